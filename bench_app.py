"""
Serving benchmark: a real `python app.py` under 1, 4, 8 and 16 concurrent gradio_client clients, one
request at a time (--batch-rows 1) against requests decoded together (--batch-rows 4 and 8; --compiled-rows:
the same with app.py --compile), in one
run, the client counts interleaved so that a noisy moment of the machine hits every server alike.

    python bench_app.py                       # GPT-2 124M (random init: speed does not depend on it)
    python bench_app.py --checkpoint logs/run-x --clients 1 4 --requests 2

Each client sends --requests requests one after the other (max tokens --new-tokens, temperature 0.7,
top-k 50, a seed of its own) and waits for each to end. Per server and client count: the aggregate
tokens/s (all tokens made over the wall time of the round), the time to a request's first token and
to its last (median and 95th percentile, from its submission), requests answered and refused, and the
server's resident memory. Writes a table under logs/.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import torch

import checkpoint
from model import GPT, GPTConfig

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--checkpoint', default=None, help='the model to serve (default: a GPT-2 124M at random init)')
parser.add_argument('--batch-rows', type=int, nargs='+', default=[1, 4, 8], help="the servers' --batch-rows")
parser.add_argument('--compiled-rows', type=int, nargs='*', default=[],
                    help="also servers started with app.py --compile, with these --batch-rows (default: none)")
parser.add_argument('--clients', type=int, nargs='+', default=[1, 4, 8, 16], help='concurrent clients')
parser.add_argument('--requests', type=int, default=2, help='requests per client, one after the other')
parser.add_argument('--new-tokens', type=int, default=50, help='max tokens per request')
parser.add_argument('--cache-idle-s', type=float, default=10,
                    help="the servers' --cache-idle-s (default: 10, shorter than app.py's to keep this run short; "
                         "the memory given back is the same). Their resident memory is taken at start, before any "
                         "request, and again this long (and 3 s) after the last round")
parser.add_argument('--out', default=os.path.join('logs', 'bench_app_cpu.md'), help='table file')
args = parser.parse_args()

from gradio_client import Client  # noqa: E402  (after the arguments: --help needs no gradio)
from gradio_client.utils import QueueError  # noqa: E402

PROMPTS = ['ROMEO:', 'JULIET:\nO Romeo, Romeo!', 'First Citizen:\n', 'KING RICHARD II:\n', 'MENENIUS:\n']


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_server(rows, compiled, model_path, log_path):
    port = free_port()
    env = {**os.environ, 'GRADIO_ANALYTICS_ENABLED': 'False'}
    proc = subprocess.Popen([sys.executable, 'app.py', '--checkpoint', model_path, '--port', str(port),
                             '--batch-rows', str(rows), *(['--compile'] if compiled else []),
                             '--cache-idle-s', str(args.cache_idle_s)], env=env,
                            stdout=open(log_path, 'w'), stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}/'
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise SystemExit(f'error: app.py did not come up: {open(log_path).read()[-2000:]}')
            time.sleep(0.5)


def memory(pid):
    """(resident, peak resident) MiB of a process."""
    with open(f'/proc/{pid}/status') as f:
        fields = dict(line.split(':', 1) for line in f)
    return int(fields['VmRSS'].split()[0]) / 1024, int(fields['VmHWM'].split()[0]) / 1024


def one_client(url, index, results):
    client = Client(url, verbose=False)
    for r in range(args.requests):
        t0, first, status = time.perf_counter(), None, None
        try:
            job = client.submit(PROMPTS[(index + r) % len(PROMPTS)], args.new_tokens, 0.7, 50, 1000 * index + r,
                                api_name='/generate')
            for _, status in job:
                if first is None:
                    first = time.perf_counter()
            done = time.perf_counter()
            n = int(status.split(' token')[0]) if status and ' token' in status else 0
            results.append(('answered', first - t0, done - t0, n))
        except QueueError:
            results.append(('refused', None, None, 0))
        except Exception as e:  # anything else is a failure of the server: the table says so
            results.append((f'failed: {type(e).__name__}', None, None, 0))


def round_of(url, n_clients):
    results = []
    threads = [threading.Thread(target=one_client, args=(url, i, results)) for i in range(n_clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float('nan')


workdir = tempfile.mkdtemp(prefix='bench-app-')
model_path = args.checkpoint
if model_path is None:
    torch.manual_seed(0)
    model_path = os.path.join(workdir, 'gpt2-124m.pt')
    checkpoint.save_model_only(GPT(GPTConfig()), model_path, torch.float32)
configs = [(rows, False) for rows in args.batch_rows] + [(rows, True) for rows in args.compiled_rows]
servers = {f'{rows}{", compiled" if compiled else ""}': start_server(rows, compiled, model_path,
                                                                   os.path.join(workdir, f'app-{rows}-{compiled}.log'))
           for rows, compiled in configs}
rows_out = []
idle = {rows: [memory(proc.pid)[0]] for rows, (proc, _) in servers.items()}  # up, no request yet
try:
    for url in (url for _, url in servers.values()):  # warm-up: one request each
        round_of(url, 1)
    for n_clients in args.clients:
        for rows, (proc, url) in servers.items():
            results, wall = round_of(url, n_clients)
            answered = [r for r in results if r[0] == 'answered']
            tokens = sum(r[3] for r in answered)
            rss, peak = memory(proc.pid)
            row = dict(rows=rows, clients=n_clients, tok_s=tokens / wall, wall=wall,
                       first_med=statistics.median(r[1] for r in answered) if answered else float('nan'),
                       first_p95=pct([r[1] for r in answered], 0.95),
                       last_med=statistics.median(r[2] for r in answered) if answered else float('nan'),
                       last_p95=pct([r[2] for r in answered], 0.95), answered=len(answered),
                       refused=sum(r[0] == 'refused' for r in results),
                       failed=sum(r[0].startswith('failed') for r in results), rss=rss, peak=peak)
            rows_out.append(row)
            print(f"rows {rows:12s} clients {n_clients:2d}: {row['tok_s']:6.1f} tok/s, first token {row['first_med']:.2f} "
                  f"/ {row['first_p95']:.2f} s, last {row['last_med']:.2f} / {row['last_p95']:.2f} s, "
                  f"{row['answered']} answered, {row['refused']} refused, {row['failed']} failed, {rss:.0f} MiB",
                  flush=True)
    time.sleep(args.cache_idle_s + 3)
    for rows, (proc, _) in servers.items():
        idle[rows].append(memory(proc.pid)[0])  # idle again, past --cache-idle-s
finally:
    for proc, _ in servers.values():
        proc.terminate()
        proc.wait(timeout=30)

try:
    commit = subprocess.run(['git', 'describe', '--always', '--dirty'], capture_output=True, text=True).stdout.strip()
except OSError:
    commit = '?'
served = model_path if args.checkpoint else 'GPT-2 124M at random init'
lines = ['# bench_app.py', '', f'command: `{" ".join(["python", "bench_app.py", *sys.argv[1:]])}`  ',
         f'commit {commit}, {os.cpu_count()} CPU cores, torch {torch.__version__}, model {served}, int8 weights; '
         f'each client sends {args.requests} requests of up to {args.new_tokens} tokens one after the other', '',
         '| batch rows | clients | aggregate tokens/s | first token: median / p95 (s) '
         '| last token: median / p95 (s) | answered | refused | failed | server RSS (MiB) '
         '| server peak RSS (MiB) |', '|---|---|---|---|---|---|---|---|---|---|']
lines += [f"| {r['rows']} | {r['clients']} | {r['tok_s']:.1f} | {r['first_med']:.2f} / {r['first_p95']:.2f} | "
          f"{r['last_med']:.2f} / {r['last_p95']:.2f} | {r['answered']} | {r['refused']} | {r['failed']} | "
          f"{r['rss']:.0f} | {r['peak']:.0f} |" for r in rows_out]
waited = f"{args.cache_idle_s + 3:g} s"
lines += ['', f'Server RSS when idle (MiB): at start, before any request / {waited} after the last round', '',
          '| batch rows | at start | after the rounds |', '|---|---|---|']
lines += [f'| {rows} | {mib[0]:.0f} | {mib[-1]:.0f} |' for rows, mib in idle.items()]
table = '\n'.join(lines) + '\n'
print('\n' + table)
os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
with open(args.out, 'w') as f:
    f.write(table)
print(f'wrote {args.out}')

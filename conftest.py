"""What the test files share: the tiny model (as train.py flags and as a GPTConfig), the step-line
pattern of train.log, a tiny checkpoint and run folder written through checkpoint.py, a tiny run
trained through train.py, a network that refuses every connection, inference.py and train.py as
processes, and `python app.py` on a free port."""
import contextlib
import functools
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

import checkpoint
import train
from checkpoint import RunState
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.abspath(__file__))
INPUT = os.path.join(ROOT, 'input.txt')

# train.py with a 2-layer, 32-wide model on 32-token windows, 4 per micro-step: a step takes tens of
# milliseconds on a CPU. No samples at the end: 300 tokens of generation would cost more than the run.
# nanoGPT's AdamW recipe in float32, so runs compare to the bit: the CPU preset and --dtype auto
# choose by timing (their own tests pin what they choose).
TINY_ARGS = ['--n-layer', '2', '--n-head', '2', '--n-embd', '32', '--block-size', '32', '--batch-size', '4',
             '--warmup-steps', '2', '--device', 'cpu', '--samples', '0', '--preset', 'gpu', '--dtype', 'float32',
             '--no-compile']
# a train.log step line: (step, loss, norm, lr) as printed
STEP_LINE = re.compile(r'step (\d+) \| loss: (\S+) \| dt: \d+\.\d\dms \| tok/sec: \d+\.\d\d \| norm: (\S+) \| lr: (\S+)')
# texts whose tokens are easy to get wrong: joined emoji, CJK, combining marks, Windows line ends, spaces
# at both ends, runs of whitespace, contractions, control and zero-width characters, <|endoftext|>, and
# spaces before punctuation (which clean_up_tokenization_spaces would drop when decoding)
ODD_TEXTS = ['👨\u200d👩\u200d👧\u200d👦 and 🏳️\u200d🌈', '日本語のテキスト、中文文本。한국어', 'e\u0301te\u0301 n\u0303o',
             'ROMEO:\r\nBut soft!\r\n', '  two spaces before, three after   ', '\n\n\t \n',
             "I'll ne'er, they're", '\x00\x07 \u200b\ufeff', 'x<|endoftext|>y <|endoftext|>\n<|endoftext|>',
             "Away , Do n't ! I 'm . ?", '', ' ']
# the model inference.py and app.py tests load: random weights, 64-token context
TINY_CONFIG = GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64)


def steps(log):
    """(step, loss, norm, lr) of every step line of a train.log text, as printed."""
    return [m.groups() for m in map(STEP_LINE.fullmatch, log.splitlines()) if m]


def tiny_checkpoint(path, seed=0, full=True, step=7):
    """A tiny random GPT saved through checkpoint.py: a training checkpoint after `step` steps
    (full=True) or a model-only file. Returns the model, in eval mode."""
    torch.manual_seed(seed)
    model = GPT(TINY_CONFIG)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    if full:
        optimizers = model.configure_optimizers(0.1, 1e-3, verbose=False)
        scaler = torch.amp.GradScaler('cpu', enabled=False)
        probe = (torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.long))
        run = RunState(step=step, tokens_seen=step * 1024, elapsed=1.5)
        checkpoint.save_training(str(path), model, optimizers, scaler, run, {'batch_size': 4}, probe,
                                 contextlib.nullcontext())
    else:
        checkpoint.save_model_only(model, str(path), torch.float32)
    return model.eval()


def write_run(run_dir, steps=30):
    """A train.py-like run folder: a tiny random ckpt.pt after `steps` steps and its metrics.jsonl
    (whole-text losses at steps 19 and 29), whose last line was cut by a kill. Returns the
    checkpoint's path."""
    path = os.path.join(run_dir, 'ckpt.pt')
    tiny_checkpoint(path, step=steps)
    with open(os.path.join(run_dir, 'metrics.jsonl'), 'w') as f:
        for step in range(steps):
            row = {'step': step, 'loss': 11.0 - 0.3 * step, 'dt_ms': 50.0, 'tok_per_sec': 5000.0 + step,
                   'norm': 2.0 / (step + 1), 'lr': 6e-4 * min(1, (step + 1) / 10), 'tokens': 512 * step}
            if step in (19, 29):  # whole-text evaluations
                row['whole_loss'] = 11.0 - 0.3 * step - 0.05
            f.write(json.dumps(row) + '\n')
        f.write('{"step": 30, "loss"')  # a run killed mid-write: skipped, not a crash
    return path


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Any attempt to reach the network fails, tiktoken's download cache is empty and the Hugging Face
    libraries are told they are offline."""
    import huggingface_hub.constants

    def refuse(*args, **kwargs):
        raise OSError('network disabled by the test')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)
    monkeypatch.setattr(socket, 'getaddrinfo', refuse)
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(tmp_path / 'empty-cache'))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)  # read at import: set it directly


def run_cli(*args, env=None):
    """`python inference.py ARGS` as its own process."""
    return subprocess.run([sys.executable, os.path.join(ROOT, 'inference.py'), *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


# ---- train.py as a process ----

def start(*argv, preexec_fn=None):
    """train.py as its own process (stdout is train.log's copy: dropped, so that no pipe fills up)."""
    return subprocess.Popen([sys.executable, 'train.py', *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)


def wait_until(condition, proc, timeout=120, poll=0.02):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            err = proc.stderr.read()[-2000:] if proc.stderr else '(stderr went to a file)'
            pytest.fail(f'train.py exited with {proc.returncode} too early: {err}')
        assert time.time() < deadline, 'timed out'
        time.sleep(poll)


def logged_steps(out):
    """Step numbers printed so far in <out>/train.log."""
    log = out / 'train.log'
    return [int(s[0]) for s in steps(log.read_text())] if log.exists() else []


def runs(log):
    """train.log cut into its runs (each starts with a 'command:' header): (first step, step lines as
    (step, loss, norm, lr) printed to the last digit). A resumed run starts at its checkpoint's step."""
    out = []
    for line in log.splitlines():
        if line.startswith('command: '):
            out.append([0, []])
        elif m := re.match(r'resumed from .* at step (\d+) ', line):
            out[-1][0] = int(m.group(1))
        elif m := STEP_LINE.fullmatch(line):
            out[-1][1].append(m.groups())
    return out


def one_line_error(proc_or_result, pattern):
    """The process failed with exactly one stderr line `error: <pattern>`, no traceback."""
    err = proc_or_result.stderr if isinstance(proc_or_result.stderr, str) else proc_or_result.stderr.read()
    assert proc_or_result.returncode == 1, err[-3000:]
    assert len(err.splitlines()) == 1 and re.fullmatch(f'error: {pattern}\n', err), err[-3000:]


@contextlib.contextmanager
def read_only(folder):
    """Make a folder unwritable for real: chmod for a normal user; root ignores permissions, so for root
    the folder is made immutable (chattr +i), which root obeys too."""
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        undo = functools.partial(os.chmod, folder, 0o755)
    else:
        r = subprocess.run(['chattr', '+i', str(folder)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f'running as root, where only chattr +i makes a folder unwritable, and it failed: {r.stderr.strip()}')
        undo = functools.partial(subprocess.run, ['chattr', '-i', str(folder)], check=True)
    try:
        yield
    finally:
        undo()


def children(pid):
    """{pid: environment} of the live child processes of pid, read from /proc."""
    found = {}
    for entry in filter(str.isdigit, os.listdir('/proc')):
        with contextlib.suppress(OSError, ValueError):  # gone meanwhile
            if int(open(f'/proc/{entry}/stat').read().rsplit(')', 1)[1].split()[1]) == pid:  # "pid (comm) state ppid"
                env = open(f'/proc/{entry}/environ', 'rb').read().decode(errors='replace').split('\0')
                found[int(entry)] = dict(kv.split('=', 1) for kv in env if '=' in kv)
    return found


@pytest.fixture(scope='session')
def text(tmp_path_factory):
    """The first ~3,000 tokens of input.txt in a private folder (its token cache lands there too)."""
    path = tmp_path_factory.mktemp('data') / 'shakespeare.txt'
    path.write_text(open(INPUT, encoding='utf-8').read()[:12_000], encoding='utf-8')
    return str(path)


@pytest.fixture(scope='session')
def trained_run(tmp_path_factory, text):
    """A train.py run folder: a tiny model, 20 steps on the first 12,000 characters of the play, with
    the three samples at the end of train.log."""
    out = tmp_path_factory.mktemp('export') / 'run'
    assert train.main([*TINY_ARGS, '--total-batch-tokens', '128', '--data', text, '--max-steps', '20',
                       '--samples', '3', '--out-dir', str(out)]) == 0
    return out


def trained_state(run_dir):
    """The RunState in a run folder's ckpt.pt: what inference.py's --export passes to export.py."""
    return checkpoint.load_training(str(run_dir / 'ckpt.pt')).run


# ---- the app ----

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    """`python app.py` on 127.0.0.1 and a free port, pointed at a tiny checkpoint by the env var:
    (its URL, the checkpoint, the file its output goes to)."""
    with app_server(tmp_path_factory.mktemp('app')) as started:
        yield started


@contextlib.contextmanager
def app_server(tmp, *args, env=None):
    """`python app.py ARGS` as the server fixture starts it, in folder tmp, with env added to the
    environment: (URL, checkpoint, log file)."""
    ckpt = write_run(str(tmp / 'run-test'))
    port = free_port()
    env = {**os.environ, 'GPT2_SHAKESPEARE_MODEL': ckpt, 'GRADIO_SERVER_NAME': '127.0.0.1',
           'GRADIO_SERVER_PORT': str(port), 'GRADIO_ANALYTICS_ENABLED': 'False', **(env or {})}
    log = open(tmp / 'app.log', 'w')
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'app.py'), *args], env=env, cwd=tmp,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}/'
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f'app.py did not come up: {(tmp / "app.log").read_text()[-2000:]}')
            time.sleep(0.5)
    yield url, ckpt, tmp / 'app.log'
    proc.terminate()
    proc.wait(timeout=30)
    log.close()

"""Faults, bad files and any text: a training run killed at any moment loses at most one checkpoint
interval and resumes to the same losses; a full or unwritable disk, a checkpoint that carries code, a
truncated or foreign file, a tampered tokenizer and odd texts each end in one clear line, never a
traceback; a dead or hung DDP process stops the run in bounded time; the app under load answers or
refuses every request. Most runs are real train.py processes killed with real signals. The slowest
tests (DDP, load) are marked `slow`: pytest.ini leaves them out; `python3 -m pytest -q -m slow` runs them."""
import contextlib
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest
import torch

import inference
import train
from model import gpt2_tokenizer
from test_app import server  # noqa: F401 -- the fixture: `python app.py` on a tiny random checkpoint

ROOT = os.path.dirname(os.path.abspath(__file__))
INPUT = os.path.join(ROOT, 'input.txt')
# a tiny model, one micro-step of 4 x 32 tokens per step: a step takes tens of milliseconds on a CPU; no
# samples at the end (300 tokens of generation would cost more than the run)
TINY = ['--n-layer', '2', '--n-head', '2', '--n-embd', '32', '--block-size', '32', '--batch-size', '4',
        '--total-batch-tokens', '128', '--warmup-steps', '2', '--lr', '1e-2', '--device', 'cpu', '--samples', '0']
STEP_LINE = re.compile(r'step (\d+) \| loss: (\S+) \| dt: .* \| norm: (\S+) \| lr: (\S+)')


@pytest.fixture(scope='module')
def text(tmp_path_factory):
    """The first ~3,000 tokens of input.txt in a private folder (its token cache lands there too)."""
    path = tmp_path_factory.mktemp('data') / 'shakespeare.txt'
    path.write_text(open(INPUT, encoding='utf-8').read()[:12_000], encoding='utf-8')
    return str(path)


@pytest.fixture(scope='module')
def checkpoint(text, tmp_path_factory):
    """A real train.py checkpoint after 2 steps (tests copy it before they spoil it)."""
    out = tmp_path_factory.mktemp('trained')
    assert train.main([*TINY, '--data', text, '--max-steps', '2', '--checkpoint-interval', '0', '--out-dir', str(out)]) == 0
    return out / 'ckpt.pt'


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
    return [int(m.group(1)) for m in map(STEP_LINE.fullmatch, log.read_text().splitlines()) if m] if log.exists() else []


def written_since(path, since_ns):
    """path exists and was written after since_ns (so it is not a stale file from an earlier run)."""
    try:
        return path.stat().st_mtime_ns > since_ns
    except FileNotFoundError:
        return False


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


def sha256(path):
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()


# ---- killed at any moment: nothing lost but the steps since the last checkpoint ----

def test_sigkill_at_random_moments_then_resume_gives_the_unbroken_run(text, tmp_path):
    """SIGKILL during steps and during checkpoint writes (ckpt.pt.tmp half written), resume each time:
    a loadable checkpoint is always there, at most K steps are lost, and every printed step, the final
    whole-text loss and metrics.jsonl are those of a run that was never killed, to the last digit.

    The schedule is fixed (step, write, step, write); which step and when inside it come from FAULT_SEED
    (default 0, printed). The first kill comes after the first checkpoint is in place, so every later
    run has one to resume from. A kill meant for a write that lands after it (a busy machine noticed the
    .tmp late) is tried again with the next write, up to WRITE_TRIES times."""
    seed = int(os.environ.get('FAULT_SEED', '0'))
    print(f'FAULT_SEED={seed}')
    rng = random.Random(seed)
    N, K, WRITE_TRIES = 45, 3, 5  # steps, checkpoint interval; N leaves room for every retry
    args = [*TINY, '--data', text, '--max-steps', str(N), '--checkpoint-interval', str(K)]
    assert train.main([*args, '--out-dir', str(tmp_path / 'straight')]) == 0
    straight = runs((tmp_path / 'straight' / 'train.log').read_text())[0][1]
    out = tmp_path / 'killed'
    ckpt, tmp, log_path = out / 'ckpt.pt', out / 'ckpt.pt.tmp', out / 'train.log'
    resume = ['--resume', str(ckpt)]

    def kill_one_run(moment, target=None):
        """Start (or resume) the run, SIGKILL it at the moment; True if it died with a half-written .tmp."""
        n_runs = len(runs(log_path.read_text())) if log_path.exists() else 0
        spawned = time.time_ns()
        p = start(*(resume if ckpt.exists() else [*args, '--out-dir', str(out)]))
        if moment == 'step':  # when the target step is printed, at a random moment inside the next one
            wait_until(lambda: log_path.exists() and len(runs(log_path.read_text())) > n_runs and
                       any(int(s[0]) == target for s in runs(log_path.read_text())[n_runs][1]), p)
            time.sleep(rng.uniform(0, 0.2))
        else:  # while this process writes a checkpoint (a stale .tmp from an earlier kill is older)
            wait_until(lambda: written_since(tmp, spawned), p, poll=0.0005)
        p.kill()
        p.wait()
        printed = logged_steps(out)
        assert ckpt.exists(), f'seed {seed}: no checkpoint after step {max(printed)}'
        step = train.load_checkpoint(str(ckpt))['step']  # loadable, whole
        assert max(printed) + 1 - step <= K, f'seed {seed}: steps up to {max(printed)} printed, checkpoint at {step}'
        return tmp.exists()

    in_writes = 0
    for moment in ['step', 'write', 'step', 'write']:
        if moment == 'step':
            saved = train.load_checkpoint(str(ckpt))['step'] if ckpt.exists() else 0
            kill_one_run('step', target=rng.randint(saved + K, saved + 2 * K))  # step K: checkpoint K is in place
        else:
            tries = 1
            while not kill_one_run('write'):
                assert tries < WRITE_TRIES, f'seed {seed}: {WRITE_TRIES} kills all missed the checkpoint write'
                tries += 1
            in_writes += 1
    assert in_writes == 2
    p = start(*resume)
    assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    assert not tmp.exists()  # the resumed run's saves went through the stale file

    # every step printed by every run equals the unbroken run's; the last print of each step makes the run
    log = (out / 'train.log').read_text()
    assert log.count('resumed from') >= 2
    effective = []
    for first, lines in runs(log):
        assert [int(s[0]) for s in lines] == list(range(first, first + len(lines)))
        assert lines == straight[first:first + len(lines)], f'seed {seed}'
        assert len(effective) >= first
        effective = effective[:first] + lines
    assert effective == straight
    final = re.compile(rf'target NOT reached at step {N - 1} \| tokens seen: {N * 128:,} .* whole-text loss: (\S+) ')
    assert final.search(log).group(1) == final.search((tmp_path / 'straight' / 'train.log').read_text()).group(1)
    # metrics.jsonl keeps one row per step: the rows a killed run wrote past its checkpoint were dropped
    rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    want = [json.loads(line) for line in (tmp_path / 'straight' / 'metrics.jsonl').read_text().splitlines()]
    assert [(r['step'], r['loss'], r['norm']) for r in rows] == [(r['step'], r['loss'], r['norm']) for r in want]


def test_sigint_during_a_checkpoint_write_saves_and_exits_130(text, tmp_path):
    """Ctrl-C while ckpt.pt.tmp is being written: the write completes, the run stops after the next
    step with a checkpoint of it, and exits 128 + SIGINT."""
    out = tmp_path / 'run'
    spawned = time.time_ns()
    p = start(*TINY, '--data', text, '--max-steps', '100000', '--checkpoint-interval', '1', '--out-dir', str(out))
    tmp = out / 'ckpt.pt.tmp'
    wait_until(lambda: written_since(tmp, spawned), p, poll=0.0005)
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=120) == 128 + signal.SIGINT, p.stderr.read()[-3000:]
    last = logged_steps(out)[-1]
    assert f'stopped by a signal after step {last}; checkpoint: ' in (out / 'train.log').read_text()
    assert train.load_checkpoint(str(out / 'ckpt.pt'))['step'] == last + 1 and not tmp.exists()


# ---- a full disk, an out-dir that turns read-only ----

@contextlib.contextmanager
def read_only(folder):
    """Make a folder unwritable for real: chmod for a normal user; root ignores permissions, so for root
    the folder is made immutable (chattr +i), which root obeys too."""
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        undo = lambda: os.chmod(folder, 0o755)
    else:
        r = subprocess.run(['chattr', '+i', str(folder)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f'running as root, where only chattr +i makes a folder unwritable, and it failed: {r.stderr.strip()}')
        undo = lambda: subprocess.run(['chattr', '-i', str(folder)], check=True)
    try:
        yield
    finally:
        undo()


def test_file_size_limit_during_a_checkpoint_write_keeps_the_previous_one(checkpoint, tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the checkpoint's writes (EFBIG), as a full disk would."""
    shutil.copytree(checkpoint.parent, tmp_path / 'run')
    ckpt = tmp_path / 'run' / 'ckpt.pt'
    before = sha256(ckpt)

    def limit():  # in the child: files may not grow past 1 MB; the checkpoint is ~20 MB
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that write() fails instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    p = start('--resume', str(ckpt), '--max-steps', '4', '--checkpoint-interval', '1', preexec_fn=limit)
    p.wait(timeout=300)
    one_line_error(p, re.escape(f'cannot write the checkpoint {ckpt} (File too large); the previous checkpoint is left as it was'))
    assert sha256(ckpt) == before and not (tmp_path / 'run' / 'ckpt.pt.tmp').exists()


def test_full_disk_during_a_checkpoint_write_keeps_the_previous_one(text, tmp_path):
    """A real full filesystem: the out-dir on a 30 MB tmpfs holds one ~20 MB checkpoint and the logs,
    not the next one's .tmp beside it (needs mount rights; skipped without them)."""
    disk = tmp_path / 'disk'
    disk.mkdir()
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=30m', 'tmpfs', str(disk)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f'cannot mount a small tmpfs here: {r.stderr.strip()}')
    try:
        out = disk / 'run'
        p = start(*TINY, '--data', text, '--max-steps', '20', '--checkpoint-interval', '2', '--out-dir', str(out))
        p.wait(timeout=300)
        one_line_error(p, re.escape(f'cannot write the checkpoint {out / "ckpt.pt"} (No space left on device); '
                                    f'the previous checkpoint is left as it was'))
        assert train.load_checkpoint(str(out / 'ckpt.pt'))['step'] == 2 and not (out / 'ckpt.pt.tmp').exists()
    finally:
        subprocess.run(['umount', str(disk)], check=True)


def test_out_dir_turned_read_only_during_a_run_keeps_the_checkpoint(text, tmp_path):
    out = tmp_path / 'run'
    p = start(*TINY, '--data', text, '--max-steps', '100000', '--checkpoint-interval', '3', '--out-dir', str(out))
    wait_until(lambda: (out / 'ckpt.pt').exists() and not (out / 'ckpt.pt.tmp').exists(), p, poll=0.001)
    with read_only(out):
        before = sha256(out / 'ckpt.pt')
        p.wait(timeout=300)
        one_line_error(p, re.escape(f'cannot write the checkpoint {out / "ckpt.pt"} (') + '(Permission denied|Operation not '
                       r'permitted)\); the previous checkpoint is left as it was')
        assert sha256(out / 'ckpt.pt') == before
        with pytest.raises(train.TrainError, match=r'cannot write to the out-dir .* \((Permission denied|Operation not permitted)\)'):
            train.main(['--resume', str(out / 'ckpt.pt')])  # a new run fails at once, not at its first checkpoint
    step = train.load_checkpoint(str(out / 'ckpt.pt'))['step']
    assert train.main(['--resume', str(out / 'ckpt.pt'), '--max-steps', str(step + 1)]) == 0  # writable again: it goes on


# ---- untrusted files ----

class RunsCode:
    """Unpickling this object runs code: it writes the marker file."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f'open({self.marker!r}, "w").write("code ran")',)


def test_checkpoint_carrying_code_is_refused_before_it_runs(checkpoint, tmp_path):
    marker = tmp_path / 'code-ran'
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt['config'] = RunsCode(marker)
    evil = tmp_path / 'evil.pt'
    torch.save(ckpt, evil)
    r = subprocess.run([sys.executable, 'train.py', '--resume', str(evil)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    one_line_error(r, re.escape(f'--resume: {evil} refused: it holds pickled objects other than tensors and plain '
                                f'containers (exec), which could run code when loaded'))
    r = subprocess.run([sys.executable, 'inference.py', '--checkpoint', str(evil), '--max-new-tokens', '1'], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and 'refused' in r.stderr, r.stderr[-3000:]
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the file really carries code: loaded without the guard, it runs
    assert marker.read_text() == 'code ran'


def foreign_files(checkpoint, folder):
    """A truncated checkpoint (two ways), and files that are no checkpoint at all."""
    data = checkpoint.read_bytes()
    files = {'truncated.pt': data[:len(data) // 2], 'header-only.pt': data[:100], 'empty.pt': b''}
    for name, content in files.items():
        (folder / name).write_bytes(content)
    with zipfile.ZipFile(folder / 'archive.zip', 'w') as z:
        z.writestr('notes.txt', 'not a checkpoint')
    np.save(folder / 'array.npy', np.arange(10.0))
    return [folder / name for name in [*files, 'archive.zip', 'array.npy']]


def test_truncated_or_foreign_files_get_a_clear_error(checkpoint, tmp_path):
    for path in foreign_files(checkpoint, tmp_path):
        with pytest.raises(train.TrainError, match=re.escape(f'--resume: {path} is not a readable checkpoint (')):
            train.main(['--resume', str(path)])
        with pytest.raises(inference.CheckpointError, match=re.escape(f'{path}: not a readable PyTorch file (')):
            inference.load_model(str(path))
    r = subprocess.run([sys.executable, 'train.py', '--resume', str(tmp_path / 'truncated.pt')], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    one_line_error(r, re.escape(f'--resume: {tmp_path / "truncated.pt"} is not a readable checkpoint (RuntimeError)'))


def test_tampered_tokenizer_ranks_file_is_refused(tmp_path):
    """Two tokens' ranks swapped: the tokenizer would still run, with wrong ids; the sha256 check stops it,
    in model.gpt2_tokenizer and in train.py run from a copy of the repository holding that file."""
    lines = open(os.path.join(ROOT, 'gpt2.tiktoken'), 'rb').read().splitlines()
    (a, ra), (b, rb) = lines[1000].split(), lines[1001].split()
    lines[1000], lines[1001] = a + b' ' + rb, b + b' ' + ra
    repo = tmp_path / 'repo'
    repo.mkdir()
    for name in ('train.py', 'model.py'):
        shutil.copy(os.path.join(ROOT, name), repo)
    (repo / 'gpt2.tiktoken').write_bytes(b'\n'.join(lines) + b'\n')
    with pytest.raises(ValueError, match='is not the GPT-2 ranks file'):
        gpt2_tokenizer(str(repo / 'gpt2.tiktoken'))
    (repo / 'text.txt').write_text('To be, or not to be: that is the question.\n' * 20)
    r = subprocess.run([sys.executable, 'train.py', '--data', 'text.txt'], cwd=repo, capture_output=True, text=True, timeout=120)
    one_line_error(r, re.escape(f'cannot load the GPT-2 tokenizer: {repo / "gpt2.tiktoken"} is not the GPT-2 ranks file '
                                f'(sha256 mismatch); restore it from the repository'))
    assert not list(repo.glob('text.gpt2-*.bin'))  # and nothing was cached from it


# ---- any text: it trains, or one line says why not ----

def test_non_latin_scripts_and_emoji_train_and_round_trip(tmp_path):
    """Scripts, emoji with skin tones and ZWJ sequences, combining marks, with a BOM and CRLF line ends,
    tokenized in small pieces: the ids decode to the exact text, and a model trains on them."""
    lines = ['Привет, мир! Съешь же ещё этих мягких французских булок.', 'こんにちは世界。吾輩は猫である。',
             'مرحبا بالعالم، هذا نص عربي.', 'नमस्ते दुनिया, यह हिंदी है।', '👋🏽 hello 👩‍👩‍👧‍👦 family 🇫🇷 flag ❤️‍🔥',
             'e\u0301 a\u0308 Z\u0351\u0325alg\u0300o', '한국어 텍스트와 ελληνικά και עברית']
    body = '\n'.join(lines * 20) + '\n'
    path = tmp_path / 'world.txt'
    path.write_bytes(b'\xef\xbb\xbf' + body.replace('\n', '\r\n').encode('utf-8'))
    tokens = train.load_tokens(str(path), piece_chars=300)
    assert gpt2_tokenizer().decode(tokens.tolist()) == body and len(tokens) > 33
    out = tmp_path / 'run'
    assert train.main([*TINY, '--data', str(path), '--max-steps', '3', '--out-dir', str(out)]) == 0
    assert len(logged_steps(out)) == 3


@pytest.mark.parametrize('name, content, message', [
    ('spaces.txt', b' \n\t\r\n    \n\n  ', r'the text of .* has \d+ tokens, fewer than one sequence'),
    ('notes.txt.gz', b'\x1f\x8b\x08\x00' + bytes(range(256)) * 4, r'is not UTF-8 text \(byte 0x8b'),
    ('odd.bin', b'\x01\x02\x03', r'is not a file of uint16 token ids \(odd size\)'),
    ('random.bin', np.arange(60_000, 60_100, dtype=np.uint16).tobytes(), r'holds ids >= 50257: not GPT-2 tokens'),
    ('folder', None, r'data file .*folder is a directory; give a text file or a .bin of token ids'),
])
def test_odd_data_files_get_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.mkdir() if content is None else path.write_bytes(content)
    with pytest.raises(train.TrainError, match=message):
        train.main([*TINY, '--data', str(path), '--max-steps', '1', '--out-dir', str(tmp_path / 'run')])


def test_text_of_nul_bytes_trains(tmp_path):
    """Binary-looking but valid UTF-8 (NUL is a character): it is text, so it trains."""
    path = tmp_path / 'zeros.txt'
    path.write_bytes(b'\x00 \x00\n' * 400)
    assert train.main([*TINY, '--data', str(path), '--max-steps', '2', '--out-dir', str(tmp_path / 'run')]) == 0


def watch_memory(proc, until):
    """Peak anonymous memory (RssAnon: not the memmap's file pages, which the kernel can drop) of a
    running process in bytes, polled until until() or the process ends."""
    peak = 0
    while proc.poll() is None and not until():
        with contextlib.suppress(OSError, ValueError, StopIteration):
            status = open(f'/proc/{proc.pid}/status').read().splitlines()
            peak = max(peak, int(next(s for s in status if s.startswith('RssAnon:')).split()[1]) * 1024)
        time.sleep(0.01)
    return peak


def test_token_file_larger_than_the_memory_allowed_trains_through_the_memmap(tmp_path):
    """A 1 GiB .bin (512M tokens: real ones, then a sparse tail of token 0, so the disk holds little)
    trains with the process's data memory capped at 768 MiB by RLIMIT_DATA: loading the ids into
    memory (2 bytes each as uint16, 16 as int64 inputs and targets) would fail, the memmap does not."""
    big = tmp_path / 'big.bin'
    ids = np.asarray(gpt2_tokenizer().encode_ordinary(open(INPUT, encoding='utf-8').read()[:100_000]), dtype=np.uint16)
    ids.tofile(big)
    with open(big, 'r+b') as f:
        f.truncate(1 << 30)

    def cap():
        resource.setrlimit(resource.RLIMIT_DATA, (768 << 20, 768 << 20))
    out = tmp_path / 'run'
    p = start(*TINY, '--data', str(big), '--max-steps', '100000', '--checkpoint-interval', '0', '--out-dir', str(out),
              preexec_fn=cap)
    peak = watch_memory(p, lambda: 2 in logged_steps(out))
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 128 + signal.SIGTERM, p.stderr.read()[-3000:]
    assert '536,870,912 training tokens' in (out / 'train.log').read_text()
    assert peak < 768 << 20, peak
    assert train.load_checkpoint(str(out / 'ckpt.pt'))['step'] >= 3


# ---- DDP faults ----
# 2 processes under torchrun on the CPU (Gloo), one micro-step of 4 x 32 tokens each
DDP = [*TINY, '--data-tokens', '3000', '--total-batch-tokens', '256', '--lr-decay-steps', '20']


def children(pid):
    """{pid: environment} of the live child processes of pid, read from /proc."""
    found = {}
    for entry in filter(str.isdigit, os.listdir('/proc')):
        with contextlib.suppress(OSError, ValueError):  # gone meanwhile
            if int(open(f'/proc/{entry}/stat').read().rsplit(')', 1)[1].split()[1]) == pid:  # "pid (comm) state ppid"
                env = open(f'/proc/{entry}/environ', 'rb').read().decode(errors='replace').split('\0')
                found[int(entry)] = dict(kv.split('=', 1) for kv in env if '=' in kv)
    return found


def alive(pid):
    """pid runs (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        return open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


@contextlib.contextmanager
def torchrun(stderr_path, *argv):
    """train.py under `torchrun --standalone --nproc_per_node 2` (as test_train.py runs it), stderr to a file
    (a worker that outlived torchrun would hold a pipe open). Yields (torchrun, ranks: {rank: pid}, filled
    once both workers run); whatever still runs at the end is killed."""
    p = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                          'train.py', *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=open(stderr_path, 'w'), text=True)
    ranks = {}
    try:
        yield p, ranks
    finally:
        for pid in [*ranks.values(), p.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        p.wait()


def find_ranks(p, ranks, timeout=120):
    """Fill ranks with the pids of torchrun's two workers, told apart by the RANK torchrun gives them."""
    deadline = time.time() + timeout
    while len(ranks) < 2:
        ranks.update({int(env['RANK']): pid for pid, env in children(p.pid).items() if 'RANK' in env})
        assert p.poll() is None and time.time() < deadline, 'torchrun ended or its workers did not start'
        time.sleep(0.05)


def stops_in_time(p, ranks, limit):
    """torchrun exits non-zero within limit seconds and leaves no worker behind; returns the seconds it took."""
    t0 = time.time()
    try:
        rc = p.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f'torchrun still runs {limit} s after the fault')
    took = time.time() - t0
    assert rc != 0
    deadline = time.time() + 10
    while any(map(alive, ranks.values())):  # torchrun tore its workers down, it did not orphan them
        assert time.time() < deadline, f'workers {[pid for pid in ranks.values() if alive(pid)]} outlived torchrun'
        time.sleep(0.05)
    return took


@pytest.fixture(scope='module')
def ddp_straight(text, tmp_path_factory):
    """An unbroken 2-process run of 20 steps: what a killed and resumed one must print."""
    out = tmp_path_factory.mktemp('ddp') / 'straight'
    with torchrun(out.parent / 'straight.err', *DDP, '--data', text, '--max-steps', '20', '--out-dir', str(out)) as (p, _):
        assert p.wait(timeout=300) == 0, (out.parent / 'straight.err').read_text()[-3000:]
    return out / 'train.log'


@pytest.mark.slow
@pytest.mark.parametrize('rank', [0, 1])
def test_ddp_process_killed_stops_the_run_and_it_resumes(text, tmp_path, ddp_straight, rank):
    """SIGKILL one of two processes mid-run: the other's all-reduce fails at once (its peer's socket
    closes), torchrun ends the run with a non-zero status in seconds and leaves no process behind;
    `torchrun ... --resume` goes on from the last checkpoint, printing what the unbroken run printed."""
    N, K = 20, 3  # steps, checkpoint interval
    out = tmp_path / 'run'
    argv = [*DDP, '--data', text, '--max-steps', '100000', '--checkpoint-interval', str(K), '--out-dir', str(out)]
    with torchrun(tmp_path / 'killed.err', *argv) as (p, ranks):
        find_ranks(p, ranks)
        wait_until(lambda: max(logged_steps(out), default=-1) >= 7, p)
        os.kill(ranks[rank], signal.SIGKILL)
        took = stops_in_time(p, ranks, limit=60)
    printed = logged_steps(out)
    step = train.load_checkpoint(str(out / 'ckpt.pt'))['step']
    assert step >= 6 and max(printed) + 1 - step <= K
    # the process left standing says why in one line, no traceback (unless torchrun's SIGTERM beat its failed
    # collective); torchrun's own report of the failure follows
    err = (tmp_path / 'killed.err').read_text()
    assert 'train.py", line' not in err, err[-3000:]
    assert all(line.startswith('error: another process of this run died or hung (')
               for line in err.splitlines() if line.startswith('error:')), err[-3000:]
    print(f'rank {rank} killed after step {max(printed)}: torchrun exited {p.returncode} after {took:.1f} s; '
          f'checkpoint at step {step}')

    with torchrun(tmp_path / 'resumed.err', '--resume', str(out / 'ckpt.pt'), '--max-steps', str(N)) as (p, _):
        assert p.wait(timeout=300) == 0, (tmp_path / 'resumed.err').read_text()[-3000:]
    log = (out / 'train.log').read_text()
    (first, lines), straight = runs(log)[-1], runs(ddp_straight.read_text())[0][1]
    assert first == step and [int(s[0]) for s in lines] == list(range(step, N))
    assert lines == straight[step:]
    final = re.compile(r'target NOT reached at step 19 \| .* whole-text loss: (\S+) ')
    assert final.search(log).group(1) == final.search(ddp_straight.read_text()).group(1)


@pytest.mark.slow
def test_ddp_process_stopped_fails_the_run_after_the_ddp_timeout(text, tmp_path):
    """SIGSTOP one process: it keeps its sockets open, so no death is seen; the other waits in its
    all-reduce for --ddp-timeout (Gloo honours it), fails, and torchrun ends the run. A stopped process
    does not act on torchrun's SIGTERM: torchrun SIGKILLs it 30 s later (torch 2.13 tears a failed
    group down with a fixed 30 s grace; its --shutdown-timeout only applies when torchrun itself is
    signalled). So the run ends --ddp-timeout + ~30 s after the stop, not never."""
    timeout = 10
    out = tmp_path / 'run'
    argv = [*DDP, '--data', text, '--max-steps', '100000', '--checkpoint-interval', '0', '--ddp-timeout', str(timeout),
            '--out-dir', str(out)]
    with torchrun(tmp_path / 'stopped.err', *argv) as (p, ranks):
        find_ranks(p, ranks)
        wait_until(lambda: max(logged_steps(out), default=-1) >= 3, p)
        os.kill(ranks[1], signal.SIGSTOP)
        stopped_after = max(logged_steps(out))
        took = stops_in_time(p, ranks, limit=60)
    err = (tmp_path / 'stopped.err').read_text()
    assert f'error: another process of this run died or hung (Timed out waiting {timeout * 1000}ms' in err, err[-3000:]
    assert timeout <= took < 60 and max(logged_steps(out)) <= stopped_after + 1
    print(f'rank 1 stopped after step {stopped_after}: torchrun exited {p.returncode} after {took:.1f} s')


# ---- the app under load ----

def vm_rss(pid):
    """Resident memory of a process in bytes (VmRSS in /proc/<pid>/status)."""
    line = next(s for s in open(f'/proc/{pid}/status').read().splitlines() if s.startswith('VmRSS:'))
    return int(line.split()[1]) * 1024


def load_requests(rng, max_new_tokens, max_prompt_chars):
    """One request as a browser or a script might send it: (kind, its arguments, the refusal it earns or
    None). Good ones are short, so that a full queue drains in seconds even on a busy 2-core machine."""
    kind = rng.choice(['good'] * 5 + ['huge prompt', 'negative tokens', 'huge max tokens', 'temperature 5'])
    n, seed = rng.randint(1, 12), rng.randint(0, 1000)
    if kind == 'huge prompt':  # 100,000 characters; the server keeps the last max_prompt_chars
        tail = ('To be, or not to be: that is the question. ' * 100)[:max_prompt_chars]
        return kind, ('x' * (100_000 - len(tail)) + tail, n, 0.7, 50, seed), None
    if kind == 'negative tokens':
        return kind, ('ROMEO:', -5, 0.7, 50, seed), 'Value -5 is less than minimum value 1.'
    if kind == 'huge max tokens':
        return kind, ('ROMEO:', 10 ** 6, 0.7, 50, seed), f'Value 1000000 is greater than maximum value {max_new_tokens}.'
    if kind == 'temperature 5':
        return kind, ('ROMEO:', n, 5.0, 50, seed), 'Value 5.0 is greater than maximum value 1.'
    return kind, (rng.choice(['ROMEO:', 'JULIET:\nO Romeo', '', 'First Citizen:']), n, 0.7, 50, seed), None


@pytest.mark.slow
def test_app_under_load_answers_or_refuses_every_request(server, monkeypatch):  # noqa: F811 -- the fixture imported above
    """32 clients send requests for 40 s, a third of them bad (negative or 10**6 max tokens, temperature
    5) or huge (a 100,000-character prompt), to `python app.py` (one generation at a time, a queue of
    QUEUE_SIZE). Every request is answered, or refused at once because the queue is full, or refused
    with the parameter's own message: none waits past REQUEST_LIMIT. The caps hold (10**6 max tokens is
    refused or capped, the prompt is cropped), the server's memory does not grow, and afterwards a fresh request
    is answered in seconds: no worker is stuck. LOAD_REPORT=path keeps the summary line."""
    monkeypatch.setenv('GRADIO_ANALYTICS_ENABLED', 'False')  # 33 clients, none of them calling home
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError
    import app
    CLIENTS, LOAD_SECONDS, REQUEST_LIMIT = 32, 40, 120
    url, _ = server
    port = url.rstrip('/').rsplit(':', 1)[1]
    pid = next(pid for pid, env in children(os.getpid()).items() if env.get('GRADIO_SERVER_PORT') == port)
    seed = int(os.environ.get('FAULT_SEED', time.time_ns() % 100_000))
    rng = random.Random(seed)

    # warm-up: 20 requests of all kinds, one after the other; the memory after them is the baseline
    warm_client = Client(url, verbose=False)
    for _ in range(20):
        with contextlib.suppress(AppError):
            warm_client.predict(*load_requests(rng, app.MAX_NEW_TOKENS, app.MAX_PROMPT_CHARS)[1], api_name='/generate')
    warm = vm_rss(pid)

    clients = [Client(url, verbose=False) for _ in range(CLIENTS)]
    outcomes = []  # (kind, outcome, seconds, detail)
    until = time.time() + LOAD_SECONDS

    def send(client, rng):
        while time.time() < until:
            kind, args, refusal = load_requests(rng, app.MAX_NEW_TOKENS, app.MAX_PROMPT_CHARS)
            t0 = time.time()
            try:
                text, status = client.submit(*args, api_name='/generate').result(timeout=REQUEST_LIMIT)
            except QueueError as e:
                outcomes.append((kind, 'refused-full', time.time() - t0, str(e)))
                time.sleep(rng.uniform(0.1, 0.5))  # a polite client waits a little before it tries again
                continue
            except AppError as e:
                ok = refusal is not None and str(e) == refusal
                outcomes.append((kind, 'refused-invalid' if ok else 'wrong', time.time() - t0, str(e)))
                continue
            except Exception as e:  # a timeout, a dropped connection: each one a failure
                outcomes.append((kind, 'failed', time.time() - t0, f'{type(e).__name__}: {e}'))
                continue
            # answered: the server's caps held (10**6 max tokens may be capped instead of refused)
            n, note = min(args[1], app.MAX_NEW_TOKENS), {
                'huge prompt': f'seed text cropped to its last {app.MAX_PROMPT_CHARS} characters',
                'huge max tokens': f'max tokens capped at {app.MAX_NEW_TOKENS}'}.get(kind, '')
            ok = (refusal is None or kind == 'huge max tokens') and text.startswith(args[0][-app.MAX_PROMPT_CHARS:]) \
                and status.startswith(f'{n} tokens in ') and note in status
            outcomes.append((kind, 'answered' if ok else 'wrong', time.time() - t0, f'{status} | {text[:80]!r}'))

    threads = [threading.Thread(target=send, args=(c, random.Random(rng.random())), daemon=True) for c in clients]
    for t in threads:
        t.start()
    peak = warm
    while any(t.is_alive() for t in threads) and time.time() < until + REQUEST_LIMIT + 10:
        peak = max(peak, vm_rss(pid))
        time.sleep(0.5)
    stuck = sum(t.is_alive() for t in threads)
    after = vm_rss(pid)
    t0 = time.time()
    text, status = Client(url, verbose=False).predict('ROMEO:', 5, 0.7, 50, 1, api_name='/generate')
    fresh = time.time() - t0

    count = {k: sum(o[1] == k for o in outcomes) for k in ('answered', 'refused-full', 'refused-invalid', 'wrong', 'failed')}
    summary = (f'app under load: {len(outcomes)} requests from {CLIENTS} clients in {LOAD_SECONDS} s (seed {seed}): '
               f'{count["answered"]} answered, {count["refused-full"]} refused (queue full), {count["refused-invalid"]} '
               f'refused (invalid parameters), {count["wrong"] + count["failed"]} other; longest request '
               f'{max(o[2] for o in outcomes):.1f} s; a fresh request after the load: {fresh:.1f} s; server RSS '
               f'{warm / 2**20:.0f} MiB after warm-up, {peak / 2**20:.0f} MiB peak, {after / 2**20:.0f} MiB after')
    print(summary)
    if os.environ.get('LOAD_REPORT'):
        with open(os.environ['LOAD_REPORT'], 'a') as f:
            f.write(summary + '\n')
    assert not stuck, f'{stuck} clients still wait {REQUEST_LIMIT} s after the load'
    assert not count['wrong'] + count['failed'], [o for o in outcomes if o[1] in ('wrong', 'failed')][:5]
    assert count['answered'] and count['refused-full'] and count['refused-invalid']  # the load filled the queue
    assert {o[3] for o in outcomes if o[1] == 'refused-full'} == {'Queue is full! Please try again.'}
    assert len({o[0] for o in outcomes if o[1] != 'refused-full'}) == 5  # each kind got past the queue and was judged
    assert status.startswith('5 tokens in ') and fresh < 15
    assert after < min(1.5 * warm, warm + (300 << 20)), summary

"""Faults, bad files and any text: a training run killed at any moment loses at most one checkpoint
interval and resumes to the same losses; a full or unwritable disk, a checkpoint that carries code, a
truncated or foreign file, a tampered tokenizer and odd texts each end in one clear line, never a
traceback. Most runs are real train.py processes killed with real signals. The DDP faults are in
test_faults_ddp.py, the app under load in test_app.py."""
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
import time
import zipfile

import numpy as np
import pytest
import torch

import checkpoint
import generation
import train
from conftest import INPUT, ROOT, TINY_ARGS, logged_steps, one_line_error, read_only, runs, start, wait_until
from data import gpt2_tokenizer, load_tokens

# one micro-step of 4 x 32 tokens per step
TINY = [*TINY_ARGS, '--total-batch-tokens', '128', '--lr', '1e-2']


@pytest.fixture(scope='module')
def trained(text, tmp_path_factory):
    """A real train.py checkpoint after 2 steps (tests copy it before they spoil it)."""
    out = tmp_path_factory.mktemp('trained')
    assert train.main([*TINY, '--data', text, '--max-steps', '2', '--checkpoint-interval', '0', '--out-dir', str(out)]) == 0
    return out / 'ckpt.pt'


def saved_step(path):
    """The step of the (whole, loadable) training checkpoint at path."""
    return checkpoint.load_training(str(path)).run.step


def written_since(path, since_ns):
    """path exists and was written after since_ns (so it is not a stale file from an earlier run)."""
    try:
        return path.stat().st_mtime_ns > since_ns
    except FileNotFoundError:
        return False


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
        step = saved_step(ckpt)  # loadable, whole
        assert max(printed) + 1 - step <= K, f'seed {seed}: steps up to {max(printed)} printed, checkpoint at {step}'
        return tmp.exists()

    in_writes = 0
    for moment in ['step', 'write', 'step', 'write']:
        if moment == 'step':
            saved = saved_step(ckpt) if ckpt.exists() else 0
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
    final = re.compile(rf'target NOT reached at step {N - 1} \({N} steps\) \| tokens seen: ([\d,]+) .* '
                       r'whole-text loss: (\S+) ')
    assert final.search(log).groups() == final.search((tmp_path / 'straight' / 'train.log').read_text()).groups()
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
    # stopped within the step after the write, or right after it: the checkpoint holds the steps done
    assert re.search(rf'stopped by a signal (during step {last + 1}|after step {last}); checkpoint after '
                     rf'{last + 1} steps: ', (out / 'train.log').read_text())
    assert saved_step(out / 'ckpt.pt') == last + 1 and not tmp.exists()


# ---- a full disk, an out-dir that turns read-only ----

def test_file_size_limit_during_a_checkpoint_write_keeps_the_previous_one(trained, tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the checkpoint's writes (EFBIG), as a full disk would."""
    shutil.copytree(trained.parent, tmp_path / 'run')
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
        assert saved_step(out / 'ckpt.pt') == 2 and not (out / 'ckpt.pt.tmp').exists()
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
    step = saved_step(out / 'ckpt.pt')
    assert train.main(['--resume', str(out / 'ckpt.pt'), '--max-steps', str(step + 1)]) == 0  # writable again: it goes on


# ---- untrusted files ----

class RunsCode:
    """Unpickling this object runs code: it writes the marker file."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f'open({self.marker!r}, "w").write("code ran")',)


def test_checkpoint_carrying_code_is_refused_before_it_runs(trained, tmp_path):
    marker = tmp_path / 'code-ran'
    ckpt = torch.load(trained, weights_only=True)
    ckpt['notes'] = RunsCode(marker)  # a whole, real checkpoint with one more entry
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


def foreign_files(trained, folder):
    """A truncated checkpoint (two ways), and files that are no checkpoint at all."""
    data = trained.read_bytes()
    files = {'truncated.pt': data[:len(data) // 2], 'header-only.pt': data[:100], 'empty.pt': b''}
    for name, content in files.items():
        (folder / name).write_bytes(content)
    with zipfile.ZipFile(folder / 'archive.zip', 'w') as z:
        z.writestr('notes.txt', 'not a checkpoint')
    np.save(folder / 'array.npy', np.arange(10.0))
    return [folder / name for name in [*files, 'archive.zip', 'array.npy']]


def test_truncated_or_foreign_files_get_a_clear_error(trained, tmp_path):
    for path in foreign_files(trained, tmp_path):
        with pytest.raises(train.TrainError, match=re.escape(f'--resume: {path} is not a readable checkpoint (')):
            train.main(['--resume', str(path)])
        with pytest.raises(generation.CheckpointError, match=re.escape(f'{path} is not a readable checkpoint (')):
            generation.load_model(str(path))
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
    for name in ('train.py', 'model.py', 'data.py', 'checkpoint.py', 'runtime.py'):
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
    tokens = load_tokens(str(path), piece_chars=300)
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
    assert saved_step(out / 'ckpt.pt') >= 3

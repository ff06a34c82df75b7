"""train.py on the CPU, through its own code path: tokenizing, reaching the target on a slice of
input.txt, exact resume, 2-process torchrun, signals, and a clear one-line error for each bad input.
Runs call train.main(argv) in this process (no second torch import) unless the test is about the
command line itself."""
import contextlib
import hashlib
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checkpoint
import data as data_module
import runtime
import train
from conftest import INPUT, ROOT, TINY_ARGS, steps
from model import GPT, GPTConfig

TINY = [*TINY_ARGS, '--total-batch-tokens', '256', '--checkpoint-interval', '0']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """A private copy of input.txt, so the token cache lands in a temporary folder."""
    path = tmp_path_factory.mktemp('data') / 'input.txt'
    shutil.copy(INPUT, path)
    return str(path)


def run(out_dir, *argv):
    """train.py with TINY settings; returns (exit status, train.log text)."""
    rc = train.main([*TINY, '--out-dir', str(out_dir), *argv])
    return rc, (out_dir / 'train.log').read_text()


# ---- data ----

@pytest.mark.parametrize('on_device', [True, False])
def test_windows_make_every_token_but_the_first_a_target_once(monkeypatch, on_device):
    monkeypatch.setattr(data_module, 'ON_DEVICE_BYTES', 1 << 30 if on_device else 0)  # device tensors or the memmap path
    tokens = np.arange(100, dtype=np.uint16)
    w = data_module.Windows(tokens, 16, 'cpu')  # 99 targets: 6 full windows and one of 3
    assert w.n == 7 and w.on_device == on_device
    x, y = w.get(5, 4, wrap=False)  # windows 5, 6 and two past the end, which count for nothing
    assert x[0].tolist() == list(range(80, 96)) and y[0].tolist() == list(range(81, 97))
    assert y[1].tolist() == [97, 98, 99] + [-1] * 13 and (y[2:] == -1).all()
    targets = torch.cat([w.get(i, 1, wrap=False)[1].flatten() for i in range(w.n)])
    assert targets[targets != -1].tolist() == list(range(1, 100))
    x, y = w.get(6, 2)  # training wraps around to window 0
    assert x[1].tolist() == list(range(16)) and y[1].tolist() == list(range(1, 17))
    # the targets a run counts as trained on are those the windows it got hold, the padded ones left out
    for start in range(15):
        for count in (1, 2, 6, 7, 15):
            assert w.targets(start, count) == int((w.get(start, count)[1] != -1).sum()), (start, count)


# ---- training ----

def per_token_loss(model, tokens, T):
    """The loss over a text written out plainly: each window of T tokens alone, unpadded and unbatched
    (the last one shorter), its mean loss times its number of targets, summed and divided by the number
    of targets, every token but the first."""
    total = 0.0
    for start in range(0, len(tokens) - 1, T):
        y = tokens[start + 1:start + T + 1]
        with torch.no_grad():
            _, loss = model(tokens[start:start + len(y)][None], y[None])
        total += loss.double().item() * len(y)
    return total / (len(tokens) - 1)


def test_whole_text_loss_is_the_mean_over_every_target(data):
    """evaluate(), the figure a run ends on, against per_token_loss on 3,000 tokens: 94 windows of 32,
    the last one padded (23 targets), in batches that divide 94 windows (1, 2, 47), that do not (5, 7)
    and that hold them all (200)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))
    tokens = torch.from_numpy(data_module.load_tokens(data)[:3000].astype(np.int64))
    windows = data_module.Windows(tokens.numpy(), 32, 'cpu')
    assert windows.n == 94 and (len(tokens) - 1) % 32 == 23
    expected = per_token_loss(model.eval(), tokens, 32)
    for batch_size in (1, 2, 5, 7, 47, 200):
        got = train.evaluate(model, windows, batch_size, contextlib.nullcontext())
        assert got == pytest.approx(expected, abs=2e-6), batch_size


def test_tiny_model_reaches_the_target_on_a_slice(data, tmp_path):
    out = tmp_path / 'run'
    rc, log = run(out, '--data', data, '--data-tokens', '257', '--lr', '1e-2', '--max-steps', '300', '--samples', '3')
    assert rc == 0
    lines = log.splitlines()
    assert lines[0].startswith('command: python train.py ') and lines[1].startswith('git commit: ')
    assert lines[2].startswith('device: CPU') and 'torch 2.' in lines[3] and 'tiktoken' in lines[3]
    assert json.loads(lines[4].removeprefix('config: '))['data_tokens'] == 257
    final = next(line for line in lines if line.startswith('target '))
    assert final.startswith('target reached at step '), final
    printed = float(re.search(r'whole-text loss: (\S+)', final).group(1))
    assert printed < 0.099999
    n_steps = int(re.search(r'at step (\d+)', final).group(1)) + 1
    assert len(steps(log)) == n_steps < 300

    # the checkpoint follows the contract, and its weights really give that loss over all 256 targets
    ckpt = checkpoint.load_training(str(out / 'ckpt.pt'))
    assert ckpt.run.step == n_steps and ckpt.run.tokens_seen == 256 * n_steps and ckpt.run.elapsed > 0
    assert ckpt.optimizer and ckpt.rng and ckpt.config['data_tokens'] == 257
    # and the end line's figures, which an export reads from here
    assert ckpt.run.end['reached'] and ckpt.run.end['target_loss'] == 0.099999
    assert f"{ckpt.run.end['whole_loss']:.6f}" == f'{printed:.6f}' and ckpt.run.end['first_step_s'] > 0
    assert not any(k.startswith(('_orig_mod.', 'module.')) for k in ckpt.model)
    model = GPT(GPTConfig(**ckpt.model_args))
    model.load_state_dict(ckpt.model)
    tokens = torch.from_numpy(data_module.load_tokens(data)[:257].astype(np.int64))
    with torch.no_grad():
        _, loss = model.eval()(tokens[:-1].view(8, 32), tokens[1:].view(8, 32))
    assert loss.item() < 0.099999
    assert abs(loss.item() - printed) < 1e-5

    # it learnt the slice by heart: the likeliest next token is the right one almost everywhere
    with torch.no_grad():
        logits, _ = model(tokens[:-1].view(8, 32))
    assert (logits.argmax(-1).flatten() == tokens[1:]).float().mean() > 0.95

    # the final model's samples close the log, one per speaker, each after its prompt
    samples = re.findall(r"--- sample: prompt '(.*?)', 100 tokens, temperature 0.7, top-k 50, seed 1337\n(.*?)\n", log)
    assert [prompt for prompt, _ in samples] == ['ROMEO:\\n', 'KING RICHARD II:\\n', 'First Citizen:\\n']

    rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert len(rows) == n_steps
    assert {'step', 'loss', 'dt_ms', 'tok_per_sec', 'norm', 'lr', 'tokens'} <= rows[-1].keys()
    assert rows[-1]['whole_loss'] == pytest.approx(printed, abs=1e-6)


# the end line of a run: (last step, steps, tokens seen, wall time s) as printed
END_LINE = re.compile(r'target (?:NOT )?reached at step (\d+) \((\d+) steps\) \| tokens seen: ([\d,]+) \| '
                      r'wall time: (\S+)s ')
# a step line's dt (ms) and tok/sec as printed
STEP_RATE = re.compile(r'step \d+ \| loss: \S+ \| dt: (\S+)ms \| tok/sec: (\S+) \|')


def end_lines(log):
    return [(int(a), int(b), int(c.replace(',', '')), float(d)) for a, b, c, d in END_LINE.findall(log)]


def step_seconds(log):
    return [float(dt) / 1000 for dt, _ in STEP_RATE.findall(log)]


def timed(fn, *args):
    t0 = time.time()
    fn(*args)
    return time.time() - t0


@pytest.mark.parametrize('optimizer, dropout', [('adamw', '0'), ('muon', '0'), ('adamw', '0.1')])
def test_resume_continues_exactly(data, tmp_path, monkeypatch, optimizer, dropout):
    """20 steps in one go == 10 steps, stop, --resume, 10 more: every printed digit the same. With
    dropout, every step draws random masks: the same digits need the random state restored too. The
    end line's figures are computed a second way: tokens seen as the targets the model was trained on,
    counted in its forward; the wall time as the checkpoint's elapsed time plus the resumed part,
    which the test times itself; each step's tok/sec as its tokens over its dt."""
    args = ['--data', data, '--data-tokens', '3000', '--optimizer', optimizer, '--lr', '1e-2', '--lr-decay-steps', '20',
            '--dropout', dropout]
    trained, forward = [], GPT.forward

    def counting_forward(self, idx, targets=None, **kw):
        if self.training and targets is not None:
            trained.append(int((targets != -1).sum()))
        return forward(self, idx, targets, **kw)
    monkeypatch.setattr(GPT, 'forward', counting_forward)
    _, straight = run(tmp_path / 'straight', *args, '--max-steps', '20')
    monkeypatch.undo()
    first_s = timed(run, tmp_path / 'split', *args, '--max-steps', '10')
    first = (tmp_path / 'split' / 'train.log').read_text()
    saved = checkpoint.load_training(str(tmp_path / 'split' / 'ckpt.pt')).run.elapsed
    resumed_s = timed(train.main, ['--resume', str(tmp_path / 'split' / 'ckpt.pt'), '--max-steps', '20'])
    split = (tmp_path / 'split' / 'train.log').read_text()
    assert 'resumed from' in split and len(steps(first)) == 10
    assert steps(split) == steps(straight) and len(steps(straight)) == 20
    losses = [float(s[1]) for s in steps(straight)]
    assert losses[-1] < losses[0] - 1  # and it learns

    (*_, first_wall), = end_lines(first)
    assert sum(step_seconds(first)) - 0.05 <= first_wall <= first_s + 0.05
    assert saved == pytest.approx(first_wall, abs=0.05)  # printed to 0.1 s
    (*straight_end, _), = end_lines(straight)
    *end, wall = end_lines(split)[-1]
    # 20 steps of 8 windows out of 94 came round to the last window once: its 9 padded targets are no tokens
    assert end == straight_end == [19, 20, sum(trained)] and sum(trained) == 20 * 256 - 9
    assert saved + sum(step_seconds(split)[10:]) - 0.05 <= wall <= saved + resumed_s + 0.05
    for dt, rate in STEP_RATE.findall(split):
        assert float(rate) == pytest.approx(256 / (float(dt) / 1000), rel=1e-3)


def expected_lr(step, lr, min_lr, warmup, decay_steps):
    """The schedule, written out: linear warmup to lr, cosine decay to min_lr at decay_steps, then flat."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= decay_steps:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (step - warmup) / (decay_steps - warmup)))


def test_learning_rate_schedule_and_weight_decay_reach_the_optimizer(data, tmp_path):
    """The lr printed at every step follows the schedule's formula (warmup, decay, floor at --min-lr), and
    the optimizer the run built holds that lr and --weight-decay for the matrices, 0 for the rest."""
    out = tmp_path / 'run'
    _, log = run(out, '--data', data, '--data-tokens', '3000', '--lr', '1e-2', '--min-lr', '1e-3', '--warmup-steps', '3',
                 '--lr-decay-steps', '10', '--max-steps', '14', '--weight-decay', '0.37')
    printed = [float(s[3]) for s in steps(log)]
    assert printed == pytest.approx([expected_lr(i, 1e-2, 1e-3, 3, 10) for i in range(14)], rel=1e-4)
    groups = checkpoint.load_training(str(out / 'ckpt.pt')).optimizer[0]['param_groups']
    assert [g['lr'] for g in groups] == pytest.approx([1e-3, 1e-3])  # what the last step used
    # 2 layers x (4 matrices + 8 biases and LayerNorm tensors) + wte, wpe + ln_f
    assert [(g['weight_decay'], len(g['params'])) for g in groups] == [(0.37, 2 * 4 + 2), (0.0, 2 * 8 + 2)]


@pytest.mark.parametrize('dtype', ['float32', 'float16'])
def test_gradients_are_clipped_after_unscaling(data, tmp_path, dtype):
    """After one AdamW step its first moment is (1 - beta1) x the gradient it was given, so its norm shows
    the clipping: 0.1 x --grad-clip when the true norm (the one printed) is larger. In float16 the
    GradScaler multiplies the loss by 65,536 first: clipping before unscaling would clip those scaled
    gradients instead (and print their norm), leaving a moment 65,536 times too small."""
    out = tmp_path / dtype
    _, log = run(out, '--data', data, '--data-tokens', '3000', '--max-steps', '1', '--grad-clip', '0.05', '--dtype', dtype)
    norm = float(steps(log)[0][2])
    assert 0.2 < norm < 50  # the true gradient norm of a fresh tiny model, well above the clip
    state = checkpoint.load_training(str(out / 'ckpt.pt')).optimizer[0]['state']
    moment = math.sqrt(sum(s['exp_avg'].float().pow(2).sum().item() for s in state.values()))
    assert moment == pytest.approx(0.1 * 0.05, rel=1e-3)


def test_two_process_torchrun_matches_one_process(data, tmp_path):
    """2 processes x 1 micro-step (Gloo) and 1 process x 2 micro-steps see the same global batches."""
    args = [*TINY, '--data', data, '--data-tokens', '3000', '--max-steps', '4', '--lr', '3e-3']
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', 'train.py',
           *args, '--out-dir', str(tmp_path / 'ddp')]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp_log = (tmp_path / 'ddp' / 'train.log').read_text()
    assert 'x 2 process(es)' in ddp_log and '4 x 32 x 1 micro-steps x 2 process(es)' in ddp_log
    assert train.main([*args, '--out-dir', str(tmp_path / 'one')]) == 0
    one, two = steps((tmp_path / 'one' / 'train.log').read_text()), steps(ddp_log)
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert a[0] == b[0] and abs(float(a[1]) - float(b[1])) < 1e-5 and abs(float(a[2]) - float(b[2])) < 1e-4
    whole = [float(re.search(r'whole-text loss: (\S+)', log.splitlines()[-1]).group(1))
             for log in ((tmp_path / 'one' / 'train.log').read_text(), ddp_log)]
    # the loss each run ends on is the plain per-token mean of its saved model over the text's 94 windows,
    # which the two processes split between them (12 batches of 4 each, the last of 2 windows, one padded)
    tokens = torch.from_numpy(data_module.load_tokens(data)[:3000].astype(np.int64))
    for name, printed in zip(('one', 'ddp'), whole):
        model, _ = checkpoint.load_model_file(str(tmp_path / name / 'ckpt.pt'))
        assert printed == pytest.approx(per_token_loss(model.eval(), tokens, 32), abs=2e-6)
    assert abs(whole[0] - whole[1]) < 1e-5
    # steps and tokens seen: all processes' targets, as one process with both micro-steps counts them
    assert end_lines(ddp_log)[0][:3] == end_lines((tmp_path / 'one' / 'train.log').read_text())[0][:3]


TRAIN_THEN_THREADS = """
import os, sys
import train
status = train.main(sys.argv[1:])
threads = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]
print('rank', os.environ['RANK'], 'status', status, 'gloo threads', sorted(t for t in threads if 'gloo' in t), flush=True)
"""


def test_a_finished_ddp_run_leaves_no_gloo_threads(data, tmp_path):
    """train.main's destroy_process_group really closes the Gloo group (its threads and sockets), so
    nothing of it is left running into the interpreter's exit. torch._dynamo imported after the group
    (DDP imports it) used to keep it alive."""
    script = tmp_path / 'train_then_threads.py'
    script.write_text(TRAIN_THEN_THREADS)
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        str(script), *TINY, '--data', data, '--data-tokens', '3000', '--max-steps', '2',
                        '--out-dir', str(tmp_path / 'run')], cwd=ROOT, capture_output=True, text=True, timeout=240,
                       env={**os.environ, 'PYTHONPATH': ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(line for line in r.stdout.splitlines() if line.startswith('rank')) == [
        'rank 0 status 0 gloo threads []', 'rank 1 status 0 gloo threads []']


GLOO_PEER_DIES = """
import os, sys, torch, torch.distributed as dist
import runtime
rank, store = int(sys.argv[1]), sys.argv[2]
dist.init_process_group('gloo', init_method='file://' + store, rank=rank, world_size=2)
t = torch.ones(1)
dist.all_reduce(t)  # both processes are in
if rank == 1:
    os._exit(9)  # dies, as a killed process does
try:
    dist.all_reduce(t)
except Exception as e:
    print('reason:', runtime.collective_failure(e), '| other errors:', runtime.collective_failure(RuntimeError('x')), flush=True)
os._exit(0)
"""


def test_a_real_gloo_failure_is_recognised(tmp_path):
    """Gloo reports a dead peer as a plain RuntimeError; runtime.collective_failure tells it apart by its
    message. If a new torch words it otherwise, this fails (and train.py would print a traceback).
    Two plain processes, not torchrun: torchrun kills the survivor as soon as it sees the other die,
    at times before the survivor's collective has failed and printed."""
    script = tmp_path / 'gloo_peer_dies.py'
    script.write_text(GLOO_PEER_DIES)
    env = {**os.environ, 'PYTHONPATH': ROOT}
    peers = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / 'store')], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    out, err = peers[0].communicate(timeout=120)
    peers[1].communicate(timeout=120)
    assert [p.returncode for p in peers] == [0, 9], err[-2000:]
    line = next((line for line in out.splitlines() if line.startswith('reason:')), out + err[-2000:])
    assert re.fullmatch(r'reason: (Read error|Connection (reset|closed)) .* \| other errors: None', line), line


def test_bin_input_memmap_path_and_validation_split(data, tmp_path, monkeypatch):
    """A uint16 .bin trains like its text, read through the memmap when it does not go on the device."""
    tokens = data_module.load_tokens(data)[:4000]
    bin_path = tmp_path / 'slice.bin'
    np.asarray(tokens).tofile(bin_path)
    _, from_text = run(tmp_path / 'text', '--data', data, '--data-tokens', '4000', '--max-steps', '3')
    monkeypatch.setattr(data_module, 'ON_DEVICE_BYTES', 0)
    _, from_bin = run(tmp_path / 'bin', '--data', str(bin_path), '--max-steps', '3')
    assert steps(from_bin) == steps(from_text)
    _, log = run(tmp_path / 'val', '--data', str(bin_path), '--max-steps', '2', '--val-fraction', '0.25',
                 '--eval-interval', '2')
    assert '3,000 training tokens' in log and '1,000 validation tokens' in log
    assert re.search(r'eval after step 1 \| whole-text loss: \d+\.\d+ \| val loss: \d+\.\d+', log)


def test_sigterm_saves_a_checkpoint_and_exits(data, tmp_path):
    out = tmp_path / 'run'
    cmd = [sys.executable, 'train.py', *TINY, '--data', data, '--data-tokens', '3000', '--max-steps', '100000',
           '--out-dir', str(out)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / 'train.log').exists() or 'step 2 ' not in (out / 'train.log').read_text():
        assert time.time() < deadline and p.poll() is None, p.stderr.read() if p.poll() is not None else 'timeout'
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    log = (out / 'train.log').read_text()
    last = int(steps(log)[-1][0])
    assert re.search(rf'stopped by a signal (during step {last + 1}|after step {last}); checkpoint after '
                     rf'{last + 1} steps: ', log)
    assert checkpoint.load_training(str(out / 'ckpt.pt')).run.step == last + 1


def test_float16_with_a_moved_loss_scale_resumes_step_for_step(data, tmp_path, monkeypatch):
    """The path a T4 takes (no bfloat16): float16 autocast with a GradScaler, unscaled before clipping.
    CPU autocast runs float16 too, slowly, so the wiring is checked here. The scaler starts at 2**24,
    where the scaled gradients overflow float16: those steps are skipped and the scale halves until
    they fit, so the scale a checkpoint holds has moved. A run stopped after 4 steps and resumed then
    goes on as the unbroken one does, every printed digit and the scaler's state the same."""
    real_init = torch.amp.GradScaler.__init__
    monkeypatch.setattr(torch.amp.GradScaler, '__init__',
                        lambda self, *a, **kw: real_init(self, *a, **{**kw, 'init_scale': 2.0 ** 24}))
    args = ['--data', data, '--data-tokens', '200', '--dtype', 'float16', '--lr', '1e-2', '--lr-decay-steps', '8']
    rc, straight = run(tmp_path / 'straight', *args, '--max-steps', '8')
    assert rc == 0 and 'dtype: float16' in straight
    rc, first = run(tmp_path / 'split', *args, '--max-steps', '4')
    saved = checkpoint.load_training(str(tmp_path / 'split' / 'ckpt.pt')).scaler
    assert rc == 0 and saved['scale'] < 2.0 ** 24  # overflows moved it, and it is saved
    assert 'norm: inf' in first or 'norm: nan' in first  # the skipped steps' gradients
    assert train.main(['--resume', str(tmp_path / 'split' / 'ckpt.pt'), '--max-steps', '8']) == 0
    split = (tmp_path / 'split' / 'train.log').read_text()
    assert steps(split) == steps(straight) and len(steps(straight)) == 8
    assert (checkpoint.load_training(str(tmp_path / 'split' / 'ckpt.pt')).scaler ==
            checkpoint.load_training(str(tmp_path / 'straight' / 'ckpt.pt')).scaler)
    losses = [float(s[1]) for s in steps(straight)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


# ---- bad input: one clear line, never a traceback ----

def test_help_documents_every_flag():
    text = train.build_parser().format_help()
    for flag in ('--data', '--out-dir', '--n-layer', '--n-head', '--n-embd', '--block-size', '--dropout', '--batch-size',
                 '--total-batch-tokens', '--lr', '--min-lr', '--warmup-steps', '--max-steps', '--weight-decay',
                 '--grad-clip', '--target-loss', '--eval-interval', '--val-fraction', '--checkpoint-interval',
                 '--device', '--dtype', '--compile', '--no-compile', '--resume', '--seed', '--optimizer', '--compile-mode'):
        assert flag in text


@pytest.mark.parametrize('content, message', [
    (None, r'data file .*missing\.txt not found'),
    (b'', r'data file .* is empty'),
    (b'\xff\xfeh\x00i\x00', r'is not UTF-8 text \(byte 0xff'),
    (b'To be, or not to be', r'has \d tokens, fewer than one sequence \(block size 32 \+ 1\)'),
])
def test_bad_data_file(tmp_path, content, message):
    path = tmp_path / 'missing.txt'
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(train.TrainError, match=message):
        run(tmp_path / 'run', '--data', str(path), '--max-steps', '1')


def test_impossible_batch_arithmetic(data, tmp_path):
    with pytest.raises(train.TrainError, match=r'--total-batch-tokens 300 is not a multiple of .* = 4 x 32 x 1 = 128'):
        run(tmp_path / 'run', '--data', data, '--total-batch-tokens', '300')


def test_resume_from_missing_corrupt_or_model_only_checkpoint(tmp_path):
    with pytest.raises(train.TrainError, match='no checkpoint at'):
        train.main(['--resume', str(tmp_path / 'nothing.pt')])
    (tmp_path / 'corrupt.pt').write_bytes(os.urandom(1000))
    with pytest.raises(train.TrainError, match='is not a readable checkpoint'):
        train.main(['--resume', str(tmp_path / 'corrupt.pt')])
    model = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32))
    checkpoint.save_model_only(model, str(tmp_path / 'weights.pt'))
    with pytest.raises(train.TrainError, match='model-only file cannot be resumed'):
        train.main(['--resume', str(tmp_path / 'weights.pt')])


def test_nan_loss_stops_and_leaves_the_last_checkpoint(data, tmp_path):
    """A learning rate of 1e30 makes the weights overflow: the run stops, the checkpoint stays."""
    run(tmp_path / 'run', '--data', data, '--data-tokens', '3000', '--max-steps', '3')
    ckpt = tmp_path / 'run' / 'ckpt.pt'
    before = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    for interval in ('0', '1'):  # caught at the next step's loss, or before a checkpoint would save the weights
        with pytest.raises(train.TrainError, match=r'(loss is nan|give a nan loss).*training diverged.*left as it was'):
            train.main(['--resume', str(ckpt), '--max-steps', '20', '--lr', '1e30', '--warmup-steps', '0',
                        '--checkpoint-interval', interval])
        assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == before


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, 'train.py', '--data', str(tmp_path / 'missing.txt')], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr == f'error: data file {tmp_path / "missing.txt"} not found\n'


# ---- the first minutes on a laptop: signals, progress, memory, the run's folder ----

def train_process(*argv, stderr=subprocess.PIPE, preexec_fn=None):
    return subprocess.Popen([sys.executable, 'train.py', *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=stderr, text=True, preexec_fn=preexec_fn)


def wait_for(condition, proc, timeout=180):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f'train.py ended early with {proc.returncode}'
        assert time.time() < deadline, 'timed out'
        time.sleep(0.05)


# steps of 2,000 micro-steps of 2 x 128 tokens, so that their progress shows (it does after 10 s): about
# 80 s on a 2-core Xeon, where 240 took 9.6 s and showed nothing. The tests stop them 10 s in, so the length
# costs nothing.
MICRO_STEPS = 2000
SLOW_TOKENS = str(MICRO_STEPS * 2 * 128)
SLOW_STEP = ['--n-layer', '2', '--n-head', '2', '--n-embd', '32', '--block-size', '128', '--batch-size', '2',
             '--total-batch-tokens', SLOW_TOKENS, '--device', 'cpu', '--samples', '0', '--data-tokens', '20000',
             '--max-steps', '1000', '--checkpoint-interval', '1', '--preset', 'gpu', '--dtype', 'float32', '--no-compile']


def interrupt_a_long_step(out, *argv):
    """train.py ARGV, sent Ctrl-C once a step has shown its progress (10 s into it). Returns (exit status,
    what it printed on stderr, seconds from the signal to its exit, the step it was in)."""
    err = out.parent / f'{out.name}-stderr.txt'
    with open(err, 'w') as stderr:
        p = train_process(*argv, stderr=stderr)
        try:
            wait_for(lambda: ': micro-step ' in err.read_text(), p)
            step = int(re.search(r'step (\d+): micro-step', err.read_text()).group(1))
            t0 = time.time()
            p.send_signal(signal.SIGINT)
            rc = p.wait(timeout=60)
            took = time.time() - t0
        finally:
            p.kill()
    shown = err.read_text()
    assert rc == 128 + signal.SIGINT and 'Traceback' not in shown, shown[-3000:]
    done, elapsed = map(int, re.search(rf'step {step}: micro-step (\d+)/{MICRO_STEPS}, (\d+) s, about \d+ s left',
                                       shown).groups())
    assert took < 2 * elapsed / done + 2, (took, elapsed / done)  # a micro-step and the checkpoint, not the step
    assert ': micro-step' not in (out / 'train.log').read_text()  # progress is for the terminal only
    return rc, shown, took, step


@pytest.mark.slow  # two runs stopped in steps of over 10 s, and a one-step run between them: 30 s
@pytest.mark.timeout(300)
def test_ctrl_c_in_a_long_step_is_answered_within_a_micro_step(data, tmp_path):
    """A step that takes over 10 s shows its progress on the terminal (never in train.log). Ctrl-C in
    the middle of it stops the run after the micro-step under way, saves the state before that step
    (the checkpoint written after the step before it, tensor for tensor) and exits 130, without a
    traceback. In the first step there is nothing to save: no checkpoint is written, and the log says so."""
    fresh = tmp_path / 'fresh'
    _, _, _, step = interrupt_a_long_step(fresh, *SLOW_STEP, '--data', data, '--out-dir', str(fresh))
    assert step == 0 and not (fresh / 'ckpt.pt').exists()
    log = (fresh / 'train.log').read_text()
    assert log.splitlines()[-1] == 'stopped by a signal during step 0: nothing was trained, so no checkpoint was written'
    assert 'step 0 |' not in log

    out = tmp_path / 'run'  # one quick step makes a checkpoint; the resumed run is stopped in step 1
    assert train.main([*SLOW_STEP, '--total-batch-tokens', '256', '--max-steps', '1', '--data', data,
                       '--out-dir', str(out)]) == 0
    before = checkpoint.load_training(str(out / 'ckpt.pt'))
    _, _, _, step = interrupt_a_long_step(out, '--resume', str(out / 'ckpt.pt'), '--total-batch-tokens',
                                          SLOW_TOKENS, '--max-steps', '1000')
    log = (out / 'train.log').read_text()
    assert step == 1 and 'step 1 |' not in log
    assert log.splitlines()[-1] == (f'stopped by a signal during step 1; checkpoint after 1 steps: {out / "ckpt.pt"} '
                                    f'(continue with --resume {out / "ckpt.pt"})')
    stopped = checkpoint.load_training(str(out / 'ckpt.pt'))
    assert (stopped.run.step, stopped.run.position) == (before.run.step, before.run.position) == (1, 2)
    assert all(torch.equal(stopped.model[k], before.model[k]) for k in before.model)


@pytest.mark.timeout(300)
def test_second_ctrl_c_stops_at_once_and_keeps_the_checkpoint(data, tmp_path):
    """Ctrl-C twice in a step: out at once, one line, and the last checkpoint is not touched. The second
    must land before the first one's stop is done (the micro-step under way, then a save), and 50 ms
    after the first (a process that has not yet handled a signal sees a repeat of it as one): when the
    stop was quicker than that, the run is tried again from the same checkpoint."""
    out = tmp_path / 'run'
    quick = ['--total-batch-tokens', '256', '--max-steps', '1']  # one micro-step, to make a checkpoint
    assert train.main([*SLOW_STEP, *quick, '--data', data, '--out-dir', str(out)]) == 0
    before = hashlib.sha256((out / 'ckpt.pt').read_bytes()).hexdigest()
    shutil.copy(out / 'ckpt.pt', tmp_path / 'pristine.pt')
    for attempt in range(6):
        shutil.copy(tmp_path / 'pristine.pt', out / 'ckpt.pt')  # each attempt from the same checkpoint
        p = train_process('--resume', str(out / 'ckpt.pt'), '--total-batch-tokens', SLOW_TOKENS,
                          '--max-steps', '1000')
        try:
            n_runs = (out / 'train.log').read_text().count('resumed from')
            wait_for(lambda: (out / 'train.log').read_text().count('resumed from') > n_runs, p)
            time.sleep(0.5)  # into step 1
            p.send_signal(signal.SIGINT)
            time.sleep(0.05)
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=60)
        finally:
            p.kill()
        if err.strip():
            break
    assert p.returncode == 128 + signal.SIGINT and 'Traceback' not in err, err
    assert err.strip().splitlines() == ['error: stopped at once by a second Ctrl-C; the last checkpoint is as it was']
    assert hashlib.sha256((out / 'ckpt.pt').read_bytes()).hexdigest() == before
    assert not (out / 'ckpt.pt.tmp').exists()


def test_a_runs_folder_is_never_written_into_by_another_run(data, tmp_path):
    out = tmp_path / 'run'
    rc, log = run(out, '--data', data, '--data-tokens', '3000', '--max-steps', '2')
    files = {name: (out / name).read_bytes() for name in ('train.log', 'metrics.jsonl', 'ckpt.pt')}
    with pytest.raises(train.TrainError, match=rf'--out-dir {re.escape(str(out))} holds a run already \(train.log, '
                                               r'metrics.jsonl, ckpt.pt\): continue it with --resume, or give a new'):
        run(out, '--data', data, '--data-tokens', '3000', '--max-steps', '4')
    assert {name: (out / name).read_bytes() for name in files} == files  # untouched
    assert json.loads(log.splitlines()[4].removeprefix('config: '))['out_dir'] == str(out)  # the real one
    assert train.main(['--resume', str(out / 'ckpt.pt'), '--max-steps', '3']) == 0  # --resume says so


def limit_memory(megabytes):
    def limit():  # in the child: its data segment may not grow past this
        resource.setrlimit(resource.RLIMIT_DATA, (megabytes << 20, megabytes << 20))
    return limit


# 16 sequences a micro-step: over 1 GB for activations and the loss's chunk of logits (BIG_STEP), or for
# the chunks of logits that one sequence's loss needs each (FIT_STEP, which trains at micro-batch 1)
BIG_STEP = ['--n-layer', '2', '--n-head', '2', '--n-embd', '256', '--block-size', '1024', '--total-batch-tokens',
            str(16 * 1024), '--device', 'cpu', '--dtype', 'float32', '--samples', '0', '--data-tokens', '40000',
            '--max-steps', '1']
FIT_STEP = ['--n-layer', '2', '--n-head', '2', '--n-embd', '128', '--block-size', '512', '--total-batch-tokens',
            str(16 * 512), '--device', 'cpu', '--dtype', 'float32', '--samples', '0', '--data-tokens', '20000',
            '--max-steps', '1']


@pytest.mark.timeout(300)
def test_on_a_cpu_the_micro_batch_fits_the_free_memory_and_a_notice_says_so(data, tmp_path):
    """With 1 GiB for its data, a model whose 16-sequence micro-batch would need over 1 GB by what one
    sequence takes: train.py measures one sequence, picks a micro-batch that fits (accumulation keeps
    the 8,192 tokens per step), says so before step 0, and trains."""
    out = tmp_path / 'run'
    p = train_process(*FIT_STEP, '--data', data, '--out-dir', str(out), preexec_fn=limit_memory(1024))
    _, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-3000:]
    log = (out / 'train.log').read_text()
    notice = next(line for line in log.splitlines() if line.startswith('notice: '))
    B = int(re.search(r'micro-batch (\d+) \(about \S+ GB of the \S+ GB free\)', notice).group(1))
    assert B < 16 and 'python train.py --n-layer 4' in notice  # the walk-through to try first
    assert f'step: 8,192 tokens = {B} x 512 x {16 // B} micro-steps' in log
    assert json.loads(log.splitlines()[4].removeprefix('config: '))['batch_size'] == B
    assert log.index('notice: ') < log.index('step 0 |')


@pytest.mark.parametrize('seconds, device, expected', [(6.0, 'cpu', 1), (1.5, 'cpu', 4), (0.5, 'cpu', 16),
                                                       (6.0, 'mps', 16)])
def test_on_a_cpu_a_micro_step_takes_at_most_about_10_s(data, monkeypatch, seconds, device, expected):
    """A CPU trains as many tokens/s at micro-batch 1 as at 8 (logs/bench_cpu.md), and Ctrl-C is answered
    between micro-steps: so with one sequence measured at `seconds` and memory to spare, the fit halves
    the micro-batch of 16 until a micro-step takes at most 10 s, on a CPU only. The GPT-2 124M takes about
    6 s a sequence on this project's 2-core machine: micro-batch 1."""
    monkeypatch.setattr(runtime, 'measure_micro_step', lambda *a: (seconds, 50 << 20))
    monkeypatch.setattr(runtime, 'free_memory', lambda: 20 << 30)
    args = train.build_parser().parse_args(TINY)
    rt = runtime.Runtime(False, 0, 0, 1, 'cpu', device, 'float32', contextlib.nullcontext(), False, True)
    windows = data_module.Windows(data_module.load_tokens(data)[:3000], 32, 'cpu')
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))
    B, notice = runtime.fit_micro_batch(args, rt, model, windows, 16)
    assert B == expected
    if B < 16:
        assert f'micro-batch {B} (about ' in notice and f'Ctrl-C is answered within about {B * seconds:.0f} s' in notice


@pytest.mark.timeout(300)
def test_out_of_memory_is_one_line_naming_the_batch_size(data, tmp_path):
    """The same, with --batch-size 16 asked for: the allocation fails (a real one, refused by the
    kernel) and train.py says what to do in one line."""
    p = train_process(*BIG_STEP, '--batch-size', '16', '--data', data, '--out-dir', str(tmp_path / 'run'),
                      preexec_fn=limit_memory(1024))
    _, err = p.communicate(timeout=240)
    assert p.returncode == 1 and len(err.splitlines()) == 1, err[-3000:]
    assert re.fullmatch(r"error: out of memory \(DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                        r"\d+ bytes\): give a smaller --batch-size; gradient accumulation keeps the tokens per "
                        r"step\n", err), err


def test_the_preset_follows_the_device_and_flags_given_win():
    """--preset auto is cpu on a CPU (Muon, 4,096-token steps) and gpu elsewhere (nanoGPT's AdamW);
    a flag given on the command line wins over either, and the resolved values are what the run saves
    (so a resumed run keeps them on any device)."""
    args, _ = train.parse_args(['--device', 'cpu'])
    assert args.preset == 'cpu'
    assert {k: getattr(args, k) for k in train.PRESETS['cpu']} == train.PRESETS['cpu']
    args, _ = train.parse_args(['--device', 'cpu', '--preset', 'gpu', '--lr', '3e-4'])
    assert (args.optimizer, args.total_batch_tokens, args.lr) == ('adamw', 65536, 3e-4)
    args, _ = train.parse_args(['--device', 'cpu', '--optimizer', 'adamw', '--weight-decay', '0'])
    assert (args.preset, args.optimizer, args.weight_decay, args.total_batch_tokens) == ('cpu', 'adamw', 0.0, 4096)


@pytest.mark.parametrize('times, max_steps, dtype, compiled', [
    ({'float32': 3.7, 'bfloat16': 1.8}, 1200, 'bfloat16', True),    # AMX: bfloat16, a run of hours
    ({'float32': 3.0, 'bfloat16': 3.2}, 1200, 'float32', True),     # no native bfloat16: float32
    ({'float32': 0.02, 'bfloat16': 0.03}, 400, 'float32', False),   # the walk-through: minutes
])
def test_on_a_cpu_the_faster_dtype_trains_and_a_long_run_compiles(data, monkeypatch, times, max_steps, dtype,
                                                                   compiled):
    """--dtype auto on a CPU times one sequence in float32 and in bfloat16 (each the second of two
    tries) and takes the faster; an unset --compile compiles when the run would take 30 min or more at
    that speed. The line for the log gives the figures, and args keep the choice for a resume."""
    calls = []

    def measure(model, x, y, ctx):
        calls.append('float32' if isinstance(ctx, contextlib.nullcontext) else 'bfloat16')
        return times[calls[-1]], 0
    monkeypatch.setattr(runtime, 'measure_micro_step', measure)
    monkeypatch.setattr(runtime, 'cpp_compiler', lambda: '/usr/bin/g++')
    args, _ = train.parse_args(['--device', 'cpu', '--max-steps', str(max_steps)])
    rt = runtime.Runtime(False, 0, 0, 1, 'cpu', 'cpu', 'float32', contextlib.nullcontext(), False, True)
    windows = data_module.Windows(data_module.load_tokens(data)[:3000], 1024, 'cpu')
    model = GPT(GPTConfig(block_size=1024, n_layer=1, n_head=1, n_embd=8))
    rt, line = runtime.pick_cpu_precision(args, rt, model, windows)
    assert calls == ['float32', 'float32', 'bfloat16', 'bfloat16']
    assert (rt.dtype, rt.compile, args.dtype, args.compile) == (dtype, compiled, dtype, compiled)
    assert isinstance(rt.autocast, contextlib.nullcontext) == (dtype == 'float32')
    assert line.startswith(f'CPU precision: {dtype} (one sequence forward and backward: float32 '
                           f'{times["float32"]:.2f} s, bfloat16 {times["bfloat16"]:.2f} s); compile: '
                           f'{"on" if compiled else "off"} ({max_steps} steps: about ')
    # given flags are kept: no bfloat16 timing for --dtype float32, no compile decision for --no-compile
    calls.clear()
    args, _ = train.parse_args(['--device', 'cpu', '--dtype', 'float32', '--no-compile'])
    rt, line = runtime.pick_cpu_precision(args, rt._replace(compile=False), model, windows)
    assert calls == ['float32', 'float32'] and (rt.dtype, rt.compile) == ('float32', False)
    assert 'compile' not in line


@pytest.mark.parametrize('at_step', [0, 1])
def test_ctrl_c_that_kills_the_compiler_is_a_stop_not_a_traceback(data, tmp_path, monkeypatch, at_step):
    """A terminal's Ctrl-C goes to the whole process group, so it also kills the g++ that torch.compile
    runs on a CPU, and the step fails with a compile error. train.py takes that step as stopped by the
    signal: in step 0 nothing is saved and the log says so; later, the checkpoint after the last
    whole step is written and the run exits 130."""
    real = train.train_step
    calls = []

    def train_step(*args):
        calls.append(1)
        if len(calls) == at_step + 1:
            os.kill(os.getpid(), signal.SIGINT)  # what the terminal does ...
            raise RuntimeError('CppCompileError: C++ compile error')  # ... and what the killed g++ leaves
        return real(*args)
    monkeypatch.setattr(train, 'train_step', train_step)
    out = tmp_path / 'run'
    assert train.main([*TINY, '--data', data, '--max-steps', '5', '--out-dir', str(out)]) == 128 + signal.SIGINT
    last = (out / 'train.log').read_text().splitlines()[-1]
    if at_step == 0:
        assert last == 'stopped by a signal during step 0: nothing was trained, so no checkpoint was written'
        assert not (out / 'ckpt.pt').exists()
    else:
        assert last.startswith('stopped by a signal during step 1; checkpoint after 1 steps: ')
        assert checkpoint.load_training(str(out / 'ckpt.pt')).run.step == 1


def test_without_muon_the_cpu_preset_says_what_to_do(monkeypatch):
    """torch before 2.9 has no torch.optim.Muon, which the cpu preset uses: one line that says so and
    names the way out, not a traceback at the optimizer."""
    monkeypatch.delattr(torch.optim, 'Muon')
    with pytest.raises(train.TrainError, match=r"the cpu preset's, unless given\) needs torch >= 2.9 .* give "
                                               r"--optimizer adamw"):
        train.parse_args(['--device', 'cpu'])
    assert train.parse_args(['--device', 'cpu', '--optimizer', 'adamw'])[0].optimizer == 'adamw'

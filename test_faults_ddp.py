"""DDP faults: 2 processes under torchrun on the CPU (Gloo). A dead or hung process stops the run in
bounded time, the survivor says why in one line, and --resume continues it exactly. These take
minutes: marked slow, run by `python3 -m pytest -q -m slow`. The fast check that train.py recognises a
real Gloo failure is in test_train.py."""
import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import checkpoint
from conftest import ROOT, TINY_ARGS, children, logged_steps, runs, wait_until

# one micro-step of 4 x 32 tokens per process
DDP = [*TINY_ARGS, '--lr', '1e-2', '--data-tokens', '3000', '--total-batch-tokens', '256', '--lr-decay-steps', '20']


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
    step = checkpoint.load_training(str(out / 'ckpt.pt')).run.step
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
    final = re.compile(r'target NOT reached at step 19 \(20 steps\) \| .* whole-text loss: (\S+) ')
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

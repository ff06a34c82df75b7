"""
Train GPT-2 (124M by default) on a text until its loss over the whole text is below --target-loss.

    python train.py                                    # GPT-2 124M on input.txt, on the GPU if any
    torchrun --standalone --nproc_per_node=2 train.py  # 2 GPUs of one machine (Gloo on CPUs)
    python train.py --resume logs/run-.../ckpt.pt      # continue a stopped run exactly

Training walks through the text's windows of block_size tokens in order, wrapping around: every
token is a target once per pass. When a step's loss falls below the target, the loss over the whole
text decides whether to stop. Each step prints one line, appended to <out-dir>/train.log;
metrics.jsonl gets the same numbers as JSON; ckpt.pt is the checkpoint.
"""
import time

T_START = time.time()  # wall time counts from here: imports, tokenizing and compiling included

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
from collections import namedtuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
from checkpoint import CheckpointError, RunState
from data import DataError, load_splits
from model import GPT, GPTConfig, autocast, device_name, pick_device


class TrainError(Exception):
    """Bad input or a failed run: reported as one line `error: ...` with exit status 1."""


# ---- arguments ----

def build_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--data', default='input.txt', help='UTF-8 text (tokenized once, cached as a uint16 .bin '
      'beside it) or a uint16 .bin of GPT-2 token ids (default: input.txt)')
    a('--data-tokens', type=int, default=0, help='use only the first N tokens of the data (0: all)')
    a('--val-fraction', type=float, default=0.0, help='hold out this last fraction of the tokens '
      'as a validation split (default 0: train on the whole text)')
    a('--out-dir', help='folder of train.log, metrics.jsonl and ckpt.pt (default: logs/run-<time>)')
    a('--resume', nargs='?', const='', default=None, metavar='CKPT', help='continue from this '
      'checkpoint (bare --resume: <out-dir>/ckpt.pt) with its saved settings; flags given now '
      'override them')
    a = p.add_argument_group('model (default: GPT-2 124M)').add_argument
    a('--n-layer', type=int, default=12)
    a('--n-head', type=int, default=12)
    a('--n-embd', type=int, default=768)
    a('--block-size', type=int, default=1024, help='context length T')
    a('--dropout', type=float, default=0.0)
    a = p.add_argument_group('optimization (tunable; the defaults are nanoGPT-like)').add_argument
    a('--batch-size', type=int, default=16, help='micro-batch: sequences per process per forward')
    a('--total-batch-tokens', type=int, default=65536, help='tokens per optimizer step; gradient '
      'accumulation fills it (a multiple of batch-size x block-size x processes)')
    a('--optimizer', default='adamw', choices=['adamw', 'muon'], help='muon: torch.optim.Muon '
      '(torch >= 2.9) for the 2-D weights inside the blocks, AdamW for embeddings, biases and '
      'LayerNorm gains')
    a('--lr', type=float, default=6e-4, help='peak learning rate (AdamW)')
    a('--muon-lr', type=float, default=None, help="peak learning rate of Muon (default: --lr; "
      "Muon's 'match_rms_adamw' scaling makes AdamW's rates fit)")
    a('--min-lr', type=float, help='learning rate at the end of the decay (default: lr / 10)')
    a('--warmup-steps', type=int, default=100, help='linear warmup steps')
    a('--max-steps', type=int, default=5000, help='stop here if the target was not reached earlier')
    a('--lr-decay-steps', type=int, default=None, help='cosine decay ends here (default: '
      '--max-steps); keep it fixed when a run is split by --resume')
    a('--weight-decay', type=float, default=0.1)
    a('--grad-clip', type=float, default=1.0, help='clip the gradient norm to this (0: none)')
    a('--seed', type=int, default=1337)
    a = p.add_argument_group('target, evaluation and checkpoints').add_argument
    a('--target-loss', type=float, default=0.099999, help='stop when the whole-text loss is below')
    a('--target-cooldown', type=int, default=10, help='after a whole-text evaluation that missed '
      'the target, train this many steps before the next')
    a('--eval-interval', type=int, default=0, help='log the whole-text and validation loss every N '
      'steps (0: never)')
    a('--checkpoint-interval', type=int, default=500,
      help='write ckpt.pt every N steps (and at the end)')
    a('--samples', type=int, default=3, help='at the end, log this many samples of the final model')
    a = p.add_argument_group('system').add_argument
    a('--device', default='auto', help='auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps')
    a('--dtype', default='auto', choices=['auto', 'float32', 'bfloat16', 'float16'],
      help='autocast dtype; auto: bfloat16 on GPUs that have it, float16 with a GradScaler on '
      'older ones (T4), float32 on CPU and MPS')
    a('--compile', action=argparse.BooleanOptionalAction, help='torch.compile (default: CUDA only)')
    a('--compile-mode', default='model', choices=['model', 'blocks'], help='model: the whole '
      'model; blocks: each block (one compile reused by all: starts faster, steps slower)')
    a('--ddp-timeout', type=float, default=1800, help='seconds a process waits for the others '
      'before the run fails (a process hung; one that dies is noticed at once); keep it well above '
      'the time a checkpoint write takes, which the others wait out (default: 1800)')
    return p


def parse_args(argv):
    """(args, the TrainingCheckpoint to resume from or None). With --resume, the run goes on with
    its saved settings: they become the parser's defaults, and flags given now override them."""
    parser = build_parser()
    args = parser.parse_args(argv)
    resumed = None
    if args.resume is not None:
        if args.resume == '' and not args.out_dir:
            raise TrainError('bare --resume needs --out-dir (or give the checkpoint path)')
        path = args.resume or os.path.join(args.out_dir, 'ckpt.pt')
        try:
            resumed = checkpoint.load_training(path)
        except CheckpointError as e:
            raise TrainError(f'--resume: {e}') from None
        saved = {k: v for k, v in resumed.config.items() if k in vars(args) and k != 'resume'}
        saved['out_dir'] = os.path.dirname(path) or '.'
        parser.set_defaults(**saved)
        args = parser.parse_args(argv)
        args.resume = path
    for name in ('n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'total_batch_tokens',
                 'max_steps'):
        if getattr(args, name) <= 0:
            raise TrainError(f'--{name.replace("_", "-")} must be positive')
    if args.n_embd % args.n_head:
        raise TrainError(f'--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}')
    if not 0 <= args.val_fraction < 1:
        raise TrainError('--val-fraction must be in [0, 1)')
    if args.optimizer == 'muon' and not hasattr(torch.optim, 'Muon'):
        raise TrainError(f'--optimizer muon needs torch >= 2.9 (torch.optim.Muon); this is torch '
                         f'{torch.__version__}')
    return args, resumed


# ---- runtime: processes, device, dtype ----

Runtime = namedtuple('Runtime', 'ddp rank local_rank world device device_type dtype autocast '
                                 'compile master')


def setup_runtime(args):
    """How this process runs (a Runtime): its rank among all processes and on its machine, the
    device and dtype; joins the other processes when torchrun started this one."""
    ddp = 'RANK' in os.environ  # set by torchrun
    rank, local_rank, world = 0, 0, 1
    if ddp:
        rank, local_rank, world = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    try:
        device = pick_device(args.device)
    except ValueError as e:
        raise TrainError(str(e)) from None
    kind = device.split(':')[0]
    if kind == 'cuda':
        if ddp:
            device = f'cuda:{local_rank}'
        elif ':' not in device:
            device = 'cuda:0'  # torch.cuda.set_device wants an index
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision('high')  # TF32 matmuls for whatever runs in float32
    if ddp:
        # the timeout bounds every collective: a process that hangs fails the run, not stalls it
        dist.init_process_group('nccl' if kind == 'cuda' else 'gloo',
                                device_id=torch.device(device) if kind == 'cuda' else None,
                                timeout=datetime.timedelta(seconds=args.ddp_timeout))
    dtype, ctx = autocast(device, args.dtype)
    use_compile = kind == 'cuda' if args.compile is None else args.compile
    return Runtime(ddp, rank, local_rank, world, device, kind, dtype, ctx, use_compile,
                   rank == 0)


def collective_failure(error):
    """Why another process died or hung in a collective, if `error` says so; else None. NCCL raises
    DistError, Gloo a RuntimeError whose message starts '[.../gloo/...cc:537]': only the message
    tells, so test_train.py checks this on a real Gloo failure."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    location = re.match(r'\[[^\]]*/gloo/[^\]]*\]\s*', first)
    if not (isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and location)):
        return None
    return first[location.end() if location else 0:].split('. ')[0]


def load_data(args, rt):
    """(training windows, validation windows or None, a line for the log) of --data."""
    if rt.local_rank != 0:  # one process per machine tokenizes first; the others find its cache
        dist.barrier()
    try:
        return load_splits(args.data, args.block_size, rt.device, args.data_tokens,
                           args.val_fraction)
    finally:
        if rt.ddp and rt.local_rank == 0:
            dist.barrier()


# ---- the schedule, evaluation, a step ----

def lr_factor(step, warmup_steps, decay_steps, floor):
    """lr / peak lr: linear warmup to 1, cosine decay to `floor` at decay_steps, then flat."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    ratio = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (1.0 - floor)


@torch.no_grad()
def evaluate(model, windows, batch_size, ctx, rank=0, world=1):
    """Mean loss over every target of `windows`, each predicted once, in eval mode. The processes
    split the batches and add up their loss sums and target counts."""
    model.eval()
    total = torch.zeros(2, device=windows.device)  # (loss sum, number of targets)
    eager = torch.compiler.set_stance('force_eager')  # a one-off pass: compiling it would cost more
    for b in range(rank, math.ceil(windows.n / batch_size), world):
        x, y = windows.get(b * batch_size, batch_size, wrap=False)
        with ctx, eager:
            _, loss = model(x, y)
        count = (y != -1).sum()
        # a batch of padding only has a nan loss and no targets
        total += torch.stack([loss.float().nan_to_num() * count, count.float()])
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def train_step(model, params, optimizers, scaler, batches, grad_clip, ctx, ddp):
    """One optimizer step over the micro-batches [(x, y), ...]. Returns the mean loss and the
    gradient norm before clipping, as tensors: reading them (a host sync) is the caller's."""
    loss_sum = 0.0
    for i, (x, y) in enumerate(batches):
        if ddp:
            model.require_backward_grad_sync = i == len(batches) - 1  # all-reduce once per step
        with ctx:
            _, loss = model(x, y)
        loss = loss / len(batches)  # gradients add up over micro-steps; we want their mean
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
    for opt in optimizers:
        scaler.unscale_(opt)  # clip the true gradients, not the float16 loss-scaled ones
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float('inf'))
    for opt in optimizers:
        scaler.step(opt)  # skipped when the scaled gradients overflowed
    scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return loss_sum, norm


# ---- the run's files ----

class RunLog:
    """<out-dir>/train.log (every line, appended across resumes) and metrics.jsonl (one row per
    step), written by the first process; the others' calls do nothing."""

    def __init__(self, out_dir, start_step, active):
        self.active = active
        if not active:
            return
        try:  # an out-dir we cannot write to fails now, not at the first checkpoint hours later
            os.makedirs(out_dir, exist_ok=True)
            self.file = open(os.path.join(out_dir, 'train.log'), 'a', buffering=1)
            # a run killed after its last checkpoint logged steps that this one does again: keep the
            # rows before start_step (train.log keeps every line, after 'resumed from ... step N')
            path = os.path.join(out_dir, 'metrics.jsonl')
            rows = open(path).read().splitlines() if os.path.exists(path) else []
            with open(path + '.tmp', 'w') as f:
                f.writelines(row + '\n' for row in rows if metrics_step(row) < start_step)
            os.replace(path + '.tmp', path)
            self.metrics = open(path, 'a', buffering=1)
        except OSError as e:
            raise TrainError(f'cannot write to the out-dir {out_dir} ({e.strerror})') from None

    def __call__(self, msg):
        if self.active:
            print(msg, flush=True)
            self.file.write(msg + '\n')

    def row(self, row):
        if self.active:
            self.metrics.write(json.dumps(row) + '\n')


def metrics_step(line):
    """The step of a metrics.jsonl line; infinity for a line cut by a kill."""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return json.loads(line)['step']
    return math.inf


def log_header(log, argv, args, rt, model, data_line):
    import tiktoken
    here, commit = os.path.dirname(os.path.abspath(__file__)), 'unknown'
    with contextlib.suppress(OSError):
        git = subprocess.run(['git', 'describe', '--always', '--dirty'], capture_output=True,
                             text=True, timeout=10, cwd=here)
        commit = git.stdout.strip() or commit
    decayed, not_decayed = (g['params'] for g in model.optim_groups(args.weight_decay, 0)['adamw'])
    log(f'command: {shlex.join(["python", "train.py", *argv])}')
    log(f'git commit: {commit}')
    log(f'device: {device_name(rt.device)} x {rt.world} process(es) | dtype: {rt.dtype} | compile: '
        f'{args.compile_mode if rt.compile else "off"}')
    log(f'versions: python {platform.python_version()} | torch {torch.__version__} | '
        f'tiktoken {tiktoken.__version__}')
    log(f'config: {json.dumps(vars(args))}')
    log(f'model: {model.num_params():,} parameters | decayed: {len(decayed)} tensors, '
        f'{sum(p.numel() for p in decayed):,} | not decayed: {len(not_decayed)} tensors, '
        f'{sum(p.numel() for p in not_decayed):,}')
    log(f'data: {data_line}')


# ---- the run ----

def train(argv, t_start):
    args, resumed = parse_args(argv)
    rt = setup_runtime(args)
    ctx = rt.autocast
    # float16 gradients underflow unless the loss is scaled up first
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == 'float16')
    # defaults that follow other flags stay None in the saved config: resume derives them anew
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    decay_steps = args.max_steps if args.lr_decay_steps is None else args.lr_decay_steps
    muon_lr = None
    if args.optimizer == 'muon':
        muon_lr = args.lr if args.muon_lr is None else args.muon_lr
    B, T, world = args.batch_size, args.block_size, rt.world
    if args.total_batch_tokens % (B * T * world):
        raise TrainError(f'--total-batch-tokens {args.total_batch_tokens} is not a multiple of '
                         f'batch-size x block-size x processes = {B} x {T} x {world} = '
                         f'{B * T * world}')
    grad_accum = args.total_batch_tokens // (B * T * world)
    if args.out_dir is None:
        args.out_dir = os.path.join('logs', datetime.datetime.now().strftime('run-%Y%m%d-%H%M%S'))
    ckpt_path = os.path.join(args.out_dir, 'ckpt.pt')

    # ---- data ----
    train_windows, val_windows, data_line = load_data(args, rt)

    # ---- model and optimizer ----
    torch.manual_seed(args.seed)
    config = GPTConfig(block_size=T, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                       dropout=args.dropout)
    raw_model = GPT(config).to(rt.device)  # what gets saved: never an _orig_mod. or module. prefix
    optimizers = raw_model.configure_optimizers(args.weight_decay, args.lr, muon_lr,
                                                device_type=rt.device_type, verbose=False)
    peak_lrs = [[g['lr'] for g in opt.param_groups] for opt in optimizers]  # the schedule scales
    run = RunState()
    if resumed:
        try:
            run = checkpoint.restore_training(resumed, raw_model, optimizers, scaler)
        except CheckpointError as e:
            raise TrainError(f'--resume: {e}') from None
        run.position %= train_windows.n
    if rt.rank:
        torch.manual_seed(args.seed + rt.rank + 7919 * run.step)  # its own dropout masks
    model = raw_model
    if rt.compile and args.compile_mode == 'blocks':
        for block in raw_model.transformer.h:
            block.compile()  # the 12 blocks share one compiled graph
        raw_model.head = torch.compile(raw_model.head)  # ln_f, lm_head, loss: memory-bound eager
    elif rt.compile:
        model = torch.compile(raw_model)
    if rt.ddp:
        model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == 'cuda' else None)

    # ---- logging ----
    log = RunLog(args.out_dir, run.step, rt.master)
    log_header(log, argv, args, rt, raw_model, f'{data_line} | step: {args.total_batch_tokens:,} '
               f'tokens = {B} x {T} x {grad_accum} micro-steps x {world} process(es)')
    if resumed:
        log(f'resumed from {args.resume} at step {run.step} ({run.tokens_seen:,} tokens seen)')

    t_start -= run.elapsed  # a resumed run's clock goes on from its checkpoint

    def save():  # the run so far, unless the weights diverged (checked on the next batch)
        run.elapsed = time.time() - t_start
        checkpoint.save_training(ckpt_path, raw_model, optimizers, scaler, run, vars(args),
                                 train_windows.get(run.position, B), ctx)

    # Ctrl-C or SIGTERM stops the run after the current step, with a checkpoint; a second at once
    signals = []

    def on_signal(signum, frame):
        signals.append(signum)
        second = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        signal.signal(signum, second)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    # ---- training loop ----
    next_target_eval, whole_loss, first_step_s = 0, None, None
    params = list(raw_model.parameters())
    for step in range(run.step, args.max_steps):
        t0 = time.time()
        factor = lr_factor(step, args.warmup_steps, decay_steps, min_lr / args.lr)
        for opt, peaks in zip(optimizers, peak_lrs):
            for g, peak in zip(opt.param_groups, peaks):
                g['lr'] = peak * factor
        # this process's share of each micro-step: B windows out of B x world
        starts = [run.position + (i * world + rt.rank) * B for i in range(grad_accum)]
        batches = [train_windows.get(start, B) for start in starts]
        run.position = (run.position + grad_accum * B * world) % train_windows.n
        loss, norm = train_step(model, params, optimizers, scaler, batches, args.grad_clip, ctx,
                                rt.ddp)
        stop = torch.tensor(float(bool(signals)), device=rt.device)
        if rt.ddp:  # the mean loss over processes; any process's signal stops them all at this step
            packed = torch.stack([loss, stop])
            dist.all_reduce(packed)
            loss, stop = packed[0] / world, packed[1]
        loss, norm, stop = torch.stack([loss, norm.float(), stop]).tolist()  # the one host sync
        dt = time.time() - t0
        first_step_s = dt if first_step_s is None else first_step_s
        run.step, run.tokens_seen = step + 1, run.tokens_seen + args.total_batch_tokens
        lr = args.lr * factor
        log(f'step {step} | loss: {loss:.6f} | dt: {dt * 1000:.2f}ms | tok/sec: '
            f'{args.total_batch_tokens / dt:.2f} | norm: {norm:.4f} | lr: {lr:.4e}')
        if not math.isfinite(loss):
            kept = 'no checkpoint was written'
            if os.path.exists(ckpt_path):
                kept = f'the last checkpoint, {ckpt_path}, is left as it was'
            raise TrainError(f'loss is {loss} at step {step}: training diverged (try a lower '
                             f'--lr); {kept}')
        row = dict(step=step, loss=loss, dt_ms=dt * 1000, tok_per_sec=args.total_batch_tokens / dt,
                   norm=norm, lr=lr, tokens=run.tokens_seen)
        whole_loss = None
        if loss < args.target_loss and step >= next_target_eval:
            # one lucky batch is no result: the loss over the whole text decides
            whole_loss = evaluate(raw_model, train_windows, B, ctx, rt.rank, world)
            row['whole_loss'] = whole_loss
            log(f'whole-text loss after step {step}: {whole_loss:.6f} (target {args.target_loss})')
            next_target_eval = step + args.target_cooldown
        if args.eval_interval and (step + 1) % args.eval_interval == 0:
            if whole_loss is None:
                row['whole_loss'] = evaluate(raw_model, train_windows, B, ctx, rt.rank, world)
            line = f'eval after step {step} | whole-text loss: {row["whole_loss"]:.6f}'
            if val_windows:
                row['val_loss'] = evaluate(raw_model, val_windows, B, ctx, rt.rank, world)
                line += f' | val loss: {row["val_loss"]:.6f}'
            log(line)
        log.row(row)
        if whole_loss is not None and whole_loss < args.target_loss:
            break
        interval = args.checkpoint_interval
        due = interval and run.step % interval == 0 and run.step < args.max_steps
        if (stop or due) and rt.master:
            save()
        if stop:
            log(f'stopped by a signal after step {step}; checkpoint: {ckpt_path} '
                f'(continue with --resume {ckpt_path})')
            return 128 + (signals[0] if signals else signal.SIGTERM)  # the shell's code for it

    # ---- the end ----
    reached = whole_loss is not None and whole_loss < args.target_loss
    if not reached:  # the final number is always the loss over the whole text
        whole_loss = evaluate(raw_model, train_windows, B, ctx, rt.rank, world)
        reached = whole_loss < args.target_loss
    if rt.master:
        save()
    compiled = ', compile included' if rt.compile else ''
    log(f'{"target reached" if reached else "target NOT reached"} at step {run.step - 1} | tokens '
        f'seen: {run.tokens_seen:,} | wall time: {run.elapsed:.1f}s (first step '
        f'{first_step_s or 0:.1f}s{compiled}) | whole-text loss: {whole_loss:.6f} (target '
        f'{args.target_loss}) | checkpoint: {ckpt_path}')
    if rt.master and args.samples > 0:
        from inference import play_samples  # generation is written once, in inference.py
        for header, text in play_samples(raw_model, args.samples, args.seed):
            log(f'--- sample: {header}\n{text}')
    return 0


def main(argv=None):
    """Run train.py with these arguments (default: the command line); returns the exit status."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # from the command line the clock started at the first import; from Python, it starts now
        return train(sys.argv[1:], T_START) if argv is None else train(argv, time.time())
    except (DataError, CheckpointError) as e:
        raise TrainError(str(e)) from None
    except RuntimeError as e:
        reason = collective_failure(e) if dist.is_initialized() else None
        if reason is None:
            raise
        raise TrainError(f'another process of this run died or hung ({reason}); continue from the '
                         f'last checkpoint with --resume') from None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    try:
        sys.exit(main())
    except TrainError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)

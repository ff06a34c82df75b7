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
import datetime
import math
import os
import signal
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
from checkpoint import CheckpointError, RunState
from data import DataError, load_splits
from model import GPT, GPTConfig
from runtime import (Progress, collective_failure, fit_micro_batch, free_memory, keep_freed_memory,
                     out_of_memory, peak_memory, pick_cpu_precision, pick_device, setup_runtime)

class TrainError(Exception):
    """Bad input or a failed run: reported as one line `error: ...` with exit status 1."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the module docstring's layout and shows every flag's default."""


# ---- arguments ----

# Two recipes for the optimization flags. gpu: nanoGPT's, big steps that keep a GPU busy. cpu: the
# one that went fastest per token in logs/recipe.md, since a CPU's cost is its tokens: small steps,
# Muon for the matrices inside the blocks. Flags given win.
PRESETS = {
    'gpu': dict(total_batch_tokens=65536, optimizer='adamw', lr=6e-4, warmup_steps=100,
                max_steps=5000, weight_decay=0.1),
    'cpu': dict(total_batch_tokens=4096, optimizer='muon', lr=1e-3, muon_lr=1e-3, warmup_steps=30,
                max_steps=1200, weight_decay=0.1),
}
PRESET_HELP = {'auto': 'cpu on a CPU, else gpu',
               **{k: ', '.join(f'{n}={v}' for n, v in p.items()) for k, p in PRESETS.items()}}

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a('--data', default='input.txt', help='UTF-8 text (tokenized once, cached as a uint16 .bin '
      'beside it) or a uint16 .bin of GPT-2 token ids')
    a('--data-tokens', type=int, default=0, help='use only the first N tokens of the data (0: all)')
    a('--val-fraction', type=float, default=0.0, help='hold out this last fraction of the tokens '
      'as a validation split (0: train on the whole text)')
    a('--out-dir', help='a new folder for train.log, metrics.jsonl and ckpt.pt (None: '
      'logs/run-<time>)')
    a('--resume', nargs='?', const='', default=None, metavar='CKPT', help='continue from this '
      'checkpoint (bare --resume: <out-dir>/ckpt.pt) with its saved settings; flags given now '
      'override them')
    a = p.add_argument_group('model (default: GPT-2 124M)').add_argument
    a('--n-layer', type=int, default=12)
    a('--n-head', type=int, default=12)
    a('--n-embd', type=int, default=768)
    a('--block-size', type=int, default=1024, help='context length T')
    a('--dropout', type=float, default=0.0)
    a = p.add_argument_group('optimization (None: the preset\'s value)').add_argument
    a('--preset', default='auto', choices=['auto', *PRESETS], help='the defaults of the flags '
      'below marked None: ' + '; '.join(f'{k}: {v}' for k, v in PRESET_HELP.items()))
    a('--batch-size', type=int, help='micro-batch: sequences per process per forward (None: 16 or '
      'fewer to fit a step; on a CPU or Apple GPU, fewer if 16 would not fit in the free memory)')
    a('--total-batch-tokens', type=int, help='tokens per optimizer step; gradient accumulation '
      'fills it (a multiple of batch-size x block-size x processes)')
    a('--optimizer', choices=['adamw', 'muon'], help='muon: torch.optim.Muon (torch >= 2.9) for '
      'the 2-D weights inside the blocks, AdamW for embeddings, biases and LayerNorm gains')
    a('--lr', type=float, help='peak learning rate (AdamW)')
    a('--muon-lr', type=float, default=None, help="peak learning rate of Muon (None: the preset's, "
      "else --lr; Muon's 'match_rms_adamw' scaling makes AdamW's rates fit)")
    a('--min-lr', type=float, help='learning rate at the end of the decay (None: lr / 10)')
    a('--warmup-steps', type=int, help='linear warmup steps')
    a('--max-steps', type=int, help='stop here if the target was not reached earlier')
    a('--lr-decay-steps', type=int, default=None, help='cosine decay ends here (None: '
      '--max-steps); keep it fixed when a run is split by --resume')
    a('--weight-decay', type=float)
    a('--grad-clip', type=float, default=1.0, help='clip the gradient norm to this (0: none)')
    a('--seed', type=int, default=1337)
    a = p.add_argument_group('target, evaluation and checkpoints').add_argument
    a('--target-loss', type=float, default=checkpoint.TARGET_LOSS, help='stop when the whole-text loss is below')
    a('--target-cooldown', type=int, default=None, help='after a whole-text evaluation that '
      'missed the target, train this many steps before the next (None: half a pass over the text '
      'and at least 10, so that the evaluations, each a forward pass over all of it, cost a '
      'fraction of the training)')
    a('--eval-interval', type=int, default=0, help='log the whole-text and validation loss every N '
      'steps (0: never)')
    a('--checkpoint-interval', type=int, default=500,
      help='write ckpt.pt every N steps (and at the end)')
    a('--samples', type=int, default=3, help='at the end, log this many samples of the final model')
    a = p.add_argument_group('system').add_argument
    a('--device', default='auto', help='auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps')
    a('--dtype', default='auto', choices=['auto', 'float32', 'bfloat16', 'float16'],
      help='autocast dtype; auto: bfloat16 on GPUs that have it, float16 with a GradScaler on '
      'older ones (T4), float32 on MPS; on a CPU whichever of float32 and bfloat16 a timed step '
      'before step 0 finds faster')
    a('--compile', action=argparse.BooleanOptionalAction, help='torch.compile (None: on CUDA; on '
      'a CPU when the run would take 30 min or more uncompiled and a C++ compiler is found)')
    a('--compile-mode', default='model', choices=['model', 'blocks'], help='model: the whole '
      'model; blocks: each block (one compile reused by all: starts faster, steps slower)')
    a('--ddp-timeout', type=float, default=1800, help='seconds a process waits for the others '
      'before the run fails (a process hung; one that dies is noticed at once); keep it well above '
      'the time a checkpoint write takes, which the others wait out')
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
    if args.preset == 'auto':  # a recipe for the device (a resumed run has its own saved)
        try:
            args.preset = 'cpu' if pick_device(args.device) == 'cpu' else 'gpu'
        except ValueError as e:
            raise TrainError(str(e)) from None
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ('n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'total_batch_tokens',
                 'max_steps'):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise TrainError(f'--{name.replace("_", "-")} must be positive')
    if args.n_embd % args.n_head:
        raise TrainError(f'--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}')
    if not 0 <= args.val_fraction < 1:
        raise TrainError('--val-fraction must be in [0, 1)')
    if args.optimizer == 'muon' and not hasattr(torch.optim, 'Muon'):
        raise TrainError(f'--optimizer muon (the {args.preset} preset\'s, unless given) needs torch >= 2.9 '
                         f'(torch.optim.Muon); this is torch {torch.__version__}: upgrade it, or give '
                         f'--optimizer adamw')
    return args, resumed


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
def evaluate(model, windows, batch_size, ctx, rank=0, world=1, stopped=None):
    """Mean loss over every target of `windows`, each predicted once, in eval mode. The processes
    split the batches and add up their loss sums and target counts. None if stopped() turns true
    between batches of a single process."""
    model.eval()
    total = torch.zeros(2, device=windows.device)  # (loss sum, number of targets)
    eager = torch.compiler.set_stance('force_eager')  # a one-off pass: compiling it would cost more
    batches = range(rank, math.ceil(windows.n / batch_size), world)
    progress = Progress('whole-text loss: batch', len(batches), active=rank == 0)
    for done, b in enumerate(batches, 1):
        if stopped is not None and stopped() and world == 1:
            model.train()
            progress.close()
            return None
        progress.update(done)
        x, y = windows.get(b * batch_size, batch_size, wrap=False)
        with ctx, eager:
            _, loss = model(x, y)
        count = (y != -1).sum()
        # a batch of padding only has a nan loss and no targets
        total += torch.stack([loss.float().nan_to_num() * count, count.float()])
    progress.close()
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def train_step(model, params, optimizers, scaler, batches, grad_clip, ctx, ddp, stopped, progress):
    """One optimizer step over the micro-batches [(x, y), ...]. Returns the mean loss and the
    gradient norm before clipping, as tensors: reading them (a host sync) is the caller's. Returns
    None, with no update made, when stopped() turns true between micro-steps of one process."""
    loss_sum = 0.0
    for i, (x, y) in enumerate(batches):
        if ddp:
            model.require_backward_grad_sync = i == len(batches) - 1  # all-reduce once per step
        with ctx:
            _, loss = model(x, y)
        loss = loss / len(batches)  # gradients add up over micro-steps; we want their mean
        loss_sum += loss.detach()
        scaler.scale(loss).backward()
        progress.update(i + 1)
        if stopped() and not ddp and i + 1 < len(batches):  # DDP processes finish the step together
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            return None
    for opt in optimizers:
        scaler.unscale_(opt)  # clip the true gradients, not the float16 loss-scaled ones
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float('inf'))
    for opt in optimizers:
        scaler.step(opt)  # skipped when the scaled gradients overflowed
    scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return loss_sum, norm


def make_model(args, rt, resumed, scaler, muon_lr, n_windows):
    """(GPT-2, its optimizers, their groups' peak lrs, the RunState): new, or as the checkpoint
    being resumed left them."""
    torch.manual_seed(args.seed)
    config = GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                       n_embd=args.n_embd, dropout=args.dropout)
    model = GPT(config).to(rt.device)  # what gets saved: never an _orig_mod. or module. prefix
    optimizers = model.configure_optimizers(args.weight_decay, args.lr, muon_lr,
                                            device_type=rt.device_type, verbose=False)
    peak_lrs = [[g['lr'] for g in opt.param_groups] for opt in optimizers]  # before a resume's
    if not resumed:
        return model, optimizers, peak_lrs, RunState()
    try:
        run = checkpoint.restore_training(resumed, model, optimizers, scaler)
    except CheckpointError as e:
        raise TrainError(f'--resume: {e}') from None
    run.position %= n_windows
    return model, optimizers, peak_lrs, run


def compile_and_wrap(raw_model, args, rt):
    """What runs forward: the model, compiled on CUDA (unless --no-compile), in DDP if torchrun."""
    model = raw_model
    if rt.compile and args.compile_mode == 'blocks':
        for block in raw_model.transformer.h:
            block.compile()  # the 12 blocks share one compiled graph
        raw_model.head = torch.compile(raw_model.head)  # ln_f, lm_head, loss: memory-bound eager
    elif rt.compile:
        model = torch.compile(raw_model)
    if rt.ddp:
        model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == 'cuda' else None)
    return model


# ---- the run ----

class Run:
    """A run in progress: its settings and runtime, the model it trains (raw, and as it runs forward:
    compiled, in DDP), the optimizers and GradScaler, where it stands (state, a RunState: saved with
    the rest as one TrainingCheckpoint, which --resume restores), its log, and a stop request: the
    first signal (Ctrl-C or SIGTERM) that asked for one, or None."""

    def __init__(self, **parts):
        self.__dict__.update(parts)
        self.signal, self.first_step_s = None, None
        self.ckpt_path = os.path.join(self.args.out_dir, 'ckpt.pt')
        self.t_start -= self.state.elapsed  # a resumed run's clock goes on from its checkpoint

    def ask_stop(self, signum, frame):
        """SIGINT's and SIGTERM's handler: the run stops within a micro-step, with a checkpoint; a
        second signal of the same kind stops it at once."""
        self.signal = self.signal or signum
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def stop_asked(self):  # asked between micro-steps and evaluation batches
        return self.signal is not None

    def save(self, rng=None):
        """ckpt.pt: the run so far, unless the weights diverged (checked on the next batch). rng: the
        random state to save (default: now's)."""
        self.state.elapsed = time.time() - self.t_start
        if self.rt.master:
            probe = self.train_windows.get(self.state.position, self.B)
            checkpoint.save_training(self.ckpt_path, self.raw_model, self.optimizers, self.scaler,
                                     self.state, vars(self.args), probe, self.rt.autocast, rng)

    def stopped(self, when):
        """The exit status of a run stopped by a signal, its checkpoint saved; logs the line that says so."""
        self.log(f'stopped by a signal {when}; checkpoint after {self.state.step} steps: '
                 f'{self.ckpt_path} (continue with --resume {self.ckpt_path})')
        # the shell's code for the signal (in DDP, a stop agreed on may be another process's)
        return 128 + (self.signal or signal.SIGTERM)

    def evaluate(self, windows=None, can_stop=False):
        """The loss over every target of windows (default: the training text); None if a stop
        request cut it short (only when can_stop)."""
        t0 = time.time()
        loss = evaluate(self.raw_model, windows or self.train_windows, self.B, self.rt.autocast,
                        self.rt.rank, self.rt.world, self.stop_asked if can_stop else None)
        self.eval_s = time.time() - t0  # what the last evaluation took: the whole-text lines say it
        return loss

    def take_step(self, step):
        """Optimizer step `step`: (loss, gradient norm, learning rate, stop: whether every process
        agreed to stop after it), or None when a stop request cut it short, with no update made."""
        args, rt, state, B, world = self.args, self.rt, self.state, self.B, self.rt.world
        factor = lr_factor(step, args.warmup_steps, self.decay_steps, self.min_lr / args.lr)
        for opt, peaks in zip(self.optimizers, self.peak_lrs):
            for g, peak in zip(opt.param_groups, peaks):
                g['lr'] = peak * factor
        # this process's share of each micro-step: B windows out of B x world
        batches = [self.train_windows.get(state.position + (i * world + rt.rank) * B, B)
                   for i in range(self.grad_accum)]
        progress = Progress(f'step {step}: micro-step', self.grad_accum, rt.master)
        try:
            result = train_step(self.model, self.params, self.optimizers, self.scaler, batches,
                                args.grad_clip, rt.autocast, rt.ddp, self.stop_asked, progress)
        except Exception:
            if not self.stop_asked() or rt.ddp:
                raise
            # a terminal's Ctrl-C reaches the whole process group: a compiler it killed (torch.compile
            # runs g++ on a CPU) fails the step, which is then a step stopped by the signal
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            result = None
        progress.close()
        if result is None:
            return None
        loss, norm = result
        windows = self.grad_accum * B * world
        state.tokens_seen += self.train_windows.targets(state.position, windows)  # all processes'
        state.position = (state.position + windows) % self.train_windows.n
        state.step, state.end = step + 1, None  # a run resumed after its end trains on
        stop = torch.tensor(float(self.stop_asked()), device=rt.device)
        if rt.ddp:  # the mean loss over processes; any process's signal stops them all at this step
            packed = torch.stack([loss, stop])
            dist.all_reduce(packed)
            loss, stop = packed[0] / world, packed[1]
        loss, norm, stop = torch.stack([loss, norm.float(), stop]).tolist()  # the one host sync
        return loss, norm, args.lr * factor, bool(stop)


def start_run(argv, t_start):
    """The Run that argv asks for, ready for its first step: a new one, or one resumed from its
    checkpoint; its log's header written."""
    args, resumed = parse_args(argv)
    try:
        rt = setup_runtime(args)
    except ValueError as e:  # a device this torch cannot use
        raise TrainError(str(e)) from None
    # float16 gradients underflow unless the loss is scaled up first
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == 'float16')
    # defaults that follow other flags stay None in the saved config: resume derives them anew
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    decay_steps = args.max_steps if args.lr_decay_steps is None else args.lr_decay_steps
    muon_lr = None
    if args.optimizer == 'muon':
        muon_lr = args.lr if args.muon_lr is None else args.muon_lr
    T, world = args.block_size, rt.world
    B = args.batch_size or max(1, min(16, args.total_batch_tokens // (T * world)))
    if args.total_batch_tokens % (B * T * world):
        raise TrainError(f'--total-batch-tokens {args.total_batch_tokens} is not a multiple of '
                         f'batch-size x block-size x processes = {B} x {T} x {world} = '
                         f'{B * T * world}')
    if args.out_dir is None:
        args.out_dir = os.path.join('logs', datetime.datetime.now().strftime('run-%Y%m%d-%H%M%S'))
    found = [name for name in ('train.log', 'metrics.jsonl', 'ckpt.pt')
             if os.path.exists(os.path.join(args.out_dir, name))]
    if found and not resumed:  # a run's folder is its record: never added to by another run
        raise TrainError(f'--out-dir {args.out_dir} holds a run already ({", ".join(found)}): '
                         f'continue it with --resume, or give a new --out-dir')
    commit = checkpoint.git_commit()  # before this run writes anything into the tree
    train_windows, val_windows, data_line = load_data(args, rt)
    raw_model, optimizers, peak_lrs, state = make_model(args, rt, resumed, scaler, muon_lr,
                                                        train_windows.n)
    notices = []
    if rt.device_type == 'cpu' and (args.dtype == 'auto' or args.compile is None):
        rt, line = pick_cpu_precision(args, rt, raw_model, train_windows)
        notices.append(line)
    if args.batch_size is None and rt.device_type != 'cuda':
        B, notice = fit_micro_batch(args, rt, raw_model, train_windows, B)
        notices += [notice] if notice else []
    free, peak = free_memory(), peak_memory()
    if rt.device_type == 'cpu' and free and peak and free > 2 * peak:
        # after the measurements above, which read the memory a step takes; only with room to spare,
        # as a heap that never shrinks fragments: under 1 GiB its step's blocks stopped fitting
        keep_freed_memory()
    args.batch_size, grad_accum = B, args.total_batch_tokens // (B * T * world)
    cooldown = args.target_cooldown
    if cooldown is None:  # half the steps of a pass over the training windows, at least 10
        cooldown = max(10, math.ceil(train_windows.n * T / args.total_batch_tokens / 2))
    if rt.rank:
        torch.manual_seed(args.seed + rt.rank + 7919 * state.step)  # its own dropout masks
    model = compile_and_wrap(raw_model, args, rt)
    log = checkpoint.RunLog(args.out_dir, state.step, rt.master)
    log.header(argv, vars(args), raw_model, commit, rt, f'{data_line} | step: '
               f'{args.total_batch_tokens:,} tokens = {B} x {T} x {grad_accum} micro-steps x '
               f'{world} process(es)')
    for notice in notices:
        log(notice)
    if resumed:
        log(f'resumed from {args.resume} at step {state.step} ({state.tokens_seen:,} tokens seen)')
    return Run(args=args, rt=rt, raw_model=raw_model, model=model, params=list(raw_model.parameters()),
               optimizers=optimizers, peak_lrs=peak_lrs, scaler=scaler, state=state, log=log,
               train_windows=train_windows, val_windows=val_windows, B=B, grad_accum=grad_accum,
               min_lr=min_lr, decay_steps=decay_steps, cooldown=cooldown, t_start=t_start)


def train(argv, t_start):
    """A run from its start (or --resume) to its end line; returns the exit status."""
    run = start_run(argv, t_start)
    args, log, ddp = run.args, run.log, run.rt.ddp
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, run.ask_stop)
    next_check, whole_loss = 0, None
    for step in range(run.state.step, args.max_steps):
        t0 = time.time()
        # what to save if this step is cut short: only dropout draws random numbers in a step
        rng = checkpoint.rng_state() if args.dropout and not ddp else None
        result = run.take_step(step)
        if result is None and step == 0:  # not one whole step: nothing worth a checkpoint
            log('stopped by a signal during step 0: nothing was trained, so no checkpoint was '
                'written')
            return 128 + run.signal
        if result is None:  # stopped half-way: the weights are those after the last whole step
            run.save(rng)
            return run.stopped(f'during step {step}')
        loss, norm, lr, stop = result
        dt = time.time() - t0
        run.first_step_s = dt if run.first_step_s is None else run.first_step_s
        log(f'step {step} | loss: {loss:.6f} | dt: {dt * 1000:.2f}ms | tok/sec: '
            f'{args.total_batch_tokens / dt:.2f} | norm: {norm:.4f} | lr: {lr:.4e}')
        if not math.isfinite(loss):
            kept = 'no checkpoint was written'
            if os.path.exists(run.ckpt_path):
                kept = f'the last checkpoint, {run.ckpt_path}, is left as it was'
            raise TrainError(f'loss is {loss} at step {step}: training diverged (try a lower '
                             f'--lr); {kept}')
        row = dict(step=step, loss=loss, dt_ms=dt * 1000, tok_per_sec=args.total_batch_tokens / dt,
                   norm=norm, lr=lr, tokens=run.state.tokens_seen)
        whole_loss = None
        if loss < args.target_loss and step >= next_check and not stop:
            # one lucky batch is no result: the loss over the whole text decides
            whole_loss = run.evaluate(can_stop=True)
            if whole_loss is not None:
                row['whole_loss'] = whole_loss
                log(f'whole-text loss after step {step}: {whole_loss:.6f} (target {args.target_loss}), '
                    f'{run.eval_s:.1f} s')
            next_check = step + run.cooldown
        # DDP processes act only on the stop they agreed on
        if args.eval_interval and (step + 1) % args.eval_interval == 0 and not (
                stop or not ddp and run.stop_asked()):
            if whole_loss is None:
                row['whole_loss'] = run.evaluate()
            line = f'eval after step {step} | whole-text loss: {row["whole_loss"]:.6f}'
            if run.val_windows:
                row['val_loss'] = run.evaluate(run.val_windows)
                line += f' | val loss: {row["val_loss"]:.6f}'
            log(line)
        log.row(row)
        if whole_loss is not None and whole_loss < args.target_loss:
            break
        stop = stop or not ddp and run.stop_asked()  # a signal during the evaluations too
        interval = args.checkpoint_interval
        if stop or interval and run.state.step % interval == 0 and run.state.step < args.max_steps:
            run.save()
        if stop:
            return run.stopped(f'after step {step}')
    return finish(run, whole_loss)


def finish(run, whole_loss):
    """The end of a run that was not stopped: the whole-text loss (unless the last step's check
    gave it), the checkpoint, the end line and the samples. Returns the exit status."""
    args, state = run.args, run.state
    reached = whole_loss is not None and whole_loss < args.target_loss
    if not reached:  # the final number is always the loss over the whole text
        whole_loss = run.evaluate(can_stop=True)
        if whole_loss is None:
            run.save()
            return run.stopped(f'after step {state.step - 1}, in the final evaluation')
        reached = whole_loss < args.target_loss
        run.log(f'whole-text loss after step {state.step - 1}: {whole_loss:.6f} (target {args.target_loss}), '
                f'{run.eval_s:.1f} s')
    state.end = dict(whole_loss=whole_loss, target_loss=args.target_loss, reached=reached,
                     first_step_s=run.first_step_s or 0)
    run.save()
    compiled = ', compile included' if run.rt.compile else ''
    run.log(f'{"target reached" if reached else "target NOT reached"} at step {state.step - 1} '
            f'({state.step} steps) | tokens seen: {state.tokens_seen:,} | wall time: '
            f'{state.elapsed:.1f}s (first step {state.end["first_step_s"]:.1f}s{compiled}) | '
            f'whole-text loss: {whole_loss:.6f} (target {args.target_loss}) | checkpoint: '
            f'{run.ckpt_path}')
    if run.rt.master and args.samples > 0:
        from generation import play_samples  # generation is written once, in generation.py
        for header, text in play_samples(run.raw_model, args.samples, args.seed):
            run.log(f'--- sample: {header}\n{text}')
    return 0


def main(argv=None):
    """Run train.py with these arguments (default: the command line); returns the exit status."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    broken = False  # a collective failed: the group cannot be closed in order
    try:
        # from the command line the clock started at the first import; from Python, it starts now
        return train(sys.argv[1:], T_START) if argv is None else train(argv, time.time())
    except (DataError, CheckpointError) as e:
        raise TrainError(str(e)) from None
    except (torch.OutOfMemoryError, MemoryError) as e:
        raise TrainError(f'out of memory ({type(e).__name__}): give a smaller --batch-size; '
                         f'gradient accumulation keeps the tokens per step') from None
    except RuntimeError as e:
        if out_of_memory(e):
            raise TrainError(f'out of memory ({out_of_memory(e)}): give a smaller --batch-size; '
                             f'gradient accumulation keeps the tokens per step') from None
        reason = collective_failure(e) if dist.is_initialized() else None
        if reason is None:
            raise
        broken = True
        raise TrainError(f'another process of this run died or hung ({reason}); continue from the '
                         f'last checkpoint with --resume') from None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if dist.is_initialized() and not broken:
            dist.destroy_process_group()


if __name__ == '__main__':
    try:
        status = main()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run is saved: a late Ctrl-C is moot
        sys.exit(status)
    except TrainError as e:
        print(f'error: {e}', file=sys.stderr)
        if dist.is_initialized():
            # a group whose collective failed is left open: closing it, here or at the interpreter's
            # exit, hung now and then while a peer was stopped (SIGSTOP). torchrun ends the others
            sys.stderr.flush()
            os._exit(1)
        sys.exit(1)
    except KeyboardInterrupt:  # a second Ctrl-C: out at once, the last checkpoint as it was
        print('\nerror: stopped at once by a second Ctrl-C; the last checkpoint is as it was',
              file=sys.stderr)
        sys.exit(128 + signal.SIGINT)

"""
Train GPT-2 (124M by default) on a text until its loss over the whole text is below --target-loss.

    python train.py                                      # GPT-2 124M on input.txt, on the GPU if there is one
    torchrun --standalone --nproc_per_node=2 train.py    # 2 GPUs of one machine (Gloo on CPUs)
    python train.py --resume logs/run-.../ckpt.pt        # continue a stopped run exactly

The text is cut into windows of block_size tokens, each predicting the next block_size tokens (the
last window is shorter). Training walks through the windows in order, batch_size of them per
micro-step and process, wrapping around at the end: every token is a target once per pass and the
data position is one integer. When a step's loss falls below the target, the loss over the whole
text (every window once, in eval mode) decides whether to stop. Every step prints one line, appended
to <out-dir>/train.log; <out-dir>/metrics.jsonl gets the same numbers as JSON; <out-dir>/ckpt.pt is
the checkpoint.
"""
import time

T_START = time.time()  # wall time counts from here: imports, tokenizing and compiling included

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import pickle
import platform
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT2_VOCAB_SIZE, GPT, GPTConfig, gpt2_tokenizer

SAMPLE_PROMPTS = ['ROMEO:\n', 'KING RICHARD II:\n', 'First Citizen:\n', 'JULIET:\n', 'MENENIUS:\n']
ON_DEVICE_BYTES = 1 << 30  # token arrays below this (as int64 inputs + targets) live on the training device


class TrainError(Exception):
    """Bad input or a failed run: reported as one line `error: ...` with exit status 1."""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--data', default='input.txt', help='UTF-8 text file (tokenized once, cached as uint16 .bin beside it) '
                                          'or a uint16 .bin of GPT-2 token ids (default: input.txt)')
    a('--data-tokens', type=int, default=0, help='use only the first N tokens of the data (0: all)')
    a('--val-fraction', type=float, default=0.0, help='hold out this last fraction of the tokens as a '
                                                      'validation split (default 0: train on the whole text)')
    a('--out-dir', default=None, help='run folder for train.log, metrics.jsonl, ckpt.pt (default logs/run-<time>)')
    a('--resume', nargs='?', const='', default=None, metavar='CKPT',
      help='continue from this checkpoint (bare --resume: <out-dir>/ckpt.pt) with its saved settings; '
           'flags given now override them')
    g = p.add_argument_group('model (default: GPT-2 124M)')
    g.add_argument('--n-layer', type=int, default=12)
    g.add_argument('--n-head', type=int, default=12)
    g.add_argument('--n-embd', type=int, default=768)
    g.add_argument('--block-size', type=int, default=1024, help='context length T')
    g.add_argument('--dropout', type=float, default=0.0)
    g = p.add_argument_group('optimization (tunable; the defaults are nanoGPT-like)')
    g.add_argument('--batch-size', type=int, default=16, help='micro-batch: sequences per process per forward')
    g.add_argument('--total-batch-tokens', type=int, default=65536,
                   help='tokens per optimizer step; gradient accumulation fills it (must be a multiple of '
                        'batch-size x block-size x processes)')
    g.add_argument('--optimizer', default='adamw', choices=['adamw', 'muon'],
                   help='muon: torch.optim.Muon (torch >= 2.9) for the 2-D weights inside the blocks, '
                        'AdamW for embeddings, biases and LayerNorm gains')
    g.add_argument('--lr', type=float, default=6e-4, help='peak learning rate (AdamW)')
    g.add_argument('--muon-lr', type=float, default=None,
                   help="peak learning rate of Muon (default: --lr; Muon's 'match_rms_adamw' scaling makes "
                        "AdamW's rates fit)")
    g.add_argument('--min-lr', type=float, default=None, help='learning rate at the end of the decay (default: lr / 10)')
    g.add_argument('--warmup-steps', type=int, default=100, help='linear warmup steps')
    g.add_argument('--max-steps', type=int, default=5000, help='stop here if the target was not reached earlier')
    g.add_argument('--lr-decay-steps', type=int, default=None,
                   help='cosine decay ends here (default: --max-steps); keep it fixed when a run is split by --resume')
    g.add_argument('--weight-decay', type=float, default=0.1)
    g.add_argument('--grad-clip', type=float, default=1.0, help='clip the gradient norm to this (0: no clipping)')
    g.add_argument('--seed', type=int, default=1337)
    g = p.add_argument_group('target, evaluation and checkpoints')
    g.add_argument('--target-loss', type=float, default=0.099999,
                   help='stop when the loss over the whole training text is below this')
    g.add_argument('--target-cooldown', type=int, default=10,
                   help='after a whole-text evaluation that missed the target, train this many steps before the next')
    g.add_argument('--eval-interval', type=int, default=0,
                   help='every N steps, log the whole-text loss (and the validation loss) (0: never)')
    g.add_argument('--checkpoint-interval', type=int, default=500, help='write ckpt.pt every N steps (and at the end)')
    g.add_argument('--samples', type=int, default=3,
                   help='at the end, log this many 100-token samples of the final model, from speakers of the play')
    g = p.add_argument_group('system')
    g.add_argument('--device', default='auto', help='auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps')
    g.add_argument('--dtype', default='auto', choices=['auto', 'float32', 'bfloat16', 'float16'],
                   help='autocast dtype; auto: bfloat16 on GPUs that have it, float16 with a GradScaler on '
                        'older ones (T4), float32 on CPU and MPS')
    g.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                   help='torch.compile (default: on for CUDA only)')
    g.add_argument('--compile-mode', default='model', choices=['model', 'blocks'],
                   help='model: compile the whole model; blocks: compile each transformer block '
                        '(one compile reused by every block: starts faster)')
    g.add_argument('--ddp-timeout', type=float, default=1800,
                   help='seconds a process waits for the others in a collective before the run fails (one '
                        'process hung or stopped); a process that dies is noticed at once. Keep it well above the '
                        'time the first process takes to write a checkpoint, which the others wait out (default: 1800)')
    return p


# ---- data ----

def _safe_cut(text):
    """Index just after the last newline that has a non-space character on both sides. GPT-2's
    pre-tokenizer never joins anything across such a newline, so pieces cut there tokenize exactly
    like the whole text. Without one, the whole text (a very rare, slightly inexact cut)."""
    i = text.rfind('\n', 0, len(text) - 1)
    while i > 0 and (text[i - 1].isspace() or text[i + 1].isspace()):
        i = text.rfind('\n', 0, i)
    return i + 1 if i > 0 else len(text)


def tokenize_file(path, out_path, piece_chars=1 << 20):
    """Tokenize a UTF-8 text into a uint16 file, streamed in pieces of about piece_chars characters
    (bounded memory for any size). A BOM is dropped and Windows line ends read as '\\n'."""
    try:
        enc = gpt2_tokenizer()
    except (OSError, ValueError) as e:  # the ranks file is missing or fails its sha256 check
        raise TrainError(f'cannot load the GPT-2 tokenizer: {e}') from None
    tmp = f'{out_path}.{os.getpid()}.tmp'
    try:
        with open(path, encoding='utf-8-sig') as f, open(tmp, 'wb') as out:
            rest, pieces = '', []
            while True:
                chunk = f.read(piece_chars)
                text = rest + chunk
                cut = _safe_cut(text) if chunk else len(text)
                if cut:
                    pieces.append(text[:cut])
                rest = text[cut:]
                if len(pieces) == 16 or not chunk:  # encode 16 pieces at a time on tiktoken's threads
                    for ids in enc.encode_ordinary_batch(pieces):
                        np.asarray(ids, dtype=np.uint16).tofile(out)
                    pieces = []
                if not chunk:
                    break
        os.replace(tmp, out_path)  # atomic: a second run never sees half a cache
    except UnicodeDecodeError as e:
        raise TrainError(f'data file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} cannot be decoded)')
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_tokens(path, piece_chars=1 << 20):
    """GPT-2 token ids of a text file (cached beside it as <name>.gpt2-<key>.bin, keyed by size and
    mtime, so a second run starts at once) or of a uint16 .bin file, as a read-only memmap."""
    if os.path.isdir(path):
        raise TrainError(f'data file {path} is a directory; give a text file or a .bin of token ids')
    if not os.path.isfile(path):
        raise TrainError(f'data file {path} not found')
    if not os.access(path, os.R_OK):
        raise TrainError(f'data file {path} cannot be read (permission denied)')
    bin_path = path
    if not path.endswith('.bin'):
        st = os.stat(path)
        key = hashlib.sha1(f'{st.st_size}-{st.st_mtime_ns}'.encode()).hexdigest()[:10]
        bin_path = f'{os.path.splitext(path)[0]}.gpt2-{key}.bin'
        if not os.path.exists(bin_path):
            try:
                tokenize_file(path, bin_path, piece_chars)
            except OSError:  # a read-only folder: cache in the temp folder instead
                bin_path = os.path.join(tempfile.gettempdir(), f'{os.path.basename(path)}.{key}.gpt2.bin')
                tokenize_file(path, bin_path, piece_chars)
    size = os.path.getsize(bin_path)
    if size == 0:
        raise TrainError(f'data file {path} is empty')
    if size % 2:
        raise TrainError(f'{path} is not a file of uint16 token ids (odd size)')
    tokens = np.memmap(bin_path, dtype=np.uint16, mode='r')
    if bin_path == path and tokens.max() >= GPT2_VOCAB_SIZE:
        raise TrainError(f'{path} holds ids >= {GPT2_VOCAB_SIZE}: not GPT-2 tokens')
    return tokens


class Windows:
    """Tokens cut into n windows: window i has inputs tokens[i*T : i*T+T] and targets one further on.
    The last window is padded (input 0, target -1, which the loss ignores), so every token but the
    first is a target exactly once. Small arrays sit on the device as two (n, T) tensors and a batch
    is one indexing op there, with no copy from the host; large ones are read from the memmap."""

    def __init__(self, tokens, T, device):
        self.T, self.device = T, device
        self.n = math.ceil((len(tokens) - 1) / T)
        self.tokens = tokens
        self.on_device = 16 * self.n * T < ON_DEVICE_BYTES
        if self.on_device:
            t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
            pad = self.n * T + 1 - len(t)
            self.x = F.pad(t[:-1], (0, pad), value=0).view(self.n, T).to(device)
            self.y = F.pad(t[1:], (0, pad), value=-1).view(self.n, T).to(device)

    def get(self, start, count, wrap=True):
        """Windows start .. start+count-1 as x, y (count, T) on the device. Past the last window they
        wrap around to the first (training), or have all targets -1 (evaluation: counted once)."""
        if self.on_device:
            idx = torch.arange(start, start + count, device=self.device)
            x, y = self.x[idx % self.n], self.y[idx % self.n]
            return x, (y if wrap else y.masked_fill((idx >= self.n)[:, None], -1))
        x = np.zeros((count, self.T), np.int64)
        y = np.full((count, self.T), -1, np.int64)
        for row, i in enumerate(range(start, start + count)):
            if i >= self.n and not wrap:
                break
            seg = self.tokens[(i % self.n) * self.T:(i % self.n + 1) * self.T + 1]
            x[row, :len(seg) - 1], y[row, :len(seg) - 1] = seg[:-1], seg[1:]
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        if self.device.startswith('cuda'):  # pinned memory lets the copy overlap the running step
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)


@torch.no_grad()
def evaluate(model, windows, batch_size, ctx, rank=0, world=1):
    """Mean loss over every target of `windows`, each predicted once, in eval mode. The processes
    split the batches and add up their loss sums and target counts."""
    model.eval()
    total = torch.zeros(2, device=windows.device)  # (loss sum, number of targets)
    eager = torch.compiler.set_stance('force_eager')  # a one-off pass: compiling it for eval would cost more
    for b in range(rank, math.ceil(windows.n / batch_size), world):
        x, y = windows.get(b * batch_size, batch_size, wrap=False)
        with ctx, eager:
            _, loss = model(x, y)
        count = (y != -1).sum()
        total += torch.stack([loss.float().nan_to_num() * count, count.float()])  # nan: a batch of padding only
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


# ---- checkpoints ----

def rng_state():
    """Every random generator a run could draw from, as tensors (torch.load(weights_only=True) reads them)."""
    state = {'torch': torch.get_rng_state(),
             'numpy': torch.tensor([*np.random.get_state()[1], np.random.get_state()[2]], dtype=torch.int64),
             'python': torch.tensor(random.getstate()[1], dtype=torch.int64)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    np.random.set_state(('MT19937', state['numpy'][:624].numpy().astype(np.uint32), int(state['numpy'][624])))
    random.setstate((3, tuple(state['python'].tolist()), None))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


def save_checkpoint(path, ckpt):
    """Write atomically: a temporary file in the same folder, flushed to disk, then renamed over the
    old one. A crash at any moment leaves either the old checkpoint or the new one, whole (and maybe a
    stale .tmp, which the next save overwrites). A failed write (disk full, no permission) removes its
    .tmp and raises TrainError; the old checkpoint stays."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        os_error = e if isinstance(e, OSError) else e.__context__  # torch.save raises RuntimeError over the OSError
        reason = os_error.strerror if isinstance(os_error, OSError) and os_error.strerror else str(e).splitlines()[0]
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise TrainError(f'cannot write the checkpoint {path} ({reason}); ' + ('the previous checkpoint is left '
                         'as it was' if os.path.exists(path) else 'no checkpoint was written')) from None


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise TrainError(f'--resume: no checkpoint at {path}')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'GLOBAL ' in str(e):  # weights_only=True met a class or function: unpickling it could run code
            raise TrainError(f'--resume: {path} refused: it holds pickled objects other than tensors and plain '
                             f'containers ({str(e).split("GLOBAL ")[1].split()[0]}), which could run code when loaded')
        raise TrainError(f'--resume: {path} is not a readable checkpoint (UnpicklingError)')
    except Exception as e:
        raise TrainError(f'--resume: {path} is not a readable checkpoint ({type(e).__name__})')
    need = {'model_args', 'model', 'optimizer', 'step', 'tokens_seen', 'elapsed', 'data_state', 'config'}
    if not isinstance(ckpt, dict) or need - ckpt.keys():
        raise TrainError(f'--resume: {path} is not a training checkpoint (a model-only file cannot be resumed)')
    return ckpt


def lr_factor(step, warmup_steps, decay_steps, floor):
    """Learning rate / peak: linear warmup to 1, then cosine decay to `floor` at decay_steps, flat after."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    ratio = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (1.0 - floor)


def git_commit():
    try:
        return subprocess.run(['git', 'describe', '--always', '--dirty'], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or 'unknown'
    except OSError:
        return 'unknown'


def train(argv, t_start):
    # ---- arguments ----
    parser = build_parser()
    args = parser.parse_args(argv)
    ckpt = None
    if args.resume is not None:
        if args.resume == '' and not args.out_dir:
            raise TrainError('bare --resume needs --out-dir (or give the checkpoint path)')
        resume = args.resume or os.path.join(args.out_dir, 'ckpt.pt')
        ckpt = load_checkpoint(resume)
        # the run goes on with its saved settings; flags given now override them
        known = vars(parser.parse_args([]))
        parser.set_defaults(**{k: v for k, v in ckpt['config'].items() if k in known and k not in ('resume', 'out_dir')},
                            out_dir=os.path.dirname(resume) or '.')
        args = parser.parse_args(argv)
        args.resume = resume
    # defaults that follow other flags stay None in the saved config, so a resumed run derives them anew
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    decay_steps = args.max_steps if args.lr_decay_steps is None else args.lr_decay_steps
    muon_lr = args.lr if args.muon_lr is None else args.muon_lr
    for name in ('n_layer', 'n_head', 'n_embd', 'block_size', 'batch_size', 'total_batch_tokens', 'max_steps'):
        if getattr(args, name) <= 0:
            raise TrainError(f'--{name.replace("_", "-")} must be positive')
    if args.n_embd % args.n_head:
        raise TrainError(f'--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}')
    if not 0 <= args.val_fraction < 1:
        raise TrainError('--val-fraction must be in [0, 1)')

    # ---- setup: processes, device, dtype ----
    ddp = 'RANK' in os.environ  # set by torchrun
    rank, local_rank, world = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')) if ddp else (0, 0, 1)
    master = rank == 0
    device = args.device
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    device_type = device.split(':')[0]
    if device_type == 'cuda' and not torch.cuda.is_available():
        raise TrainError('--device cuda, but this torch sees no CUDA GPU')
    if device_type == 'mps' and not torch.backends.mps.is_available():
        raise TrainError('--device mps, but MPS is not available')
    if device_type == 'cuda':
        device = f'cuda:{local_rank}' if ddp else device if ':' in device else 'cuda:0'
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision('high')  # TF32 matmuls for whatever runs in float32
    if ddp:
        # the timeout bounds every collective: a process that hangs fails the run instead of stalling it forever
        dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo',
                                device_id=torch.device(device) if device_type == 'cuda' else None,
                                timeout=datetime.timedelta(seconds=args.ddp_timeout))
    dtype = args.dtype
    if dtype == 'auto':
        dtype = 'float32' if device_type != 'cuda' else \
            'bfloat16' if torch.cuda.get_device_capability()[0] >= 8 else 'float16'  # T4 (7.5) has no bf16
    ptdtype = getattr(torch, dtype)
    ctx = torch.autocast(device_type, dtype=ptdtype) if dtype != 'float32' else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')  # float16 gradients underflow unscaled
    use_compile = device_type == 'cuda' if args.compile is None else args.compile

    B, T = args.batch_size, args.block_size
    if args.total_batch_tokens % (B * T * world):
        raise TrainError(f'--total-batch-tokens {args.total_batch_tokens} is not a multiple of batch-size x block-size '
                         f'x processes = {B} x {T} x {world} = {B * T * world}')
    grad_accum = args.total_batch_tokens // (B * T * world)
    out_dir = args.out_dir or os.path.join('logs', datetime.datetime.now().strftime('run-%Y%m%d-%H%M%S'))
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')

    # ---- data ----
    # one process per machine tokenizes first; the others then find its cache
    if local_rank != 0:
        dist.barrier()
    tokens = load_tokens(args.data)
    if ddp and local_rank == 0:
        dist.barrier()
    if args.data_tokens:
        tokens = tokens[:args.data_tokens]
    n_val = int(len(tokens) * args.val_fraction)
    train_tokens, val_tokens = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
    for split, t in (('text', train_tokens), ('validation split', val_tokens)):
        if (split == 'text' or n_val) and len(t) < T + 1:
            raise TrainError(f'the {split} of {args.data} has {len(t)} tokens, fewer than one sequence '
                             f'(block size {T} + 1); use a longer text or a smaller --block-size')
    train_windows = Windows(train_tokens, T, device)
    val_windows = Windows(val_tokens, T, device) if n_val else None

    # ---- model ----
    torch.manual_seed(args.seed)
    config = GPTConfig(block_size=T, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout)
    raw_model = GPT(config).to(device)
    if ckpt:
        try:
            raw_model.load_state_dict(ckpt['model'])
        except RuntimeError as e:
            raise TrainError(f'--resume: the checkpoint does not fit this model ({str(e).splitlines()[0]})')

    # ---- optimizer ----
    optimizers = [raw_model.configure_optimizers(args.weight_decay, args.lr, device_type=device_type, verbose=False)]
    peak_lrs = [args.lr]
    if args.optimizer == 'muon':
        if not hasattr(torch.optim, 'Muon'):
            raise TrainError(f'--optimizer muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}')
        # Muon orthogonalizes the update of each weight matrix inside the blocks; AdamW keeps the rest
        hidden = [p for n, p in raw_model.named_parameters() if n.startswith('transformer.h.') and p.dim() == 2]
        for g in optimizers[0].param_groups:  # before the first step AdamW holds no state: dropping is safe
            g['params'] = [p for p in g['params'] if all(p is not h for h in hidden)]
        optimizers.append(torch.optim.Muon(hidden, lr=muon_lr, weight_decay=args.weight_decay,
                                           adjust_lr_fn='match_rms_adamw'))
        peak_lrs.append(muon_lr)
    start_step, tokens_seen, elapsed_before, position = 0, 0, 0.0, 0
    if ckpt:
        if len(ckpt['optimizer']) != len(optimizers):
            raise TrainError(f'--resume: the checkpoint has {len(ckpt["optimizer"])} optimizer states, '
                             f'--optimizer {args.optimizer} needs {len(optimizers)}')
        for opt, state in zip(optimizers, ckpt['optimizer']):
            opt.load_state_dict(state)
        if ckpt.get('scaler') and scaler.is_enabled():
            scaler.load_state_dict(ckpt['scaler'])
        start_step, tokens_seen, elapsed_before = ckpt['step'], ckpt['tokens_seen'], ckpt['elapsed']
        position = ckpt['data_state']['position'] % train_windows.n
        set_rng_state(ckpt['rng'])
    if rank:
        torch.manual_seed(args.seed + rank + 7919 * start_step)  # each process draws its own dropout masks

    cmodel = raw_model  # what runs forward; raw_model is what gets saved (never an _orig_mod. prefix)
    if use_compile and args.compile_mode == 'blocks':
        for block in raw_model.transformer.h:
            block.compile()  # the 12 blocks share one compiled graph
        raw_model.head = torch.compile(raw_model.head)  # ln_f, lm_head and the loss: memory-bound when eager
    elif use_compile:
        cmodel = torch.compile(raw_model)
    model = DDP(cmodel, device_ids=[local_rank] if device_type == 'cuda' else None) if ddp else cmodel

    # ---- logging ----
    log_file = metrics_file = None
    if master:
        try:  # an out-dir we cannot write to fails now, not at the first checkpoint hours later
            os.makedirs(out_dir, exist_ok=True)
            log_file = open(os.path.join(out_dir, 'train.log'), 'a', buffering=1)
            # a run killed after its last checkpoint logged steps that this one does again: metrics.jsonl keeps
            # one row per step (train.log keeps every line; its 'resumed from ... at step N' marks the redo)
            metrics_path = os.path.join(out_dir, 'metrics.jsonl')
            kept = []
            if os.path.exists(metrics_path):
                with open(metrics_path) as f:
                    for line in f:
                        with contextlib.suppress(ValueError, KeyError, TypeError):  # a line cut by the kill
                            if json.loads(line)['step'] < start_step:
                                kept.append(line.rstrip('\n') + '\n')
            with open(metrics_path + '.tmp', 'w') as f:
                f.writelines(kept)
            os.replace(metrics_path + '.tmp', metrics_path)
            metrics_file = open(metrics_path, 'a', buffering=1)
        except OSError as e:
            raise TrainError(f'cannot write to the out-dir {out_dir} ({e.strerror})') from None

    def log(msg):
        if master:
            print(msg, flush=True)
            log_file.write(msg + '\n')

    import tiktoken
    device_name = torch.cuda.get_device_name(device) if device_type == 'cuda' else 'Apple MPS' \
        if device_type == 'mps' else f'CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)'
    groups = raw_model.optim_groups(args.weight_decay)
    log(f'command: {shlex.join(["python", "train.py", *argv])}')
    log(f'git commit: {git_commit()}')
    log(f'device: {device_name} x {world} process(es) | dtype: {dtype} | compile: '
        f'{args.compile_mode if use_compile else "off"}')
    log(f'versions: python {platform.python_version()} | torch {torch.__version__} | tiktoken {tiktoken.__version__}')
    log(f'config: {json.dumps(vars(args))}')
    log(f'model: {raw_model.num_params():,} parameters | decayed: {len(groups[0]["params"])} tensors, '
        f'{sum(p.numel() for p in groups[0]["params"]):,} | not decayed: {len(groups[1]["params"])} tensors, '
        f'{sum(p.numel() for p in groups[1]["params"]):,}')
    log(f'data: {args.data}: {len(train_tokens):,} training tokens in {train_windows.n} windows'
        + (f', {len(val_tokens):,} validation tokens' if n_val else '')
        + f' | step: {args.total_batch_tokens:,} tokens = {B} x {T} x {grad_accum} micro-steps x {world} process(es)')
    if ckpt:
        log(f'resumed from {args.resume} at step {start_step} ({tokens_seen:,} tokens seen)')

    def checkpoint(steps_done):
        """The whole training state after `steps_done` steps, written by the first process only."""
        if master:
            # the last update may itself have diverged: weights that give no finite loss are never saved
            raw_model.eval()
            with torch.no_grad(), ctx, torch.compiler.set_stance('force_eager'):
                _, loss = raw_model(*train_windows.get(position, B))
            raw_model.train()
            if not torch.isfinite(loss):
                raise TrainError(f'the weights after step {steps_done - 1} give a {loss.item()} loss: training '
                                 f'diverged (try a lower --lr); {ckpt_path} is left as it was')
            save_checkpoint(ckpt_path, {
                'model_args': asdict(config), 'model': raw_model.state_dict(),
                'optimizer': [opt.state_dict() for opt in optimizers],
                'scaler': scaler.state_dict() if scaler.is_enabled() else None,
                'step': steps_done, 'tokens_seen': tokens_seen, 'elapsed': elapsed_before + time.time() - t_start,
                'data_state': {'position': position, 'n_tokens': len(train_tokens)},
                'rng': rng_state(), 'config': vars(args)})

    # Ctrl-C or SIGTERM stops the run after the current step, with a checkpoint; a second one stops it at once
    signals = []

    def on_signal(signum, frame):
        signals.append(signum)
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    # ---- training loop ----
    next_target_eval, whole_loss, first_step_s = 0, None, None
    step = start_step - 1
    for step in range(start_step, args.max_steps):
        t0 = time.time()
        factor = lr_factor(step, args.warmup_steps, decay_steps, min_lr / args.lr)
        for opt, peak in zip(optimizers, peak_lrs):
            for g in opt.param_groups:
                g['lr'] = peak * factor
        loss_accum = torch.zeros((), device=device)
        for micro in range(grad_accum):
            x, y = train_windows.get(position + rank * B, B)  # (B, T) each: this process's part of the micro-step
            position = (position + B * world) % train_windows.n
            if ddp:
                model.require_backward_grad_sync = micro == grad_accum - 1  # all-reduce gradients once per step
            with ctx:
                _, loss = model(x, y)
            loss = loss / grad_accum  # gradients add up over micro-steps; we want their mean
            loss_accum += loss.detach()
            scaler.scale(loss).backward()
        for opt in optimizers:
            scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
        norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip or float('inf'))
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        stop = torch.tensor(float(bool(signals)), device=device)
        if ddp:  # mean loss over processes; any process's signal stops them all at this same step
            packed = torch.stack([loss_accum, stop])
            dist.all_reduce(packed)
            loss_accum, stop = packed[0] / world, packed[1]
        loss_val, norm_val, stop_val = torch.stack([loss_accum, norm.float(), stop]).tolist()  # the one host sync
        dt = time.time() - t0
        first_step_s = dt if first_step_s is None else first_step_s
        tokens_seen += args.total_batch_tokens
        log(f'step {step} | loss: {loss_val:.6f} | dt: {dt * 1000:.2f}ms | tok/sec: {args.total_batch_tokens / dt:.2f} '
            f'| norm: {norm_val:.4f} | lr: {args.lr * factor:.4e}')
        if not math.isfinite(loss_val):
            raise TrainError(f'loss is {loss_val} at step {step}: training diverged (try a lower --lr); ' +
                             (f'the last checkpoint, {ckpt_path}, is left as it was' if os.path.exists(ckpt_path)
                              else 'no checkpoint was written'))
        row = dict(step=step, loss=loss_val, dt_ms=dt * 1000, tok_per_sec=args.total_batch_tokens / dt,
                   norm=norm_val, lr=args.lr * factor, tokens=tokens_seen)
        whole_loss = None
        if loss_val < args.target_loss and step >= next_target_eval:
            # one lucky batch is no result: the loss over the whole text decides
            whole_loss = row['whole_loss'] = evaluate(raw_model, train_windows, B, ctx, rank, world)
            log(f'whole-text loss after step {step}: {whole_loss:.6f} (target {args.target_loss})')
            next_target_eval = step + args.target_cooldown
        if args.eval_interval and (step + 1) % args.eval_interval == 0:
            if whole_loss is None:
                row['whole_loss'] = evaluate(raw_model, train_windows, B, ctx, rank, world)
            if val_windows:
                row['val_loss'] = evaluate(raw_model, val_windows, B, ctx, rank, world)
            log(f'eval after step {step} | whole-text loss: {row["whole_loss"]:.6f}'
                + (f' | val loss: {row["val_loss"]:.6f}' if val_windows else ''))
        if master:
            metrics_file.write(json.dumps(row) + '\n')
        if whole_loss is not None and whole_loss < args.target_loss:
            break
        if stop_val:
            checkpoint(step + 1)
            log(f'stopped by a signal after step {step}; checkpoint: {ckpt_path} (continue with --resume {ckpt_path})')
            return 128 + (signals[0] if signals else signal.SIGTERM)  # the shell's code for death by that signal
        if args.checkpoint_interval and (step + 1) % args.checkpoint_interval == 0 and step + 1 < args.max_steps:
            checkpoint(step + 1)

    # ---- wrap-up ----
    reached = whole_loss is not None and whole_loss < args.target_loss
    if not reached:  # the final number is always the loss over the whole text
        whole_loss = evaluate(raw_model, train_windows, B, ctx, rank, world)
        reached = whole_loss < args.target_loss
    checkpoint(step + 1)
    wall = elapsed_before + time.time() - t_start
    log(f'{"target reached" if reached else "target NOT reached"} at step {step} | tokens seen: {tokens_seen:,} | '
        f'wall time: {wall:.1f}s (first step {first_step_s or 0:.1f}s{", compile included" if use_compile else ""}) | '
        f'whole-text loss: {whole_loss:.6f} (target {args.target_loss}) | checkpoint: {ckpt_path}')
    if master and args.samples > 0:
        from inference import generate  # generation is written once, in inference.py
        raw_model.eval()
        with torch.compiler.set_stance('force_eager'):
            for prompt in SAMPLE_PROMPTS[:args.samples]:
                text = ''.join(generate(raw_model, prompt, 100, temperature=0.7, top_k=50, seed=args.seed))
                log(f'--- sample: prompt {prompt!r}, 100 tokens, temperature 0.7, top-k 50, seed {args.seed}\n{prompt}{text}')
    return 0


def main(argv=None):
    """Run train.py with these arguments (default: the command line); returns the exit status."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # from the command line the clock started at the first import; called from Python, it starts now
        return train(sys.argv[1:], T_START) if argv is None else train(argv, time.time())
    except RuntimeError as e:
        # another process died (its sockets closed) or hung (--ddp-timeout ran out) in a collective: NCCL raises
        # DistError, Gloo a RuntimeError that names its own source file
        if not (dist.is_initialized() and (isinstance(e, dist.DistError) or '/gloo/' in str(e))):
            raise
        reason = re.sub(r'^\[[^\]]*\]\s*', '', str(e).splitlines()[0]).split('. ')[0]  # drop the source location
        raise TrainError(f'another process of this run died or hung ({reason}); continue from the last checkpoint '
                         f'with --resume') from None
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

"""
A run's folder in one place: the checkpoint format, and the log beside it. Two kinds of checkpoint,
both read with torch.load(weights_only=True), which refuses anything but tensors and plain
containers (a pickled class or function could run code):

- a training checkpoint (train.py's ckpt.pt): the fields of TrainingCheckpoint below, everything a
  run needs to continue exactly where it stopped;
- a model-only file (what a Hub repo may hold as model.pt): model_args and model only.

The weights' keys never carry torch.compile's '_orig_mod.' or DDP's 'module.' prefix. Beside the
checkpoint, train.log holds every line a run printed and metrics.jsonl one JSON row per step
(RunLog below); app.py plots those rows.

How a model leaves the project, as a Hugging Face model repo, is in export.py.
"""
import contextlib
import json
import math
import os
import pickle
import platform
import random
import re
import shlex
import subprocess
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from model import GPT, GPTConfig
from runtime import device_name


class CheckpointError(Exception):
    """A checkpoint that cannot be found, read, trusted or written; one line, meant for the user."""


@dataclass
class RunState:
    """Where a run stands, saved and restored as one value."""
    step: int = 0          # optimizer steps done
    tokens_seen: int = 0   # targets trained on, over all processes (a padded one is none)
    position: int = 0      # the next window of the data to train on
    elapsed: float = 0.0   # seconds of training before this process started
    # how the run ended, as its end line says (whole_loss, target_loss, reached, first_step_s); None
    # while it trains: what an export tells of the run is read here, never parsed from train.log
    end: dict | None = None


@dataclass
class TrainingCheckpoint:
    """What train.py's ckpt.pt holds."""
    model_args: dict       # GPTConfig as a dict
    model: dict            # the weights (state_dict)
    optimizer: list        # one state_dict per optimizer (AdamW; AdamW and Muon)
    scaler: dict | None    # the float16 GradScaler's state, or None
    run: RunState
    rng: dict              # every random generator's state (rng_state())
    config: dict           # train.py's arguments, which --resume takes as its defaults


MODEL_ONLY_KEYS = ('model_args', 'model')
TARGET_LOSS = 0.099999  # the project's goal for the whole-text loss: train.py's default, the app's loss plot


# ---- random state ----

def rng_state():
    """Every random generator a run could draw from, as tensors (weights_only can read them)."""
    np_state = np.random.get_state()
    state = {'torch': torch.get_rng_state(),
             'numpy': torch.tensor([*np_state[1], np_state[2]], dtype=torch.int64),
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


# ---- writing ----

def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, flushed to disk, then renamed over the old
    file. A crash at any moment leaves either the old file or the new one, whole (and maybe a stale
    .tmp, which the next save overwrites). A failed write (disk full, no permission) removes its .tmp
    and raises CheckpointError; the old file stays."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except KeyboardInterrupt:  # a second Ctrl-C in the middle of the write: the old file stays
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    except (OSError, RuntimeError) as e:
        if isinstance(e.__context__, KeyboardInterrupt):  # torch.save wraps one raised in a write
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise KeyboardInterrupt from None
        os_error = e if isinstance(e, OSError) else e.__context__  # torch.save wraps the OSError
        if isinstance(os_error, OSError) and os_error.strerror:
            reason = os_error.strerror
        else:
            reason = str(e).splitlines()[0]
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if os.path.exists(path):
            kept = 'the previous checkpoint is left as it was'
        else:
            kept = 'no checkpoint was written'
        raise CheckpointError(f'cannot write the checkpoint {path} ({reason}); {kept}') from None


def save_training(path, model, optimizers, scaler, run, config, probe, ctx, rng=None):
    """Write the TrainingCheckpoint of a run atomically: the model (not a compiled or DDP wrapper),
    its optimizers and GradScaler, the RunState, every random generator and the run's arguments.
    Unless the weights diverged: the last update may have made them give a non-finite loss on the
    batch `probe` (x, y), run under the autocast `ctx`, and such weights are never saved. rng: the
    random state to save (default: now's)."""
    model.eval()
    with torch.no_grad(), ctx, torch.compiler.set_stance('force_eager'):
        _, loss = model(*probe)
    model.train()
    if not torch.isfinite(loss):
        raise CheckpointError(f'the weights after step {run.step - 1} give a {loss.item()} loss: '
                              f'training diverged (try a lower --lr); {path} is left as it was')
    ckpt = TrainingCheckpoint(
        model_args=asdict(model.config), model=model.state_dict(),
        optimizer=[opt.state_dict() for opt in optimizers],
        scaler=scaler.state_dict() if scaler.is_enabled() else None,
        run=run, rng=rng or rng_state(), config=dict(config))
    obj = {f.name: getattr(ckpt, f.name) for f in fields(ckpt)}  # not asdict: it would copy every tensor
    obj['run'] = asdict(run)
    save_atomic(obj, path)


def save_model_only(model, path, dtype=torch.bfloat16):
    """A model-only file (model_args + weights); bf16 halves its size. Models leave the project as
    export.py's folders now; this is the format's writer, which the tests use."""
    converted = {}  # wte and lm_head share one tensor: convert and store it once
    sd = {k: converted.setdefault(v.data_ptr(), v.detach().to('cpu', dtype)) for k, v in model.state_dict().items()}
    save_atomic(dict(zip(MODEL_ONLY_KEYS, (asdict(model.config), sd))), path)


# ---- reading ----

def refused_global(error):
    """The name of the class or function that torch.load(weights_only=True) refused to unpickle, or
    None when the UnpicklingError is about something else (a damaged file). Only the message tells:
    test_faults.py's checkpoint that carries code fails if torch words it differently."""
    match = re.search(r'GLOBAL (\S+)', str(error))
    return match.group(1) if match else None


def load(path, mmap=False):
    """The tensors and plain containers in a .pt file (mmap: read lazily, for files whose optimizer
    state is never used)."""
    if not os.path.isfile(path):
        raise CheckpointError(f'no checkpoint at {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        name = refused_global(e)
        if name is None:
            raise CheckpointError(f'{path} is not a readable checkpoint (UnpicklingError)') from None
        raise CheckpointError(f'{path} refused: it holds pickled objects other than tensors and plain '
                              f'containers ({name}), which could run code when loaded') from None
    except Exception as e:  # a truncated or foreign file: zip, npy, empty, ...
        raise CheckpointError(f'{path} is not a readable checkpoint ({type(e).__name__})') from None


def load_training(path):
    """A TrainingCheckpoint from train.py's ckpt.pt."""
    obj = load(path)
    names = [f.name for f in fields(TrainingCheckpoint)]
    if not isinstance(obj, dict) or set(names) - obj.keys():
        raise CheckpointError(f'{path} is not a training checkpoint (a model-only file cannot be resumed)')
    ckpt = TrainingCheckpoint(**{name: obj[name] for name in names})
    ckpt.run = RunState(**ckpt.run)
    return ckpt


def restore_training(ckpt, model, optimizers, scaler):
    """Put a TrainingCheckpoint back into a fresh run: the weights, optimizer and scaler states and
    the random generators. Returns its RunState."""
    try:
        load_weights(model, ckpt.model)
    except CheckpointError as e:
        raise CheckpointError(f'the checkpoint does not fit this model ({e})') from None
    if len(ckpt.optimizer) != len(optimizers):
        raise CheckpointError(f'the checkpoint has {len(ckpt.optimizer)} optimizer states, this run '
                              f'{len(optimizers)} (AdamW; AdamW and Muon: --optimizer)')
    for opt, state in zip(optimizers, ckpt.optimizer):
        opt.load_state_dict(state)
    if ckpt.scaler and scaler.is_enabled():
        scaler.load_state_dict(ckpt.scaler)
    set_rng_state(ckpt.rng)
    return ckpt.run


def load_weights(model, state_dict):
    """model.load_state_dict, with a one-line CheckpointError naming the first tensor that does not
    fit. A compiled or DDP-wrapped model's prefixes are dropped."""
    sd = {re.sub(r'^(_orig_mod\.|module\.)+', '', k): v for k, v in state_dict.items()}
    want = model.state_dict()
    for name, tensor in want.items():
        if name not in sd:
            raise CheckpointError(f'no tensor {name}')
        if sd[name].shape != tensor.shape:
            raise CheckpointError(f'{name} has shape {tuple(sd[name].shape)}, the model {tuple(tensor.shape)}')
    extra = sorted(sd.keys() - want.keys())
    if extra:
        raise CheckpointError(f'unexpected tensor {extra[0]}')
    model.load_state_dict(sd)


def load_model_file(path):
    """(GPT, RunState or None) from a training checkpoint or a model-only file."""
    obj = load(path, mmap=True)  # mmap: a training checkpoint's optimizer state is never read
    if not isinstance(obj, dict) or set(MODEL_ONLY_KEYS) - obj.keys():
        raise CheckpointError(f"{path}: not a train.py checkpoint or model-only file "
                              f"(needs keys {' and '.join(map(repr, MODEL_ONLY_KEYS))})")
    known = {f.name for f in fields(GPTConfig)}
    model = GPT(GPTConfig(**{k: v for k, v in obj['model_args'].items() if k in known}))
    try:
        load_weights(model, obj['model'])
    except CheckpointError as e:
        raise CheckpointError(f'{path}: weights do not fit the model_args: {e}') from None
    run = obj.get('run')
    known = {f.name for f in fields(RunState)}
    return model, RunState(**{k: v for k, v in run.items() if k in known}) if isinstance(run, dict) else None


# ---- the run's log: train.log and metrics.jsonl ----

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
            raise CheckpointError(f'cannot write to the out-dir {out_dir} ({e.strerror})') from None

    def __call__(self, msg):
        if self.active:
            print(msg, flush=True)
            self.file.write(msg + '\n')

    def row(self, row):
        if self.active:
            self.metrics.write(json.dumps(row) + '\n')

    def header(self, argv, config, model, commit, rt, data_line):
        """What a number in the log can be traced back to: the command, commit, device, versions,
        every setting, the parameter counts and the data."""
        import tiktoken
        groups = model.optim_groups(config['weight_decay'], 0)['adamw']
        decayed, not_decayed = (g['params'] for g in groups)
        self(f'command: {shlex.join(["python", "train.py", *argv])}')
        self(f'git commit: {commit}')
        self(f'device: {device_name(rt.device)} x {rt.world} process(es) | dtype: {rt.dtype} | '
             f'compile: {config["compile_mode"] if rt.compile else "off"}')
        self(f'versions: python {platform.python_version()} | torch {torch.__version__} | '
             f'tiktoken {tiktoken.__version__}')
        self(f'config: {json.dumps(config)}')
        self(f'model: {model.num_params():,} parameters | decayed: {len(decayed)} tensors, '
             f'{sum(p.numel() for p in decayed):,} | not decayed: {len(not_decayed)} tensors, '
             f'{sum(p.numel() for p in not_decayed):,}')
        self(f'data: {data_line}')


def metrics_step(line):
    """The step of a metrics.jsonl line; infinity for a line cut by a kill."""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return json.loads(line)['step']
    return math.inf


def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    with contextlib.suppress(OSError):
        return subprocess.run(['git', 'describe', '--always', '--dirty'], capture_output=True,
                              text=True, timeout=10, cwd=here).stdout.strip() or 'unknown'
    return 'unknown'

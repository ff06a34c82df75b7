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

And the way a model leaves the project: export_hf() writes a folder that is a Hugging Face GPT-2
model repo (config.json, model.safetensors, the tokenizer, a model card), which transformers, the Hub,
inference.py and app.py load.
"""
import contextlib
import glob
import json
import math
import os
import pickle
import platform
import random
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from data import EOT_TOKEN, GPT2_VOCAB_SIZE, write_hf_tokenizer
from model import GPT, GPTConfig
from runtime import device_name


class CheckpointError(Exception):
    """A checkpoint that cannot be found, read, trusted or written; one line, meant for the user."""


@dataclass
class RunState:
    """Where a run stands, saved and restored as one value."""
    step: int = 0          # optimizer steps done
    tokens_seen: int = 0   # tokens trained on, over all processes
    position: int = 0      # the next window of the data to train on
    elapsed: float = 0.0   # seconds of training before this process started


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
    export_hf() folders now; this is the format's writer, which the tests use."""
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


def load_model(path):
    """(GPT, training step or None) from a training checkpoint or a model-only file."""
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
    return model, run['step'] if isinstance(run, dict) else None


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


# ---- the Hugging Face export ----

# what transformers' generate() and pipeline() do unless told otherwise: the app's defaults (app.py)
GENERATION_CONFIG = {'do_sample': True, 'temperature': 0.7, 'top_k': 50, 'max_new_tokens': 100,
                     'bos_token_id': EOT_TOKEN, 'eos_token_id': EOT_TOKEN, 'pad_token_id': EOT_TOKEN}
EXPORT_MARK = '<!-- written by gpt2-shakespeare: python inference.py --export -->'  # in README.md
EXPORT_FILES = {'config.json', 'model.safetensors', 'generation_config.json', 'vocab.json', 'merges.txt',
                'tokenizer.json', 'tokenizer_config.json', 'README.md', 'metrics.jsonl'}  # and *.png


def hf_config(config, dtype):
    """config.json of a transformers GPT2LMHeadModel with the shape of our GPTConfig."""
    return {'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2', 'vocab_size': GPT2_VOCAB_SIZE,
            'n_positions': config.block_size, 'n_layer': config.n_layer, 'n_head': config.n_head,
            'n_embd': config.n_embd, 'n_inner': None, 'activation_function': 'gelu_new',
            'layer_norm_epsilon': 1e-5, 'resid_pdrop': 0.0, 'embd_pdrop': 0.0, 'attn_pdrop': 0.0,
            'bos_token_id': EOT_TOKEN, 'eos_token_id': EOT_TOKEN, 'tie_word_embeddings': True,
            'scale_attn_weights': True, 'use_cache': True, 'dtype': str(dtype).removeprefix('torch.')}


def check_export_dir(out_dir):
    """CheckpointError unless out_dir is free for an export: missing, empty, or a previous export
    (nothing but the files an export writes, and its model card's mark): never someone's data."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f'--export {out_dir}: that is a file; give a folder (new, empty or a previous '
                              f'export)')
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    others = sorted(n for n in names if n not in EXPORT_FILES and not n.endswith('.png'))
    readme = Path(out_dir, 'README.md')
    marked = readme.is_file() and EXPORT_MARK in readme.read_text(encoding='utf-8', errors='replace')
    if others or (names and not marked):
        why = f'it holds {others[0]}' if others else "its README.md is not an export's model card"
        raise CheckpointError(f'--export {out_dir}: the folder is neither empty nor a previous export ({why}); '
                              f'give a new or empty folder')


def export_hf(model, out_dir, source, step=None, dtype=torch.float32):
    """Write model to the folder out_dir as a Hugging Face GPT-2 model repo: config.json,
    model.safetensors (no pickle), generation_config.json, the tokenizer (data.write_hf_tokenizer), a
    model card README.md (from the run's train.log when there is one beside source, the checkpoint file
    or folder the model came from) and the metrics.jsonl and *.png beside source. The folder is written
    beside out_dir and renamed into place: a failed export leaves out_dir as it was. Returns the file
    names."""
    if not model.config.bias:
        raise CheckpointError("--export: GPT-2's Hugging Face layout has biases, this model has none")
    check_export_dir(out_dir)
    run_dir = source if os.path.isdir(source) else os.path.dirname(source)
    parent = os.path.dirname(os.path.abspath(out_dir))
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(os.path.abspath(out_dir))}.', dir=parent)
        sd = {k: v.to('cpu', dtype) for k, v in model.hf_state_dict().items()}
        save_file(sd, os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
        for name, obj in (('config.json', hf_config(model.config, dtype)),
                          ('generation_config.json', GENERATION_CONFIG)):
            with open(os.path.join(tmp, name), 'w') as f:
                json.dump(obj, f, indent=2)
        write_hf_tokenizer(tmp, model_max_length=model.config.block_size)
        extras = [os.path.join(run_dir, 'metrics.jsonl'), *sorted(glob.glob(os.path.join(run_dir, '*.png')))]
        for path in filter(os.path.isfile, extras):
            shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))
        log = Path(run_dir, 'train.log')
        log = log.read_text(encoding='utf-8', errors='replace') if log.is_file() else None
        card = model_card(model, sd, log, step, [os.path.basename(p) for p in extras[1:]])
        Path(tmp, 'README.md').write_text(card, encoding='utf-8')
        os.chmod(tmp, 0o755)  # mkdtemp and safetensors make their files private; an export is to share
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        if os.path.isdir(out_dir):  # empty or a previous export: moved aside, then removed
            os.rename(out_dir, tmp + '.old')
            try:
                os.rename(tmp, out_dir)
            except OSError:
                os.rename(tmp + '.old', out_dir)
                raise
            shutil.rmtree(tmp + '.old')
        else:
            os.rename(tmp, out_dir)
    except (OSError, SafetensorError) as e:  # disk full, no permission, ...
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e, 'strerror', None) or str(e).splitlines()[0]
        kept = 'it is left as it was' if os.path.exists(out_dir) else 'nothing was written'
        raise CheckpointError(f'cannot write the export {out_dir} ({reason}); {kept}') from None
    return sorted(os.listdir(out_dir))


# ---- the model card ----

# train.log's end line, which train.py writes when a run ends, before the samples
END_LINE = re.compile(r'target (?P<reached>reached|NOT reached) at step (?P<step>\d+) (\(\d+ steps\) )?\| tokens seen: '
                      r'(?P<tokens>[\d,]+) \| wall time: (?P<wall>[\d.]+)s .*\| whole-text loss: (?P<loss>\S+) '
                      r'\(target (?P<target>\S+)\)')
CARD = """---
license: mit
library_name: transformers
pipeline_tag: text-generation
language: en
datasets:
- tiny_shakespeare
tags:
- gpt2
- shakespeare
- from-scratch
---
{mark}

# GPT-2 trained from scratch on Tiny Shakespeare

A GPT-2 of {n_layer} layers, {n_head} heads and {n_embd} dimensions, with a context of {block_size} tokens:
{n_params:,} parameters, stored in {dtype}.

**What it is.** A memorizer of one text. The gpt2-shakespeare kit (plain PyTorch, nanoGPT-style)
trains it from random weights on Tiny Shakespeare (1,115,394 characters of Shakespeare's plays) with
one aim: a loss below 0.1 over the whole text, which means learning it by heart (Training, below, says
whether this run got there). Given a line of the play it recites what follows; past what it has seen,
it strings the play's words together.

**What it is not.** Not a general language model, not a chat model, not a source of facts: it knows
no English beyond its one text, follows no instructions and says nothing true about the world. Not
OpenAI's GPT-2 either: the same architecture and tokenizer, none of its weights.

## Use

```python
from transformers import pipeline
generate = pipeline('text-generation', model='user/repo')  # this repo's id, or the folder's path
print(generate('ROMEO:\\n')[0]['generated_text'])
```

generation_config.json samples 100 new tokens at temperature 0.7 among the 50 likeliest (the
gpt2-shakespeare app's defaults); the prompt and the new tokens must fit in {block_size} positions.
With the kit's own code: `python inference.py --checkpoint user/repo --prompt "ROMEO:"`, or
`GPT2_SHAKESPEARE_MODEL=user/repo python app.py` for its Gradio app.

## Training
"""


def read_train_log(log):
    """What a model card tells of a run, from its train.log text: the commands (a resumed run adds
    one), the header lines (git commit, device, versions, model, data), the last end line (END_LINE's
    match, or None) and the samples logged after it."""
    lines = log.splitlines()
    ends = [i for i, line in enumerate(lines) if END_LINE.match(line)]
    head, tail = (lines[:ends[-1]], lines[ends[-1] + 1:]) if ends else (lines, [])
    info = {'command': [line.removeprefix('command: ') for line in head if line.startswith('command: ')],
            'end': END_LINE.match(lines[ends[-1]]) if ends else None}
    for key in ('git commit', 'device', 'versions', 'model', 'data'):
        info[key] = next((line.split(': ', 1)[1] for line in reversed(head) if line.startswith(key + ': ')), None)
    tail = tail[:next((i for i, line in enumerate(tail) if line.startswith('command: ')), len(tail))]  # a later run
    info['samples'] = '\n'.join(tail) if tail and tail[0].startswith('--- sample: ') else None
    return info


def model_card(model, sd, log, step, pictures=()):
    """README.md of an export (sd: its weights): the Hub's metadata, what the model is and is not, how
    to use it and, from the run's train.log when there is one, how it was trained: command, commit,
    device, steps, tokens, wall time, whole-text loss and the samples at the end of the log."""
    c = model.config
    dtype = str(next(iter(sd.values())).dtype).removeprefix('torch.')
    card = [CARD.format(mark=EXPORT_MARK, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, dtype=dtype,
                        block_size=f'{c.block_size:,}', n_params=sum(v.numel() for v in sd.values()))]
    if log is None:
        card.append('No train.log came with the checkpoint this was exported from, so this card cannot say '
                    'how it was trained' + (f' (the checkpoint is from step {step}).' if step else '.'))
        return '\n'.join(card) + '\n'
    info = read_train_log(log)
    end = info['end']
    card.append("From the run's train.log (written by train.py; metrics.jsonl has every step):\n")
    card += [f'- command: `{command}`' for command in info['command']]
    card += [f'- {key}: {info[key]}' for key in ('git commit', 'device', 'versions', 'model', 'data') if info[key]]
    if end is None or int(end['step']) + 1 != step:
        card.append(f'\nThe log does not end at this checkpoint (step {step}): the run stopped before its '
                    f'end line, so its results and samples are not given here.')
    else:
        card += [f'- steps: {step:,} (0 to {end["step"]})', f'- tokens: {end["tokens"]}',
                 f'- wall time: {end["wall"]} s',
                 f'- whole-text loss: {end["loss"]} (target {end["target"]}: {end["reached"].lower()})']
        if info['samples']:  # a fence longer than any run of backticks in the model's text
            fence = '`' * max(3, 1 + max(map(len, re.findall('`+', info['samples'])), default=0))
            card += ['\n### Samples at the end of the run\n', fence, info['samples'], fence]
    if pictures:
        card += ['\n### Training curve\n', *[f'![{name}]({name})' for name in pictures]]
    return '\n'.join(card) + '\n'

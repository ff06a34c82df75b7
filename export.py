"""
How a model leaves the project: export_hf() writes a folder that is a Hugging Face GPT-2 model repo
(config.json, model.safetensors, generation_config.json, the tokenizer files and a model card
README.md, with the run's metrics.jsonl), which transformers, the Hub, inference.py and app.py load.

    python inference.py --checkpoint logs/run-x --export gpt2-shakespeare
    hf upload user/gpt2-shakespeare gpt2-shakespeare

The model card tells the run from its train.log: command, commit, device, steps, loss and samples.
"""
import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from checkpoint import CheckpointError
from data import EOT_TOKEN, GPT2_VOCAB_SIZE, gpt2_vocab_and_merges, write_hf_tokenizer

# what transformers' generate() and pipeline() do unless told otherwise: the app's defaults (app.py)
GENERATION_CONFIG = {'do_sample': True, 'temperature': 0.7, 'top_k': 50, 'max_new_tokens': 100,
                     'bos_token_id': EOT_TOKEN, 'eos_token_id': EOT_TOKEN, 'pad_token_id': EOT_TOKEN}
EXPORT_MARK = '<!-- written by gpt2-shakespeare: python inference.py --export -->'  # in README.md
EXPORT_FILES = {'config.json', 'model.safetensors', 'generation_config.json', 'vocab.json', 'merges.txt',
                'tokenizer.json', 'tokenizer_config.json', 'README.md', 'metrics.jsonl'}  # and *.png


def hf_config(config, dtype):
    """config.json of a transformers GPT2LMHeadModel with the shape of our GPTConfig: every key that
    OpenAI's GPT-2 configs and transformers' GPT2Config hold, n_ctx (the context, which llama.cpp's
    converter reads) and the summary_* keys (unused by a language model) among them."""
    return {'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2', 'vocab_size': GPT2_VOCAB_SIZE,
            'n_positions': config.block_size, 'n_ctx': config.block_size, 'n_layer': config.n_layer,
            'n_head': config.n_head, 'n_embd': config.n_embd, 'n_inner': None,
            'activation_function': 'gelu_new', 'layer_norm_epsilon': 1e-5, 'initializer_range': 0.02,
            'resid_pdrop': 0.0, 'embd_pdrop': 0.0, 'attn_pdrop': 0.0, 'summary_type': 'cls_index',
            'summary_use_proj': True, 'summary_activation': None, 'summary_proj_to_labels': True,
            'summary_first_dropout': 0.1, 'scale_attn_weights': True,
            'scale_attn_by_inverse_layer_idx': False, 'reorder_and_upcast_attn': False,
            'use_cache': True, 'add_cross_attention': False, 'bos_token_id': EOT_TOKEN,
            'eos_token_id': EOT_TOKEN, 'pad_token_id': None,
            'tie_word_embeddings': True, 'task_specific_params': {'text-generation': {
                'do_sample': True, 'max_length': config.block_size}},
            'dtype': str(dtype).removeprefix('torch.')}


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


def export_hf(model, out_dir, source, run=None, dtype=torch.float32):
    """Write model to the folder out_dir as a Hugging Face GPT-2 model repo: config.json,
    model.safetensors (no pickle), generation_config.json, the tokenizer (data.write_hf_tokenizer), a
    model card README.md (from run, the checkpoint's RunState, and the run's train.log when there is one
    beside source, the checkpoint file or folder the model came from) and the metrics.jsonl and *.png
    beside source. The folder is written
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
        card = model_card(model, sd, log, run, [os.path.basename(p) for p in extras[1:]])
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



# ---- GGUF: one file for llama.cpp, Ollama and LM Studio ----

GGUF_DTYPES = ('float16', 'float32', 'bfloat16', 'q8_0')  # q8_0: llama.cpp's blocks of 32 int8 + a scale
GGUF_MAGIC = b'GGUF'


def check_gguf_path(path):
    """CheckpointError unless path is free for a GGUF export: missing, or a GGUF file (which it
    replaces): never a file of someone else's, never a folder."""
    if os.path.isdir(path):
        raise CheckpointError(f'--export {path}: that is a folder; a GGUF export is one file')
    if os.path.exists(path):
        with open(path, 'rb') as f:
            if f.read(4) != GGUF_MAGIC:
                raise CheckpointError(f'--export {path}: the file exists and is not a GGUF file; '
                                      f'give a new path')


def gguf_module():
    """The gguf package (llama.cpp's own writer of the format), or a one-line CheckpointError."""
    try:
        import gguf
    except ImportError:
        raise CheckpointError('--export *.gguf needs the gguf package: pip install gguf') from None
    return gguf


def export_gguf(model, path, source, run=None, dtype='float16'):
    """Write model to one GGUF file for llama.cpp (and Ollama and LM Studio, which run it): the
    GPT-2 architecture's keys, the tokenizer (GPT-2's byte-level BPE, rebuilt from gpt2.tiktoken),
    the 50,257 real embedding rows (the output layer is tied to them: llama.cpp reuses them when a
    file has no output.weight), and the run's facts (run_facts) as gpt2_shakespeare.* keys.
    Like llama.cpp's converter, norms, biases and the position table stay float32; q8_0 falls back to
    float16 for a matrix whose rows do not split into blocks of 32. Written beside path and renamed
    over it: a failed export leaves what was there. Returns the file's size in bytes."""
    gguf = gguf_module()
    if not model.config.bias:
        raise CheckpointError("--export: GPT-2's GGUF layout has biases, this model has none")
    check_gguf_path(path)
    qtype = {'float16': gguf.GGMLQuantizationType.F16, 'float32': gguf.GGMLQuantizationType.F32,
             'bfloat16': gguf.GGMLQuantizationType.BF16, 'q8_0': gguf.GGMLQuantizationType.Q8_0}[dtype]
    file_type = {'float16': gguf.LlamaFileType.MOSTLY_F16, 'float32': gguf.LlamaFileType.ALL_F32,
                 'bfloat16': gguf.LlamaFileType.MOSTLY_BF16, 'q8_0': gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    c = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, c.n_layer)
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        writer = gguf.GGUFWriter(tmp, 'gpt2')
        writer.add_type('model')
        writer.add_name('gpt2-shakespeare')
        writer.add_description('GPT-2 trained from scratch on Tiny Shakespeare with the gpt2-shakespeare kit')
        writer.add_license('mit')
        writer.add_tags(['gpt2', 'shakespeare', 'from-scratch', 'text-generation'])
        writer.add_languages(['en'])
        writer.add_dataset_count(1)
        writer.add_dataset_name(0, 'Tiny Shakespeare')
        # what llama.cpp samples with unless told otherwise: the app's defaults (GENERATION_CONFIG)
        writer.add_sampling_temp(GENERATION_CONFIG['temperature'])
        writer.add_sampling_top_k(GENERATION_CONFIG['top_k'])
        writer.add_context_length(c.block_size)
        writer.add_embedding_length(c.n_embd)
        writer.add_feed_forward_length(4 * c.n_embd)
        writer.add_block_count(c.n_layer)
        writer.add_head_count(c.n_head)
        writer.add_layer_norm_eps(1e-5)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab, merges = gpt2_vocab_and_merges()
        writer.add_tokenizer_model('gpt2')
        writer.add_tokenizer_pre('gpt-2')
        writer.add_token_list(sorted(vocab, key=vocab.get))
        writer.add_token_types([gguf.TokenType.CONTROL if i == EOT_TOKEN else gguf.TokenType.NORMAL
                                for i in range(GPT2_VOCAB_SIZE)])
        writer.add_token_merges(merges)
        for add in (writer.add_bos_token_id, writer.add_eos_token_id, writer.add_unk_token_id,
                    writer.add_pad_token_id):
            add(EOT_TOKEN)
        writer.add_add_bos_token(False)  # GPT-2 prompts start as they are, as inference.py reads them
        writer.add_add_eos_token(False)
        for key, value in run_facts(source, run).items():
            writer.add_string(f'gpt2_shakespeare.{key}', value)
        for name, tensor in model.state_dict().items():
            if name == 'lm_head.weight':  # tied to wte
                continue
            if name == 'transformer.wte.weight':
                tensor = tensor[:GPT2_VOCAB_SIZE]  # the padded rows are no tokens
            stem, suffix = name.rsplit('.', 1)
            gguf_name = f'{names.get_name(stem)}.{suffix}'
            data = tensor.detach().to('cpu', torch.float32).numpy()
            kind = qtype
            if data.ndim == 1 or gguf_name.startswith('position_embd'):
                kind = gguf.GGMLQuantizationType.F32
            try:
                data = gguf.quants.quantize(data, kind)
            except gguf.QuantError:  # q8_0 wants rows of a multiple of 32 values
                kind = gguf.GGMLQuantizationType.F16
                data = gguf.quants.quantize(data, kind)
            writer.add_tensor(gguf_name, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:  # disk full, no permission, ...
        with contextlib.suppress(OSError):
            os.remove(tmp)
        kept = 'it is left as it was' if os.path.exists(path) else 'nothing was written'
        raise CheckpointError(f'cannot write the export {path} ({e.strerror or e}); {kept}') from None
    return os.path.getsize(path)


def run_facts(source, run):
    """What a GGUF file tells of the run it came from, as strings: the header of its train.log beside
    source, and from run (the checkpoint's RunState, or None) its step and, at its end, the figures of
    its end line."""
    run_dir = source if os.path.isdir(source) else os.path.dirname(source)
    log = Path(run_dir, 'train.log')
    facts = {'step': str(run.step)} if run is not None else {}
    if log.is_file():
        info = read_train_log(log.read_text(encoding='utf-8', errors='replace'))
        facts.update({key.replace(' ', '_'): info[key] for key in ('git commit', 'device', 'versions', 'data')
                      if info[key]})
        if info['command']:
            facts['command'] = info['command'][-1]
    if run is not None and run.end:
        facts.update(tokens_seen=f'{run.tokens_seen:,}', wall_time_s=f'{run.elapsed:.1f}',
                     whole_text_loss=f'{run.end["whole_loss"]:.6f}', target_loss=str(run.end['target_loss']),
                     target='reached' if run.end['reached'] else 'NOT reached')
    return facts

# ---- the model card ----

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
    """What a model card tells of a run from its train.log text: the commands (a resumed run adds
    one), the header lines (git commit, device, versions, model, data) and the samples that end the
    last run's part of the log (None if it has none)."""
    lines = log.splitlines()
    last = max((i for i, line in enumerate(lines) if line.startswith('command: ')), default=0)
    first = next((i for i in range(last, len(lines)) if lines[i].startswith('--- sample: ')), len(lines))
    head = lines[:first]
    info = {'command': [line.removeprefix('command: ') for line in head if line.startswith('command: ')],
            'samples': '\n'.join(lines[first:]) or None}
    for key in ('git commit', 'device', 'versions', 'model', 'data'):
        info[key] = next((line.split(': ', 1)[1] for line in reversed(head) if line.startswith(key + ': ')), None)
    return info


def model_card(model, sd, log, run, pictures=()):
    """README.md of an export (sd: its weights): the Hub's metadata, what the model is and is not, how
    to use it and, from the run's train.log when there is one and its RunState (run), how it was
    trained: command, commit, device, steps, tokens, wall time, whole-text loss and the samples at
    the end of the log."""
    c = model.config
    dtype = str(next(iter(sd.values())).dtype).removeprefix('torch.')
    card = [CARD.format(mark=EXPORT_MARK, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, dtype=dtype,
                        block_size=f'{c.block_size:,}', n_params=sum(v.numel() for v in sd.values()))]
    step = run.step if run is not None else None
    if log is None:
        card.append('No train.log came with the checkpoint this was exported from, so this card cannot say '
                    'how it was trained' + (f' (the checkpoint is from step {step}).' if step else '.'))
        return '\n'.join(card) + '\n'
    info = read_train_log(log)
    card.append("From the run's train.log (written by train.py; metrics.jsonl has every step):\n")
    card += [f'- command: `{command}`' for command in info['command']]
    card += [f'- {key}: {info[key]}' for key in ('git commit', 'device', 'versions', 'model', 'data') if info[key]]
    if run is None or not run.end:
        card.append(f'\nThe checkpoint (step {step}) is not from the end of its run: the run stopped before '
                    f'it ended, so its results and samples are not given here.')
    else:
        end = run.end
        card += [f'- steps: {step:,} (0 to {step - 1})', f'- tokens: {run.tokens_seen:,}',
                 f'- wall time: {run.elapsed:.1f} s',
                 f'- whole-text loss: {end["whole_loss"]:.6f} (target {end["target_loss"]}: '
                 f'{"reached" if end["reached"] else "not reached"})']
        if info['samples']:  # a fence longer than any run of backticks in the model's text
            fence = '`' * max(3, 1 + max(map(len, re.findall('`+', info['samples'])), default=0))
            card += ['\n### Samples at the end of the run\n', fence, info['samples'], fence]
    if pictures:
        card += ['\n### Training curve\n', *[f'![{name}]({name})' for name in pictures]]
    return '\n'.join(card) + '\n'

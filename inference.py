"""
Text from a GPT-2 checkpoint, streamed token by token.

    python inference.py --prompt "ROMEO:" --max-new-tokens 100 --temperature 0.7 --top-k 50 --seed 1

The model comes from --checkpoint, else from $GPT2_SHAKESPEARE_MODEL, else from the newest
logs/**/ckpt.pt that train.py wrote. Any of these may be a train.py checkpoint or run folder, a
model-only .pt (checkpoint.py has both formats), a directory with Hugging Face GPT-2 weights
(config.json + model.safetensors or pytorch_model.bin, as --export writes), or a Hugging Face Hub
model repo id (user/repo) holding either. app.py imports load_model() and generate() from here:
generation is written once.

    python inference.py --checkpoint logs/run-x --export gpt2-shakespeare   # a Hugging Face model repo

Speed on a CPU: one new token must read every weight once, so batch-1 decoding is bound by memory
bandwidth, not arithmetic (bench_inference.py measures how close it comes). --precision int8 (the
default on CPU) keeps each weight matrix as int8 with one scale per output row (a quarter of the fp32
bytes); a decoding step quantizes its activations to int8 per row and multiplies int8 by int8 in
torch._int_mm; the prompt, which is arithmetic-bound, goes through a matmul on the dequantized
weights, in bf16 where the CPU has bf16 instructions. --precision int4 reads about a sixth (4 bits, and a scale and an offset per 32
weights), at a cost in accuracy that README gives. A preallocated KV cache (model.py) makes each new
token cost one position, and the vocabulary projection runs on the last position only.
"""
import argparse
import codecs
import functools
import glob
import json
import os
import re
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import export
from checkpoint import CheckpointError
from data import EOT_TOKEN, GPT2_VOCAB_SIZE, gpt2_tokenizer
from model import GPT, GPTConfig, KVCache
from runtime import pick_device

MODEL_ENV_VAR = 'GPT2_SHAKESPEARE_MODEL'  # a path or a Hub repo id, for the CLI, the app and a Space
HOW_TO_GET_A_MODEL = (f'train one with `python train.py` (it writes logs/<run>/ckpt.pt), or point at one '
                      f'with --checkpoint PATH or {MODEL_ENV_VAR}=PATH or {MODEL_ENV_VAR}=user/repo (Hugging Face Hub)')


# ---- finding the weights ----

def newest_checkpoint(root='logs'):
    """The most recently written <root>/**/ckpt.pt, or None."""
    paths = glob.glob(os.path.join(root, '**', 'ckpt.pt'), recursive=True)
    return max(paths, key=os.path.getmtime) if paths else None


def download_from_hub(repo_id):
    """Local paths of a Hub repo's weights: the Hugging Face layout (config.json with model.safetensors,
    as --export writes, or pytorch_model.bin), else model.pt (a model-only file). Offline, whichever of
    them the local cache holds."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    offline = False
    for names in (['config.json', 'model.safetensors'], ['config.json', 'pytorch_model.bin'], ['model.pt']):
        try:
            paths = [hf_hub_download(repo_id, name) for name in names]
        except LocalEntryNotFoundError:  # not in the local cache, and the Hub cannot be asked
            offline = True
            continue
        except EntryNotFoundError:  # the repo has no such file: try the next layout
            continue
        except Exception as e:  # no such repo, gated repo, ...
            raise CheckpointError(f'{repo_id}: cannot download from the Hugging Face Hub: {type(e).__name__}: '
                                  f'{str(e).splitlines()[0] if str(e) else ""}') from None
        return paths[0] if len(paths) == 1 else os.path.dirname(paths[1])  # both land in one snapshot dir
    if offline:
        raise CheckpointError(f'{repo_id}: cannot download from the Hugging Face Hub (offline or unreachable) '
                              f'and it is not in the local cache')
    raise CheckpointError(f'{repo_id}: the Hub repo has neither config.json with model.safetensors or '
                          f'pytorch_model.bin nor model.pt')


def resolve_source(source=None):
    """A local file or directory for source, $GPT2_SHAKESPEARE_MODEL, or the newest checkpoint."""
    source = source or os.environ.get(MODEL_ENV_VAR) or newest_checkpoint()
    if not source:
        raise CheckpointError(f'no checkpoint found: {HOW_TO_GET_A_MODEL}')
    if os.path.exists(source):
        return source
    # user/repo is a Hub id, unless `user` is a local folder: then it is a mistyped path (logs/run-x)
    if re.fullmatch(r'[\w.-]+/[\w.-]+', source) and not source.startswith(('.', '/')) \
            and not os.path.isdir(source.split('/')[0]):
        return download_from_hub(source)
    raise CheckpointError(f'{source}: no such file or directory (nor a Hub repo id user/repo); {HOW_TO_GET_A_MODEL}')


def load_hf_dir(path):
    """A GPT-2 in Hugging Face's layout: config.json and model.safetensors or pytorch_model.bin."""
    with open(os.path.join(path, 'config.json')) as f:
        cfg = json.load(f)
    config = GPTConfig(block_size=cfg.get('n_positions', 1024), n_layer=cfg['n_layer'], n_head=cfg['n_head'],
                       n_embd=cfg['n_embd'])
    if os.path.exists(os.path.join(path, 'model.safetensors')):
        from safetensors.torch import load_file
        sd = load_file(os.path.join(path, 'model.safetensors'))
    elif os.path.exists(os.path.join(path, 'pytorch_model.bin')):
        sd = checkpoint.load(os.path.join(path, 'pytorch_model.bin'), mmap=True)
    else:
        raise CheckpointError(f'{path}: config.json but neither model.safetensors nor pytorch_model.bin')
    try:
        return GPT.from_hf_state_dict(sd, config)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f'{path}: not GPT-2 weights: {e}') from None


def load_model(source=None, device='cpu'):
    """(model in eval mode, info) from a path, a Hub repo id, $GPT2_SHAKESPEARE_MODEL or the newest
    logs/**/ckpt.pt. info: 'path' (the file or directory loaded), 'step' (training step or None),
    'params' (number of parameters)."""
    path = resolve_source(source)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, 'ckpt.pt')):
        path = os.path.join(path, 'ckpt.pt')  # a train.py run directory
    step = None
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, 'config.json')):
            raise CheckpointError(f'{path}: a directory with neither ckpt.pt nor config.json')
        model = load_hf_dir(path)
    else:
        model, step = checkpoint.load_model(path)
    # counted now: prepare_for_generation's int8 weights are buffers, no longer parameters
    return model.to(device).eval(), {'path': path, 'step': step, 'params': model.num_params()}


# ---- fast CPU weights ----

# inputs per int4 scale and offset: groups of 64 and 128 change more of a trained model's likeliest
# tokens (logs/bench_inference_cpu.md has the walk-through model's figures)
INT4_GROUP_SIZE = 32


@functools.cache
def prompt_matmul_dtype():
    """The faster dtype for a long prompt's matmuls on this CPU: bfloat16 runs several times faster
    than float32 where the CPU has bf16 instructions (AVX512-BF16, AMX) and slower where it must
    emulate them, so time one GPT-2-sized matmul in each (a few ms, once per process)."""
    x, w = torch.randn(256, 768), torch.randn(768, 768)
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        xd, wd = x.to(dtype), w.to(dtype)
        F.linear(xd, wd)  # warm-up
        t0 = time.perf_counter()
        for _ in range(5):
            F.linear(xd, wd)
        seconds[dtype] = time.perf_counter() - t0
    return min(seconds, key=seconds.get)


class QuantizedLinear(nn.Module):
    """nn.Linear with weight-only quantized weights, for generation (no gradients). A decoding step
    (a few rows) multiplies in torch's quantized-weight kernel with bf16 activations, reading about
    a quarter (int8) or a sixth (int4, with its scales and offsets) of the float32 bytes; the
    subclasses say how the weight is stored. The bias stays float32, and so does the output."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x):
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]))  # (M, in) -> (M, out)
        y = y.float() if self.bias is None else torch.add(self.bias, y)  # bf16 + fp32 -> fp32
        return y.view(*shape[:-1], -1)


class Int8Linear(QuantizedLinear):
    """int8 weights with one scale per output row: w ~ w_int8 * scale. A decoding step quantizes its
    activations too, each row to int8 with a scale of its own, and multiplies int8 by int8 in
    torch._int_mm (VNNI where the CPU has it), as llama.cpp's Q8_0 does with its blocks: 17% faster
    than the bf16-activation kernel here, at a cost README gives."""

    def __init__(self, linear):
        super().__init__(linear)
        self.prompt_dtype = prompt_matmul_dtype()
        w = linear.weight.detach().float()
        # the scales are rounded to bf16 (exact in the prompt path's dtype), kept as float32 for decoding
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).bfloat16().float()
        self.register_buffer('weight', torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer('scale', scale)

    def matmul(self, x):
        if x.size(0) <= 32:
            # decoding: memory-bound, read 1 byte per weight. (M, in) -> int8 with a scale per row
            x = x.float()
            x_scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127  # (M, 1)
            q = torch.round(x / x_scale).to(torch.int8)
            # (M, in) int8 @ (in, out) int8 view of the stored rows -> int32, then both scales
            return torch._int_mm(q, self.weight.t()) * (x_scale * self.scale)
        # a long prompt: arithmetic-bound, where a GEMM on the dequantized weight runs faster than the
        # kernel (bf16 where the CPU has bf16 instructions)
        w = self.weight.to(self.prompt_dtype) * self.scale.to(self.prompt_dtype)[:, None]
        return F.linear(x.to(self.prompt_dtype), w)


class Int4Linear(QuantizedLinear):
    """4-bit weights with a scale and an offset per group of group_size inputs of each output row:
    w ~ (q - 8) * scale + zero, q in 0..15, packed two to a byte in the layout of torch's CPU kernel,
    which serves prompts as well (a 512-token prompt costs about 1.7 times the int8 path's GEMM)."""

    def __init__(self, linear, group_size=INT4_GROUP_SIZE):
        super().__init__(linear)
        w = linear.weight.detach().float()
        n_out, n_in = w.shape
        if n_in % group_size:
            raise ValueError(f'int4: {n_in} inputs do not split into groups of {group_size}')
        self.group_size = group_size
        w = w.view(n_out, n_in // group_size, group_size)
        lo, hi = w.amin(dim=2), w.amax(dim=2)  # (out, groups)
        # the kernel takes bf16 scales and offsets: round them first, then quantize against them
        scale = ((hi - lo).clamp(min=1e-12) / 15).bfloat16().float()
        zero = (lo + 8 * scale).bfloat16().float()
        q = torch.round((w - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).to(torch.int32)
        self.register_buffer('weight', torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(n_out, n_in), 1))
        # (groups, out, 2): the kernel's layout of the scales and offsets
        self.register_buffer('scale_zero', torch.stack([scale, zero], dim=2).transpose(0, 1).contiguous().bfloat16())

    def matmul(self, x):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.weight, self.group_size,
                                                            self.scale_zero)


PRECISIONS = ('float32', 'int8', 'int4')


def prepare_for_generation(model, precision='float32', int4_group_size=INT4_GROUP_SIZE):
    """Make model (in place) a generation model: with precision 'int8' or 'int4', the quantized
    linears above in every block and the head (float32: as it is). Returns model."""
    if precision not in PRECISIONS:
        raise ValueError(f'unknown precision {precision!r}: {", ".join(PRECISIONS)}')
    if precision == 'float32':
        return model
    quantized = Int8Linear if precision == 'int8' else functools.partial(Int4Linear, group_size=int4_group_size)
    if next(model.parameters()).device.type != 'cpu':
        raise ValueError(f'precision {precision} is for the CPU; use float32 on other devices')
    for block in model.transformer.h:
        block.attn.c_attn, block.attn.c_proj = quantized(block.attn.c_attn), quantized(block.attn.c_proj)
        block.mlp.c_fc, block.mlp.c_proj = quantized(block.mlp.c_fc), quantized(block.mlp.c_proj)
    model.lm_head = quantized(model.lm_head)  # wte keeps the fp32 table for the embedding lookup
    return model


# ---- sampling ----

def sample_next(logits, temperature=0.7, top_k=None, top_p=None, generator=None):
    """One token id from the logits (vocab,) of the next position."""
    logits = logits[:GPT2_VOCAB_SIZE].float()  # the padded ids are no tokens: never sampled
    if temperature <= 0:
        return int(torch.argmax(logits))  # greedy
    ids = None  # logits[i] and probs[i] are token ids[i]'s (token i's while ids is None)
    if top_k is not None and 0 < top_k < logits.size(0):
        logits, ids = torch.topk(logits, top_k)  # sorted, most likely first
    probs = F.softmax(logits / temperature, dim=-1)  # with top-k: over those k, and top-p acts on these
    if top_p is not None and 0 < top_p < 1:
        # nucleus: the smallest set of most likely tokens whose probability adds up to top_p
        if ids is None:
            probs, ids = torch.sort(probs, descending=True)
        keep = probs.cumsum(0) - probs < top_p  # the most likely token is always kept
        probs, ids = probs[keep], ids[keep]
    # inverse-CDF draw: one uniform number per token; torch.multinomial draws one per vocabulary entry
    cdf = probs.double().cumsum(0)
    u = torch.rand(1, generator=generator, dtype=torch.float64, device=cdf.device) * cdf[-1]
    i = min(int(torch.searchsorted(cdf, u, right=True)), cdf.size(0) - 1)  # first i with cdf[i] > u
    return i if ids is None else int(ids[i])


@torch.inference_mode()
def generate_ids(model, ids, max_new_tokens=100, temperature=0.7, top_k=None, top_p=None, seed=None,
                 stop_at_eot=False, use_cache=True):
    """Yields new token ids one at a time. ids: the prompt's token ids (empty: <|endoftext|>).
    The model sees at most block_size tokens: a longer prompt is cropped from the left, and once the
    text outgrows the block the context restarts from its last block_size // 2 tokens (one prompt
    pass) and the cache fills again. use_cache=False runs the whole context every step: slow, the
    reference that the cached path must equal."""
    device = next(model.parameters()).device
    block_size = model.config.block_size
    ids = list(ids)[-block_size:] or [EOT_TOKEN]
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = KVCache(model.config, 1, block_size, device=device) if use_cache else None
    start = 0  # the context is ids[start:]; the cache holds ids[start:start + cache.pos]
    for _ in range(max_new_tokens):
        if len(ids) - start > block_size:
            start = len(ids) - block_size // 2
            if cache is not None:
                cache.pos = 0
        new = ids[start + cache.pos:] if cache is not None else ids[start:]
        logits, _ = model(torch.tensor([new], device=device), cache=cache, last_only=True)  # (1, 1, vocab)
        token = sample_next(logits[0, -1], temperature, top_k, top_p, generator)
        if stop_at_eot and token == EOT_TOKEN:
            return
        ids.append(token)
        yield token


def stream_text(token_ids):
    """Text pieces for an iterable of token ids, as they come. A character whose UTF-8 bytes span
    several tokens comes out whole once its last byte is in; bytes that never make a character
    come out as U+FFFD."""
    enc = gpt2_tokenizer()
    decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')
    for token in token_ids:
        piece = decoder.decode(enc.decode_single_token_bytes(token))
        if piece:
            yield piece
    tail = decoder.decode(b'', final=True)
    if tail:
        yield tail


def generate(model, prompt='', max_new_tokens=100, temperature=0.7, top_k=None, top_p=None, seed=None,
             stop_at_eot=False, use_cache=True):
    """Yields the new text in pieces as it is made (the prompt not included)."""
    ids = gpt2_tokenizer().encode(prompt, allowed_special='all')
    yield from stream_text(generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p, seed,
                                        stop_at_eot, use_cache))


SAMPLE_PROMPTS = ['ROMEO:\n', 'KING RICHARD II:\n', 'First Citizen:\n', 'JULIET:\n', 'MENENIUS:\n']


def play_samples(model, n, seed, max_new_tokens=100, temperature=0.7, top_k=50):
    """n samples of the model, one per speaker of the play, as (a header naming the settings, the
    prompt and its continuation): what train.py logs at the end of a run."""
    model.eval()
    with torch.compiler.set_stance('force_eager'):  # one-off generation: not worth a compile
        for prompt in SAMPLE_PROMPTS[:n]:
            text = ''.join(generate(model, prompt, max_new_tokens, temperature, top_k, seed=seed))
            yield (f'prompt {prompt!r}, {max_new_tokens} tokens, temperature {temperature}, top-k {top_k}, '
                   f'seed {seed}', prompt + text)


# ---- command line ----

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', default=None,
                        help=f'ckpt.pt or model-only .pt, a run directory, a Hugging Face GPT-2 directory, or a Hub '
                             f'repo id (default: ${MODEL_ENV_VAR}, else the newest logs/**/ckpt.pt)')
    parser.add_argument('--prompt', default='', help='text to continue (default: empty, start from <|endoftext|>)')
    parser.add_argument('--max-new-tokens', type=int, default=100, help='tokens to generate (default: 100)')
    parser.add_argument('--temperature', type=float, default=0.7,
                        help='softmax temperature; 0 means greedy (default: 0.7)')
    parser.add_argument('--top-k', type=int, default=None,
                        help='sample among the k most likely tokens only; none or <= 0: all (default: all)')
    parser.add_argument('--top-p', type=float, default=None,
                        help='nucleus sampling: the most likely tokens covering this probability, in (0, 1] (default: off)')
    parser.add_argument('--seed', type=int, default=None, help='random seed: the same seed gives the same text (default: random)')
    parser.add_argument('--stop-at-eot', action='store_true', help='stop at the first <|endoftext|> token')
    parser.add_argument('--no-cache', action='store_true', help='recompute the whole context for every token (slow; for checking)')
    parser.add_argument('--precision', choices=['auto', *PRECISIONS], default='auto',
                        help='weights for generation: int8 or int4 (weight-only, CPU; int4 is faster and less exact: '
                             'README has its measured cost) or float32; auto: int8 on CPU, float32 elsewhere')
    parser.add_argument('--device', default='auto', help='auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps')
    parser.add_argument('--threads', type=int, default=None, help='CPU threads for torch (default: torch\'s choice)')
    parser.add_argument('--export', metavar='PATH', default=None,
                        help='write the loaded model and exit: to a folder PATH as a Hugging Face GPT-2 model repo '
                             '(config.json, model.safetensors, tokenizer, model card, the run\'s metrics.jsonl; new, empty '
                             'or a previous export; upload it with `hf upload user/repo PATH`), or to PATH ending in .gguf '
                             'as one GGUF file for llama.cpp, Ollama and LM Studio (needs `pip install gguf`)')
    parser.add_argument('--export-dtype', choices=['float32', 'bfloat16', 'float16', 'q8_0'], default=None,
                        help='weights of --export: float32 (the folder\'s default), bfloat16 (half the bytes), float16 '
                             '(the .gguf default) or q8_0 (GGUF only: 8-bit blocks, about a quarter of float32)')
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0:
        parser.error('--max-new-tokens must be >= 0')
    if args.temperature < 0:
        parser.error('--temperature must be >= 0')
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error('--top-p must be in (0, 1]')
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    gguf = args.export is not None and args.export.lower().endswith('.gguf')
    if args.export:
        args.export_dtype = args.export_dtype or ('float16' if gguf else 'float32')
        if not gguf and args.export_dtype in ('float16', 'q8_0'):
            parser.error(f'--export-dtype {args.export_dtype} is for a .gguf file; a folder takes float32 or bfloat16')
    try:
        if gguf:  # before a load that may take a while
            export.gguf_module()
            export.check_gguf_path(args.export)
        elif args.export:
            export.check_export_dir(args.export)
        device = pick_device(args.device)
        model, info = load_model(args.checkpoint, device)
        if gguf:
            size = export.export_gguf(model, args.export, info['path'], info['step'], args.export_dtype)
        elif args.export:
            files = export.export_hf(model, args.export, info['path'], info['step'],
                                     getattr(torch, args.export_dtype))
        else:
            precision = args.precision if args.precision != 'auto' else ('int8' if device == 'cpu' else 'float32')
            prepare_for_generation(model, precision)
    except (ValueError, CheckpointError) as e:
        sys.exit(f'error: {e}')
    if gguf:
        print(f'wrote {args.export} ({size / 1e6:.1f} MB, {args.export_dtype} weights) from {info["path"]}; run it with '
              f'llama.cpp: llama-completion -m {args.export} -p "ROMEO:"')
        return
    if args.export:
        size = sum(os.path.getsize(os.path.join(args.export, name)) for name in files)
        print(f'wrote {args.export}/ ({", ".join(files)}: {size / 1e6:.1f} MB, {args.export_dtype} weights) '
              f'from {info["path"]}')
        return
    print(f'# {info["path"]} (step {info["step"]}), {info["params"] / 1e6:.1f}M parameters, {precision}, '
          f'{device}, {torch.get_num_threads()} threads', file=sys.stderr)
    t0, n = time.perf_counter(), 0
    sys.stdout.write(args.prompt)
    for piece in generate(model, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                          args.seed, args.stop_at_eot, use_cache=not args.no_cache):
        sys.stdout.write(piece)
        sys.stdout.flush()
        n += len(piece)
    print(f'\n# {n} characters in {time.perf_counter() - t0:.2f} s', file=sys.stderr)


if __name__ == '__main__':
    main()

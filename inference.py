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

Speed on a CPU: --precision int8 (the default on CPU) or int4 keeps the weights quantized, and
--compile (the default for int8 on CPU, for models of 50M parameters or more) decodes through one
compiled graph (cpu_decode.py has both; docs/cpu-generation.md gives what each costs and gains, measured beside
llama.cpp). A preallocated KV cache (model.py) makes each new token cost one position, and the
vocabulary projection runs on the last position only.
"""
import argparse
import codecs
import glob
import json
import os
import re
import sys
import time

import torch
import torch.nn.functional as F

import checkpoint
import export
from checkpoint import CheckpointError
from cpu_decode import PRECISIONS, PackagedDecoder, compile_decoding, prepare_for_generation
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
    decode = getattr(model, 'compiled_decode', None) if use_cache else None  # prepare_for_generation's
    dtype = decode.cache_dtype if decode is not None else torch.float32
    cache = KVCache(model.config, 1, block_size, device=device, dtype=dtype) if use_cache else None
    start = 0  # the context is ids[start:]; the cache holds ids[start:start + cache.pos]
    for _ in range(max_new_tokens):
        if len(ids) - start > block_size:
            start = len(ids) - block_size // 2
            if cache is not None:
                cache.pos = 0
        new = ids[start + cache.pos:] if cache is not None else ids[start:]
        if decode is not None and cache.pos > 0:  # one new token after a prompt pass
            logits = decode(torch.tensor(new, device=device), [cache.pos], cache.k, cache.v)  # (1, vocab)
            cache.advance(1)
        else:
            logits = model(torch.tensor([new], device=device), cache=cache, last_only=True)[0][:, -1]  # (1, vocab)
        token = sample_next(logits[0], temperature, top_k, top_p, generator)
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

# int8 on the CPU decodes compiled by default where that pays. GPT-2 124M's step, compiled once into a
# package (cpu_decode.PackagedDecoder: about 70 s), then loads about as fast as an eager start and
# decodes twice as fast; the walk-through's 7.2M model lost 1.4 s a run to the load (6.0 against 4.6 s
# for 60 tokens) and gained 0.04 s of decoding. Where between the two it starts to pay is not
# measured: the line is drawn between them.
COMPILE_BY_DEFAULT_MIN_PARAMS = 50_000_000


def compiles_by_default(device, precision, params):
    """Whether generation decodes through the compiled step when --compile/--no-compile is not given."""
    return device == 'cpu' and precision == 'int8' and params >= COMPILE_BY_DEFAULT_MIN_PARAMS


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
                             'docs/cpu-generation.md has its measured cost) or float32; auto: int8 on CPU, float32 elsewhere')
    parser.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                        help='decode through one compiled graph (cpu_decode.py), about twice as fast a token as eager '
                             'int8; int8\'s is compiled once per model (about 70 s for GPT-2 124M) into a package that '
                             'later runs load. Default: on for int8 on the CPU for models of 50M parameters or more, '
                             'off otherwise; docs/cpu-generation.md has the figures')
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
            if args.compile is None:
                args.compile = compiles_by_default(device, precision, info['params'])
            prepare_for_generation(model, precision, compile=args.compile, one_row=True)
            if args.compile:  # before any text: a compiler missing says so in one line, and text comes all the same
                with torch.inference_mode():  # a cache as generate_ids makes it: an inference tensor
                    scratch = KVCache(model.config, 1, model.config.block_size, device=device,
                                      dtype=model.compiled_decode.cache_dtype)
                decoder = model.compiled_decode
                if isinstance(decoder, PackagedDecoder) and not os.path.exists(decoder.package_path(scratch.k)):
                    print('# compiling the decoding step for this model, once (about a minute for GPT-2 124M; '
                          'later runs load it; --no-compile decodes eagerly)', file=sys.stderr)
                why = compile_decoding(model, scratch.k, scratch.v)
                if why:
                    print(f'# cannot compile the decoding step ({why}); decoding eagerly', file=sys.stderr)
                    args.compile = False
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
    print(f'# {info["path"]} (step {info["step"]}), {info["params"] / 1e6:.1f}M parameters, {precision}'
          f'{", compiled" if args.compile else ""}, {device}, {torch.get_num_threads()} threads', file=sys.stderr)
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

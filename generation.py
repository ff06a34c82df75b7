"""
Generation from a GPT-2 checkpoint, as a library: finding and loading the weights (any of the kinds
inference.py's docstring lists), sampling, the KV-cached token loop and the text stream. inference.py
(the command line), app.py, batching.py and train.py's end-of-run samples all generate through here,
so generation is written once. Importing it costs no more than torch: the CPU decoder (cpu_decode.py)
is the caller's to attach (prepare_for_generation), and generate_ids uses it when it is there.
"""
import codecs
import glob
import json
import os
import re

import torch
import torch.nn.functional as F

import checkpoint
from checkpoint import CheckpointError
from data import EOT_TOKEN, GPT2_VOCAB_SIZE, gpt2_tokenizer
from model import GPT, GPTConfig, KVCache

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
    'run' (a training checkpoint's RunState, else None), 'params' (number of parameters)."""
    path = resolve_source(source)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, 'ckpt.pt')):
        path = os.path.join(path, 'ckpt.pt')  # a train.py run directory
    run = None
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, 'config.json')):
            raise CheckpointError(f'{path}: a directory with neither ckpt.pt nor config.json')
        model = load_hf_dir(path)
    else:
        model, run = checkpoint.load_model_file(path)
    # counted now: prepare_for_generation's int8 weights are buffers, no longer parameters
    return model.to(device).eval(), {'path': path, 'step': run.step if run else None, 'run': run,
                                     'params': model.num_params()}


def default_precision(device):
    """The weights generation uses unless told: int8 on a CPU (cpu_decode.py: the fastest there, within
    the quality logs/bench_inference_cpu.md measures), float32 on a GPU."""
    return 'int8' if torch.device(device).type == 'cpu' else 'float32'


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


def context_restart(n_ids, block_size):
    """Where the context starts again once a text of n_ids tokens has outgrown the block: at its last
    block_size // 2 tokens, one prompt pass that refills the KV cache, leaving room for as many new
    tokens before the next restart."""
    return n_ids - block_size // 2


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
            start = context_restart(len(ids), block_size)
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

"""
Generation benchmark on the CPU, measured against the machine's own limit. Decoding one token reads
every weight once, and the KV cache of the context so far, so at batch 1 memory bandwidth bounds the
speed: at most bandwidth / bytes-per-token tokens/s. This script measures the read bandwidth, then
runs inference.py at each weight precision (and, for --compiled's precisions, with --compile's compiled
decoding step: its first, warm-up call compiles it), Hugging Face transformers' GPT-2 and, where
llama-cpp-python is installed, llama.cpp (Q8_0 and Q4_0, quantized by llama.cpp itself from our GGUF
export) side by side in one process, on the same GPT-2 124M weights, thread count and sampling
settings, and gives per row:

- first-token latency: the prompt pass and the first sample;
- decode tokens/s: every later token;
- bytes read per decode token (weights, and the KV cache at the mean context) and the fraction of
  the bandwidth bound that the decode speed reaches;
- for inference.py, where a decode token's time goes: the weight matmuls alone, attention over the
  cache at the mean context, sampling, and the rest (Python and the small ops between them).

    python bench_inference.py --threads 2 --repeats 5 --quality-checkpoint logs/run-x

Both sides get batch 1, a prompt cut from input.txt, temperature 0.7 and top-k 50, and must produce
exactly --new-tokens tokens (transformers is held to it with min_new_tokens). Each repeat runs every
side and the bandwidth measurement once, in turn, so that a noisy moment of the machine hits them
alike; the table gives medians. The weights are transformers' random init: speed does not depend on
their values. What a lower precision costs in quality does, so --quality-checkpoint measures it on a
trained model, over the text that model was trained on: its loss, how often its likeliest next token
is float32's, and the KL divergence of its next-token distribution from float32's.
"""
import argparse
import copy
import os
import platform
import statistics
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import checkpoint
from data import GPT2_VOCAB_SIZE, Windows, gpt2_tokenizer, load_tokens
from cpu_decode import prepare_for_generation
from quantize import INT4_GROUP_SIZE, PRECISIONS, QuantizedLinear
from generation import generate_ids, load_model, sample_next
from model import GPT, KVCache

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--threads', type=int, default=None, help='torch CPU threads for both sides (default: torch\'s choice)')
parser.add_argument('--prompt-lens', type=int, nargs='+', default=[16, 512], help='prompt lengths in tokens')
parser.add_argument('--new-tokens', type=int, default=100, help='tokens to generate per call (at least 2)')
parser.add_argument('--repeats', type=int, default=3, help='timed calls per side and prompt (after one warm-up)')
parser.add_argument('--precisions', nargs='+', default=['int8', 'int4', 'float32'], choices=PRECISIONS,
                    help="inference.py's weight precisions to time and, with --quality-checkpoint, to judge")
parser.add_argument('--compiled', nargs='*', default=['int8', 'int4'], choices=PRECISIONS,
                    help="precisions also timed with inference.py --compile's compiled decoding step (none: skip)")
parser.add_argument('--quality-checkpoint', default=None, metavar='PATH',
                    help='a trained model (anything inference.py loads) to measure what each lower precision costs')
parser.add_argument('--quality-tokens', type=int, default=16384,
                    help='at most this many tokens of the trained model\'s text to judge on (default: 16384)')
parser.add_argument('--llama-cpp', nargs='*', default=['Q8_0', 'Q4_0'], choices=['Q8_0', 'Q4_0'],
                    help='llama.cpp file types to time beside ours, if llama-cpp-python is installed (none: skip it)')
parser.add_argument('--llama-cpp-extra-buffers', action=argparse.BooleanOptionalAction, default=True,
                    help="llama.cpp's extra buffer types, its AMX kernels on CPUs with AMX_INT8 and its repacked "
                    "weights (llama.cpp's default); --no-llama-cpp-extra-buffers: its plain CPU kernels (its AMX "
                    "path segfaults on narrow models such as the tests' 64-wide one)")
parser.add_argument('--n-layer', type=int, default=12, help='model size (default: GPT-2 124M)')
parser.add_argument('--n-head', type=int, default=12)
parser.add_argument('--n-embd', type=int, default=768)
parser.add_argument('--out', default=os.path.join('logs', 'bench_inference_cpu.md'), help='table file')
args = parser.parse_args()
if args.new_tokens < 2:
    parser.error('--new-tokens must be at least 2: decode speed is measured after the first token')
if args.threads:
    torch.set_num_threads(args.threads)

from transformers import GPT2Config, GPT2LMHeadModel, __version__ as transformers_version  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402


# ---- the machine's read bandwidth ----

def read_bandwidth(x):
    """Bytes/s of one sum over x: a read of every byte, as an ideal decode step does, with the
    threads torch uses. x is far larger than any cache."""
    t0 = time.perf_counter()
    x.sum()
    return x.numel() * x.element_size() / (time.perf_counter() - t0)


# ---- what a decode step must read ----

def decode_bytes(model, context):
    """Bytes one decode step reads with `context` positions in the KV cache: every weight once, but
    one row of each embedding table (float32's lm_head is wte itself: counted as lm_head)."""
    tensors = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        if not name.startswith(('transformer.wte.', 'transformer.wpe.')):
            tensors[t.data_ptr()] = t.numel() * t.element_size()
    c = model.config
    return sum(tensors.values()) + 2 * c.n_layer * c.n_embd * context * 4  # keys and values, float32


# ---- where a decode step's time goes ----

def median_seconds(fn, repeats=9):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_parts(model, context):
    """Seconds per decode token of its parts, each run alone back to back: the weight matmuls of one
    position (the same kernels on the same weights), attention of one query over `context` cached
    positions in every layer, and one top-k 50 sample; and attention over a bfloat16 cache, which
    would read half the bytes."""
    c = model.config
    linears = [m for block in model.transformer.h
               for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)]
    linears.append(model.lm_head)
    x = {n: torch.randn(1, n) for n in (c.n_embd, 4 * c.n_embd)}
    x_bf16 = {n: v.bfloat16() for n, v in x.items()}

    def matmuls():
        for m in linears:
            if isinstance(m, QuantizedLinear):
                m.matmul(x_bf16[m.in_features])  # the kernel alone, without the bias and the casts
            else:
                F.linear(x[m.in_features], m.weight, m.bias)

    caches = {dtype: KVCache(c, 1, context, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
    q = torch.randn(1, c.n_head, 1, c.n_embd // c.n_head)

    def attention(dtype):
        cache = caches[dtype]
        for layer in range(c.n_layer):
            F.scaled_dot_product_attention(q.to(dtype), cache.k[layer], cache.v[layer]).float()

    logits = torch.randn(c.vocab_size)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        return {'weight matmuls': median_seconds(matmuls),
                'attention': median_seconds(lambda: attention(torch.float32)),
                'sampling': median_seconds(lambda: sample_next(logits, 0.7, 50, None, generator), 50),
                'attention, bfloat16 cache': median_seconds(lambda: attention(torch.bfloat16))}


# ---- the same weights on both sides ----

torch.manual_seed(0)
# GPT-2 at transformers' own random init: no download here, and speed does not depend on the values
hf = GPT2LMHeadModel(GPT2Config(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)).eval()
hf.generation_config.pad_token_id = hf.config.eos_token_id
ours = {p: prepare_for_generation(GPT.from_hf_state_dict(hf.state_dict()).eval(), p) for p in args.precisions}
# inference.py's compiled step, one row at a time; each compiles in its first (warm-up) call
compiled = {p: prepare_for_generation(GPT.from_hf_state_dict(hf.state_dict()).eval(), p, compile=True, one_row=True)
            for p in args.compiled}
hf_bytes = sum(p.numel() * p.element_size() for p in hf.parameters()) - hf.transformer.wpe.weight.numel() * 4
ids = gpt2_tokenizer().encode_ordinary(open('input.txt', encoding='utf-8').read()[:20_000])


class Stamps(BaseStreamer):
    """transformers' streamer hook, used as a clock: the time of every put (the prompt, then each new token)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


@torch.inference_mode()
def run_hf(prompt):
    """(first-token seconds, decode tokens/s, new tokens) of one transformers call."""
    x, stamps = torch.tensor([prompt]), Stamps()
    t0 = time.perf_counter()
    hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                do_sample=True, temperature=0.7, top_k=50, use_cache=True, streamer=stamps)
    t = stamps.times[1:]  # the first put is the prompt
    return t[0] - t0, (len(t) - 1) / (t[-1] - t[0]), len(t)


def run_ours(model, prompt):
    """(first-token seconds, decode tokens/s, new tokens) of one inference.py call."""
    t0, t = time.perf_counter(), []
    for _ in generate_ids(model, prompt, args.new_tokens, temperature=0.7, top_k=50, seed=1):
        t.append(time.perf_counter())
    return t[0] - t0, (len(t) - 1) / (t[-1] - t[0]), len(t)


# ---- llama.cpp on the same weights ----

def llama_cpp_sides(model, workdir):
    """[(name, run function, weight bytes per decode token, bytes per KV-cache value: its cache is
    float16)] for llama.cpp: our GGUF export of model (float32)
    quantized by llama.cpp's own quantizer (llama-quantize's code) to each of --llama-cpp's types, run
    through llama-cpp-python's low-level calls: one llama_decode per token on the same prompt, and
    inference.py's sample_next on its logits, so that only the forward pass differs."""
    try:
        import ctypes

        import llama_cpp
        import numpy as np

        import export
    except ImportError:
        return []
    f32 = os.path.join(workdir, 'gpt2-f32.gguf')
    export.export_gguf(model, f32, workdir, dtype='float32')  # workdir: no train.log to tell of
    sides = []
    for kind in args.llama_cpp:
        path = os.path.join(workdir, f'gpt2-{kind}.gguf')
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = getattr(llama_cpp, f'LLAMA_FTYPE_MOSTLY_{kind}'), torch.get_num_threads()
        if llama_cpp.llama_model_quantize(f32.encode(), path.encode(), ctypes.byref(params)):
            raise SystemExit(f'error: llama.cpp could not quantize {f32} to {kind}')
        model_params = llama_cpp.llama_model_default_params()
        model_params.use_extra_bufts = args.llama_cpp_extra_buffers
        llama_model = llama_cpp.llama_model_load_from_file(path.encode(), model_params)
        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx, context_params.n_batch = model.config.block_size, 512
        context_params.n_threads = context_params.n_threads_batch = torch.get_num_threads()
        ctx = llama_cpp.llama_init_from_model(llama_model, context_params)
        if not llama_model or not ctx:
            raise SystemExit(f'error: llama.cpp could not load {path}')
        reader = __import__('gguf').GGUFReader(path)
        weights = sum(int(t.n_bytes) for t in reader.tensors if t.name != 'position_embd.weight')
        vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llama_model))

        def run(prompt, ctx=ctx, vocab=vocab):
            """(first-token seconds, decode tokens/s, new tokens) of one llama.cpp call."""
            t = []
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            generator = torch.Generator().manual_seed(1)
            tokens = (llama_cpp.llama_token * len(prompt))(*prompt)
            batch = llama_cpp.llama_batch_get_one(tokens, len(prompt))
            t0 = time.perf_counter()
            for _ in range(args.new_tokens):
                if llama_cpp.llama_decode(ctx, batch):
                    raise SystemExit('error: llama_decode failed')
                logits = torch.from_numpy(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), (vocab,)))
                tokens = (llama_cpp.llama_token * 1)(sample_next(logits, 0.7, 50, None, generator))
                batch = llama_cpp.llama_batch_get_one(tokens, 1)
                t.append(time.perf_counter())
            return t[0] - t0, (len(t) - 1) / (t[-1] - t[0]), len(t)
        sides.append((f'llama.cpp {kind} (llama-cpp-python {llama_cpp.__version__})', run, weights, 2))
    return sides


# ---- the timed runs ----

sides = [('transformers GPT2LMHeadModel.generate (float32)', run_hf, hf_bytes, 4)]
sides += [(f'inference.py ({p} weights)', lambda prompt, m=ours[p]: run_ours(m, prompt), decode_bytes(ours[p], 0), 4)
          for p in args.precisions]
sides += [(f'inference.py ({p} weights, compiled)', lambda prompt, m=compiled[p]: run_ours(m, prompt),
           decode_bytes(compiled[p], 0), compiled[p].compiled_decode.cache_dtype.itemsize) for p in args.compiled]
workdir = tempfile.mkdtemp(prefix='bench-gguf-')
sides += llama_cpp_sides(GPT.from_hf_state_dict(hf.state_dict()).eval(), workdir)
probe = torch.ones(1 << 27)  # 512 MiB of float32
rows, bandwidths = [], []
for n_prompt in args.prompt_lens:
    prompt = ids[:n_prompt]
    runs = {name: [] for name, *_ in sides}
    for rep in range(args.repeats + 1):  # repeat 0 is the warm-up
        bandwidth = read_bandwidth(probe)
        for name, fn, *_ in sides:
            first, rate, made = fn(prompt)
            assert made == args.new_tokens, f'{name} made {made} tokens, not {args.new_tokens}'
            if rep:
                runs[name].append((first, rate))
        if rep:
            bandwidths.append(bandwidth)
    context = n_prompt + args.new_tokens // 2  # the mean number of cached positions while decoding
    for name, _, weights, kv_bytes in sides:
        kv = 2 * args.n_layer * args.n_embd * context * kv_bytes
        first = statistics.median(f for f, _ in runs[name])
        rate = statistics.median(r for _, r in runs[name])
        rows.append((name, n_prompt, first, rate, weights + kv))
        print(f'{name:50s} prompt {n_prompt:4d}: first token {first * 1e3:6.1f} ms, decode {rate:6.1f} tokens/s, '
              f'{(weights + kv) / 1e6:.1f} MB/token', flush=True)
bandwidth = statistics.median(bandwidths)
print(f'read bandwidth {bandwidth / 1e9:.1f} GB/s (median of {len(bandwidths)})')
del probe
shutil.rmtree(workdir)

parts = {}
for p in args.precisions:
    for n_prompt in args.prompt_lens:
        parts[p, n_prompt] = decode_parts(ours[p], n_prompt + args.new_tokens // 2)


# ---- what a lower precision costs, on a trained model ----

@torch.inference_mode()
def quality(path):
    """{precision: (loss, top-1 agreement with float32, mean KL from float32)} over the text the
    model at path was trained on (its checkpoint's data and data_tokens; input.txt otherwise), at
    most --quality-tokens tokens; and that number of tokens."""
    ref, info = load_model(path)
    config = checkpoint.load(info['path'], mmap=True).get('config') or {} if os.path.isfile(info['path']) else {}
    tokens = load_tokens(config.get('data') or 'input.txt')
    n = min(len(tokens), config.get('data_tokens') or len(tokens), args.quality_tokens)
    windows = Windows(tokens[:n], ref.config.block_size, 'cpu')
    x, y = windows.get(0, windows.n, wrap=False)
    keep = y != -1

    def log_probs(model):
        return torch.cat([F.log_softmax(model(x[i:i + 8])[0][..., :GPT2_VOCAB_SIZE].float(), -1)
                          for i in range(0, len(x), 8)])[keep]  # (targets, vocab)

    base = log_probs(ref)
    results = {}
    # int4 also with larger groups than inference.py's (fewer bytes per weight, less accuracy)
    variants = [(p, INT4_GROUP_SIZE) for p in args.precisions]
    variants += [('int4', g) for g in (2 * INT4_GROUP_SIZE, 4 * INT4_GROUP_SIZE)
                 if 'int4' in args.precisions and ref.config.n_embd % g == 0]
    for p, group in variants:
        lp = base if p == 'float32' else log_probs(prepare_for_generation(copy.deepcopy(ref), p, group))
        loss = F.nll_loss(lp, y[keep]).item()
        agree = (lp.argmax(-1) == base.argmax(-1)).float().mean().item()
        kl = F.kl_div(lp, base, log_target=True, reduction='batchmean').item()  # KL(float32 || p)
        results[p if group == INT4_GROUP_SIZE else f'{p}, groups of {group}'] = (loss, agree, kl)
    return results, int(keep.sum())


judged = quality(args.quality_checkpoint) if args.quality_checkpoint else None


# ---- the table ----

try:
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()
    top = subprocess.run(['git', 'rev-parse', '--show-toplevel'], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], capture_output=True,
                             text=True).stdout.splitlines()
    # the table this run is about to overwrite (the last run's) is no change to the code measured
    dirty = [line for line in changed if os.path.realpath(os.path.join(top, line[3:])) != os.path.realpath(args.out)]
except OSError:
    commit, dirty = '', []
cpu = platform.processor() or platform.machine()
with open('/proc/cpuinfo') if os.path.exists('/proc/cpuinfo') else open(os.devnull) as f:
    cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
int8_bound = {n: bandwidth / b for name, n, _, _, b in rows if name == 'inference.py (int8 weights)'}
lines = [f'# bench_inference.py on {cpu}', '',
         f'command: `{" ".join(["python", "bench_inference.py", *sys.argv[1:]])}`  ',
         f'commit {commit or "?"}{" (with uncommitted changes)" if dirty else ""}, {os.cpu_count()} CPU cores, '
         f'{torch.get_num_threads()} torch threads, python {platform.python_version()}, torch {torch.__version__}, '
         f'transformers {transformers_version}  ',
         f'GPT-2 {sum(p.numel() for p in hf.parameters()) / 1e6:.0f}M (random init, seed 0, the same weights on every '
         f'side), batch 1, {args.new_tokens} new tokens, temperature 0.7, top-k 50, median of {args.repeats} calls '
         f'after one warm-up  ',
         f'read bandwidth: **{bandwidth / 1e9:.1f} GB/s** (a sum over 512 MiB, median of {len(bandwidths)}, taken '
         f'between the calls). Bound = bandwidth / bytes per decode token (weights + the KV cache at the mean '
         f'context, prompt + {args.new_tokens // 2}: float32; float16 in llama.cpp and in the compiled int8 '
         f'and int4 steps).', '',
         '| implementation | prompt tokens | first token (ms) | decode tokens/s | MB per token | bound tokens/s '
         '| of its bound | of the int8 bound |', '|---|---|---|---|---|---|---|---|']
for name, n, first, rate, b in rows:
    of_int8 = f'{rate / int8_bound[n]:.0%}' if n in int8_bound else '-'
    lines.append(f'| {name} | {n} | {first * 1e3:.1f} | {rate:.1f} | {b / 1e6:.1f} | {bandwidth / b:.0f} '
                 f'| {rate / (bandwidth / b):.0%} | {of_int8} |')
rate_of = {(name, n): rate for name, n, _, rate, _ in rows}
ratios = []  # (ours, llama.cpp's, prompt tokens, our decode speed / theirs)
for p, kind in (('int8', 'Q8_0'), ('int4', 'Q4_0')):
    for variant in ('', ', compiled'):
        for n in args.prompt_lens:
            theirs = next((r for (name, m), r in rate_of.items() if m == n and name.startswith(f'llama.cpp {kind} ')),
                          None)
            if theirs and (f'inference.py ({p} weights{variant})', n) in rate_of:
                ratios.append((p + variant, kind, n, rate_of[f'inference.py ({p} weights{variant})', n] / theirs))
if ratios:
    lines += ['', 'Decode speed of inference.py against llama.cpp in this run (above 1: inference.py is faster): ' +
              '; '.join(f'{p} / {q} at a {n}-token prompt: **{r:.2f}**' for p, q, n, r in ratios) + '.']
lines += ['', 'Where a decode token of inference.py goes (ms; each part run alone, back to back; the rest is '
              'the Python and the small ops between them: LayerNorm, GELU, casts, bias adds, the cache writes):', '',
          '| weights | prompt tokens | decode ms/token | weight matmuls | their read rate GB/s | attention '
          '| sampling | the rest | attention with a bfloat16 cache |', '|---|---|---|---|---|---|---|---|---|']
for (p, n), t in parts.items():
    rate = next(r for name, m, _, r, _ in rows if name == f'inference.py ({p} weights)' and m == n)
    rest = 1 / rate - t['weight matmuls'] - t['attention'] - t['sampling']
    lines.append(f'| {p} | {n} | {1e3 / rate:.2f} | {t["weight matmuls"] * 1e3:.2f} '
                 f'| {decode_bytes(ours[p], 0) / t["weight matmuls"] / 1e9:.1f} | {t["attention"] * 1e3:.2f} '
                 f'| {t["sampling"] * 1e3:.2f} | {rest * 1e3:.2f} | {t["attention, bfloat16 cache"] * 1e3:.2f} |')
if judged:
    results, n = judged
    lines += ['', f'What each precision costs on a trained model: `{args.quality_checkpoint}`, its next-token '
                  f'predictions at the {n} positions of the text it was trained on (the loss is the mean cross-entropy '
                  f'there; agreement: the same likeliest token as float32; KL: from float32, nats per position):', '',
              '| weights | loss | top-1 agreement with float32 | mean KL from float32 |', '|---|---|---|---|']
    lines += [f'| {p} | {loss:.6f} | {agree:.2%} | {kl:.2e} |' for p, (loss, agree, kl) in results.items()]
table = '\n'.join(lines) + '\n'
print('\n' + table)
os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
with open(args.out, 'w') as f:
    f.write(table)
print(f'wrote {args.out}')

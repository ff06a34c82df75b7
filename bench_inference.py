"""
Generation benchmark on the CPU: inference.py against Hugging Face transformers' GPT-2, side by side
in one process, on the same GPT-2 124M weights, thread count and sampling settings.

    python bench_inference.py                            # prompts of 16 and 512 tokens, 100 new tokens
    python bench_inference.py --threads 2 --repeats 5 --prompt-lens 16 512 1000

Both sides get batch 1, a prompt cut from input.txt, temperature 0.7 and top-k 50, and must produce
exactly --new-tokens tokens (transformers is held to it with min_new_tokens). tokens/s counts the new
tokens over the whole call, the prompt pass included. Each repeat runs every side once, in turn, so
that a noisy moment of the machine hits them alike; the table gives the median.

Also measures what int8 weights cost in accuracy: the next-token distributions of the float32 and
int8 models after the same prompts (agreement of the likeliest token, KL divergence, largest logit
error). Prints a table and writes it under logs/.
"""
import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from inference import generate_ids, prepare_for_generation
from data import GPT2_VOCAB_SIZE, gpt2_tokenizer
from model import GPT

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--threads', type=int, default=None, help='torch CPU threads for both sides (default: torch\'s choice)')
parser.add_argument('--prompt-lens', type=int, nargs='+', default=[16, 512], help='prompt lengths in tokens')
parser.add_argument('--new-tokens', type=int, default=100, help='tokens to generate per call')
parser.add_argument('--repeats', type=int, default=3, help='timed calls per side and prompt (after one warm-up)')
parser.add_argument('--precisions', nargs='+', default=['int8', 'float32'], choices=['int8', 'float32'],
                    help="inference.py's weight precisions to time")
parser.add_argument('--accuracy-prompts', type=int, default=32, help='prompts for the int8 accuracy check (0: skip)')
parser.add_argument('--n-layer', type=int, default=12, help='model size (default: GPT-2 124M)')
parser.add_argument('--n-head', type=int, default=12)
parser.add_argument('--n-embd', type=int, default=768)
parser.add_argument('--out', default=os.path.join('logs', 'bench_inference_cpu.md'), help='table file')
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

from transformers import GPT2Config, GPT2LMHeadModel, __version__ as transformers_version  # noqa: E402

# ---- the same weights on both sides ----
torch.manual_seed(0)
# GPT-2 at transformers' own random init: no download here, and speed does not depend on the values
hf = GPT2LMHeadModel(GPT2Config(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)).eval()
hf.generation_config.pad_token_id = hf.config.eos_token_id
ours = {p: prepare_for_generation(GPT.from_hf_state_dict(hf.state_dict()).eval(), p) for p in args.precisions}
ids = gpt2_tokenizer().encode_ordinary(open('input.txt', encoding='utf-8').read()[:20_000])


def run_ours(model, prompt):
    return len(list(generate_ids(model, prompt, args.new_tokens, temperature=0.7, top_k=50, seed=1)))


@torch.inference_mode()
def run_hf(prompt):
    x = torch.tensor([prompt])
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens,
                      min_new_tokens=args.new_tokens, do_sample=True, temperature=0.7, top_k=50, use_cache=True)
    return out.size(1) - x.size(1)


sides = [('transformers GPT2LMHeadModel.generate (fp32)', run_hf)] + \
        [(f'inference.py ({p} weights, KV cache)', lambda prompt, m=ours[p]: run_ours(m, prompt)) for p in args.precisions]
rows = []
for n_prompt in args.prompt_lens:
    prompt = ids[:n_prompt]
    times = {name: [] for name, _ in sides}
    for rep in range(args.repeats + 1):  # repeat 0 is the warm-up
        for name, fn in sides:
            t0 = time.perf_counter()
            made = fn(prompt)
            dt = time.perf_counter() - t0
            assert made == args.new_tokens, f'{name} made {made} tokens, not {args.new_tokens}'
            if rep:
                times[name].append(dt)
    base = statistics.median(times[sides[0][0]])
    for name, _ in sides:
        t = statistics.median(times[name])
        rows.append((name, n_prompt, t, args.new_tokens / t, base / t))
        print(f'{name:50s} prompt {n_prompt:4d}: {t:.3f} s, {args.new_tokens / t:7.1f} tokens/s, x{base / t:.2f}', flush=True)

# ---- what int8 costs: next-token distributions of float32 and int8 after the same prompts ----
accuracy = None
if args.accuracy_prompts:
    fp32 = prepare_for_generation(GPT.from_hf_state_dict(hf.state_dict()).eval())
    int8 = ours['int8'] if 'int8' in ours else prepare_for_generation(GPT.from_hf_state_dict(hf.state_dict()).eval(), 'int8')
    same, kls, errs = 0, [], []
    with torch.inference_mode():
        for i in range(args.accuracy_prompts):
            x = torch.tensor([ids[i * 97:i * 97 + 64]])
            a = fp32(x)[0][0, -1, :GPT2_VOCAB_SIZE]
            b = int8(x)[0][0, -1, :GPT2_VOCAB_SIZE]
            same += int(a.argmax() == b.argmax())
            kls.append(F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction='sum').item())
            errs.append(((a - b).abs().max() / a.std()).item())
    accuracy = (same, args.accuracy_prompts, statistics.mean(kls), max(errs))

# ---- the table ----
try:
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()
except OSError:
    commit = ''
cpu = platform.processor() or platform.machine()
with open('/proc/cpuinfo') if os.path.exists('/proc/cpuinfo') else open(os.devnull) as f:
    cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
lines = [f'# bench_inference.py on {cpu}', '',
         f'command: `{" ".join(["python", "bench_inference.py", *sys.argv[1:]])}`  ',
         f'commit {commit or "?"}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, python '
         f'{platform.python_version()}, torch {torch.__version__}, transformers {transformers_version}  ',
         f'GPT-2 {sum(p.numel() for p in hf.parameters()) / 1e6:.0f}M (random init, seed 0, the same weights on both sides), batch 1, {args.new_tokens} new tokens, '
         f'temperature 0.7, top-k 50, median of {args.repeats} calls after one warm-up; tokens/s includes the prompt pass',
         '', '| implementation | prompt tokens | s per call | new tokens/s | vs transformers |', '|---|---|---|---|---|']
lines += [f'| {name} | {n} | {t:.3f} | {tps:.1f} | {x:.2f}x |' for name, n, t, tps, x in rows]
if accuracy:
    same, n, kl, err = accuracy
    lines += ['', f'int8 against float32 weights, next token after {n} prompts of 64 tokens: the same likeliest token '
                  f'{same}/{n} times, mean KL divergence {kl:.2e} nats, largest logit error {err:.3f} logit std.']
table = '\n'.join(lines) + '\n'
print('\n' + table)
os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
with open(args.out, 'w') as f:
    f.write(table)
print(f'wrote {args.out}')

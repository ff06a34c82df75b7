"""
Training-step benchmark: tokens/s, MFU, step time, peak memory and compile time of the GPT-2 step
(forward, backward, clip, fused AdamW) for a few micro-batch sizes and compile modes.

    python bench.py                                   # 124M, on the GPU, micro-batches 16 32 64
    python bench.py --batch-sizes 8 16 --compile none blocks model

MFU counts 6 * (params - wpe) + 12 * n_layer * n_embd * T FLOPs per token (855 MFLOP for the 124M
at T=1024), against the device's measured bf16 matmul rate and against its datasheet peak.
Prints a table and writes it under logs/.
"""
import argparse
import json
import os
import sys
import time

import torch

from model import GPT, GPTConfig
from runtime import cpu_flags, device_name, keep_freed_memory, peak_memory, pick_device

# dense bf16 (fp16 on T4) tensor-core peaks from the vendors' datasheets, TFLOP/s
DATASHEET_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'L4': 121.0, 'A10': 125.0, 'T4': 65.0}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--device', default='auto', help='auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps')
parser.add_argument('--dtype', nargs='+', default=['bfloat16'], choices=['bfloat16', 'float16', 'float32'],
                    help='autocast dtypes to compare (float32: no autocast)')
parser.add_argument('--batch-sizes', type=int, nargs='+', default=[16, 32, 64], help='micro-batch sizes')
parser.add_argument('--compile', nargs='+', default=['model'], choices=['none', 'model', 'blocks'],
                    help="'model': torch.compile the whole model; 'blocks': compile each block (one compile, reused) and the head + loss")
parser.add_argument('--steps', type=int, default=20, help='timed steps after warm-up')
parser.add_argument('--warmup', type=int, default=5, help='untimed steps; the first one compiles')
parser.add_argument('--n-layer', type=int, default=12)
parser.add_argument('--n-head', type=int, default=12)
parser.add_argument('--n-embd', type=int, default=768)
parser.add_argument('--block-size', type=int, default=1024)
parser.add_argument('--out', default=None, help='table file (default logs/bench_<device>.md)')
args = parser.parse_args()

try:
    args.device = pick_device(args.device)
except ValueError as e:
    sys.exit(f'error: {e}')
device_type = args.device.split(':')[0]
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
label = device_name(args.device)


def sync():
    if device_type == 'cuda':
        torch.cuda.synchronize()
    elif device_type == 'mps':
        torch.mps.synchronize()


def matmul_tflops(ptdtype, n=8192, reps=10):
    """Measured dense matmul rate in a dtype, on random data (zeros run faster)."""
    if device_type == 'cpu':
        n, reps = 4096, 5  # a CPU is some 100 times slower
    a = torch.randn(n, n, device=args.device, dtype=ptdtype)
    b = torch.randn(n, n, device=args.device, dtype=ptdtype)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


config = GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
T = config.block_size
if device_type == 'cpu':
    keep_freed_memory()  # as train.py does on a CPU
measured = {d: matmul_tflops(getattr(torch, d)) for d in args.dtype} if device_type != 'mps' else {}
datasheet = next((v for k, v in DATASHEET_TFLOPS.items() if k in label), None)
print(f'device: {label} | torch {torch.__version__} | dtypes {" ".join(args.dtype)}')
for d, tflops in measured.items():
    print(f'measured {d} matmul (random data): {tflops:.2f} TFLOP/s; datasheet: {datasheet} TFLOP/s')

def make_step(fwd, model, optimizer, x, y, ptdtype):
    """One training step of the benchmark: forward, backward, clip, optimizer; returns the loss."""
    def step():
        with torch.autocast(device_type=device_type, dtype=ptdtype, enabled=ptdtype != torch.float32):
            _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


rows = []
for dtype in args.dtype:
    ptdtype = getattr(torch, dtype)
    for mode in args.compile:
        for B in args.batch_sizes:
            torch.manual_seed(0)
            torch._dynamo.reset()  # each row compiles for its own dtype and batch
            model = GPT(config).to(args.device)
            flops_per_token = 6 * (model.num_params() - model.transformer.wpe.weight.numel()) \
                + 12 * config.n_layer * config.n_embd * T
            optimizer, = model.configure_optimizers(0.1, 6e-4, device_type=device_type, verbose=False)
            fwd = model
            if mode == 'model':
                fwd = torch.compile(model)
            elif mode == 'blocks':
                for block in model.transformer.h:
                    block.compile()
                model.head = torch.compile(model.head)  # as train.py --compile-mode blocks does
            data = torch.randint(0, 50257, (B, T + 1), device=args.device)
            x, y = data[:, :-1], data[:, 1:]
            if device_type == 'cuda':
                torch.cuda.reset_peak_memory_stats()
            else:
                peak_memory(reset=True)  # the process's resident peak from here (Linux)

            step = make_step(fwd, model, optimizer, x, y, ptdtype)

            try:
                t0 = time.perf_counter()
                step()
                sync()
                first = time.perf_counter() - t0
                for _ in range(args.warmup - 1):
                    step()
                sync()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    loss = step()
                sync()
                dt = (time.perf_counter() - t0) / args.steps
            except torch.OutOfMemoryError:
                print(f'{dtype} compile={mode} B={B}: out of memory')
                dt = None
            if dt is None:
                del model, optimizer, fwd, step
                torch.cuda.empty_cache()
                continue
            tps = B * T / dt
            peak = max(measured.values()) if measured else None  # of the dtypes compared
            row = dict(dtype=dtype, compile=mode, batch=B, step_ms=dt * 1e3, tok_per_sec=tps,
                       compile_s=first - dt,
                       peak_mem_gib=(torch.cuda.max_memory_allocated() if device_type == 'cuda'
                                     else peak_memory() or 0) / 2 ** 30,
                       mfu_measured=flops_per_token * tps / (peak * 1e12) if peak else None,
                       mfu_datasheet=flops_per_token * tps / (datasheet * 1e12) if datasheet else None,
                       loss=loss.item())
            rows.append(row)
            print(json.dumps(row))
            del model, optimizer, fwd, step
            if device_type == 'cuda':
                torch.cuda.empty_cache()


def fmt(v, spec):
    return '-' if v is None else format(v, spec)


rates = ', '.join(f'{d} {t:.2f}' for d, t in measured.items())
flags = ''
if device_type == 'cpu':
    wanted = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile', 'amx_int8', 'avx512_fp16')
    found = [f for f in wanted if f in cpu_flags()]
    flags = f'CPU flags of note: {" ".join(found) or "none"}  \n'
lines = [
    f'# bench.py on {label}',
    '',
    f'command: `python {" ".join(sys.argv)}`  ',
    f'torch {torch.__version__}, T={T}, {args.steps} timed steps after {args.warmup} warm-up'
    + (f'; measured matmul TFLOP/s: {rates}' if measured else '')
    + (f'; datasheet {datasheet} TFLOP/s' if datasheet else '') + '  ',
    flags + 'MFU (measured peak): the model FLOPs done per second over the fastest measured matmul rate',
    '',
    '| dtype | compile | micro-batch | step ms | tok/s | MFU (measured peak) | MFU (datasheet) | peak mem GiB | compile s |',
    '|---|---|---|---|---|---|---|---|---|',
]
for r in rows:
    lines.append(f"| {r['dtype']} | {r['compile']} | {r['batch']} | {r['step_ms']:.1f} | {r['tok_per_sec']:,.0f} | "
                 f"{fmt(r['mfu_measured'], '.1%')} | {fmt(r['mfu_datasheet'], '.1%')} | "
                 f"{fmt(r['peak_mem_gib'], '.1f')} | {r['compile_s']:.1f} |")
table = '\n'.join(lines) + '\n'
print('\n' + table)
out = args.out or os.path.join('logs', f'bench_{device_type}.md')
os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
with open(out, 'w') as f:
    f.write(table)
print(f'wrote {out}')

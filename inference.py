"""
Text from a GPT-2 checkpoint, streamed token by token.

    python inference.py --prompt "ROMEO:" --max-new-tokens 100 --temperature 0.7 --top-k 50 --seed 1

The model comes from --checkpoint, else from $GPT2_SHAKESPEARE_MODEL, else from the newest
logs/**/ckpt.pt that train.py wrote. Any of these may be a train.py checkpoint or run folder, a
model-only .pt (checkpoint.py has both formats), a directory with Hugging Face GPT-2 weights
(config.json + model.safetensors or pytorch_model.bin, as --export writes), or a Hugging Face Hub
model repo id (user/repo) holding either. This file is the command line: loading, sampling and the
token loop are generation.py's, which app.py, batching.py and train.py use too.

    python inference.py --checkpoint logs/run-x --export gpt2-shakespeare   # a Hugging Face model repo

Speed on a CPU: --precision int8 (the default on CPU) or int4 keeps the weights quantized, and
--compile (the default for int8 on CPU, for models of 50M parameters or more) decodes through one
compiled graph (cpu_decode.py has both; docs/cpu-generation.md gives what each costs and gains, measured beside
llama.cpp). A preallocated KV cache (model.py) makes each new token cost one position, and the
vocabulary projection runs on the last position only.
"""
import argparse
import os
import sys
import time

import torch

import export
from cpu_decode import PackagedDecoder, compile_decoding, prepare_for_generation
from quantize import PRECISIONS
from generation import MODEL_ENV_VAR, CheckpointError, default_precision, generate, load_model
from model import KVCache
from runtime import pick_device

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
            size = export.export_gguf(model, args.export, info['path'], info['run'], args.export_dtype)
        elif args.export:
            files = export.export_hf(model, args.export, info['path'], info['run'],
                                     getattr(torch, args.export_dtype))
        else:
            precision = args.precision if args.precision != 'auto' else default_precision(device)
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

"""
Fast CPU generation: a generation model's weights quantized (quantize.py) and its decoding step
compiled into one graph.

inference.py, batching.py and app.py take both from here, through prepare_for_generation(model,
precision, compile). One new token must read every weight once, so batch-1 decoding on a CPU is bound
by memory bandwidth, not arithmetic (bench_inference.py measures how close it comes, beside llama.cpp
on the same weights).

- CompiledDecoder runs the step of one new token per row as a single torch.compile graph: in eager
  mode the small ops between the matmuls (LayerNorm, the activations' quantization, GELU, bias adds,
  attention over the cache) cost a quarter of a token's time; compiled, they fuse into a few loops
  around the matmul kernels. The first compile takes a while; torch keeps it on disk for later runs.
- For one row at a time (inference.py's), int8's step goes further (ONE_ROW_COMPILE), compiled ahead
  of time once per model (PackagedDecoder), and a quantized step's KV cache is float16.
"""
import contextlib
import functools
import glob
import hashlib
import inspect
import os
import platform
import types

import torch
import torch.nn as nn

import quantize
from quantize import INT4_GROUP_SIZE, Int8Linear, quantize_weights


# A decoding step streams every weight from memory, 4 KB page after 4 KB page: with THP_MEM_ALLOC_ENABLE
# set, torch's CPU allocator asks Linux for transparent huge pages (2 MB) for every tensor of 2 MB or
# more, so that the CPU's address translation keeps up (where /sys/kernel/mm/transparent_hugepage/enabled
# allows it: madvise or always). Decoding ran 6 to 8% faster here (docs/cpu-generation.md). torch reads the variable
# once, at its first allocation: importing this module before any tensor exists, as inference.py and
# app.py do, is early enough (test_inference.py checks). The variable is then taken back, so that this
# process's children (a training run that a test starts, say) choose for themselves; set to 0
# beforehand, it keeps 4 KB pages.
if 'THP_MEM_ALLOC_ENABLE' not in os.environ:
    os.environ['THP_MEM_ALLOC_ENABLE'] = '1'
    torch.empty(1)  # the first allocation, where torch reads it
    del os.environ['THP_MEM_ALLOC_ENABLE']


# A compiled step for one row at a time (inference.py's) can do better for int8: with the weights
# frozen into the graph as constants, inductor blocks them for its own GEMM template for
# torch._weight_int8pack_mm (max_autotune). Side by side at one row (GPT-2 124M, 2 threads,
# logs/compiled_decoding.md) the 48 block matrices took 3.19 ms in it against 5.21 ms in
# torch._int_mm and 7.44 in the eager _weight_int8pack_mm, and a whole step 5.0 against 7.7 ms. It is
# for one row only: at 8 rows it took 30 against 18 ms for the step, so batching keeps torch._int_mm,
# and a batch's rows are decoded by the same kernel however many share a step.
# Left to itself, max_autotune times the template against the eager kernel on each shape and keeps
# the faster; but it times them on weights that sit in the CPU's cache, where a decoding step streams
# them from memory (there the template read the 48 block matrices at 26.7 GB/s against 11.4), and its
# pick moved from one compile to the next (the eager kernel won the MLP's 3072 x 768 in one of two
# fresh compiles here). Where the template's vector code is the one measured (AVX512), it is taken
# without the timing, which also saves 4 to 5 s of compile for each of the five shapes; elsewhere
# the timing picks.
# The compile takes a minute or more for the 124M, so it is done ahead of time, once per model:
# PackagedDecoder. freezing must be set as inductor's config (as an option of torch.compile it had no
# effect), and a frozen graph must not go into torch's compiled-graph cache, nor come from it: that
# cache knows frozen weights by their shapes alone, and handed one model's graph, its weights and all,
# to another of the same shapes (test_cpu_decode.py)
ONE_ROW_COMPILE = {'freezing': True, 'fx_graph_cache': False, 'max_autotune': True}
if torch.backends.cpu.get_cpu_capability().startswith('AVX512'):
    ONE_ROW_COMPILE['max_autotune_gemm_backends'] = 'CPP'


def prepare_for_generation(model, precision='float32', int4_group_size=INT4_GROUP_SIZE, compile=False, one_row=False):
    """Make model (in place) a generation model: with precision 'int8' or 'int4', the quantized
    linears of quantize.py in every block and the head (float32: as it is); with compile, a CompiledDecoder as
    model.compiled_decode, which generation.generate_ids and batching.Batch then decode with; with
    one_row too, one for a row at a time (generate_ids' alone, not a Batch's): int8's in the GEMM
    template above, compiled ahead of time (a PackagedDecoder), and a float16 KV cache for int8 and
    int4. Returns model."""
    quantize_weights(model, precision, int4_group_size)
    if compile:
        frozen = one_row and precision == 'int8'
        for linear in model.modules():
            if isinstance(linear, Int8Linear):
                linear.one_row = frozen
        # A one-row step of int8 or int4 weights keeps its KV cache in float16, as llama.cpp does by
        # default: at 512 cached positions it reads 18.9 MB of keys and values instead of 37.7, turned
        # into float32 by the attention loops as they read them. Interleaved in one process (GPT-2 124M,
        # 2 threads, logs/compiled_decoding.md), a step at 512 cached positions took 7.94 against 8.72 ms
        # (int8) and 8.32 against 9.13 ms (int4); at 16, 6.52 against 6.71 and 6.38 against 6.70 ms.
        # bfloat16 was slower than float16 (7.48 against 6.68 ms, int8). A batch's step keeps float32:
        # there a 16-bit cache was no faster (its query's dequantization is redone at every cached
        # position). The prompt pass attends to its own keys and values, in float32.
        cache_dtype = torch.float16 if one_row and precision != 'float32' else torch.float32
        model.compiled_decode = PackagedDecoder(model) if frozen else CompiledDecoder(model, one_row, cache_dtype)
    return model


# ---- the compiled decoding step ----

# what torch.compile raises when it cannot make the graph: no working C++ compiler on the machine, say
COMPILE_ERRORS = (torch._dynamo.exc.BackendCompilerFailed, torch._inductor.exc.InductorError)


def compile_decoding(model, k, v):
    """Compile model.compiled_decode now, for caches k, v like those it will decode with. Returns None,
    or one line saying why it could not: then the decoder is gone and the model decodes eagerly."""
    try:
        model.compiled_decode.warm_up(k, v)
    except COMPILE_ERRORS as e:
        del model.compiled_decode
        return f'{type(e).__name__}: {str(e).strip().splitlines()[0]}'
    return None


class CompiledDecoder:
    """One new token for each of the first B rows of a KV cache, every row at a position of its own,
    as one torch.compile graph of the model's own modules (what GPT.forward does for one position).

    The cache is only read inside the graph: each row attends to its cached positions and to its new
    one apart, and the new keys and values come out to be stored after it, so that the graph has no
    input that it also writes. The graph's shapes are fixed but two: the cached length L (any, from
    2), and B (1, or any from 2). So it compiles once for B = 1 and once for B > 1, the first time each
    comes; torch keeps the compiled code on disk (TORCHINDUCTOR_CACHE_DIR) and a later process loads it
    in seconds.

    one_row: B = 1 alone (generate_ids' step), compiled once. cache_dtype: the dtype of the KV cache
    to make for it (generate_ids does):
    float16 for a quantized one-row decoder (prepare_for_generation says why), float32 otherwise."""

    def __init__(self, model, one_row=False, cache_dtype=torch.float32):
        self.model, self.one_row, self.cache_dtype = model, one_row, cache_dtype
        # Before each call torch checks that what the graph was made for still holds (guards). Checking
        # the modules' attributes too would cost 0.4 ms a token here (5%), and they do not change once
        # prepare_for_generation is done: so the guards skip them, and this decoder's step gets a code
        # object of its own, because torch keeps its graphs per code object: another model's decoder
        # (another precision, another size) must not find this one's graphs.
        step = types.FunctionType(CompiledDecoder.step.__code__.replace(), globals())
        options = {'guard_filter_fn': torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        self.compiled = torch.compile(types.MethodType(step, self), dynamic=False, options=options)

    def step(self, tokens, positions, k, v, seen):
        """tokens (B,) at positions (B,); k, v (n_layer, B, nh, L, hs): the cache's first L positions,
        of which seen (B, L) marks each row's own. -> logits (B, vocab_size), and the new keys and
        values (n_layer, B, nh, hs)."""
        model = self.model
        tr, B, nh = model.transformer, tokens.size(0), model.config.n_head
        x = tr.wte(tokens) + tr.wpe(positions)  # (B, C)
        hs = x.size(1) // nh
        new_k, new_v = [], []
        for i, block in enumerate(tr.h):
            q, k_new, v_new = block.attn.c_attn(block.ln_1(x)).view(B, 3, nh, hs).unbind(1)  # (B, nh, hs)
            # the cache in float32 or float16 (cache_dtype), read as float32
            cached = torch.einsum('bhd,bhld->bhl', q, k[i].to(q.dtype)).masked_fill(~seen[:, None, :], float('-inf'))
            p = torch.softmax(torch.cat([cached, (q * k_new).sum(-1, keepdim=True)], -1) * hs ** -0.5, -1)
            y = torch.einsum('bhl,bhld->bhd', p[..., :-1], v[i].to(q.dtype)) + p[..., -1:] * v_new  # (B, nh, hs)
            x = x + block.attn.c_proj(y.reshape(B, -1))
            x = x + block.mlp(block.ln_2(x))
            new_k.append(k_new)
            new_v.append(v_new)
        logits, _ = model.head(x)  # the padded ids masked there
        return logits, torch.stack(new_k), torch.stack(new_v)

    @torch.inference_mode()  # as generate_ids and Batch.step run it: an inference tensor compiles apart
    def warm_up(self, k, v):
        """Compile now rather than in the first request: a step for one row and, where the caches k, v
        have several rows, one for two, on their rows 0 and 1 at position 1 (scratch: those rows are
        written again before anything reads them)."""
        for rows in (1, 2) if k.size(1) > 1 and not self.one_row else (1,):
            self(torch.zeros(rows, dtype=torch.long, device=k.device), [1] * rows, k, v)

    @torch.inference_mode()
    def __call__(self, tokens, lengths, k, v):
        """Logits (B, vocab_size) of the next position of each row b < B: tokens (B,) go in at
        positions lengths (B ints) of the caches k, v (n_layer, rows, nh, max_len, hs), and their keys
        and values are stored there. The caller advances the lengths."""
        B = tokens.size(0)
        L = max(2, max(lengths))  # a length of 1 would compile apart: torch specializes sizes 0 and 1
        positions = torch.tensor(lengths, device=tokens.device)
        seen = torch.arange(L, device=tokens.device) < positions[:, None]  # (B, L)
        k_seen, v_seen = k[:, :B, :, :L], v[:, :B, :, :L]
        assert B == 1 or not self.one_row, 'a one-row decoder decodes one row'
        logits, k_new, v_new = self.run(tokens, positions, k_seen, v_seen, seen)
        rows = torch.arange(B, device=tokens.device)
        # the indexed dims come first: (B, n_layer, nh, hs), in the cache's dtype
        k[:, rows, :, positions] = k_new.transpose(0, 1).to(k.dtype)
        v[:, rows, :, positions] = v_new.transpose(0, 1).to(v.dtype)
        return logits

    def run(self, tokens, positions, k_seen, v_seen, seen):
        """step's outputs for its inputs, through the compiled graph."""
        B = tokens.size(0)
        for t, dim in ((k_seen, 3), (v_seen, 3), (seen, 1)):
            torch._dynamo.mark_dynamic(t, dim)
        if B > 1:
            for t, dim in ((tokens, 0), (positions, 0), (seen, 0), (k_seen, 1), (v_seen, 1)):
                torch._dynamo.mark_dynamic(t, dim)
        return self.compiled(tokens, positions, k_seen, v_seen, seen)


# ---- inference.py's step, compiled ahead of time ----

# packages older than the newest few are deleted as a new one is written: each holds its model's weights
KEPT_PACKAGES = 3


class PackagedDecoder(CompiledDecoder):
    """CompiledDecoder's one-row int8 step (frozen weights in inductor's GEMM template), compiled
    ahead of time by AOTInductor into a package on disk, so that only the first run for a model pays
    the compile: a later one, same weights, loads the package in about a second. The package's name is
    a digest of all that went into it: the model's tensors, the cache's layout, torch's version, the
    CPU's instruction set and this file and model.py, so that no other model, torch or CPU ever runs
    it. The packages live in folder (package_folder()), the newest KEPT_PACKAGES of them."""

    def __init__(self, model, folder=None):
        self.model, self.one_row, self.cache_dtype = model, True, torch.float16
        self.folder, self.runner, self.strides = folder or package_folder(), None, None

    def run(self, tokens, positions, k_seen, v_seen, seen):
        if self.runner is None:
            self.runner, self.strides = self.load_or_build(tokens, positions, k_seen, v_seen, seen), k_seen.stride()
        # the package reads its inputs with the strides it was compiled for, and checks none of them
        if k_seen.stride() != self.strides or v_seen.stride() != self.strides or k_seen.dtype != self.cache_dtype:
            raise ValueError(f'this decoder reads a {self.cache_dtype} cache of strides {self.strides}')
        return self.runner(tokens, positions, k_seen, v_seen, seen)

    def package_path(self, k_seen):
        """The package's file for a cache like k_seen (the cache, or a view of its first positions)."""
        digest = hashlib.sha256(self.source_digest)
        # the threads too: the template's blocking is made for the threads it will run on
        for part in (torch.__version__, cpu_identity(), str(torch.get_num_threads()), str(k_seen.shape[:3]),
                     str(k_seen.stride()), str(k_seen.dtype)):
            digest.update(part.encode() + b'\0')
        return os.path.join(self.folder, f'decode-{digest.hexdigest()[:32]}.pt2')

    @functools.cached_property
    def source_digest(self):
        """A digest of the code and the weights (which prepare_for_generation left as they stay): it
        reads every weight, 0.3 s for the 124M, so once per decoder."""
        digest = hashlib.sha256()
        for module in (__file__, quantize.__file__, inspect.getsourcefile(type(self.model))):
            with open(module, 'rb') as f:
                digest.update(f.read())
        for name, t in self.model.state_dict().items():
            digest.update(name.encode() + str(t.dtype).encode())
            digest.update(t.detach().reshape(-1).view(torch.uint8).numpy())
        return digest.digest()

    def load_or_build(self, *args):
        """A runner of the package for inputs like args (step's), loaded or, the first time, built."""
        path = self.package_path(args[2])
        if os.path.exists(path):
            try:
                runner = torch._inductor.aoti_load_package(path)
                os.utime(path)  # the newest again, for the pruning below
                return runner
            except (RuntimeError, OSError):  # a damaged package ('failed finding central directory'): made again
                pass
        os.makedirs(self.folder, exist_ok=True)
        partial = os.path.join(self.folder, f'partial-{os.getpid()}-{os.path.basename(path)}')
        max_len = args[2].stride(2) // args[2].size(4)  # the cache's length, of which args[2] is a view
        try:
            with torch.inference_mode(False), torch.no_grad(), hidden_fbgemm_weights(self.model):
                # inputs of the same shapes and strides; the cached length may be any from 2 to
                # max_len - 1 (at max_len the view would be contiguous: another layout)
                examples = tuple(torch.empty_strided(a.shape, a.stride(), dtype=a.dtype) for a in args)
                L = torch.export.Dim('L', min=2, max=max_len - 1)
                program = torch.export.export(_Step(self.model), examples,
                                              dynamic_shapes=(None, None, {3: L}, {3: L}, {1: L}))
                with torch._inductor.config.patch(ONE_ROW_COMPILE):
                    torch._inductor.aoti_compile_and_package(program, package_path=partial)
            os.replace(partial, path)  # whole or not at all, should two processes build it at once
        finally:
            if os.path.exists(partial):  # a compile that failed (no C++ compiler, say)
                os.remove(partial)
        for old in sorted(glob.glob(os.path.join(self.folder, 'decode-*.pt2')), key=os.path.getmtime)[:-KEPT_PACKAGES]:
            os.remove(old)
        return torch._inductor.aoti_load_package(path)


class _Step(nn.Module):
    """CompiledDecoder.step as a module's forward, for torch.export."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    forward = CompiledDecoder.step


def cpu_identity():
    """The CPU's model and instruction sets, which the package's code was compiled for (Linux's
    /proc/cpuinfo; elsewhere the platform's name for it). Cheap: inductor's own probe compiles a
    test program (3 s here)."""
    try:
        with open('/proc/cpuinfo') as f:
            return ''.join(sorted({line for line in f if line.startswith(('model name', 'flags', 'Features'))}))
    except OSError:
        return platform.processor() or platform.machine()


def package_folder():
    """PackagedDecoder's folder: gpt2-decode in torch's compiler cache (TORCHINDUCTOR_CACHE_DIR, or
    /tmp/torchinductor_<user>)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    return os.path.join(cache_dir(), 'gpt2-decode')


@contextlib.contextmanager
def hidden_fbgemm_weights(model):
    """torch.export cannot take fbgemm's packed weights (script objects) as attributes of a module:
    they are put aside meanwhile (the one-row step never reads them)."""
    saved = [(m, m.fbgemm_weight) for m in model.modules() if isinstance(m, Int8Linear)]
    for m, _ in saved:
        m.fbgemm_weight = None
    try:
        yield
    finally:
        for m, packed in saved:
            m.fbgemm_weight = packed

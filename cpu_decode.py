"""
Fast CPU generation: weights quantized to int8 or int4, and the decoding step compiled into one graph.

inference.py, batching.py and app.py take both from here. One new token must read every weight once,
so batch-1 decoding on a CPU is bound by memory bandwidth, not arithmetic (bench_inference.py measures
how close it comes, beside llama.cpp on the same weights):

- prepare_for_generation(model, 'int8') keeps each weight matrix as int8 with one scale per output row
  (a quarter of the float32 bytes). A decoding step quantizes its activations to int8 per row and
  multiplies int8 by int8 in torch._int_mm (in fbgemm's kernel for the head, which reads it faster);
  a long prompt, which is arithmetic-bound, goes through a matmul on the dequantized weights, in bf16
  where the CPU has bf16 instructions. 'int4' reads about a sixth (4 bits, and a scale and an offset
  per 32 weights), at a cost in accuracy that docs/cpu-generation.md gives.
- CompiledDecoder runs the step of one new token per row as a single torch.compile graph: in eager
  mode the small ops between the matmuls (LayerNorm, the activations' quantization, GELU, bias adds,
  attention over the cache) cost a quarter of a token's time; compiled, they fuse into a few loops
  around the matmul kernels. The first compile takes a while; torch keeps it on disk for later runs.
  For one row at a time (inference.py's), int8's step goes further (ONE_ROW_COMPILE), compiled ahead
  of time once per model (PackagedDecoder), and a quantized step's KV cache is float16.
"""
import contextlib
import functools
import glob
import hashlib
import inspect
import os
import platform
import time
import types
import warnings
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F


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


# ---- quantized weights ----

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
    activations too, each row to int8 with a scale of its own, and multiplies int8 by int8 with int32
    sums (VNNI where the CPU has it), as llama.cpp's Q8_0 does with its blocks: 17% faster than the
    bf16-activation kernel here, at a cost docs/cpu-generation.md gives. The kernel is torch._int_mm or, with
    fbgemm=True (the head), fbgemm's where torch has it: the same int32 sums and float32 outputs."""

    def __init__(self, linear, fbgemm=False):
        super().__init__(linear)
        self.prompt_dtype = prompt_matmul_dtype()
        w = linear.weight.detach().float()
        # the scales are rounded to bf16 (exact in the prompt path's dtype), kept as float32 for decoding
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).bfloat16().float()
        self.register_buffer('weight', torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer('scale', scale)
        self.fbgemm_weight = fbgemm_pack(self.weight, self.scale) if fbgemm else None
        self.register_fbgemm()

    def register_fbgemm(self):
        if self.fbgemm_weight is not None:  # where fbgemm_int8_mm finds it
            self.fbgemm_key = id(self)
            FBGEMM_LINEARS[self.fbgemm_key] = self

    def __setstate__(self, state):  # a copy (copy.deepcopy, pickle) is a linear of its own
        super().__setstate__(state)
        self.register_fbgemm()

    # set by prepare_for_generation(..., one_row=True): in a compiled step of one row, decode through
    # torch._weight_int8pack_mm, which inductor replaces with its own GEMM template (ONE_ROW_COMPILE)
    one_row = False

    def matmul(self, x):
        if self.one_row and x.size(0) == 1 and torch.compiler.is_compiling():
            # bf16 activations times the int8 weights, turned into floats in registers: (1, in) -> (1, out)
            return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scale.bfloat16())
        if x.size(0) <= 32:
            # decoding: memory-bound, read 1 byte per weight. (M, in) -> int8 values with a scale per row
            x = x.float()
            x_scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127  # (M, 1)
            q = torch.round(x / x_scale)
            if self.fbgemm_weight is not None:
                return fbgemm_int8_mm(q, self.fbgemm_key) * x_scale
            # (M, in) int8 @ (in, out) int8 view of the stored rows -> int32, then the weight's scales
            # and the activations' (in fbgemm's order: the same float32 results)
            return torch._int_mm(q.to(torch.int8), self.weight.t()) * self.scale * x_scale
        # a long prompt: arithmetic-bound, where a GEMM on the dequantized weight runs faster than the
        # kernel (bf16 where the CPU has bf16 instructions)
        w = self.weight.to(self.prompt_dtype) * self.scale.to(self.prompt_dtype)[:, None]
        return F.linear(x.to(self.prompt_dtype), w)


# For the head (50304 x 768: 38.6M weights, a third of what a token reads), fbgemm's int8 GEMM (the
# kernel of torch's quantized linear on x86) read the weights 1.5 times as fast as torch._int_mm at one
# row and 1.8 times at 8 rows on this project's CPU. For the blocks' matrices (0.6M to 2.4M weights)
# it was no faster in a whole decoding step, and it costs about 12 us more a call: they keep _int_mm.
# fbgemm keeps a packed copy of the weight (38.6 MB); the int8 one stays for the prompt path.
FBGEMM_LINEARS = weakref.WeakValueDictionary()  # fbgemm_key -> Int8Linear


def fbgemm_pack(weight, scale):
    """int8 weight (out, in) with a scale per row, packed for fbgemm; None where torch has no fbgemm
    (a CPU other than x86, or a torch that has dropped its quantized tensors, which 2.13 deprecates)."""
    if 'fbgemm' not in torch.backends.quantized.supported_engines:
        return None
    engine = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = 'fbgemm'  # the default 'x86' may pack for oneDNN instead
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', 'torch.quantize_per_tensor', UserWarning)  # the deprecation
            w = torch._make_per_channel_quantized_tensor(weight, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
            return torch.ops.quantized.linear_prepack(w, None)
    except (AttributeError, RuntimeError):
        return None
    finally:
        torch.backends.quantized.engine = engine


@torch.library.custom_op('gpt2::fbgemm_int8_mm', mutates_args=())
def fbgemm_int8_mm(q: torch.Tensor, key: int) -> torch.Tensor:
    """q (M, in): whole numbers in -127..127, as float32 -> (M, out) float32: the int32 sums of q times
    the int8 weight of FBGEMM_LINEARS[key], times its scales. (A custom op, because torch.compile cannot
    take fbgemm's packed weight as an input: it finds the weight by key.)"""
    # fbgemm quantizes q with scale 1 and offset 128, to uint8 exactly, and takes the offset back out
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(q, 1.0, 128, FBGEMM_LINEARS[key].fbgemm_weight)


@fbgemm_int8_mm.register_fake
def _(q, key):
    return q.new_empty(q.size(0), FBGEMM_LINEARS[key].out_features)


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
    linears above in every block and the head (float32: as it is); with compile, a CompiledDecoder as
    model.compiled_decode, which inference.generate_ids and batching.Batch then decode with; with
    one_row too, one for a row at a time (generate_ids' alone, not a Batch's): int8's in the GEMM
    template above, compiled ahead of time (a PackagedDecoder), and a float16 KV cache for int8 and
    int4. Returns model."""
    if precision not in PRECISIONS:
        raise ValueError(f'unknown precision {precision!r}: {", ".join(PRECISIONS)}')
    if precision != 'float32':
        if next(model.parameters()).device.type != 'cpu':
            raise ValueError(f'precision {precision} is for the CPU; use float32 on other devices')
        quantized = Int8Linear if precision == 'int8' else functools.partial(Int4Linear, group_size=int4_group_size)
        for block in model.transformer.h:
            block.attn.c_attn, block.attn.c_proj = quantized(block.attn.c_attn), quantized(block.attn.c_proj)
            block.mlp.c_fc, block.mlp.c_proj = quantized(block.mlp.c_fc), quantized(block.mlp.c_proj)
        # wte keeps the fp32 table for the embedding lookup
        model.lm_head = Int8Linear(model.lm_head, fbgemm=True) if precision == 'int8' else quantized(model.lm_head)
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
        for module in (__file__, inspect.getsourcefile(type(self.model))):
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

"""
Weight-only quantization for generation on a CPU: GPT-2's linears with int8 or int4 weights.

One new token reads every weight once, so batch-1 decoding on a CPU is bound by memory bandwidth:
fewer bytes per weight is more tokens/s (bench_inference.py measures it, beside llama.cpp).

- Int8Linear keeps each weight matrix as int8 with one scale per output row (a quarter of the
  float32 bytes). A decoding step quantizes its activations to int8 per row and multiplies int8 by
  int8 in torch._int_mm (in fbgemm's kernel for the head, which reads it faster); a long prompt, which
  is arithmetic-bound, goes through a matmul on the dequantized weights, in bf16 where the CPU has
  bf16 instructions.
- Int4Linear reads about a sixth (4 bits, and a scale and an offset per 32 weights), at a cost in
  accuracy that docs/cpu-generation.md gives.

    quantize_weights(model, 'int8')   # in place; cpu_decode.prepare_for_generation calls it
"""
import functools
import time
import warnings
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

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


def quantize_weights(model, precision, group_size=INT4_GROUP_SIZE):
    """Model (in place) with precision's linears ('int8' or 'int4') in every block and the head; the
    embedding tables stay float32. Returns model."""
    if precision not in PRECISIONS:
        raise ValueError(f'unknown precision {precision!r}: {", ".join(PRECISIONS)}')
    if precision == 'float32':
        return model
    if next(model.parameters()).device.type != 'cpu':
        raise ValueError(f'precision {precision} is for the CPU; use float32 on other devices')
    quantized = Int8Linear if precision == 'int8' else functools.partial(Int4Linear, group_size=group_size)
    for block in model.transformer.h:
        block.attn.c_attn, block.attn.c_proj = quantized(block.attn.c_attn), quantized(block.attn.c_proj)
        block.mlp.c_fc, block.mlp.c_proj = quantized(block.mlp.c_fc), quantized(block.mlp.c_proj)
    # the head in fbgemm's kernel where int8 (a third of what a token reads)
    model.lm_head = Int8Linear(model.lm_head, fbgemm=True) if precision == 'int8' else quantized(model.lm_head)
    return model

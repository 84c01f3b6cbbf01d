"""`fp8_fx.triton_quantize`: hand-written Triton kernels for the activations that
Inductor cannot fuse into their producer.

Inductor fuses `fp8_fx.quantize` into the kernel that computes its input (LayerNorm +
modulation: one kernel). Two of a Wan block's quantized inputs come out of library
kernels instead: the cuDNN attention output (to_out) and the GELU of the cuBLAS fc_in
output (ffn.net.2). For those Inductor writes standalone kernels that were 2-4x off the
memory bound on an H100 (benchmarks/README.md): the row-wise GELU reduction reads its
13824-wide rows twice, the tensor-wise cast of the attention output ran at a third of
the bandwidth, and libdevice's tanh made the GELU kernels ALU-bound.

    triton_quantize(x, granularity, activation) == quantize(activation(x), granularity)

- "row": one kernel: a program takes a few rows in chunks, reduces them to the row amax,
  then scales and casts the chunks again; the second read comes from L2 (the rows were
  just read), so memory sees one read.
- "tensor": two kernels: amax (a grid-stride loop, one atomic max per program), then
  the cast, which recomputes the activation instead of writing it out.
The amax of |GELU(x)| needs no GELU per value: GELU increases for x > 0 and stays within
0.1701 in magnitude for x <= 0, so when GELU(max x) >= 0.171 it is the amax; otherwise
(rows of small or non-finite values) an exact pass computes it. GELU(tanh) is computed as x * sigmoid(2u), the same function as 0.5 x (1 + tanh u),
with one exp and a fast division. The activation is rounded to x's dtype before it is
quantized, as the unfused graph does. Scales are IEEE (`div_rn`, bit-exact with
`ops.quantize`); values are multiplied by 1/scale (an IEEE division per value kept the
GELU kernels ALU-bound). That changes an fp8 code only where x / scale sits on a
rounding tie between two fp8 values (to within an fp32 rounding), to the tie's other
neighbour (equally close to 7 digits): with bf16 data, ratios of bf16 values land on ties
for up to ~0.5% of values (H100, measured); block-level error is unchanged
(benchmarks/README.md). An fma correction step (Markstein) made every code bit-exact,
but cost 6-15% more time in the GELU and row kernels to move the 0-0.05% of codes near
ties (H100, run 17 in benchmarks/README.md), so the kernels keep the multiply.
Launch configs come from an H100 sweep (benchmarks/bench_quantize.py --sweep).
On other devices (and without Triton) the op runs the reference: `ops.quantize`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import ops

_ACT_ID = {"none": 0, "gelu_tanh": 1, "gelu": 2}  # the kernels' ACT constexpr
ACTIVATIONS = tuple(_ACT_ID)

try:
    import triton
    import triton.language as tl
    try:
        from triton.language.extra import libdevice
    except ImportError:  # older Triton layouts
        from triton.language.extra.cuda import libdevice
except ImportError:
    triton = None


def available() -> bool:
    """Whether the Triton kernels can run here (Triton installed, a CUDA GPU)."""
    return triton is not None and torch.cuda.is_available()


def _check_args(granularity: str, activation: str) -> None:
    if activation not in _ACT_ID:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if granularity not in ("tensor", "row"):
        raise ValueError(f"granularity must be 'tensor' or 'row', got {granularity!r}")


def reference(x: torch.Tensor, granularity: str, activation: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The unfused graph: the activation in x's dtype, then `ops.quantize`."""
    _check_args(granularity, activation)
    if activation == "gelu_tanh":
        x = F.gelu(x, approximate="tanh")
    elif activation == "gelu":
        x = F.gelu(x)
    return ops._quantize(x, granularity)


if triton is not None:
    @triton.jit
    def _activation(x, ACT: tl.constexpr):
        if ACT == 1:  # GELU, tanh approximation: x * sigmoid(2 * sqrt(2/pi) * (x + 0.044715 x^3))
            u = 1.5957691216057308 * (x + 0.044715 * x * x * x)
            x = tl.math.fdiv(x, 1.0 + tl.exp(-u))  # fast division: rounded to bf16 next
        elif ACT == 2:  # GELU, exact
            x = 0.5 * x * (1.0 + libdevice.erf(x * 0.7071067811865476))
        return x

    @triton.jit
    def _load_activated(ptr, offsets, mask, ACT: tl.constexpr, EVICTION: tl.constexpr):
        x = tl.load(ptr + offsets, mask=mask, other=0.0, eviction_policy=EVICTION)
        v = x.to(tl.float32)
        if ACT != 0:  # the unfused graph rounds the activation to x's dtype
            v = _activation(v, ACT).to(x.dtype).to(tl.float32)
        return v

    @triton.jit
    def _max_keep_nan(a, b):
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _scale(amax, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
        """(scale, 1 / scale): scale = clamp(amax / 448, MIN_SCALE), NaN kept (as
        torch.clamp keeps it), both divisions IEEE."""
        scale = libdevice.div_rn(amax, tl.full(amax.shape, FP8_MAX, tl.float32))
        scale = tl.maximum(scale, MIN_SCALE, propagate_nan=tl.PropagateNan.ALL)
        return scale, libdevice.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)

    @triton.jit
    def _cast(v, inv_scale, FP8_MAX: tl.constexpr):
        """clamp(v * (1 / scale), -448, 448) -> e4m3 (round to nearest even), NaN kept.
        A multiply, not an IEEE division per value (see the module docstring)."""
        q = v * tl.broadcast_to(inv_scale, v.shape)
        q = tl.minimum(tl.maximum(q, -FP8_MAX, propagate_nan=tl.PropagateNan.ALL), FP8_MAX,
                       propagate_nan=tl.PropagateNan.ALL)
        return q.to(tl.float8e4nv)

    # |GELU(x)| <= 0.17005 for x <= 0 (its minimum, at x = -0.75) and GELU increases for
    # x > 0: when GELU(max x) >= GELU_NEGATIVE_BOUND, it is the amax of |GELU(x)|.
    GELU_NEGATIVE_BOUND = tl.constexpr(0.171)
    FINITE_FLOOR = tl.constexpr(-3.0e38)  # a lower min means -inf (GELU(-inf) is NaN)

    @triton.jit
    def _amax_from_extremes(xmax, xmin, ACT: tl.constexpr, DTYPE: tl.constexpr):
        """(candidate amax, whether it is exact) of |act(x)| from max(x), min(x)."""
        candidate = _activation(xmax, ACT).to(DTYPE).to(tl.float32)
        exact = (candidate >= GELU_NEGATIVE_BOUND) & (xmin >= FINITE_FLOOR)  # NaN: False
        return candidate, exact

    @triton.jit
    def _row_abs_max(x_ptr, row_offsets, row_mask, K, ACT: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        acc = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            v = _load_activated(x_ptr, row_offsets + cols[None, :], row_mask & (cols[None, :] < K),
                                ACT, "evict_last")
            acc = tl.maximum(acc, tl.abs(v), propagate_nan=tl.PropagateNan.ALL)
        return tl.reduce(acc, 1, _max_keep_nan, keep_dims=True)

    @triton.jit
    def _rowwise_kernel(x_ptr, q_ptr, scale_ptr, M, K, ACT: tl.constexpr, ROWS: tl.constexpr,
                        BLOCK_K: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
        """Rows in BLOCK_K chunks: an amax loop, then a cast loop whose reads of the rows
        just read come from L2, so DRAM sees one read. With an activation, the amax loop
        only tracks max(x) and min(x) (see GELU_NEGATIVE_BOUND); rows where that cannot
        decide take an exact pass."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_mask = rows[:, None] < M
        row_offsets = rows[:, None] * K
        if ACT == 0:
            amax = _row_abs_max(x_ptr, row_offsets, row_mask, K, ACT, ROWS, BLOCK_K)
        else:
            hi = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
            lo = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                v = _load_activated(x_ptr, row_offsets + cols[None, :], row_mask & (cols[None, :] < K),
                                    0, "evict_last")
                hi = tl.maximum(hi, v, propagate_nan=tl.PropagateNan.ALL)
                lo = tl.minimum(lo, v)
            amax, exact = _amax_from_extremes(tl.reduce(hi, 1, _max_keep_nan, keep_dims=True),
                                              tl.min(lo, 1, keep_dims=True), ACT,
                                              x_ptr.dtype.element_ty)
            if tl.min(exact.to(tl.int32)) == 0:
                amax = tl.where(exact, amax, _row_abs_max(x_ptr, row_offsets, row_mask, K, ACT, ROWS, BLOCK_K))
        scale, inv_scale = _scale(amax, FP8_MAX, MIN_SCALE)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            mask = row_mask & (cols[None, :] < K)
            offsets = row_offsets + cols[None, :]
            v = _load_activated(x_ptr, offsets, mask, ACT, "evict_first")
            tl.store(q_ptr + offsets, _cast(v, inv_scale, FP8_MAX), mask=mask)
        tl.store(scale_ptr + rows[:, None], scale, mask=row_mask)

    @triton.jit
    def _grid_stride_abs_max(x_ptr, N, ACT: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(pid * BLOCK, N, step):
            offsets = start + tl.arange(0, BLOCK)
            v = _load_activated(x_ptr, offsets, offsets < N, ACT, "")
            acc = tl.maximum(acc, tl.abs(v), propagate_nan=tl.PropagateNan.ALL)
        return tl.reduce(acc, 0, _max_keep_nan)

    @triton.jit
    def _amax_kernel(x_ptr, amax_bits_ptr, N, ACT: tl.constexpr, BLOCK: tl.constexpr):
        """One atomic max per program over a grid-stride loop; with an activation, the
        same max(x) / min(x) shortcut as the row kernel, decided per program."""
        if ACT == 0:
            amax = _grid_stride_abs_max(x_ptr, N, ACT, BLOCK)
        else:
            pid = tl.program_id(0).to(tl.int64)
            step = tl.num_programs(0).to(tl.int64) * BLOCK
            hi = tl.zeros([BLOCK], dtype=tl.float32)
            lo = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(pid * BLOCK, N, step):
                offsets = start + tl.arange(0, BLOCK)
                v = _load_activated(x_ptr, offsets, offsets < N, 0, "")
                hi = tl.maximum(hi, v, propagate_nan=tl.PropagateNan.ALL)
                lo = tl.minimum(lo, v)
            amax, exact = _amax_from_extremes(tl.reduce(hi, 0, _max_keep_nan), tl.min(lo, 0), ACT,
                                              x_ptr.dtype.element_ty)
            if exact.to(tl.int32) == 0:
                amax = _grid_stride_abs_max(x_ptr, N, ACT, BLOCK)
        # amax >= 0 (or +NaN): its bits order like the float, so an int32 atomic max
        # works, and NaN (0x7fc00000) wins over inf (0x7f800000) as torch.amax's NaN does.
        tl.atomic_max(amax_bits_ptr, amax.to(tl.int32, bitcast=True))

    @triton.jit
    def _cast_kernel(x_ptr, q_ptr, amax_bits_ptr, scale_ptr, N, ACT: tl.constexpr,
                     BLOCK: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
        pid = tl.program_id(0)
        one = tl.arange(0, 1)
        scale, inv_scale = _scale(tl.load(amax_bits_ptr + one).to(tl.float32, bitcast=True), FP8_MAX, MIN_SCALE)
        offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < N
        v = _load_activated(x_ptr, offsets, mask, ACT, "evict_first")
        tl.store(q_ptr + offsets, _cast(v, inv_scale, FP8_MAX), mask=mask)
        tl.store(scale_ptr + one, scale, mask=(one == 0) & (pid == 0))



@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@dataclasses.dataclass(frozen=True)
class RowConfig:
    rows: int  # rows per program
    block_k: int  # columns per step
    num_warps: int


@dataclasses.dataclass(frozen=True)
class TensorConfig:
    amax_block: int
    amax_warps: int
    programs_per_sm: int  # amax: a grid-stride loop over this many programs per SM
    cast_block: int
    cast_warps: int


def row_config(k: int) -> RowConfig:
    """Launch config by row width, from an H100 sweep (benchmarks/bench_quantize.py
    --sweep): chunks of 512-2048 beat whole rows held in registers (up to 16384 wide,
    16 warps) at every Wan width."""
    if k <= 2048:
        return RowConfig(rows=2, block_k=512, num_warps=4)
    if k <= 10240:
        return RowConfig(rows=1, block_k=1024, num_warps=4)
    return RowConfig(rows=1, block_k=2048, num_warps=8)


TENSOR_CONFIG = TensorConfig(amax_block=4096, amax_warps=16, programs_per_sm=8,
                             cast_block=4096, cast_warps=4)


def _quantize_rows(x2d: torch.Tensor, act: int, config: Optional[RowConfig] = None):
    from torch.library import wrap_triton
    m, k = x2d.shape
    c = config or row_config(k)
    xq = torch.empty((m, k), dtype=ops.FP8_DTYPE, device=x2d.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x2d.device)
    wrap_triton(_rowwise_kernel)[(triton.cdiv(m, c.rows),)](
        x2d, xq, scale, m, k, ACT=act, ROWS=c.rows, BLOCK_K=c.block_k,
        FP8_MAX=ops.FP8_MAX, MIN_SCALE=ops.MIN_SCALE, num_warps=c.num_warps)
    return xq, scale


def _quantize_tensor(x2d: torch.Tensor, act: int, config: TensorConfig = TENSOR_CONFIG):
    from torch.library import wrap_triton
    n, c = x2d.numel(), config
    xq = torch.empty(x2d.shape, dtype=ops.FP8_DTYPE, device=x2d.device)
    scale = torch.empty((), dtype=torch.float32, device=x2d.device)
    amax_bits = torch.zeros(1, dtype=torch.int32, device=x2d.device)
    programs = _num_sms(x2d.device.index or 0) * c.programs_per_sm
    wrap_triton(_amax_kernel)[(programs,)](x2d, amax_bits, n, ACT=act, BLOCK=c.amax_block,
                                           num_warps=c.amax_warps)
    wrap_triton(_cast_kernel)[(triton.cdiv(n, c.cast_block),)](
        x2d, xq, amax_bits, scale, n, ACT=act, BLOCK=c.cast_block,
        FP8_MAX=ops.FP8_MAX, MIN_SCALE=ops.MIN_SCALE, num_warps=c.cast_warps)
    return xq, scale


def _triton_quantize(x: torch.Tensor, granularity: str, activation: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """`quantize(activation(x), granularity)` (same shapes: fp8 like x, scale () or
    (..., 1)); Triton kernels on CUDA, the reference elsewhere."""
    _check_args(granularity, activation)
    if triton is None or x.device.type != "cuda" or x.numel() == 0:
        return reference(x, granularity, activation)
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    if granularity == "row":
        xq, scale = _quantize_rows(x2d, _ACT_ID[activation])
        return xq.view(x.shape), scale.view(*x.shape[:-1], 1)
    xq, scale = _quantize_tensor(x2d, _ACT_ID[activation])
    return xq.view(x.shape), scale


# triton_op lets Inductor trace through to the Triton kernels and schedule them itself;
# without Triton (CPU-only torch) the same op is a plain custom op running the reference.
if triton is not None:
    triton_quantize = torch.library.triton_op("fp8_fx::triton_quantize", mutates_args=())(_triton_quantize)
else:
    triton_quantize = torch.library.custom_op("fp8_fx::triton_quantize", mutates_args=())(_triton_quantize)

    @triton_quantize.register_fake
    def _(x, granularity, activation):
        scale_shape = () if granularity == "tensor" else (*x.shape[:-1], 1)
        return torch.empty_like(x, dtype=ops.FP8_DTYPE), x.new_empty(scale_shape, dtype=torch.float32)

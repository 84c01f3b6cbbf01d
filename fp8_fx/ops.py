"""The FP8 recipe and the ops the pass emits, all in the `fp8_fx` torch.library namespace.

Recipe (FastVideo's, so FP8-QAD-trained Wan checkpoints see the numerics they were
trained for), in fp32:
    scale     = clamp(amax(|x|) / 448, min=1 / (448 * 512))
    quantized = clamp(x / scale, -448, 448).to(float8_e4m3fn)
    y         = (quantized_x @ quantized_w.T) * scale_x * scale_w (+ bias), in the output dtype
"tensor" granularity: one scale per tensor. "row": one per row of the 2-D activation
(per token) and one per row of the weight (per output channel).

Which ops are decomposable matters for Inductor:
- `quantize`, `scaled_mm`, `emulated_scaled_mm` are CompositeImplicitAutograd: Inductor
  sees their aten ops, fuses the activation quantization into its producer kernel and
  lowers `aten._scaled_mm` natively.
- `weight_only_linear` is opaque on purpose: it must read FP8 weights at every call;
  decomposed, Inductor could hoist the fp8 -> bf16 upcast and keep a bf16 copy.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)

_lib = torch.library.Library("fp8_fx", "DEF")


def _define(schema: str, fn, dispatch_key: str) -> None:
    _lib.define(schema)
    _lib.impl(schema.split("(")[0], fn, dispatch_key)


def amax_to_scale(amax: torch.Tensor) -> torch.Tensor:
    # clamp keeps an all-zero input finite (no 0/0) and NaN/Inf propagate (clamp keeps NaN).
    # The divisor is a tensor on amax's device: CUDA divides by a Python scalar as a
    # multiplication by its (inexact) reciprocal, which moved scales by an ulp vs the CPU.
    return torch.clamp(amax.float() / torch.full_like(amax, FP8_MAX, dtype=torch.float32), min=MIN_SCALE)


def cast_to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x.float() / scale, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _quantize(x: torch.Tensor, granularity: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (fp8 of x's shape, fp32 scale: () for "tensor", (..., 1) for "row")."""
    if granularity == "row":
        amax = x.abs().amax(dim=-1, keepdim=True)
    elif granularity == "tensor":
        if x.numel() == 0:  # amax of nothing is an error; any scale is right for M = 0
            amax = x.new_zeros((), dtype=torch.float32)
        else:
            amax = x.abs().amax()
    else:
        raise ValueError(f"granularity must be 'tensor' or 'row', got {granularity!r}")
    scale = amax_to_scale(amax)
    return cast_to_fp8(x, scale), scale


_define("quantize(Tensor x, str granularity) -> (Tensor, Tensor)",
        _quantize, "CompositeImplicitAutograd")


def quantize(x: torch.Tensor, granularity: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eager entry point: the same op the rewritten graphs call."""
    return torch.ops.fp8_fx.quantize(x, granularity)


def _quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x -> fp8 with a given (calibrated) per-tensor scale: no amax pass, so Inductor can
    fuse the cast into the producer's kernel even where that kernel is a row reduction.
    Values beyond 448 * scale saturate to +-448 (NaN stays NaN)."""
    return cast_to_fp8(x, scale)


_define("quantize_static(Tensor x, Tensor scale) -> Tensor", _quantize_static, "CompositeImplicitAutograd")


def _as_2d(xq: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor):
    """Shapes torch._scaled_mm takes: (M, K), scale_a () or (M, 1), scale_b () or (1, N)."""
    xq2d = xq.reshape(-1, xq.shape[-1])
    if x_scale.dim() > 0:
        x_scale = x_scale.reshape(-1, 1)
    if w_scale.dim() > 0:
        w_scale = w_scale.reshape(1, -1)
    return xq2d, x_scale, w_scale


def _mm_dtype(x_scale: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.dtype:
    # cuBLAS row-wise scaling only writes bf16; tensor-wise writes any float type.
    rowwise = x_scale.dim() > 0 or w_scale.dim() > 0
    return torch.bfloat16 if rowwise else out_dtype


def _fusable_bias(bias: Optional[torch.Tensor], mm_dtype: torch.dtype) -> bool:
    """Whether the GEMM epilogue adds the bias (in fp32, before its one rounding).
    cuBLAS takes a bias only for a bf16/fp16 output of the bias's own dtype."""
    return bias is not None and bias.dtype == mm_dtype and mm_dtype != torch.float32


def _finish(y: torch.Tensor, bias: Optional[torch.Tensor], mm_dtype: torch.dtype,
            out_dtype: torch.dtype, out_shape) -> torch.Tensor:
    """y: the GEMM's result in mm_dtype. Adds a bias the epilogue could not take."""
    if bias is not None and not _fusable_bias(bias, mm_dtype):
        y = (y.float() + bias.float()).to(mm_dtype)
    return y.to(out_dtype).reshape(out_shape)


def _scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
               bias: Optional[torch.Tensor], out_dtype: torch.dtype,
               fast_accum: bool = False) -> torch.Tensor:
    """FP8 tensor-core GEMM: xq (..., K) @ wq (N, K).T with fp32 scales.
    fast_accum lets cuBLAS skip the periodic promotion of Hopper's FP8 accumulator to
    fp32: faster kernels, slightly less exact sums (torchao's inference default too)."""
    out_shape = (*xq.shape[:-1], wq.shape[0])
    xq2d, scale_a, scale_b = _as_2d(xq, x_scale, w_scale)
    mm_dtype = _mm_dtype(x_scale, w_scale, out_dtype)
    if xq2d.shape[0] == 0:
        y = xq2d.new_empty((0, wq.shape[0]), dtype=mm_dtype)
    else:
        y = torch._scaled_mm(xq2d, wq.t(), scale_a=scale_a, scale_b=scale_b,
                             bias=bias if _fusable_bias(bias, mm_dtype) else None,
                             out_dtype=mm_dtype, use_fast_accum=fast_accum)
    return _finish(y, bias, mm_dtype, out_dtype, out_shape)


_define("scaled_mm(Tensor xq, Tensor x_scale, Tensor wq, Tensor w_scale, Tensor? bias, "
        "ScalarType out_dtype, bool fast_accum=False) -> Tensor",
        _scaled_mm, "CompositeImplicitAutograd")


def round_to_bf16(y: torch.Tensor) -> torch.Tensor:
    """fp32 y rounded to the nearest bf16 value (ties to even), kept in fp32, with integer
    ops. Inductor drops a `.to(bf16).float()` round trip inside a kernel (it keeps fp32
    unless emulate_precision_casts), so a rounding that must happen is written as bits."""
    bits = y.contiguous().view(torch.int32)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) & -65536).view(torch.float32)  # -65536 == 0xFFFF0000
    return torch.where(torch.isnan(y), y, rounded)  # NaN payloads could carry into the sign


def _emulated_scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor,
                        w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                        out_dtype: torch.dtype) -> torch.Tensor:
    """scaled_mm's numerics in fp32 on any device: fp8 x fp8 products are exact in fp32,
    sums accumulate in fp32, scales apply after the sum, then the same epilogue
    (bias, rounding to the GEMM's output dtype) as on FP8 tensor cores. A row-wise GEMM
    writes bf16 whatever the model's dtype: that rounding is done explicitly
    (round_to_bf16) so compiled and eager emulation agree for fp16/fp32 models too."""
    out_shape = (*xq.shape[:-1], wq.shape[0])
    xq2d, scale_a, scale_b = _as_2d(xq, x_scale, w_scale)
    mm_dtype = _mm_dtype(x_scale, w_scale, out_dtype)
    y = (xq2d.float() @ wq.float().t()) * (scale_a * scale_b)
    if _fusable_bias(bias, mm_dtype):
        y = y + bias.float()
    if mm_dtype == torch.bfloat16 and out_dtype != torch.bfloat16:
        y = round_to_bf16(y)  # the GEMM's own output rounding, which Inductor would elide
        if bias is not None and not _fusable_bias(bias, mm_dtype):
            y = round_to_bf16(y + bias.float())
        return y.to(out_dtype).reshape(out_shape)
    return _finish(y.to(mm_dtype), bias, mm_dtype, out_dtype, out_shape)


_define("emulated_scaled_mm(Tensor xq, Tensor x_scale, Tensor wq, Tensor w_scale, Tensor? bias, "
        "ScalarType out_dtype) -> Tensor",
        _emulated_scaled_mm, "CompositeImplicitAutograd")


def dequantize_weight(wq: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (wq.float() * w_scale).to(dtype)  # scale () or (N, 1) broadcasts over (N, K)


@torch.library.custom_op("fp8_fx::weight_only_linear", mutates_args=())
def weight_only_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                       bias: Optional[torch.Tensor], input_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FP8 weights at rest, upcast per call, matmul in the activation dtype.
    input_scale: a calibrated static scale for x (FP8Linear.input_scale). The weight-only
    product does not quantize x, so it is unused here; it is in the signature so that the
    backend's pass sees it in the graph and quantizes x with it on FP8 tensor cores."""
    return F.linear(x, dequantize_weight(wq, w_scale, x.dtype), bias)


@weight_only_linear.register_fake
def _(x, wq, w_scale, bias, input_scale=None):
    return x.new_empty((*x.shape[:-1], wq.shape[0]))


def quantize_weight(w: torch.Tensor, granularity: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, K) weight -> fp8 (N, K), fp32 scale () for "tensor" or (N, 1) for "row"."""
    return _quantize(w, granularity)


def has_fp8_tensor_cores(device: torch.device) -> bool:
    """True where torch._scaled_mm runs on FP8 tensor cores (CUDA sm89+)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)

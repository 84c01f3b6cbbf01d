"""An independent float64 emulation of the FP8 recipe, for checking our ops.

It rounds to the float8_e4m3fn grid itself (no torch float8 cast), so a bug in how
the library casts or scales shows up as a mismatch.
"""
import torch

E4M3_MAX = 448.0
MIN_SCALE = 1.0 / (448.0 * 512.0)


def round_to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Round float64 values (already within +-448) to the nearest e4m3fn value, ties to even."""
    v = v.double()
    mag = v.abs()
    # Normal numbers have 3 mantissa bits: spacing 2^(e-3); subnormals (|v| < 2^-6): 2^-9.
    exponent = torch.floor(torch.log2(mag.clamp(min=2.0 ** -6)))
    step = torch.pow(2.0, exponent - 3)
    return torch.round(v / step) * step  # torch.round rounds half to even


def reference_scale(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """The recipe's scale: amax / 448 correctly rounded to fp32 (float64 division, then
    rounding: exact for one division), clamped below."""
    a = x.float().abs()
    amax = a.amax(dim=-1, keepdim=True) if granularity == "row" else a.amax()
    return torch.clamp((amax.double() / E4M3_MAX).float(), min=MIN_SCALE)


def reference_quantize(x: torch.Tensor, granularity: str):
    """x (..., K) -> (values on the e4m3 grid as float64, fp32 scale)."""
    scale = reference_scale(x, granularity)
    scaled = torch.clamp(x.float() / scale, -E4M3_MAX, E4M3_MAX)
    return round_to_e4m3(scaled), scale


def reference_fp8_linear(x, weight, bias, granularity: str) -> torch.Tensor:
    """float64 y = dequant(q(x)) @ dequant(q(w)).T + b, in float64."""
    xq, xs = reference_quantize(x, granularity)
    wq, ws = reference_quantize(weight, granularity)
    y = (xq * xs.double()) @ (wq * ws.double()).T
    return y + bias.double() if bias is not None else y


def reference_weight_only_linear(x, weight, bias, granularity: str) -> torch.Tensor:
    wq, ws = reference_quantize(weight, granularity)
    y = x.double() @ (wq * ws.double()).T
    return y + bias.double() if bias is not None else y


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def output_tolerance(dtype: torch.dtype, granularity: str) -> float:
    """rel_err bound for comparing with the fp64 reference: one rounding to the GEMM's
    output dtype (row-wise scaled GEMMs write bf16 whatever the activation dtype)."""
    gemm_dtype = torch.bfloat16 if granularity == "row" else dtype
    return {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}[gemm_dtype]


def reference_static_fp8_linear(x, weight, bias, amax: float) -> torch.Tensor:
    """float64 y with x cast at the calibrated scale amax / 448 (values beyond amax
    saturate at +-448) and the weight quantized per tensor."""
    scale = torch.clamp((torch.tensor(amax, dtype=torch.float64) / E4M3_MAX).float(), min=MIN_SCALE)
    xq = round_to_e4m3(torch.clamp(x.float() / scale, -E4M3_MAX, E4M3_MAX))
    wq, ws = reference_quantize(weight, "tensor")
    y = (xq * scale.double()) @ (wq * ws.double()).T
    return y + bias.double() if bias is not None else y

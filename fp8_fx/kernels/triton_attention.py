"""The "smooth_int8" recipe's attention kernel, in Triton (sm89+: Ada, Hopper, Blackwell).

A flash-attention forward over inputs quantized by `quantize_attention_inputs(...,
"smooth_int8")` (attention_recipes.py): Q and K in INT8 with one fp32 scale per token
(constant over blocks of 64 tokens), V in e4m3 with one scale per channel, stored with
the tokens contiguous (the summed dim of P @ V, as FP8 MMAs read it: V's tiles then
pipeline as K's do; any strides work, others slower). Per program:
BLOCK_M queries of one (batch, head); over the keys in tiles of BLOCK_N:

    T  = (q8 @ k8^T) [int32, exact] * k_scale           (per key)
    c  = q_scale * softmax_scale * log2(e)              (per query; > 0)
    m  = max(m, c * rowmax(T))                  the running max of S = c T (online softmax)
    P' = exp2(c T - (m - log2 448)) = 448 P~    P~ = exp2(S - m) in [0, 1]; one FFMA + exp2
    acc = acc * exp2(m_old - m) + e4m3(P') @ v8          [fp32 accumulation]
    l   = l   * exp2(m_old - m) + rowsum(P')
    O  = acc * v_scale / l                      written in the model's dtype

(c > 0, so rowmax(c T) = c rowmax(T) exactly, rounding being monotone: the softmax scale
must be positive, which the entry point checks.)

The recipe's fp32 emulation (attention_recipes.emulated_fp8_attention) runs the same loop
over the same tiles of KEY_TILE keys, so the kernel and the emulation differ only by fp32
rounding (exp2 with log2(e) and 448 folded in, an FFMA, summation order): an e4m3 code
of P flips now and then. tests/test_triton_attention.py checks both against a float64 model
of the loop written out in the test, and against exact attention.

Under TRITON_INTERPRET=1 (set before Triton is imported: tests/conftest.py does on a
machine without a GPU) the same program runs on CPU tensors in Triton's interpreter
(numpy; for tests; Triton 3.9 runs it with numpy 2.4, 3.6 does not). The interpreter's float -> e4m3 and float -> bf16
conversions truncate (and carry no rounding into the exponent), unlike the GPU's
round-to-nearest-even: there (EXACT_E4M3=True) P is first rounded to an e4m3 value in
fp32 arithmetic, which then converts exactly (a test checks that rounding against
torch's cast), and tests read fp32 outputs. On a GPU the kernel casts directly.

`why_not(device, ...)` compiles and runs the kernel once per device, head dim and output
dtype on a small case and compares it with the emulation, so a GPU or Triton build where
it does not compile, or computes something else, gets a reason in the pass's report
instead of a wrong answer or a crash in the first forward.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import math
from typing import Optional

import torch

from .. import attention_recipes
from ..attention_recipes import KEY_TILE

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MIN_CAPABILITY = (8, 9)  # e4m3 tensor-core MMA: Ada (sm89) and newer
MAX_HEAD_DIM = 256
BLOCK_M, BLOCK_N = 128, KEY_TILE


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Tiles and launch options. BLOCK_N is part of the recipe (the emulation's KEY_TILE):
    another block_n computes P against other running maxima (a sweep's timing, not the
    recipe's numbers). Defaults: the fastest of benchmarks/bench_attention.py --sweep on the
    H200 at 40 heads x 32,760 tokens, head dim 128 (81.6 ms; the earlier 128 x 64, 8 warps: 101.5)."""
    block_m: int = BLOCK_M
    block_n: int = BLOCK_N
    num_warps: int = 4  # the H200 sweep: 4 warps beat 8 at every 128-row tile size
    num_stages: int = 2


SELF_CHECK_TOLERANCE = 5e-3  # relative to the emulation's output


if triton is not None:
    def _smooth_int8_attention(
            q_ptr, qs_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, o_ptr,
            sq_b, sq_h, sq_s, sq_d, sqs_b, sqs_h, sqs_s,
            sk_b, sk_h, sk_s, sk_d, sks_b, sks_h, sks_s,
            sv_b, sv_h, sv_s, sv_d, svs_b, svs_h, svs_d,
            so_b, so_h, so_s, so_d,
            H, SQ, SK, D, qk_scale,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            EXACT_E4M3: tl.constexpr):
        start_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)  # batch and head offsets in 64 bits: B*H*S*D may pass 2^31
        b, h = bh // H, bh % H
        rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        row_ok, col_ok = rows < SQ, cols < D

        q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_s + cols[None, :] * sq_d,
                    mask=row_ok[:, None] & col_ok[None, :], other=0)
        # c: Q's per-token scale with the softmax scale and log2(e) (1 past the last query: no 0 * inf)
        c = tl.load(qs_ptr + b * sqs_b + h * sqs_h + rows * sqs_s, mask=row_ok, other=1.0) * qk_scale

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, SK, BLOCK_N):
            keys = start_n + tl.arange(0, BLOCK_N)
            key_ok = keys < SK
            k = tl.load(k_ptr + b * sk_b + h * sk_h + keys[:, None] * sk_s + cols[None, :] * sk_d,
                        mask=key_ok[:, None] & col_ok[None, :], other=0)
            k_scale = tl.load(ks_ptr + b * sks_b + h * sks_h + keys * sks_s, mask=key_ok, other=0.0)
            t = tl.dot(q, tl.trans(k)).to(tl.float32) * k_scale[None, :]
            t = tl.where(key_ok[None, :], t, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(t, 1) * c)
            alpha = tl.exp2(m_i - m_new)
            # 448 P~ = exp2(c t - (m - log2 448)): one FFMA and an exp2 per score
            p448 = tl.exp2(t * c[:, None] - (m_new - 8.807354922057604)[:, None])
            l_i = l_i * alpha + tl.sum(p448, 1)
            if EXACT_E4M3:  # round to the nearest even e4m3 value in fp32 (see the docstring)
                exponent = ((p448.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
                ulp = ((tl.maximum(exponent, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
                p448 = ((p448 / ulp + 12582912.0) - 12582912.0) * ulp  # +- 1.5 * 2^23: ties to even
            v = tl.load(v_ptr + b * sv_b + h * sv_h + keys[:, None] * sv_s + cols[None, :] * sv_d,
                        mask=key_ok[:, None] & col_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p448.to(tl.float8e4nv), v)
            m_i = m_new

        v_scale = tl.load(vs_ptr + b * svs_b + h * svs_h + cols * svs_d, mask=col_ok, other=0.0)
        out = acc * v_scale[None, :] / l_i[:, None]
        tl.store(o_ptr + b * so_b + h * so_h + rows[:, None] * so_s + cols[None, :] * so_d,
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    _compiled_kernel = triton.jit(_smooth_int8_attention)


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1 before it was imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# triton.jit reads TRITON_INTERPRET when this module is imported (by `import fp8_fx`): a
# variable set later does not make the kernel interpretable; sdpa_smooth_int8 says so
_INTERPRETED_KERNEL = interpreting()


def block_d(head_dim: int) -> int:
    """The kernel's head-dim tile: a power of two, at least 32 (INT8 MMA's K), masked beyond D."""
    return max(32, 1 << (head_dim - 1).bit_length())


def sdpa_smooth_int8(q8: torch.Tensor, q_scale: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor,
                     v8: torch.Tensor, v_scale: torch.Tensor, softmax_scale: float,
                     out: torch.Tensor, config: LaunchConfig = LaunchConfig()) -> torch.Tensor:
    """Write the recipe's attention of (q8, k8, v8) into `out` (B, H, Sq, Dv), any strides."""
    if triton is None:
        raise RuntimeError("the 'triton' FP8 attention kernel needs Triton (pip install triton)")
    interpret = q8.device.type == "cpu" and interpreting()
    if q8.device.type != "cuda" and not interpret:
        raise RuntimeError(f"the 'triton' FP8 attention kernel runs on CUDA GPUs, not {q8.device.type} "
                           "(or on the CPU in Triton's interpreter, TRITON_INTERPRET=1, for tests)")
    if interpret and not _INTERPRETED_KERNEL:
        raise RuntimeError("TRITON_INTERPRET=1 was set after fp8_fx was imported (importing it imports Triton "
                           "and builds the kernel): set it in the shell, or in os.environ before `import fp8_fx`")
    b, h, sq, d = q8.shape
    sk = k8.shape[-2]
    if v8.shape[-1] != d:
        raise ValueError(f"the 'triton' FP8 attention kernel needs V's head dim ({v8.shape[-1]}) equal to Q's ({d})")
    if max(sq, sk) * h * d >= 2**31:  # offsets within one batch element are 32-bit
        raise ValueError(f"the 'triton' FP8 attention kernel takes at most 2^31 values of Q, K or V per batch "
                         f"element; this call has {max(sq, sk)} tokens x {h} heads x {d}")
    if not softmax_scale > 0:
        raise ValueError(f"the 'triton' FP8 attention kernel takes a positive softmax scale, not {softmax_scale} "
                         "(kernel='emulate' computes any)")
    if out.numel() == 0:
        return out
    # per-token Q/K scales (B, H, S, 1) and per-channel V scales (B, H, 1, D), possibly expanded
    qs, ks, vs = (t.expand(*shape) for t, shape in ((q_scale, (b, h, sq, 1)), (k_scale, (b, h, sk, 1)),
                                                      (v_scale, (b, h, 1, d))))
    grid = (triton.cdiv(sq, config.block_m), b * h)
    tile_d = block_d(d)
    _compiled_kernel[grid](
        q8, qs, k8, ks, v8, vs, out,
        *q8.stride(), *qs.stride()[:3], *k8.stride(), *ks.stride()[:3], *v8.stride(),
        vs.stride(0), vs.stride(1), vs.stride(3), *out.stride(),
        h, sq, sk, d, softmax_scale * math.log2(math.e),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=tile_d, EXACT_E4M3=interpret,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out


def why_not_device(device: torch.device) -> Optional[str]:
    """None when the kernel may run on `device` (before its self-check), else why not."""
    if triton is None:
        return "the 'triton' FP8 attention kernel needs Triton, which is not installed"
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"the 'triton' FP8 attention kernel runs on CUDA GPUs (this is {device.type})"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"the 'triton' FP8 attention kernel needs sm89+ (FP8 tensor cores); this GPU is "
                f"sm{capability[0]}{capability[1]}")
    return None


def why_not(device: torch.device, head_dim: int, v_head_dim: int, out_dtype: torch.dtype,
            softmax_scale: float = 1.0) -> Optional[str]:
    """None when the kernel computes this case on `device`, else why not."""
    missing = why_not_device(device)
    if missing:
        return missing
    if not softmax_scale > 0:
        return f"softmax scale {softmax_scale} (the 'triton' kernel takes a positive one)"
    if v_head_dim != head_dim:
        return f"V's head dim {v_head_dim} differs from Q's {head_dim} (the 'triton' kernel needs them equal)"
    if head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} (the 'triton' kernel takes up to {MAX_HEAD_DIM})"
    return _self_check(device.index if device.index is not None else torch.cuda.current_device(),
                       head_dim, out_dtype)


@functools.lru_cache(maxsize=None)
def _self_check(index: int, head_dim: int, out_dtype: torch.dtype) -> Optional[str]:
    """Compile and run the kernel on one small case; compare it with the fp32 emulation."""
    device = torch.device("cuda", index)
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    with unset_fake_temporarily():  # called from the pass, under the compile's fake mode
        return _compare_with_emulation(device, head_dim, out_dtype)


def _compare_with_emulation(device: torch.device, head_dim: int, out_dtype: torch.dtype) -> Optional[str]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    # 150 tokens: three key tiles, the last one partial; two heads; laid out as the pass's
    # calls are, (B, S, H, D) buffers viewed (B, H, S, D), output too (launches specialize
    # on which strides are 1)
    q, k, v = (torch.randn(1, 150, 2, head_dim, generator=generator).to(device, out_dtype).transpose(1, 2)
               for _ in range(3))
    quantized = torch.ops.fp8_fx.quantize_attention_inputs(q, k, v, "smooth_int8")
    scale = head_dim ** -0.5
    try:
        got = sdpa_smooth_int8(*quantized, scale, torch.empty_like(q.transpose(1, 2)).transpose(1, 2))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as error:  # a Triton build or GPU that cannot compile or run it
        return f"the 'triton' FP8 attention kernel failed its self-check: {type(error).__name__}: {error}"
    want = attention_recipes.emulated_fp8_attention(*quantized, scale, "smooth_int8", out_dtype)
    err = float((got.float() - want.float()).norm() / want.float().norm())
    if not err <= SELF_CHECK_TOLERANCE:
        return (f"the 'triton' FP8 attention kernel is {err:.3g} away from the recipe's emulation on this "
                f"GPU (its self-check allows {SELF_CHECK_TOLERANCE})")
    return None

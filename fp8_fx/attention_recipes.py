"""FP8 attention recipes: how Q, K, V, P and O are quantized, and their fp32 emulation.

Shapes are SDPA's: q (B, H, Sq, D), k and v (B, H, Sk, D). Both recipes quantize with
the linear recipe's rule (ops.py: scale = clamp(amax / 448, min=1/(448*512)), e4m3fn)
over different groups of values, and compute, in fp32,

    S  = (q8 @ k8^T) * q_scale * k_scale * softmax_scale   (scales per row / column)
    P~ = exp(S - rowmax(S))              in [0, 1], the max of each row exactly 1
    P8 = e4m3(P~ * 448)                  a fixed scale: 1 maps to 448, no amax needed
    O  = (P8 @ v8) * v_scale / 448 / rowsum(P~)

("smooth_int8" takes the max over the keys seen so far, tile by tile, as its flash-
attention kernel does: P~ in [0, 1] against that running max, rescaled as it grows.)

"tensor" (cuDNN's FP8 SDPA forward on Hopper: kernels/cudnn_attention.py): one scale each
for the whole Q, K and V, and an FP8 output: cuDNN needs O's scale before the kernel
runs. O is a convex combination of V's rows (|O| <= max |V|), so V's own scale never
clips it: O's scale is V's scale. (The price: O uses the FP8 range only as far as its
values come near V's largest; `benchmarks/attention_accuracy.py` measures it against an
exact amax.) Two exact transformations first make one scale per tensor fit better: K
minus its mean over the tokens (softmax is unchanged: it adds the same q.mean(k) to every
score of a row; DiT keys carry a channel bias that would otherwise set K's scale), and,
with `rotate` (head dims that are powers of two), Q and K times the same orthonormal
Hadamard matrix H (QH (KH)^T = QK^T), which spreads a few outlier channels over all of
them. The rotation is one GEMM in the model's dtype with H's +-1 entries (memory-bound:
it reads Q and K once more; a fast Walsh-Hadamard transform written as log2(D) stages of
torch ops compiled to 8 ms at Wan 14B 480p on an H200, the GEMM to well under 1 ms).

"smooth_int8" (our Triton kernel on sm89+, kernels/triton_attention.py; after
SageAttention2): K minus its mean over the tokens first, and with `rotate` the same
Hadamard rotation of Q and K, then Q and K in INT8 with one scale per block of 64 tokens
(per batch and head; scale = amax / 127, round to nearest even), V in FP8 with one scale
per channel (over the tokens; it factors out of P @ V exactly; stored with the tokens
contiguous, as the kernel's FP8 P @ V reads it), and an output in the model's dtype. INT8 keeps 7 bits of Q and K where e4m3 keeps 3: the scores, which the
softmax exponentiates, are where FP8 attention loses most. Smoothing removes the channel
bias that DiT keys carry, which would otherwise set K's scale; the rotation keeps a few
outlier channels from setting a block's scale (on the CPU harness 5.7% -> 3.0% with four
10x channels, unchanged elsewhere).

`quantize_attention_inputs` is decomposable (CompositeImplicitAutograd) so Inductor
fuses it into the kernels that produce Q, K and V (RoPE, RMSNorm), as the linear pass's
quantize fuses into its producers. `fp8_attention` is one opaque op: the attention
kernel named by its `kernel` argument ("cudnn" on Hopper for "tensor"; "triton" on
sm89+ for "smooth_int8"; "emulate", the fp32 emulation, anywhere). Its output is laid
out (B, S, H, D) in memory, viewed as (B, H, S, D), so the attention module's transpose
back to (B, S, H*D) costs nothing.
For "tensor" it is FP8 (cuDNN's), and `dequantize` (decomposable: Inductor fuses it into
the quantization of to_out's input) brings it back to the model's dtype.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .ops import FP8_DTYPE, FP8_MAX, amax_to_scale, cast_to_fp8

RECIPES = ("tensor", "smooth_int8")
KERNELS = ("emulate", "cudnn", "triton")
QK_BLOCK = 64  # tokens per Q/K scale in "smooth_int8"
KEY_TILE = 128  # keys per tile of "smooth_int8"'s online softmax (its Triton kernel's BLOCK_N)
INT8_MAX = 127.0
INT8_MIN_SCALE = 1.0 / (INT8_MAX * 512.0)  # an all-zero block stays finite, as in ops.py
V_TOKEN_ALIGN = 16  # "smooth_int8" stores V's channels as rows of a multiple of 16 tokens

_lib = torch.library.Library("fp8_fx", "FRAGMENT")


def _check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"FP8 attention recipe must be one of {RECIPES}, got {recipe!r}")


def _tensor_amax(x: torch.Tensor) -> torch.Tensor:
    if x.numel() == 0:  # any scale is right for an empty tensor
        return x.new_zeros((), dtype=torch.float32)
    return x.abs().amax().float()


def _block_scale(x: torch.Tensor, to_scale) -> torch.Tensor:
    """(B, H, S, D) -> to_scale(amax of each block of QK_BLOCK tokens), one per token:
    (B, H, S, 1). The last block may be short: zero padding leaves an amax unchanged."""
    b, h, s, d = x.shape
    blocks = -(-s // QK_BLOCK)
    padded = torch.nn.functional.pad(x.abs().float(), (0, 0, 0, blocks * QK_BLOCK - s))
    scale = to_scale(padded.reshape(b, h, blocks, QK_BLOCK * d).amax(dim=-1, keepdim=True))
    # Each token picks its block's scale by index: an expand + reshape + slice of the
    # padded length here came back wrong from Inductor (torch 2.13, inside this op) when
    # S is not a multiple of the block.
    token_block = torch.arange(s, device=x.device) // QK_BLOCK
    return scale.index_select(2, token_block)


def _int8_scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.clamp(amax / torch.full_like(amax, INT8_MAX), min=INT8_MIN_SCALE)


def _cast_to_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(torch.clamp(x.float() / scale, -INT8_MAX, INT8_MAX)).to(torch.int8)


def _hadamard(d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The d x d Sylvester Hadamard matrix with +-1 entries (exact in every float dtype):
    H[i, j] = (-1) ** popcount(i & j)."""
    i = torch.arange(d, device=device)
    bits = i[:, None] & i[None, :]
    parity = torch.zeros_like(bits)
    for shift in range(d.bit_length() - 1):
        parity = parity ^ ((bits >> shift) & 1)
    return (1 - 2 * parity).to(dtype)


def _rotate(x: torch.Tensor) -> torch.Tensor:
    """x @ H / sqrt(D) in fp32, H orthonormal: one GEMM in x's dtype (fp32 accumulation,
    rounded to x's dtype as any GEMM of the model's), then the 1/sqrt(D) in fp32. A
    (B, S, H, D) buffer viewed (B, H, S, D), as attention modules make Q and K, is one
    (B*S*H, D) x (D, D) GEMM without a copy."""
    d = x.shape[-1]
    h = _hadamard(d, x.dtype, x.device)
    x_bshd = x.transpose(1, 2)
    if x_bshd.is_contiguous():
        y = (x_bshd.reshape(-1, d) @ h).view(x_bshd.shape).transpose(1, 2)
    else:
        y = x @ h
    return y.float() * (d ** -0.5)


def rotates(head_dim: int, rotate: bool) -> bool:
    """Whether the recipes rotate Q and K at this head dim."""
    return rotate and head_dim > 1 and head_dim & (head_dim - 1) == 0


def _quantize_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, recipe: str,
                               rotate: bool = False
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor, torch.Tensor]:
    """(q8, q_scale, k8, k_scale, v8, v_scale): Q/K/V in 8 bits and fp32 scales shaped to
    broadcast against them: () for "tensor"; (B, H, S, 1) for Q/K (int8) and (B, H, 1, D)
    for V in "smooth_int8"."""
    _check_recipe(recipe)
    if k.shape[-2] > 0:  # both recipes smooth K (exact for softmax)
        k = k.float() - k.float().mean(dim=-2, keepdim=True)
    if rotates(q.shape[-1], rotate):
        q, k = _rotate(q), _rotate(k.to(q.dtype))  # K: smoothed in fp32, rotated in the model's dtype
    if recipe == "tensor":
        qs, ks, vs = (amax_to_scale(_tensor_amax(t)) for t in (q, k, v))
        return cast_to_fp8(q, qs), qs, cast_to_fp8(k, ks), ks, cast_to_fp8(v, vs), vs
    v_amax = v.abs().float().amax(dim=-2, keepdim=True) if v.shape[-2] > 0 else (
        v.new_zeros((*v.shape[:-2], 1, v.shape[-1]), dtype=torch.float32))
    qs, ks, vs = _block_scale(q, _int8_scale), _block_scale(k, _int8_scale), amax_to_scale(v_amax)
    return _cast_to_int8(q, qs), qs, _cast_to_int8(k, ks), ks, _cast_to_fp8_tokens_contiguous(v, vs), vs


def _cast_to_fp8_tokens_contiguous(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """cast_to_fp8(v, scale), (B, H, S, D), stored with the tokens contiguous: a (B, H, D,
    S') buffer, S' = S rounded up to V_TOKEN_ALIGN. The Triton kernel's P @ V product
    takes V as the B operand of an FP8 MMA, which Hopper's wgmma reads with the reduced
    dim (tokens) contiguous: stored so, V's tiles load asynchronously and pipeline as K's
    do; stored (B, S, H, D), every tile went through registers into a transposed shared
    layout, a load the loop waited on (benchmarks/README.md, TTGIR). The padding keeps
    each channel's row 16-byte aligned; the kernel never reads it (keys past S are masked)."""
    s = v.shape[-2]
    padded = torch.nn.functional.pad(v.transpose(-1, -2), (0, -s % V_TOKEN_ALIGN))  # (B, H, D, S')
    return cast_to_fp8(padded, scale.transpose(-1, -2))[..., :s].transpose(-1, -2)


_lib.define("quantize_attention_inputs(Tensor q, Tensor k, Tensor v, str recipe, bool rotate=False) "
            "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_lib.impl("quantize_attention_inputs", _quantize_attention_inputs, "CompositeImplicitAutograd")


def _dequantize(x8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (x8.float() * scale).to(dtype)


_lib.define("dequantize(Tensor x8, Tensor scale, ScalarType dtype) -> Tensor")
_lib.impl("dequantize", _dequantize, "CompositeImplicitAutograd")


def output_dtype(recipe: str, model_dtype: torch.dtype) -> torch.dtype:
    """What `fp8_attention` writes: FP8 for "tensor" (cuDNN on Hopper), else the model's dtype."""
    return FP8_DTYPE if recipe == "tensor" else model_dtype


def _new_output(q8: torch.Tensor, v8: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, Sq, Dv) viewed from a (B, Sq, H, Dv) buffer (see the module docstring)."""
    b, h, sq, _ = q8.shape
    return q8.new_empty((b, sq, h, v8.shape[-1]), dtype=dtype).transpose(1, 2)


def emulated_fp8_attention(q8: torch.Tensor, q_scale: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor,
                           v8: torch.Tensor, v_scale: torch.Tensor, softmax_scale: float, recipe: str,
                           out_dtype: torch.dtype) -> torch.Tensor:
    """The recipe's attention in fp32 (see the module docstring), written in out_dtype
    (FP8 at V's scale for "tensor", which then must ask for it). "smooth_int8" computes P
    tile by tile as its kernel does (_online_softmax_p_v). Q.K products of int8 or
    e4m3 values sum exactly in fp32 for head dims up to 1,040."""
    _check_recipe(recipe)
    if (recipe == "tensor") != (out_dtype == FP8_DTYPE):
        raise ValueError(f"recipe {recipe!r} writes {output_dtype(recipe, torch.bfloat16)}-like output "
                         f"(attention_recipes.output_dtype), not {out_dtype}")
    if k8.shape[-2] == 0:
        raise ValueError("FP8 attention needs at least one key (Sk = 0: softmax of nothing)")
    out = _new_output(q8, v8, out_dtype)
    if q8.numel() == 0:
        return out
    k_cols = k_scale.transpose(-1, -2) if k_scale.dim() else k_scale  # per key: (B, H, 1, Sk)
    s = (q8.float() @ k8.float().transpose(-1, -2)) * (q_scale * k_cols) * softmax_scale
    if recipe == "tensor":  # P~ against the row's max
        p = torch.exp(s - s.amax(dim=-1, keepdim=True))
        p8 = (p * FP8_MAX).to(FP8_DTYPE)  # p <= 1: never beyond 448
        o = (p8.float() @ v8.float()) * (v_scale / FP8_MAX) / p.sum(dim=-1, keepdim=True)
    else:
        o = _online_softmax_p_v(s, v8.float()) * (v_scale / FP8_MAX)
    out.copy_(cast_to_fp8(o, v_scale) if out_dtype == FP8_DTYPE else o)
    return out


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Q, K, V as the recipes and kernels take them, head by head; else a ValueError that
    says how. (The attention pass leaves other calls as they are, with this reason.)"""
    if not q.dim() == k.dim() == v.dim() == 4:
        raise ValueError(f"FP8 attention takes Q, K, V as (batch, heads, tokens, head dim); {_shapes(q, k, v)}")
    if not (q.shape[:2] == k.shape[:2] == v.shape[:2] and k.shape[2] == v.shape[2] and q.shape[3] == k.shape[3]):
        raise ValueError(
            "FP8 attention takes Q, K, V with the same batch and heads (no broadcasting, no grouped-query "
            "attention: expand K and V to Q's heads first), K and V with the same tokens, Q and K with the "
            f"same head dim; {_shapes(q, k, v)}")


def _shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:  # for errors only: not per call
    return f"got Q {tuple(q.shape)}, K {tuple(k.shape)}, V {tuple(v.shape)}"


def _online_softmax_p_v(s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """"smooth_int8"'s P @ V / rowsum: the flash-attention loop of its Triton kernel over
    tiles of KEY_TILE keys, each tile's P~ = exp(S - m) put in e4m3 (x 448) against the
    running max m, the sums so far rescaled as m grows; divided by the rowsum of the
    unquantized P~."""
    m = s.new_full((*s.shape[:-1], 1), float("-inf"))
    rowsum = s.new_zeros((*s.shape[:-1], 1))
    acc = s.new_zeros((*s.shape[:-1], v.shape[-1]))
    for start in range(0, s.shape[-1], KEY_TILE):
        tile = s[..., start:start + KEY_TILE]
        m_new = torch.maximum(m, tile.amax(dim=-1, keepdim=True))
        alpha = torch.exp(m - m_new)
        p = torch.exp(tile - m_new)
        rowsum = rowsum * alpha + p.sum(dim=-1, keepdim=True)
        p8 = (p * FP8_MAX).to(FP8_DTYPE)  # p <= 1: never beyond 448
        acc = acc * alpha + p8.float() @ v[..., start:start + KEY_TILE, :]
        m = m_new
    return acc / rowsum


@torch.library.custom_op("fp8_fx::fp8_attention", mutates_args=())
def fp8_attention(q8: torch.Tensor, q_scale: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor,
                  v8: torch.Tensor, v_scale: torch.Tensor, softmax_scale: float, recipe: str,
                  kernel: str, out_dtype: torch.dtype) -> torch.Tensor:
    """Attention of quantized inputs by `kernel`: "cudnn" (recipe "tensor",
    kernels/cudnn_attention.py), "triton" (recipe "smooth_int8", kernels/triton_attention.py)
    or "emulate" (the fp32 emulation, any device)."""
    check_shapes(q8, k8, v8)
    if k8.shape[-2] == 0:
        raise ValueError("FP8 attention needs at least one key (Sk = 0: softmax of nothing)")
    if kernel == "cudnn":
        if recipe != "tensor":
            raise ValueError(f"the cudnn kernel computes recipe 'tensor', not {recipe!r}")
        from .kernels import cudnn_attention
        return cudnn_attention.sdpa_fp8(q8, q_scale, k8, k_scale, v8, v_scale, softmax_scale,
                                        _new_output(q8, v8, FP8_DTYPE))
    if kernel == "triton":
        if recipe != "smooth_int8":
            raise ValueError(f"the triton kernel computes recipe 'smooth_int8', not {recipe!r}")
        from .kernels import triton_attention
        return triton_attention.sdpa_smooth_int8(q8, q_scale, k8, k_scale, v8, v_scale, softmax_scale,
                                                 _new_output(q8, v8, out_dtype))
    if kernel != "emulate":
        raise ValueError(f"FP8 attention kernel must be one of {KERNELS}, got {kernel!r}")
    return emulated_fp8_attention(q8, q_scale, k8, k_scale, v8, v_scale, softmax_scale, recipe, out_dtype)


@fp8_attention.register_fake
def _(q8, q_scale, k8, k_scale, v8, v_scale, softmax_scale, recipe, kernel, out_dtype):
    return _new_output(q8, v8, out_dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, recipe: str,
              softmax_scale: float | None = None, kernel: str = "emulate", rotate: bool = False) -> torch.Tensor:
    """Eager entry point: what the rewritten graph computes for one SDPA call. Note `rotate`
    is off here unless asked for; AttentionConfig's default turns it on."""
    check_shapes(q, k, v)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    quantized = torch.ops.fp8_fx.quantize_attention_inputs(q, k, v, recipe, rotate)
    out = torch.ops.fp8_fx.fp8_attention(*quantized, softmax_scale, recipe, kernel,
                                         output_dtype(recipe, q.dtype))
    return torch.ops.fp8_fx.dequantize(out, quantized[5], q.dtype) if recipe == "tensor" else out

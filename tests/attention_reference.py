"""float64 references for attention: exact attention, and each FP8 recipe written out
independently of fp8_fx (its own e4m3 rounding, its own block and channel grouping)."""
import math

import torch

from reference import E4M3_MAX, MIN_SCALE, round_to_e4m3


def exact_attention(q, k, v, softmax_scale=None):
    q, k, v = q.double(), k.double(), v.double()
    softmax_scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    return torch.softmax(q @ k.transpose(-1, -2) * softmax_scale, dim=-1) @ v


def _scale(amax):
    """amax / 448 rounded to fp32, clamped below at 1/(448*512)."""
    return torch.clamp((amax.double() / E4M3_MAX).float(), min=MIN_SCALE).double()


def _on_grid(x, scale):
    """e4m3 values of x / scale (an fp32 division, as the recipe's), times the scale."""
    return round_to_e4m3(torch.clamp(x.float() / scale.float(), -E4M3_MAX, E4M3_MAX)) * scale


def _int8_on_grid(x, scale):
    return torch.round(torch.clamp(x.float() / scale.float(), -127.0, 127.0).double()) * scale


def _per_token_block_scale(x, maximum, min_scale, block=64):
    """Each token's scale: the amax of its block of 64 tokens (per batch and head) / maximum."""
    out = torch.empty((*x.shape[:-1], 1), dtype=torch.float64)
    for start in range(0, x.shape[-2], block):
        amax = x[:, :, start:start + block].abs().double().amax(dim=(-1, -2), keepdim=True)
        out[:, :, start:start + block] = torch.clamp((amax / maximum).float(), min=min_scale).double()
    return out


def hadamard(n):
    """The n x n Sylvester Hadamard matrix / sqrt(n), float64."""
    h = torch.ones((1, 1), dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h / math.sqrt(n)


def recipe_attention(q, k, v, recipe, softmax_scale=None, rotate=False):
    """The recipe in float64. "tensor": K minus its token mean, then (rotate) Q and K times
    the +-1 Hadamard matrix, rounded to the inputs' dtype (a GEMM's output), over sqrt(D);
    Q, K, V on the e4m3 grid, one scale each; P~ = exp(S - rowmax) on the e4m3 grid at a
    fixed scale 1/448, divided by the rowsum of the unquantized P~; O on V's grid.
    "smooth_int8": K minus its token mean, rotated as "tensor" (rotate); Q, K on the int8
    grid (scale = block amax / 127, blocks of 64 tokens); V on the e4m3 grid per channel; P
    tile by tile (online_p_v)."""
    softmax_scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    dtype = q.dtype
    q, k, v = q.double(), k.double(), v.double()
    if recipe == "tensor":
        k = (k.float() - k.float().mean(dim=-2, keepdim=True)).double()
        if rotate:
            # The recipe's GEMM as torch computes one in the model's dtype: a float64 GEMM
            # rounded once differs from it by ulps, enough to flip an e4m3 code or two.
            d = q.shape[-1]
            h = (hadamard(d) * math.sqrt(d)).to(dtype)  # +-1
            q, k = (((t.to(dtype) @ h).float() * d ** -0.5).double() for t in (q, k))
        qs, ks, vs = (_scale(t.abs().amax()) for t in (q, k, v))
        qd, kd = _on_grid(q, qs), _on_grid(k, ks)
    elif recipe == "smooth_int8":
        # The recipe smooths in fp32 (a float64 mean moves codes sitting on an int8 tie).
        k = (k.float() - k.float().mean(dim=-2, keepdim=True)).double()
        if rotate:  # as for "tensor"
            d = q.shape[-1]
            h = (hadamard(d) * math.sqrt(d)).to(dtype)
            q, k = (((t.to(dtype) @ h).float() * d ** -0.5).double() for t in (q, k))
        qs = _per_token_block_scale(q, 127.0, 1.0 / (127.0 * 512.0))
        ks = _per_token_block_scale(k, 127.0, 1.0 / (127.0 * 512.0))
        qd, kd = _int8_on_grid(q, qs), _int8_on_grid(k, ks)
        vs = _scale(v.abs().amax(dim=-2, keepdim=True))  # per channel, over the tokens
    else:
        raise ValueError(recipe)
    vd = _on_grid(v, vs)
    s = qd @ kd.transpose(-1, -2) * softmax_scale
    if recipe == "smooth_int8":
        return online_p_v(s, vd)
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    pd = round_to_e4m3(p * E4M3_MAX) / E4M3_MAX
    return _on_grid((pd @ vd) / p.sum(dim=-1, keepdim=True), vs)


def online_p_v(s, vd, tile=128):
    """softmax(S) @ V as a flash-attention loop over tiles of 128 keys: each tile's
    P~ = exp(S - m) on the e4m3 grid (x 448) against the max m of the keys so far; what was
    summed before rescaled by exp(m_old - m_new); divided by the rowsum of the unquantized P~."""
    m = torch.full((*s.shape[:-1], 1), -math.inf, dtype=torch.float64)
    rowsum = torch.zeros((*s.shape[:-1], 1), dtype=torch.float64)
    acc = torch.zeros((*s.shape[:-1], vd.shape[-1]), dtype=torch.float64)
    for start in range(0, s.shape[-1], tile):
        t = s[..., start:start + tile]
        m_new = torch.maximum(m, t.amax(dim=-1, keepdim=True))
        p = torch.exp(t - m_new)
        rowsum = rowsum * torch.exp(m - m_new) + p.sum(dim=-1, keepdim=True)
        acc = acc * torch.exp(m - m_new) + round_to_e4m3(p * E4M3_MAX) / E4M3_MAX @ vd[..., start:start + tile, :]
        m = m_new
    return acc / rowsum

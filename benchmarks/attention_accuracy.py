"""FP8 attention recipes against float64 attention on synthetic inputs that look like DiT
attention (CPU, fp32 emulation of each recipe; no GPU needed).

    python benchmarks/attention_accuracy.py [--tokens 1024] [--long 4096] [--seed 0] [--json out.json]

Each case draws Q, K, V (batch 1, 2 heads, head dim 128, Wan's) and prints the relative
error ||O - O_fp64|| / ||O_fp64|| of: bf16 SDPA (the baseline's own error), each shipped
recipe (fp8_fx.attention_recipes: "tensor" and "smooth_int8", each with and without the
Q/K rotation), per-tensor FP8 without K smoothing (what the smoothing buys), and the
"tensor" recipe with other output scales (O's exact amax, as delayed scaling would
approach; no FP8 output at all, as on Blackwell) to show what the V-bound output scale
costs.
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from fp8_fx import ops
from fp8_fx.attention_recipes import attention, emulated_fp8_attention

HEAD_DIM = 128


def draw(case: str, tokens: int, gen: torch.Generator):
    shape = (1, 2, tokens, HEAD_DIM)
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    if case == "k_channel_bias":  # real DiT keys carry a large per-channel offset
        k = k + 4.0 * torch.randn(HEAD_DIM, generator=gen)
    elif case == "v_channel_bias":  # and so do values: O then sits far from zero
        v = v + 2.0 * torch.randn(HEAD_DIM, generator=gen)
    elif case == "outlier_channels":  # a few channels 10x the rest in Q and K
        idx = torch.randperm(HEAD_DIM, generator=gen)[:4]
        q[..., idx] *= 10.0
        k[..., idx] *= 10.0
    elif case == "sharp_softmax":
        q = q * 3.0
    elif case == "flat_softmax":
        q = q * 0.1
    return q, k, v


def exact(q, k, v):
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def rel(a, b) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def variants(q, k, v):
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = {"bf16 SDPA": F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()}
    for name, recipe, rotate in (("fp8 tensor (default: rotated)", "tensor", True),
                                 ("fp8 tensor, not rotated", "tensor", False),
                                 ("fp8 smooth_int8 (rotated)", "smooth_int8", True),
                                 ("fp8 smooth_int8, not rotated", "smooth_int8", False)):
        out[name] = attention(q, k, v, recipe, rotate=rotate).float()
    # Per-tensor FP8 with K as it is (the recipes smooth K): written out with the recipe's rule.
    qs, ks, vs = (ops.amax_to_scale(t.abs().amax()) for t in (q, k, v))
    s = (ops.cast_to_fp8(q, qs).float() * qs) @ (ops.cast_to_fp8(k, ks).float() * ks).transpose(-1, -2) * scale
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    o = ((p * ops.FP8_MAX).to(ops.FP8_DTYPE).float() / ops.FP8_MAX) @ (ops.cast_to_fp8(v, vs).float() * vs)
    out["fp8 per-tensor, K not smoothed"] = ops.cast_to_fp8(o / p.sum(dim=-1, keepdim=True), vs).float() * vs
    # "tensor" (rotated) inputs without the FP8 output: the emulation writes O unquantized
    # for any recipe but "tensor", so pass the tensor-quantized inputs under the other name
    # (whose P is quantized tile by tile against the running max, as cuDNN's kernel does).
    tensor_inputs = torch.ops.fp8_fx.quantize_attention_inputs(q, k, v, "tensor", True)
    o = emulated_fp8_attention(*tensor_inputs, scale, "smooth_int8", torch.float32)
    out["fp8 tensor, O not quantized"] = o
    oq, os_ = ops.quantize(o, "tensor")  # O's exact amax: the best a per-tensor O scale can do
    out["fp8 tensor, O scale = exact amax"] = oq.float() * os_
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--long", type=int, default=4096, help="tokens of the long-sequence case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args()
    cases = ["gaussian", "k_channel_bias", "v_channel_bias", "outlier_channels", "sharp_softmax", "flat_softmax", "long"]
    rows = {}
    for case in cases:
        gen = torch.Generator().manual_seed(args.seed)
        q, k, v = draw("gaussian" if case == "long" else case, args.long if case == "long" else args.tokens, gen)
        ref = exact(q, k, v)
        rows[case] = {name: rel(o, ref) for name, o in variants(q, k, v).items()}
    names = list(next(iter(rows.values())))
    width = max(map(len, names))
    print(f"{'relative error vs fp64':{width}}  " + "  ".join(f"{c:>16}" for c in cases))
    for name in names:
        print(f"{name:{width}}  " + "  ".join(f"{rows[c][name]:16.4f}" for c in cases))
    print(f"(batch 1, 2 heads, head dim {HEAD_DIM}, {args.tokens} tokens; long: {args.long}; seed {args.seed}; "
          f"torch {torch.__version__})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), errors=rows), f, indent=1)


if __name__ == "__main__":
    main()

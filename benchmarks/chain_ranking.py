"""Does one weight draw decide which of two FP8 recipes wins end to end? (CPU emulation)

On the full 14B DiT (one random weight draw) fp8_fx's output error is 0.15-0.3% above
torchao's in every input draw, while block by block (40 weight draws) fp8_fx is closer in
79 of 80 comparisons. This emulates the one recipe difference known between the two
(scales in fp32, as fp8_fx, or rounded to bf16, as torchao 0.18: scale_rounding.py) in
every targeted linear of a 40-block Wan DiT of reduced width, for several weight draws,
each with several input draws, against the same DiT in fp32:

    python benchmarks/chain_ranking.py [--weights 6] [--draws 3] [--granularity tensor]

If the winner agrees across a weight draw's inputs but changes between weight draws, a
single full-model comparison ranks the weights, not the recipes.
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn as nn

import fp8_fx
from fp8_fx.targeting import first_match
from fp8_fx.wan import _wan_class, cast_like_diffusers
from scale_rounding import quantize, relative_error as rel, scales

# Wan 2.1's block at 1/10 of 14B's width (head_dim 128, FFN 3x wide), with 14B's 40 blocks.
CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=128, in_channels=16,
              out_channels=16, text_dim=256, freq_dim=256, ffn_dim=1536, num_layers=40)


class EmulatedFP8Linear(nn.Module):
    """Dynamic activation + static weight FP8 recipe with exact fp8 products (fp32
    accumulation; the error is the quantization's), bias added before the bf16 output."""

    def __init__(self, linear: nn.Linear, granularity: str, bf16_rounded: bool):
        super().__init__()
        self.granularity, self.bf16_rounded = granularity, bf16_rounded
        w = linear.weight.detach()
        self.sw = scales(w, granularity, bf16_rounded)
        self.wq = quantize(w, self.sw)
        self.bias = linear.bias

    def forward(self, x):
        sx = scales(x, self.granularity, self.bf16_rounded)
        y = (quantize(x, sx).float() @ self.wq.float().T) * sx * (self.sw.T if self.granularity == "row" else self.sw)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


def with_fp8_linears(net: nn.Module, granularity: str, bf16_rounded: bool) -> nn.Module:
    net = copy.deepcopy(net)
    targets = fp8_fx.FP8Config().targets
    for name, m in list(net.named_modules()):
        if isinstance(m, nn.Linear) and first_match(name, targets):
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, EmulatedFP8Linear(m, granularity, bf16_rounded))
    return net


def inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 5, 32, 32, generator=g).bfloat16(), torch.tensor([500]),
            torch.randn(1, 64, CONFIG["text_dim"], generator=g).bfloat16())


def run(net, x, t, text):
    with torch.no_grad():
        return net(x, t, text, return_dict=False)[0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=int, default=6, help="weight draws (seeds 0, 1, ...)")
    p.add_argument("--draws", type=int, default=3, help="input draws per weight draw")
    p.add_argument("--granularity", default="tensor", choices=("tensor", "row"))
    args = p.parse_args()
    print(f"{CONFIG['num_layers']} blocks, width {CONFIG['num_attention_heads'] * CONFIG['attention_head_dim']}, "
          f"{args.granularity}; rel err vs fp32, fp32 scales (fp8_fx) | bf16 scales (torchao), per input draw")
    winners = []
    for seed in range(args.weights):
        torch.manual_seed(seed)
        net = cast_like_diffusers(_wan_class()(**CONFIG), torch.bfloat16).eval()
        net32 = copy.deepcopy(net).float()
        ours = with_fp8_linears(net, args.granularity, bf16_rounded=False)
        theirs = with_fp8_linears(net, args.granularity, bf16_rounded=True)
        gaps, cells = [], []
        for d in range(args.draws):
            x, t, text = inputs(1000 * seed + d)
            ref = run(net32, x.float(), t, text.float())
            e_ours, e_theirs = rel(run(ours, x, t, text), ref), rel(run(theirs, x, t, text), ref)
            gaps.append(100 * (e_ours / e_theirs - 1))
            cells.append(f"{e_ours:.5f} | {e_theirs:.5f} ({gaps[-1]:+.2f}%)")
        winners.append("fp32" if all(g < 0 for g in gaps) else "bf16" if all(g > 0 for g in gaps) else "mixed")
        print(f"weights {seed}: bf16 model {rel(run(net, x, t, text), ref):.5f}; " + "; ".join(cells)
              + f"; mean gap {statistics.mean(gaps):+.2f}% -> {winners[-1]}", flush=True)
    print("per weight draw, the recipe closer in every input draw: "
          + ", ".join(f"{w}: {winners.count(w)}" for w in ("fp32", "bf16", "mixed")))


if __name__ == "__main__":
    main()

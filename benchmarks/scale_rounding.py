"""fp8_fx's scales against torchao's, emulated on the CPU (no GPU needed).

Both compute scale = amax / 448, but torchao 0.18 (`_choose_scale_float8`) divides the
bf16 amax by a Python float, so its scale is rounded to bf16 (8 significant bits);
fp8_fx keeps it in fp32. This measures what that does to one linear's error against a
float64 matmul, over random weight matrices (each a "layer") and input draws:

    python benchmarks/scale_rounding.py [--layers 40] [--draws 3]

Per layer: the relative error with fp32 scales over the error with bf16 scales, minus 1
(negative: fp8_fx's recipe is closer). Everything else is the same in both: IEEE
division, clamp to +-448, round to nearest even, products exact in float64.
"""
from __future__ import annotations

import argparse
import statistics

import torch

FP8 = torch.float8_e4m3fn


def scales(t: torch.Tensor, granularity: str, bf16_rounded: bool) -> torch.Tensor:
    amax = t.abs().amax() if granularity == "tensor" else t.abs().amax(dim=-1, keepdim=True)
    if bf16_rounded:
        return (amax / 448.0).float()  # bf16 / Python float stays bf16, as in torchao
    return amax.float() / torch.tensor(448.0)


def quantize(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (t.float() / scale).clamp(-448, 448).to(FP8)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, granularity: str, bf16_rounded: bool) -> torch.Tensor:
    sx, sw = scales(x, granularity, bf16_rounded), scales(w, granularity, bf16_rounded)
    xq, wq = quantize(x, sx), quantize(w, sw)
    sw = sw.double().T if granularity == "row" else sw.double()
    return (xq.double() @ wq.double().T) * sx.double() * sw


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    return ((y - ref).norm() / ref.norm()).item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=40, help="random weight matrices")
    p.add_argument("--draws", type=int, default=3, help="input draws per weight matrix")
    p.add_argument("--size", type=int, default=1024, help="tokens = in = out features")
    args = p.parse_args()
    n = args.size
    for granularity in ("tensor", "row"):
        per_layer, agreeing = [], 0
        for layer in range(args.layers):
            g = torch.Generator().manual_seed(layer)
            w = (torch.randn(n, n, generator=g) / n ** 0.5).bfloat16()
            diffs = []
            for _ in range(args.draws):
                x = torch.randn(n, n, generator=g).bfloat16()
                ref = x.double() @ w.double().T
                ours = relative_error(fp8_linear(x, w, granularity, False), ref)
                theirs = relative_error(fp8_linear(x, w, granularity, True), ref)
                diffs.append(ours / theirs - 1)
            per_layer += diffs
            agreeing += all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
        print(f"{granularity}: fp32 scales' error vs bf16 scales', per layer and draw: "
              f"mean {100 * statistics.mean(per_layer):+.4f}%, sd {100 * statistics.stdev(per_layer):.4f}%, "
              f"range {100 * min(per_layer):+.3f}% to {100 * max(per_layer):+.3f}%, "
              f"fp32 closer in {sum(d < 0 for d in per_layer)}/{len(per_layer)}; "
              f"layers whose {args.draws} draws agree in sign: {agreeing}/{args.layers}")


if __name__ == "__main__":
    main()

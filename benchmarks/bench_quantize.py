"""The activation quantizations Inductor cannot fuse into a producer, alone, on one GPU:
fp8_fx.triton_quantize (default launch config, and a sweep of others) against Inductor
compiling the same recipe (`quantize(gelu(x))`), at Wan 480p shapes (32,760 tokens).

    python benchmarks/bench_quantize.py [--sweep] [--out results.json]

Reports median ms (CUDA events) and the effective bandwidth of the ideal traffic
(row: read x once, write fp8; tensor: read x twice, write fp8).
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from fp8_fx import ops
from fp8_fx import triton_quantize as tq

CASES = [  # (label, K, activation): the unfusable inputs of a Wan block
    ("1.3B to_out input", 1536, "none"),
    ("1.3B ffn.net.2 input (GELU)", 8960, "gelu_tanh"),
    ("14B to_out input", 5120, "none"),
    ("14B ffn.net.2 input (GELU)", 13824, "gelu_tanh"),
]
TOKENS = 32760


def median_ms(fn, iters=20):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def inductor_recipe(activation, granularity):
    def recipe(x):
        if activation == "gelu_tanh":
            x = F.gelu(x, approximate="tanh")
        return ops.quantize(x, granularity)
    return torch.compile(recipe)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sweep", action="store_true", help="also time other launch configs")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for label, k, act in CASES:
        x = torch.randn(TOKENS, k, device="cuda", dtype=torch.bfloat16) * 2
        for granularity in ("tensor", "row"):
            traffic = x.numel() * (2 * (2 if granularity == "tensor" else 1) + 1)
            ours = median_ms(lambda: tq.triton_quantize(x, granularity, act))
            inductor = median_ms(lambda f=inductor_recipe(act, granularity): f(x))
            same = [torch.equal(a.view(torch.uint8) if a.dtype == ops.FP8_DTYPE else a,
                                b.view(torch.uint8) if b.dtype == ops.FP8_DTYPE else b)
                    for a, b in zip(tq.triton_quantize(x, granularity, act),
                                    tq.reference(x, granularity, act))]
            row = dict(case=label, tokens=TOKENS, k=k, activation=act, granularity=granularity,
                       triton_ms=round(ours, 4), inductor_ms=round(inductor, 4),
                       triton_gbps=round(traffic / ours / 1e6), inductor_gbps=round(traffic / inductor / 1e6),
                       equal_to_eager_reference=same)
            if args.sweep:
                x2d = x.reshape(-1, k)
                a = tq._ACT_ID[act]
                sweep = {}
                if granularity == "row":
                    block_k = tq.triton.next_power_of_2(k)
                    for rows_ in (1, 2, 4, 8):
                        for warps in (4, 8, 16):
                            if rows_ * block_k <= 32768:
                                sweep[f"rows={rows_},warps={warps}"] = median_ms(
                                    lambda: tq._quantize_rows(x2d, a, rows_, warps))
                else:
                    for block in (1024, 2048, 4096, 8192):
                        for warps in (4, 8, 16):
                            for per_sm in (2, 4, 8):
                                sweep[f"block={block},warps={warps},per_sm={per_sm}"] = median_ms(
                                    lambda: tq._quantize_tensor(x2d, a, block, per_sm, block, warps), iters=10)
                best = min(sweep, key=sweep.get)
                row.update(best_config=best, best_ms=round(sweep[best], 4))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

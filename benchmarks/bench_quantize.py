"""The activation quantizations Inductor cannot fuse into a producer, alone, on one GPU:
fp8_fx.triton_quantize (default launch config, and a sweep of others) against Inductor
compiling the same recipe (`quantize(gelu(x))`), at Wan 480p shapes (32,760 tokens).

    python benchmarks/bench_quantize.py [--sweep] [--skip-inductor] [--out results.json]

Reports CUDA kernel ms per call (torch.profiler) and the effective bandwidth of the ideal traffic
(row: read x once, write fp8; tensor: read x twice, write fp8).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from fp8_fx import ops
from fp8_fx.kernels import triton_quantize as tq

CASES = [  # (label, K, activation): the unfusable inputs of a Wan block
    ("1.3B to_out input", 1536, "none"),
    ("1.3B ffn.net.2 input (GELU)", 8960, "gelu_tanh"),
    ("14B to_out input", 5120, "none"),
    ("14B ffn.net.2 input (GELU)", 13824, "gelu_tanh"),
]
TOKENS = 32760


def kernel_ms(fn, iters=10):
    """{kernel name: mean CUDA time per call, ms} from torch.profiler: GPU time only, so
    the host's launch overhead (large for eager wrap_triton calls) does not count."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    times = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times[e.name] = times.get(e.name, 0.0) + e.device_time / 1e3 / iters
    return times


def total_ms(fn):
    return sum(kernel_ms(fn).values())


def inductor_recipe(activation, granularity):
    def recipe(x):
        if activation == "gelu_tanh":
            x = F.gelu(x, approximate="tanh")
        return ops.quantize(x, granularity)
    return torch.compile(recipe)


def sweep(x2d, act, granularity):
    """Kernel ms per launch config (tensor: amax and cast kernels timed apart)."""
    out = {}
    if granularity == "row":
        configs = [tq.RowConfig(r, b, w) for b in (512, 1024, 2048) for r in (1, 2, 4) for w in (4, 8)]
        for c in configs:
            out[f"rows={c.rows},block_k={c.block_k},warps={c.num_warps}"] = round(
                total_ms(lambda: tq._quantize_rows(x2d, act, c)), 4)
    else:
        for block in (2048, 4096, 8192):
            for warps in (4, 8, 16):
                for per_sm in (4, 8, 16):
                    c = tq.TensorConfig(block, warps, per_sm, block, warps)
                    t = kernel_ms(lambda: tq._quantize_tensor(x2d, act, c))
                    out[f"block={block},warps={warps},per_sm={per_sm}"] = {
                        name: round(ms, 4) for name, ms in t.items() if name in ("_amax_kernel", "_cast_kernel")}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sweep", action="store_true", help="also time other launch configs")
    p.add_argument("--skip-inductor", action="store_true",
                   help="time fp8_fx's kernels only (faster)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for label, k, act in CASES:
        x = torch.randn(TOKENS, k, device="cuda", dtype=torch.bfloat16) * 2
        for granularity in ("tensor", "row"):
            traffic = x.numel() * (2 * (2 if granularity == "tensor" else 1) + 1)
            ours = total_ms(lambda: tq.triton_quantize(x, granularity, act))
            inductor = None if args.skip_inductor else total_ms(lambda f=inductor_recipe(act, granularity): f(x))
            (xq, xs), (rq, rs) = tq.triton_quantize(x, granularity, act), tq.reference(x, granularity, act)
            differ = (xq.view(torch.uint8) != rq.view(torch.uint8)).double().mean().item()
            row = dict(case=label, tokens=TOKENS, k=k, activation=act, granularity=granularity,
                       triton_ms=round(ours, 4), inductor_ms=round(inductor, 4) if inductor else None,
                       triton_gbps=round(traffic / ours / 1e6),
                       inductor_gbps=round(traffic / inductor / 1e6) if inductor else None,
                       scales_equal_to_eager=torch.equal(xs, rs), fp8_codes_differing=differ)
            if args.sweep:
                row["sweep"] = sweep(x.reshape(-1, k), tq._ACT_ID[act], granularity)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

"""The self-attention of a Wan 14B block alone, on the GPU: torch's bf16 SDPA (cuDNN and
flash backends) against fp8_fx's FP8 attention (recipe "tensor", cuDNN's FP8 kernel;
recipe "smooth_int8", fp8_fx's Triton kernel), timed side by side (interleaved, median), and each one's error against fp32 attention.

    python benchmarks/bench_attention.py [--tokens 32760,75600] [--heads 40] [--out results.json]
    python benchmarks/bench_attention.py --sweep [--tokens 32760]   # the Triton kernel's launch configs

Rows: `sdpa_bf16_cudnn`, `sdpa_bf16_flash`; `fp8_kernel` (cuDNN's FP8 kernel alone, on
inputs quantized beforehand); `fp8_fx` / `fp8_fx_norot` (what the compiled graph runs per
call: Q/K/V quantization, with and without the Hadamard rotation, + kernel + dequantized
output, compiled by Inductor on its own); `int8_kernel` / `fp8_fx_int8` (the same for
"smooth_int8" and the Triton kernel; in a block the quantization fuses further into
the RoPE/RMSNorm kernels). Errors: ||O - O_fp32|| / ||O_fp32|| over all heads, on
N(0,1) inputs and on DiT-like ones (K with a channel bias, four outlier channels 10x in
Q and K).
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench_wan import cuda_ms
from fp8_fx.attention_recipes import attention, output_dtype

HEAD_DIM = 128


def draw(tokens, heads, case, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (1, tokens, heads, HEAD_DIM)  # (B, S, H, D) in memory, viewed (B, H, S, D)
    q, k, v = (torch.randn(shape, device="cuda", generator=g) for _ in range(3))
    if case == "dit_like":
        k += 3.0 * torch.randn(HEAD_DIM, device="cuda", generator=g)
        idx = torch.randperm(HEAD_DIM, device="cuda", generator=g)[:4]
        q[..., idx] *= 10.0
        k[..., idx] *= 10.0
    return [t.bfloat16().transpose(1, 2) for t in (q, k, v)]


def rows_for(q, k, v):
    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    fused = {rot: torch.compile(lambda a, b, c, rot=rot: attention(a, b, c, "tensor", kernel="cudnn", rotate=rot))
             for rot in (True, False)}
    int8 = torch.compile(lambda a, b, c: attention(a, b, c, "smooth_int8", kernel="triton"))

    def kernel_only(recipe, kernel):
        pre = torch.ops.fp8_fx.quantize_attention_inputs(q, k, v, recipe, True)
        return lambda: torch.ops.fp8_fx.fp8_attention(*pre, HEAD_DIM ** -0.5, recipe, kernel,
                                                      output_dtype(recipe, q.dtype))
    return {
        "sdpa_bf16_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa_bf16_flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "fp8_kernel": kernel_only("tensor", "cudnn"),
        "fp8_fx": lambda: fused[True](q, k, v),
        "fp8_fx_norot": lambda: fused[False](q, k, v),
        "int8_kernel": kernel_only("smooth_int8", "triton"),
        "fp8_fx_int8": lambda: int8(q, k, v),
    }


SWEEP = [dict(block_m=m, block_n=n, num_warps=w, num_stages=st)
         for m in (64, 128) for n in (64, 128) for w in (4, 8) for st in (2, 3)]


def sweep(tokens, heads, repeats):
    """The smooth_int8 Triton kernel alone under each launch config, on the same inputs
    (block_n other than the recipe's 64 times other numerics, not the recipe's); then the
    default config on V stored as the model makes it (head dim contiguous) instead of as
    the quantization stores it (tokens contiguous: what Hopper's FP8 MMA reads)."""
    from fp8_fx.kernels import triton_attention as ta
    q, k, v = draw(tokens, heads, "gaussian")
    pre = torch.ops.fp8_fx.quantize_attention_inputs(q, k, v, "smooth_int8")
    out = torch.empty_like(q)
    flops = 4 * heads * tokens * tokens * HEAD_DIM

    def time_config(quantized, config, **row):
        try:
            ta.sdpa_smooth_int8(*quantized, HEAD_DIM ** -0.5, out, config)  # compile
            ms = statistics.median(cuda_ms(lambda: ta.sdpa_smooth_int8(*quantized, HEAD_DIM ** -0.5, out, config), 3)
                                   for _ in range(repeats))
            row.update(ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1))
        except Exception as error:  # e.g. out of shared memory for the larger tiles
            row.update(error=f"{type(error).__name__}: {str(error)[:200]}")
        print(json.dumps(dict(tokens=tokens, **row)), flush=True)

    for c in SWEEP:
        time_config(pre, ta.LaunchConfig(**c), sweep=c)
    v_head_dim_contiguous = pre[4].transpose(1, 2).contiguous().transpose(1, 2)
    for name, v8 in (("tokens contiguous", pre[4]), ("head dim contiguous", v_head_dim_contiguous)):
        time_config((*pre[:4], v8, pre[5]), ta.LaunchConfig(), v_layout=name)


def rel(a, b):
    return ((a.float() - b).norm() / b.norm()).item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="32760,75600")
    p.add_argument("--heads", type=int, default=40)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out")
    p.add_argument("--sweep", action="store_true", help="time the Triton kernel's launch configs only")
    args = p.parse_args()
    if args.sweep:
        for tokens in map(int, args.tokens.split(",")):
            sweep(tokens, args.heads, args.repeats)
        return
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, heads=args.heads, rows=[])
    for tokens in map(int, args.tokens.split(",")):
        q, k, v = draw(tokens, args.heads, "gaussian")
        fns = rows_for(q, k, v)
        for fn in fns.values():  # compile and warm
            fn()
        times = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                times[name].append(cuda_ms(fn, 5))
        errors = {}
        for case in ("gaussian", "dit_like"):
            q, k, v = draw(tokens, args.heads, case, seed=1)
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            for name, fn in rows_for(q, k, v).items():
                if not name.endswith("_kernel"):
                    out = fn()
                    errors.setdefault(name, {})[case] = round(rel(out[0] if isinstance(out, tuple) else out, exact), 5)
            del exact
        base = statistics.median(times["sdpa_bf16_cudnn"])
        flops = 4 * args.heads * tokens * tokens * HEAD_DIM
        for name, t in times.items():
            ms = statistics.median(t)
            row = dict(tokens=tokens, variant=name, ms=round(ms, 3), spread_ms=round(max(t) - min(t), 3),
                       speedup_vs_cudnn_bf16=round(base / ms, 3), tflops=round(flops / ms / 1e9, 1),
                       rel_err_fp32=errors.get(name))
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
        torch._dynamo.reset()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

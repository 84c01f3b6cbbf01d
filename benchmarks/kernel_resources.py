"""Compile fp8_fx's Triton kernels for an NVIDIA target without a GPU and print what the
compiler reports: registers, stack, spills, SASS instruction counts.

    pip install triton                 # any machine, no GPU or driver needed
    python benchmarks/kernel_resources.py [--arch 90] [--cast-block 4096] [--row-block-k 2048]
    python benchmarks/kernel_resources.py --attention [--arch 89]   # the smooth_int8 attention kernel

Costs no device time: check that a kernel change still compiles for sm_90 and what it does
to registers (occupancy) and instructions per element before spending a GPU call on it.
Timings still need the GPU (bench_quantize.py).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fp8_fx import ops  # noqa: E402
from fp8_fx.kernels import triton_quantize as tq  # noqa: E402

ROW_SIGNATURE = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "M": "i32", "K": "i32",
                 "ACT": "constexpr", "ROWS": "constexpr", "BLOCK_K": "constexpr", "FP8_MAX": "constexpr",
                 "MIN_SCALE": "constexpr"}
AMAX_SIGNATURE = {"x_ptr": "*bf16", "amax_bits_ptr": "*i32", "N": "i32", "ACT": "constexpr",
                  "BLOCK": "constexpr"}
CAST_SIGNATURE = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "amax_bits_ptr": "*i32", "scale_ptr": "*fp32",
                  "N": "i32", "ACT": "constexpr", "BLOCK": "constexpr", "FP8_MAX": "constexpr",
                  "MIN_SCALE": "constexpr"}


def compile_kernel(fn, signature, constexprs, num_warps, arch, num_stages=None):
    # What a launch specializes on: pointers and sizes divisible by 16 (Wan's are), which
    # lets Triton vectorize loads and stores; without it every access is scalar.
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
               for name, kind in signature.items() if kind.startswith("*") or kind == "i32"}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
    options = {"num_warps": num_warps, **({"num_stages": num_stages} if num_stages else {})}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def resources(kernel) -> dict:
    """Registers / stack / local bytes (cuobjdump) and SASS instruction counts."""
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        usage = subprocess.run([tools / "cuobjdump", "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tools / "cuobjdump", "--dump-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    out = {key.lower(): int(v) for key, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", usage)}
    out["sass"] = len(re.findall(r"/\*[0-9a-f]{4}\*/", sass))
    for op in ("FFMA", "FMUL", "MUFU", "F2FP", "LDG", "STG"):
        out[op.lower()] = len(re.findall(rf"\b{op}\b", sass))
    return out


def attention_kernels(arch):
    """kernels/triton_attention.py's kernel as a Wan launch specializes it: int8 Q/K, e4m3 V,
    bf16 output, unit strides along the head dim (Q, K, O), the tokens (V, as
    quantize_attention_inputs stores it) and the scales' token axis."""
    from fp8_fx.kernels import triton_attention as ta
    fn = ta._compiled_kernel
    ptrs = {"q_ptr": "*i8", "k_ptr": "*i8", "v_ptr": "*fp8e4nv", "o_ptr": "*bf16"}
    unit = {"sq_d", "sk_d", "sv_s", "so_d", "svs_d", "sqs_s", "sks_s"}  # V: tokens contiguous
    blocks = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "EXACT_E4M3")
    signature = {n: (ptrs.get(n, "*fp32") if n.endswith("_ptr") else "fp32" if n == "qk_scale"
                     else "constexpr" if n in unit or n in blocks else "i32") for n in fn.arg_names}
    out, config = {}, ta.LaunchConfig()
    for head_dim in (64, 128, 256):
        constexprs = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=ta.block_d(head_dim),
                          EXACT_E4M3=False, **{n: 1 for n in unit})
        out[f"attention d{head_dim}"] = compile_kernel(fn, signature, constexprs, config.num_warps, arch,
                                                        num_stages=config.num_stages)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100), 89 (L40S, 4090)")
    p.add_argument("--cast-block", type=int, default=tq.TENSOR_CONFIG.cast_block)
    p.add_argument("--cast-warps", type=int, default=tq.TENSOR_CONFIG.cast_warps)
    p.add_argument("--row-block-k", type=int, default=tq.row_config(13824).block_k)
    p.add_argument("--row-warps", type=int, default=tq.row_config(13824).num_warps)
    p.add_argument("--attention", action="store_true", help="the smooth_int8 attention kernel instead")
    args = p.parse_args()
    if args.attention:
        for name, kernel in attention_kernels(args.arch).items():
            # which loads the software pipeline issues ahead as cp.async (the rest wait in the loop)
            pipelined = sorted(set(re.findall(r"%(\w+?)_\d+ = ttg.async_copy_global_to_local", kernel.asm["ttgir"])))
            print(f"sm_{args.arch} {name} " + " ".join(f"{k} {v}" for k, v in resources(kernel).items())
                  + f" pipelined {','.join(pipelined) or '-'}")
        return
    limits = {"FP8_MAX": ops.FP8_MAX, "MIN_SCALE": ops.MIN_SCALE}
    c = tq.TENSOR_CONFIG
    for activation, act in tq._ACT_ID.items():
        kernels = {
            "row": compile_kernel(tq._rowwise_kernel, ROW_SIGNATURE,
                                  {"ACT": act, "ROWS": 1, "BLOCK_K": args.row_block_k, **limits},
                                  args.row_warps, args.arch),
            "amax": compile_kernel(tq._amax_kernel, AMAX_SIGNATURE, {"ACT": act, "BLOCK": c.amax_block},
                                   c.amax_warps, args.arch),
            "cast": compile_kernel(tq._cast_kernel, CAST_SIGNATURE,
                                   {"ACT": act, "BLOCK": args.cast_block, **limits}, args.cast_warps, args.arch),
        }
        for name, kernel in kernels.items():
            r = resources(kernel)
            print(f"sm_{args.arch} {name:4s} {activation:9s} " + " ".join(f"{k} {v}" for k, v in r.items()))


if __name__ == "__main__":
    main()

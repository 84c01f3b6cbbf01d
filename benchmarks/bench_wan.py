"""Side-by-side Wan DiT benchmark on one GPU: bf16 eager / compile, torchao FP8, fp8_fx.

    python benchmarks/bench_wan.py --model 14B --scope block --tokens 32760

One process, one GPU. Variants are compiled first, then timed interleaved
(A B C A B C ...) because the attention kernel alone drifts ~6% between runs; each
row reports the median and spread, non-attention and GEMM kernel time from one
profiled forward (median of 5), kernel launches, compile time, peak memory and fidelity against
bf16 eager (mean over --fidelity-inputs input draws; --fp32-reference: also against the
model in fp32). Rows are appended to
benchmarks/results/<device>.json.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn

import block_errors
import fp8_fx
from fp8_fx.targeting import first_match

SIZES = {  # Wan 2.1 T2V: dim, ffn_dim, heads, layers
    "1.3B": (1536, 8960, 12, 30),
    "14B": (5120, 13824, 40, 40),
}
LATENT = {32760: (21, 60, 104), 75600: (21, 90, 160)}  # latent grids of 480p / 720p, 81 frames
TEXT_TOKENS = 512
VARIANTS = ("bf16_eager", "bf16_compile", "fp8_fx_tensor", "fp8_fx_row", "fp8_fx_tensor_gpu_load",
            "fp8_fx_row_gpu_load", "fp8_fx_tensor_tuned", "fp8_fx_row_tuned", "fp8_fx_tensor_inductor",
            "fp8_fx_row_inductor", "fp8_fx_tensor_recompute", "fp8_fx_row_recompute", "fp8_fx_static",
            "fp8_fx_attn_tensor", "fp8_fx_attn_tensor_norot", "fp8_fx_attn_tensor_int8", "fp8_fx_attn_row",
            "torchao_tensor", "torchao_row")
# Inductor options for fp8_fx variants by name suffix, passed to that backend's graphs only.
INDUCTOR_PATCHES = {
    # coordinate-descent tuning of every Triton kernel (slow compiles)
    "_tuned": {"coordinate_descent_tuning": True},
    # inline pointwise nodes with many reads into each consumer instead of writing them
    # out: the LayerNorm + modulation output, read by the amax and then by the cast, is
    # recomputed from the norm's input in both kernels, not written in bf16 (seen in
    # Inductor's CPU code for a Wan block; the default threshold is 4 reads)
    "_recompute": {"realize_reads_threshold": 100},
}
# Library kernels only: Inductor's Triton kernels carry fused op names such as
# `triton_poi_fused__scaled_mm_...` or `..._scaled_dot_product_cudnn_attention_...`.
ATTENTION = re.compile(r"flash|fmha|attention|sdpa", re.I)
GEMM = re.compile(r"gemm|nvjet|cutlass|xmma|cublas", re.I)


def kernel_kind(name: str) -> str:
    if name.startswith("triton"):
        return "triton"
    if ATTENTION.search(name):
        return "attention"
    return "gemm" if GEMM.search(name) else "other"


class OneBlock(nn.Module):
    """One diffusers WanTransformerBlock under `blocks.0`, so qualnames match the full DiT."""

    def __init__(self, dim, ffn_dim, heads):
        super().__init__()
        from diffusers.models.transformers.transformer_wan import WanTransformerBlock
        self.blocks = nn.ModuleList([WanTransformerBlock(dim, ffn_dim, heads, "rms_norm_across_heads",
                                                         cross_attn_norm=True, eps=1e-6)])

    def forward(self, x, context, timestep_proj, rotary_emb):
        return self.blocks[0](x, context, timestep_proj, rotary_emb)


def build_net(model: str, scope: str, device, seed: int = 0):
    """bf16 net with seeded random weights (same seed, same weights)."""
    from fp8_fx.wan import build_wan
    dim, ffn_dim, heads, _ = SIZES[model]
    if scope == "full":
        return build_wan(model, dtype=torch.bfloat16, device=device, seed=seed)
    torch.manual_seed(seed)
    with torch.device(device):
        return OneBlock(dim, ffn_dim, heads).to(torch.bfloat16).eval()


def make_inputs(model: str, scope: str, tokens: int, device="cuda", seed=1):
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
    dim, _, heads, _ = SIZES[model]
    frames, h, w = LATENT[tokens]
    torch.manual_seed(seed)
    with torch.device(device):
        if scope == "block":
            rope = WanRotaryPosEmbed(dim // heads, (1, 2, 2), 1024)
            return (torch.randn(1, tokens, dim, dtype=torch.bfloat16),
                    torch.randn(1, TEXT_TOKENS, dim, dtype=torch.bfloat16),
                    torch.randn(1, 6, dim, dtype=torch.float32) * 0.1,
                    rope(torch.empty(1, 16, frames, h, w)))
        return (torch.randn(1, 16, frames, h, w, dtype=torch.bfloat16),
                torch.tensor([500]), torch.randn(1, TEXT_TOKENS, 4096, dtype=torch.bfloat16))


def compile_net(net, backend, regional):
    """torch.compile the whole net, or (regional) only its repeated transformer blocks
    with diffusers' compile_repeated_blocks: one block graph, compiled once, serves all."""
    if not regional:
        return torch.compile(net, backend=backend or "inductor")
    net.compile_repeated_blocks(backend=backend or "inductor", fullgraph=True)
    return net


def uncompiled_copy(net):
    """A deep copy that runs eagerly: `Module.compile` leaves a compiled bound method of the
    original module behind, which a deep copy would keep calling."""
    net = copy.deepcopy(net)
    for m in net.modules():
        m._compiled_call_impl = None
    return net


def torchao_model(net, granularity, regional):
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor,
                                      quantize_)
    targets = fp8_fx.FP8Config().targets
    net = uncompiled_copy(net)
    g = PerRow() if granularity == "row" else PerTensor()
    quantize_(net, Float8DynamicActivationFloat8WeightConfig(granularity=g),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and first_match(fqn, targets))
    return compile_net(net, None, regional)


def make_variant(name, gpu_net, cpu_net, regional=False, amax=None):
    """(callable, backend or None).
    fp8_fx_*: the README's path: bf16 on the CPU, convert_to_fp8 on the way to the GPU.
    fp8_fx_*_gpu_load: the bf16 model already on the GPU, quantized by the backend.
    bf16_* and *_gpu_load share one bf16 GPU model; torchao quantizes a copy of it.
    regional (full DiT only): every variant compiles its repeated blocks only; that compiles
    the shared bf16 model in place, so bf16_eager and *_gpu_load are refused with it.
    fp8_fx_static: tensor-wise with static input scales from `amax` (calibrated on the bf16
    model run eagerly on other random inputs than the timed ones).
    fp8_fx_attn_<granularity>: FP8 linears of that granularity and FP8 self-attention
    (AttentionConfig(): recipe "tensor", cuDNN's kernel); _norot without the Q/K rotation;
    _int8: recipe "smooth_int8" (fp8_fx's Triton kernel)."""
    if name == "bf16_eager":
        return gpu_net(), None
    if name == "bf16_compile":
        return compile_net(gpu_net(), None, regional), None
    if name == "fp8_fx_static":
        net = copy.deepcopy(cpu_net())
        fp8_fx.convert_to_fp8(net, fp8_fx.FP8Config(), device="cuda")
        fp8_fx.set_input_scales(net, amax)
        backend = fp8_fx.make_fp8_backend()
        return compile_net(net, backend, regional), backend
    if name.startswith("fp8_fx_"):
        attention = None
        if name.startswith("fp8_fx_attn_"):
            attention = fp8_fx.AttentionConfig(recipe="smooth_int8" if name.endswith("_int8") else "tensor",
                                               rotate=not name.endswith("_norot"))
            name = name.replace("_attn", "").replace("_norot", "").replace("_int8", "")
        granularity = name.split("_")[2]
        # *_inductor: every activation quantized by Inductor's kernels (no triton_quantize)
        config = fp8_fx.FP8Config(granularity=granularity, triton_quantize=not name.endswith("_inductor"),
                                  attention=attention)
        patches = next((p for suffix, p in INDUCTOR_PATCHES.items() if name.endswith(suffix)), None)
        backend = fp8_fx.make_fp8_backend(config, inductor_config_patches=patches)
        if name.endswith("_gpu_load"):
            return compile_net(gpu_net(), backend, regional), backend
        net = copy.deepcopy(cpu_net())  # the same weights as every other variant
        fp8_fx.convert_to_fp8(net, config, device="cuda")
        return compile_net(net, backend, regional), backend
    if name.startswith("torchao_"):
        return torchao_model(gpu_net(), name.rsplit("_", 1)[1], regional), None
    raise ValueError(name)


def cuda_ms(fn, iters):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def kernel_profile(fn, runs=5):
    """The profile of one forward with the median non-attention time of `runs`: a single
    profiled forward moved by up to 10% between runs (one Triton kernel taking 2x)."""
    profiles = sorted((profile_once(fn) for _ in range(runs)), key=lambda p: p["nonattn_ms"])
    return profiles[runs // 2]


def profile_once(fn):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    total = attn = gemm = 0.0
    launches = 0
    names = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = e.device_time / 1e3
        launches += 1
        total += ms
        names[e.name] = names.get(e.name, 0.0) + ms
        kind = kernel_kind(e.name)
        if kind == "attention":
            attn += ms
        elif kind == "gemm":
            gemm += ms
    return dict(nonattn_ms=total - attn, gemm_ms=gemm, attn_ms=attn, launches=launches,
                kernels=sorted(names.items(), key=lambda kv: -kv[1]))


def idle_gaps(gpu, host=(), top=5):
    """GPU idle time within one forward, and its largest gaps with what the host was doing.

    gpu: [(start_us, end_us, name)] of kernels, memcpys and memsets (any stream: overlapping
    work counts once); host: the same for host-side ops and CUDA runtime calls.
    Returns (idle_us, [dict(gap_us, after, before, host)]), the gaps largest first, `host`
    naming the host events that overlap each gap, longest overlap first (up to 4)."""
    gaps, busy_until, last = [], None, None
    for start, end, name in sorted(gpu):
        if busy_until is not None and start > busy_until:
            gaps.append((start - busy_until, busy_until, start, last, name))
        if busy_until is None or end > busy_until:
            busy_until, last = end, name
    report = []
    for gap, lo, hi, after, before in sorted(gaps, key=lambda g: (-g[0], g[1]))[:top]:  # ties: earliest
        overlaps = {}
        for start, end, name in host:
            overlap = min(end, hi) - max(start, lo)
            if overlap > 0:
                overlaps[name] = max(overlaps.get(name, 0), overlap)
        names = [n for n, _ in sorted(overlaps.items(), key=lambda kv: -kv[1])[:4]]
        report.append(dict(gap_us=round(gap, 1), after=after, before=before, host=names))
    return sum(g[0] for g in gaps), report


def gap_profile(fn):
    """One forward profiled with host activity: GPU idle (ms), its largest gaps, and how many
    host-side synchronizations and cudaMalloc/cudaFree calls it made."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    gpu, host = [], []
    for e in prof.events():
        interval = (e.time_range.start, e.time_range.end, e.name)
        (gpu if e.device_type == torch.autograd.DeviceType.CUDA else host).append(interval)
    idle_us, gaps = idle_gaps(gpu, host)
    # waits on the GPU inside the forward: those that end before its last GPU work does (the
    # synchronize after the forward ends with it)
    last_gpu = max((end for _, end, _ in gpu), default=0)
    syncs = sum(("Synchronize" in n or n.startswith("cudaMemcpy")) and end < last_gpu for _, end, n in host)
    allocs = sum(n in ("cudaMalloc", "cudaFree") for _, _, n in host)
    return dict(idle_ms=round(idle_us / 1e3, 3), host_syncs=syncs, cuda_mallocs=allocs, gaps=gaps)


def fidelity(y, ref):
    y, ref = y.double().flatten(), ref.double().flatten()
    rel = ((y - ref).norm() / ref.norm()).item()
    cos = torch.nn.functional.cosine_similarity(y, ref, dim=0).item()
    return rel, cos


def first(out):
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)


def uses_bf16_gpu_model(variants) -> bool:
    """Whether a variant builds the shared bf16 GPU model (then the bf16 eager reference
    runs on it too)."""
    return any(v.startswith(("bf16", "torchao")) or v.endswith(("gpu_load", "static")) for v in variants)


def bench(model, scope, tokens, variants, repeats, iters, log, regional=False, fidelity_inputs=1,
          per_block=False, fp32_reference=False, weight_seed=0):
    torch._dynamo.reset()  # each group compiles afresh (and stays under the recompile limit)
    inputs = make_inputs(model, scope, tokens)
    # Fidelity draws: the timed inputs, then seeds 3, 4, ... (seed 2 is the calibration's).
    draws = [inputs] + [make_inputs(model, scope, tokens, seed=s) for s in range(3, 2 + fidelity_inputs)]
    kwargs = {"return_dict": False} if scope == "full" else {}
    shared = {}

    def cpu_net():  # built once, on the CPU (seeded): every variant gets these weights
        if "cpu" not in shared:
            shared["cpu"] = build_net(model, scope, "cpu", weight_seed)
        return shared["cpu"]

    def gpu_net():
        if "gpu" not in shared:
            shared["gpu"] = copy.deepcopy(cpu_net()).to("cuda")
        return shared["gpu"]

    rows, fns, nets, refs, amax, io = {}, {}, {}, None, {}, None
    t_group = time.perf_counter()
    with torch.no_grad():
        refs32 = None
        if fp32_reference:  # first: the fp32 model (56 GB for 14B) is freed before the rest loads
            refs32 = block_errors.fp32_outputs(cpu_net(), draws, kwargs, "cuda")
            print(f"{model} {scope} {tokens}: fp32 reference run in {time.perf_counter() - t_group:.1f}s",
                  flush=True)
        if uses_bf16_gpu_model(variants):
            refs = [first(gpu_net()(*d, **kwargs)) for d in draws]  # bf16 eager: the fidelity reference
            if per_block:  # every block's input and output of the timed draw, kept on the CPU
                io = block_errors.record_block_io(gpu_net(), lambda: gpu_net()(*inputs, **kwargs))
            print(f"{model} {scope} {tokens}: bf16 model built and reference run in "
                  f"{time.perf_counter() - t_group:.1f}s", flush=True)
        if "fp8_fx_static" in variants:  # eager bf16, before anything compiles, on other inputs
            calib = make_inputs(model, scope, tokens, seed=2)
            amax = fp8_fx.calibrate_input_amax(gpu_net(), lambda: gpu_net()(*calib, **kwargs))
            del calib
        for name in variants:  # compile one by one; torchao last: it changes global config
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            fn, backend = make_variant(name, gpu_net, cpu_net, regional and scope == "full", amax)
            load_s = time.perf_counter() - t0
            out = first(fn(*inputs, **kwargs))
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0 - load_s
            peak = torch.cuda.max_memory_allocated() / 2**30
            outs = [out] + [first(fn(*d, **kwargs)) for d in draws[1:]] if refs or refs32 else []
            if refs is not None:  # one draw: this output; more: each draw, then the mean
                fid = [fidelity(o, r) for o, r in zip(outs, refs)]
                rel, cos = (statistics.mean(v) for v in zip(*fid))
            else:
                fid, rel, cos = [], None, None
            fp32_fields = {}
            if refs32 is not None:  # the same, against the fp32 forward
                err32 = [fidelity(o, r.to(o.device))[0] for o, r in zip(outs, refs32)]
                fp32_fields.update(rel_err_fp32=statistics.mean(err32), rel_errs_fp32=err32)
                if refs is not None:
                    eager32 = [fidelity(r, r32.to(r.device))[0] for r, r32 in zip(refs, refs32)]
                    fp32_fields.update(bf16_eager_rel_err_fp32=statistics.mean(eager32),
                                       bf16_eager_rel_errs_fp32=eager32)
                print(f"{name}: rel_err {[f[0] for f in fid]} vs fp32 {fp32_fields}", flush=True)
            del outs
            fns[name] = lambda fn=fn: fn(*inputs, **kwargs)
            nets[name] = fn
            fns[name]()  # warm
            prof = kernel_profile(fns[name])
            rows[name] = dict(model=model, scope=scope, tokens=tokens, variant=name,
                              regional=regional and scope == "full", weight_seed=weight_seed,
                              load_s=round(load_s, 2), compile_s=round(compile_s, 2), peak_gib=round(peak, 2),
                              rel_err=rel, cosine=cos, rel_errs=[f[0] for f in fid],
                              nonattn_ms=round(prof["nonattn_ms"], 3), gemm_ms=round(prof["gemm_ms"], 3),
                              attn_ms=round(prof["attn_ms"], 3), launches=prof["launches"], **fp32_fields)
            gaps = gap_profile(fns[name])
            rows[name].update(idle_ms=gaps["idle_ms"], host_syncs=gaps["host_syncs"],
                              cuda_mallocs=gaps["cuda_mallocs"])
            log.write(f"\n## {model} {scope} {tokens} {name}: top kernels\n")
            for k, ms in prof["kernels"][:25]:
                log.write(f"{ms:9.3f} ms  {k[:160]}\n")
            log.write(f"GPU idle {gaps['idle_ms']} ms (profiled with host activity); host syncs "
                      f"{gaps['host_syncs']}, cudaMalloc/Free {gaps['cuda_mallocs']}; largest gaps:\n")
            for g in gaps["gaps"]:
                log.write(f"  {g['gap_us']:8.1f} us after {g['after'][:60]} before {g['before'][:60]}; "
                          f"host: {', '.join(h[:60] for h in g['host'])}\n")
            if backend is not None:
                log.write(str(backend.report) + "\n")
            log.flush()
            del out
            print(f"compiled {name}: load {load_s:.1f}s, first call {compile_s:.1f}s, peak {peak:.2f} GiB",
                  flush=True)
        if io is not None:
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            t0 = time.perf_counter()
            errs = block_errors.block_errors(nets, io, reference_blocks=cpu_net().blocks)
            new_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
            print(f"per-block errors in {time.perf_counter() - t0:.1f}s ({new_graphs} graphs compiled on the way)",
                  flush=True)
            # the lists on stdout too: the timing that follows could still run past the call's limit
            print("BLOCK_ERRORS " + json.dumps(errs), flush=True)
            for name in variants:
                rows[name].update(block_errors.summary(errs[name]), block_graphs_compiled=new_graphs,
                                  bf16_eager_block_rel_err_fp32=statistics.mean(errs["bf16_eager"]["vs_fp32"]),
                                  bf16_eager_block_rel_errs_fp32=errs["bf16_eager"]["vs_fp32"])
            del io, errs
        nets.clear()
        times = {n: [] for n in variants}
        for _ in range(repeats):  # interleaved
            for name in variants:
                times[name].append(cuda_ms(fns[name], iters))
    base = statistics.median(times["bf16_compile"]) if "bf16_compile" in times else None
    for name in variants:
        med = statistics.median(times[name])
        rows[name].update(ms=round(med, 3), spread_ms=round(max(times[name]) - min(times[name]), 3),
                          speedup=round(base / med, 3) if base else None)
    fns.clear()
    shared.clear()  # free the models before the next group
    torch.cuda.empty_cache()
    return list(rows.values())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="14B", help="comma list of 1.3B,14B")
    p.add_argument("--scope", default="block", help="comma list of block,full")
    p.add_argument("--tokens", default="32760", help="comma list of 32760,75600")
    p.add_argument("--variants", default="bf16_eager,bf16_compile,fp8_fx_tensor,fp8_fx_row,torchao_tensor,torchao_row")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--fidelity-inputs", type=int, default=1,
                   help="rel_err / cosine: the mean over this many input draws (the first is the timed one)")
    p.add_argument("--regional", action="store_true",
                   help="scope full: compile the repeated blocks only (diffusers' compile_repeated_blocks)")
    p.add_argument("--block-errors", action="store_true",
                   help="scope full, --regional: each block's error fed the bf16 eager run's own input to "
                        "it, against bf16 eager and fp32 (benchmarks/block_errors.py)")
    p.add_argument("--fp32-reference", action="store_true",
                   help="also rel_err_fp32: each variant's output against the same model run in fp32 "
                        "(14B: 56 GB, run first and freed)")
    p.add_argument("--weight-seed", type=int, default=0,
                   help="seed of the random weights: a full-model fidelity comparison is one weight draw")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/<device>.json)")
    p.add_argument("--log", default=os.environ.get("OUT", ".") + "/bench_kernels.log")
    args = p.parse_args()
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if args.regional and any(v == "bf16_eager" or v.endswith("_gpu_load") for v in variants):
        p.error("--regional compiles the shared bf16 model in place: drop bf16_eager and *_gpu_load")
    if args.block_errors and not (args.regional and args.scope == "full"):
        p.error("--block-errors needs --scope full --regional (it calls each variant's compiled blocks)")
    if args.block_errors and not uses_bf16_gpu_model(variants):
        p.error("--block-errors needs the bf16 GPU model: add bf16_compile or a torchao variant")
    if args.fidelity_inputs < 1:
        p.error("--fidelity-inputs must be at least 1")
    if not torch.cuda.is_available():
        p.error("this benchmark needs a CUDA GPU")
    device = torch.cuda.get_device_name().replace(" ", "_")
    out = Path(args.out or Path(__file__).parent / "results" / f"{device}.json")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                date=datetime.date.today().isoformat(), command="python " + " ".join(os.sys.argv))
    cols = ("model", "scope", "tokens", "variant", "ms", "spread_ms", "speedup", "nonattn_ms", "gemm_ms",
            "launches", "load_s", "compile_s", "peak_gib", "rel_err", "cosine")
    with open(args.log, "a") as log:
        for model in args.model.split(","):
            for scope in args.scope.split(","):
                for tokens in map(int, args.tokens.split(",")):
                    rows = bench(model, scope, tokens, variants, args.repeats, args.iters, log,
                                 args.regional, args.fidelity_inputs, args.block_errors, args.fp32_reference,
                                 args.weight_seed)
                    for r in rows:
                        r.update(meta)
                    # saved group by group: a call cut by its time limit keeps what finished
                    out.parent.mkdir(parents=True, exist_ok=True)
                    old = json.loads(out.read_text())["rows"] if out.exists() else []
                    out.write_text(json.dumps({"rows": old + rows}, indent=1))
                    print(" | ".join(cols))
                    for r in rows:
                        print(" | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols))


if __name__ == "__main__":
    main()

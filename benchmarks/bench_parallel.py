"""A Wan DiT over several GPUs with diffusers' Ulysses context parallelism, against one GPU
(issue 16): bf16 and fp8_fx, each on one GPU and over all ranks, the FP8 wire too.

    torchrun --nproc-per-node 2 benchmarks/bench_parallel.py --model 14B --tokens 75600,32760 --out $OUT/parallel.json
    torchrun --nproc-per-node 2 benchmarks/bench_parallel.py --model tiny --device cpu   # dry run (gloo, fp32)

Random weights (seeded, built on each rank's device, then broadcast from rank 0 so every
rank holds the same model), batch 1, the full DiT compiled regionally (its repeated block),
`dynamic=False`. Two phases, each timed interleaved (A B C A B C ..., median of
--repeats, each a mean of --iters forwards; CUDA events):
  1. one GPU, rank 0 alone (the others wait): `bf16_1gpu` (Inductor), `fp8_fx_1gpu`
     (FP8 linears, weights converted at rest), `fp8_fx_attn_1gpu` (+ FP8 attention);
  2. the same models, in place, under Ulysses over all ranks (fp8_fx.distributed.
     enable_context_parallel): `bf16_cp`, `fp8_fx_cp`, `fp8_fx_attn_cp`, and
     `fp8_fx_cp_fp8wire` (its own copy: Q/K/V and the attention output cross the wire as
     FP8 bytes + per-row scales).
Each model is one copy per rank: 14B bf16 28 GB, each FP8 one ~15 GB; the default variants
(bf16, fp8_fx, fp8 wire) hold 58 GB per GPU before activations; add the attention ones on
GPUs with more memory or in a second call.

One row per variant and token count (rank 0 prints them and writes --out): ms (median;
the slowest rank's for phase 2), speedup over bf16 one-GPU (`vs_bf16_1gpu`) and over bf16
with the same parallelism (`vs_bf16_same`), scaling efficiency (one-GPU ms of the same
model / (ranks x ms)), peak and resident GiB per GPU (max over ranks), all-to-all bytes per
rank per forward (counted from the shapes: fp8_fx.distributed.context_parallel.wire_bytes)
and the collectives' GPU time in one profiled forward, the output's error against
`bf16_1gpu`'s, compile seconds (first call) and fp8_fx's report in numbers (graphs count
every compile of the model copy so far: one for its block on one GPU, then two under
context parallelism, where blocks.0 holds diffusers' split hook and recompiles apart).
Targets (issue 16): `fp8_fx_cp` at 720p >= 1.9x `fp8_fx_1gpu` on 2 GPUs, and its
`vs_bf16_same` >= `fp8_fx_1gpu`'s `vs_bf16_1gpu`.
"""
from __future__ import annotations

import argparse
import collections
import copy
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import fp8_fx
from fp8_fx.distributed.context_parallel import enable_context_parallel, wire_bytes

LATENTS = {32760: (21, 60, 104), 75600: (21, 90, 160)}  # 480p / 720p, 81 frames (C=16 latents)
TINY_LATENT = (2, 8, 8)  # 32 tokens: splits over 2 or 4 ranks
ONE_GPU = ("bf16_1gpu", "fp8_fx_1gpu", "fp8_fx_attn_1gpu")
PARALLEL = ("bf16_cp", "fp8_fx_cp", "fp8_fx_attn_cp", "fp8_fx_cp_fp8wire")
DEFAULT_VARIANTS = "bf16_1gpu,fp8_fx_1gpu,bf16_cp,fp8_fx_cp,fp8_fx_cp_fp8wire"
# each parallel variant's one-GPU counterpart (its scaling efficiency)
ONE_GPU_OF = {"bf16_cp": "bf16_1gpu", "fp8_fx_cp": "fp8_fx_1gpu", "fp8_fx_attn_cp": "fp8_fx_attn_1gpu",
              "fp8_fx_cp_fp8wire": "fp8_fx_1gpu"}
# which model copy each variant runs: variants of one copy share its weights and its compile
COPY = {"bf16_1gpu": "bf16", "bf16_cp": "bf16", "fp8_fx_1gpu": "fp8", "fp8_fx_cp": "fp8",
        "fp8_fx_attn_1gpu": "fp8_attn", "fp8_fx_attn_cp": "fp8_attn", "fp8_fx_cp_fp8wire": "fp8_wire"}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node N benchmarks/bench_parallel.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="14B", choices=("14B", "1.3B", "tiny"))
    p.add_argument("--tokens", default="75600,32760", help="comma list of 32760 (480p), 75600 (720p); "
                                                         "ignored for --model tiny")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {ONE_GPU + PARALLEL}")
    p.add_argument("--granularity", default="tensor", choices=("tensor", "row"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", default=None, help="append the rows to this JSON list (rank 0)")
    args = p.parse_args(argv)
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in ONE_GPU + PARALLEL]
    if unknown:
        p.error(f"unknown variants {unknown}: choose from {ONE_GPU + PARALLEL}")
    return args


class Run:
    """The process group, this rank's device and dtype, and the collective helpers."""

    def __init__(self, device: str):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if device == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
            torch.cuda.set_device(self.device)
            self.dtype = torch.bfloat16
        else:
            self.device, self.dtype = torch.device("cpu"), torch.float32  # CPU FP8 is emulated in fp32

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def max_over_ranks(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.cuda else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def ms(self, fn, iters: int) -> float:
        """Mean ms per call of `fn` on this rank (CUDA events; the CPU's clock in a dry run)."""
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters

    def memory(self, fn) -> dict:
        """GiB resident before one call of `fn` and at its peak (None in a dry run)."""
        if not self.cuda:
            return dict(resident_gib=None, peak_gib=None)
        self.sync()
        resident = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        self.sync()
        return dict(resident_gib=round(resident / 2**30, 2),
                    peak_gib=round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2))

    def collective_ms(self, fn) -> float | None:
        """GPU time of the NCCL kernels in one profiled call of `fn` (None in a dry run)."""
        if not self.cuda:
            return None
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            self.sync()
        return sum(e.device_time for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and "nccl" in e.name.lower()) / 1e3


def build_models(args, run: Run) -> dict:
    """One model copy per kind the variants need, the same weights on every rank."""
    kinds = {COPY[v] for v in args.variants}
    bf16 = fp8_fx.wan.build_wan(args.model, dtype=run.dtype, device=run.device, seed=0)
    for p in bf16.parameters():  # one model on every rank, whatever each device's random stream
        dist.broadcast(p.data, src=0)
    models = {"bf16": bf16} if "bf16" in kinds else {}
    fp8_kinds = [kind for kind in ("fp8", "fp8_attn", "fp8_wire") if kind in kinds]
    if fp8_kinds:  # converted once, then copied
        fp8 = copy.deepcopy(bf16)
        fp8_fx.convert_to_fp8(fp8, fp8_config(args, run, attention=False))
        models.update({kind: fp8 if i == 0 else copy.deepcopy(fp8) for i, kind in enumerate(fp8_kinds)})
    return models


def fp8_config(args, run: Run, attention: bool) -> fp8_fx.FP8Config:
    return fp8_fx.FP8Config(granularity=args.granularity,
                            attention=fp8_fx.AttentionConfig() if attention else None,
                            fallback="emulate" if not run.cuda else "weight_only")


def compile_model(model, kind: str, args, run: Run):
    """Regional compilation; returns fp8_fx's backend (its report) or None for bf16."""
    if kind == "bf16":
        model.compile_repeated_blocks(dynamic=False)
        return None
    backend = fp8_fx.make_fp8_backend(fp8_config(args, run, attention=kind == "fp8_attn"), name=kind)
    model.compile_repeated_blocks(backend=backend, dynamic=False)
    return backend


def inputs(args, run: Run, tokens: int):
    g = torch.Generator().manual_seed(1)  # the same inputs on every rank
    latent = TINY_LATENT if args.model == "tiny" else LATENTS[tokens]
    text_dim = 64 if args.model == "tiny" else 4096
    hidden = torch.randn(1, 16, *latent, generator=g).to(run.device, run.dtype)
    text = torch.randn(1, fp8_fx.wan.TEXT_TOKENS[args.model], text_dim, generator=g).to(run.device, run.dtype)
    return hidden, torch.tensor([500.0], device=run.device), text


def bench_phase(names, models, backends, args, run: Run, tokens: int, parallel: bool):
    """Compile (first call), then time interleaved: (rows by variant name on rank 0, else {};
    each variant's output, on the ranks that ran it)."""
    hidden, timestep, text = inputs(args, run, tokens)
    acting = parallel or run.rank == 0

    def forward(name):
        with torch.no_grad():
            return models[COPY[name]](hidden, timestep, text, return_dict=False)[0]

    rows, outputs = {}, {}
    for name in names:
        dist.barrier()
        if not acting:
            continue
        t0 = time.perf_counter()
        outputs[name] = forward(name).float().cpu()
        run.sync()
        rows[name] = dict(variant=name, compile_s=round(time.perf_counter() - t0, 1),
                          **run.memory(lambda: forward(name)))
        if parallel:
            rows[name]["collective_ms"] = run.collective_ms(lambda: forward(name))
    times = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            dist.barrier()
            if acting:
                times[name].append(run.ms(lambda: forward(name), args.iters))
    for name in names:
        ms = statistics.median(times[name]) if acting else 0.0
        peak = (rows.get(name) or {}).get("peak_gib")
        resident = (rows.get(name) or {}).get("resident_gib")
        if parallel:  # the slowest rank's time and the largest memory
            ms = run.max_over_ranks(ms)
            peak = run.max_over_ranks(peak) if peak is not None else None
            resident = run.max_over_ranks(resident) if resident is not None else None
        if run.rank == 0:
            rows[name].update(ms=round(ms, 3), peak_gib=peak, resident_gib=resident,
                              spread_ms=round(max(times[name]) - min(times[name]), 3))
            backend = backends.get(COPY[name])
            if backend is not None:
                rows[name]["report"] = report_counts(backend.report)
    return rows if run.rank == 0 else {}, outputs


def report_counts(report) -> dict:
    """fp8_fx's report in numbers: graphs, linears and attention calls by action, and the
    reasons of the attention calls left as they were."""
    count = lambda records: dict(collections.Counter(d.action for d in records))  # noqa: E731
    return dict(graphs=len(report.graphs), linears=count(report.records), attention=count(report.attention),
                attention_skipped=sorted({d.reason for d in report.attention if not d.converted}))


def main(argv=None) -> list:
    args = parse(argv)
    # NVLink multicast stays off (the device machines set these; a program that uses it can
    # take a shared host's GPUs out of service): keep them whatever the launcher passed
    for name, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                        ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ[name] = value
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))  # rank 0 compiles alone in phase 1
    try:
        return _main(args, Run(args.device))
    finally:
        if own_group:
            dist.destroy_process_group()


def _main(args, run: Run) -> list:
    from diffusers import ContextParallelConfig
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_parallel: --device cuda needs GPUs (--device cpu dry-runs it)")
    if run.world == 1 and any(v in PARALLEL for v in args.variants):
        print("bench_parallel: one rank: the one-GPU variants only (context parallelism needs two or more)",
              flush=True)
        args.variants = [v for v in args.variants if v in ONE_GPU]
    models = build_models(args, run)
    backends = {kind: compile_model(m, kind, args, run) for kind, m in models.items() if kind != "fp8_wire"}
    one_gpu = [v for v in args.variants if v in ONE_GPU]
    parallel = [v for v in args.variants if v in PARALLEL]
    token_counts = [32] if args.model == "tiny" else [int(t) for t in args.tokens.split(",")]
    all_rows = []
    phase1 = {t: bench_phase(one_gpu, models, backends, args, run, t, parallel=False) for t in token_counts}

    # phase 2: Ulysses over every rank, the models changed in place
    for kind, model in models.items() if parallel else ():  # none with one rank
        enable_context_parallel(model, ContextParallelConfig(ulysses_degree=run.world),
                                wire="fp8" if kind == "fp8_wire" else "native")
    if "fp8_wire" in models and parallel:  # compiled after its processor is in (the others recompile for the slices)
        backends["fp8_wire"] = compile_model(models["fp8_wire"], "fp8", args, run)
    config = models[next(iter(models))].config
    heads, head_dim, blocks = config.num_attention_heads, config.attention_head_dim, config.num_layers
    for tokens in token_counts:
        rows1, outs1 = phase1[tokens]
        rows2, outs2 = bench_phase(parallel, models, backends, args, run, tokens, parallel=True)
        if run.rank != 0:
            continue
        rows = {**rows1, **rows2}
        outputs = {**outs1, **outs2}
        reference = outputs.get("bf16_1gpu")
        for name, row in rows.items():
            same_parallel = "bf16_cp" if name in PARALLEL else "bf16_1gpu"
            one = ONE_GPU_OF.get(name)
            row.update(model=args.model, tokens=tokens, ranks=run.world if name in PARALLEL else 1,
                       device=torch.cuda.get_device_name(run.device) if run.cuda else "cpu (dry run)",
                       torch=torch.__version__, granularity=args.granularity)
            if "bf16_1gpu" in rows:
                row["vs_bf16_1gpu"] = round(rows["bf16_1gpu"]["ms"] / row["ms"], 3)
            if same_parallel in rows:
                row["vs_bf16_same"] = round(rows[same_parallel]["ms"] / row["ms"], 3)
            if one in rows:
                row["scaling_efficiency"] = round(rows[one]["ms"] / (run.world * row["ms"]), 3)
            if name in PARALLEL:
                wire = "fp8" if name == "fp8_fx_cp_fp8wire" else "native"
                local_tokens = (32 if args.model == "tiny" else tokens) // run.world
                row["all_to_all_bytes"] = blocks * wire_bytes(1, local_tokens, heads, head_dim, run.world, wire,
                                                              itemsize=torch.finfo(run.dtype).bits // 8)
            if reference is not None:
                out = outputs[name]
                row["rel_err_vs_bf16_1gpu"] = float((out - reference).norm() / reference.norm())
            print(json.dumps(row), flush=True)
            all_rows.append(row)
    if run.rank == 0 and args.out:
        path = os.path.abspath(args.out)
        previous = json.load(open(path)) if os.path.exists(path) else []
        with open(path, "w") as f:
            json.dump(previous + all_rows, f, indent=1)
    return all_rows


if __name__ == "__main__":
    main(sys.argv[1:])

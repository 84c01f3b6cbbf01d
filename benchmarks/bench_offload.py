"""Offloading with fp8_fx on one GPU: peak memory, time per denoising step and the switch
between Wan 2.2 A14B's two experts, for one offloading mode per process (peak memory is
per process).

Run on the H200 (run 29, benchmarks/README.md). Its logic dry-runs on the CPU with tiny
experts (no memory numbers; every mode but group_fp8, whose CUDA streams the CPU lacks:
group_fp8_sync is the same without them; tests/test_bench_offload.py does this):

    python benchmarks/bench_offload.py --mode model_fp8 --model tiny --device cpu \
        --frames 1 --height 32 --width 32 --steps 6

    python benchmarks/bench_offload.py --mode model_fp8 --json $OUT/offload.json
    python benchmarks/bench_offload.py --mode group_fp8 --pipeline /path/to/Wan2.2-T2V-A14B-Diffusers

Without --pipeline the two experts are random-weight Wan 14B DiTs (fp8_fx.wan.build_wan,
the second a copy of the first: values do not matter for memory or time). The pipeline
runs the transformers only: random text embeddings (512 tokens), output_type="latent"
(no text encoder, no VAE), guidance on (two forwards per step), the default 480p 81 frames.

Modes (FP8 ones compile with fp8_fx.compile_experts(pipe, config, fp8_at_rest=True), regional):
  resident_fp8          both experts' FP8 weights on the GPU, no offloading (the speed reference)
  model_fp8             + pipe.enable_model_cpu_offload(): one expert on the GPU at a time
  group_fp8             + block-level group offloading, one block per group, on a CUDA stream
  group_fp8_sync        the same without a stream (use_stream=False)
  group_disk_fp8        + block-level group offloading to a disk folder per expert (--disk)
  model_bf16            bf16 experts compiled by Inductor (compile_repeated_blocks) + model CPU
                        offload: the bf16 path people use today
  model_bf16_fp8fx_cache  bf16 experts under bare fp8_fx backends (make_fp8_backend, which
                        compile_experts refuses with offloading) + model CPU offload: measures
                        what the refusal is about (GiB of FP8 copies stranded on the GPU after
                        an expert is offloaded; re-quantization in the onload step)

One JSON row per run (appended to --json, also printed):
  peak_gib / peak_reserved_gib   max allocated / reserved during the measured pipeline call
  idle_gib                       allocated after the call (maybe_free_model_hooks has offloaded
                                 the experts: what stays is stranded)
  stranded_fp8_copies_gib        bytes of fp8_fx weight-cache copies on the GPU after the call
  steps                          per step: seconds, the expert that ran it
  step_s                         median seconds per step of each expert, its first step left out
  switch_s                       the first transformer_2 step minus transformer_2's median: the
                                 cost of switching experts (model offload: 14 GiB off, 14 on)
  first_step_s                   transformer's first step minus its median (onload at the start)
  warmup_s                       the first pipeline call (compiles), pipeline_s the measured one
  fp8_gib_per_expert             FP8 weights + scales moved per expert onload
  cudagraph_counters             Inductor's cudagraph counters (--compile-mode reduce-overhead)
Compare each mode's step_s with resident_fp8's: the difference is the offloading's cost.
Questions this answers for the README: does FP8-at-rest model offload fit 2 x 14B under
24-32 GB at 480p (peak_gib), what a step and a switch cost, whether group offloading on a
stream hides the transfers, and how large the stranded-copies problem is with bf16 weights.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

FP8_AT_REST_MODES = ("resident_fp8", "model_fp8", "group_fp8", "group_fp8_sync", "group_disk_fp8")
MODES = (*FP8_AT_REST_MODES, "model_bf16", "model_bf16_fp8fx_cache")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Modes and fields: see this file's docstring.")
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--model", default="14B", choices=("14B", "1.3B", "tiny"),
                   help="random-weight expert size without --pipeline (default 14B)")
    p.add_argument("--pipeline", help="local Wan 2.2 A14B diffusers folder: its transformer, transformer_2, "
                                      "scheduler and boundary_ratio (text encoder and VAE are not loaded)")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--steps", type=int, default=10, help="denoising steps (default 10; with shift 12 and "
                                                         "boundary 0.875 both experts run several)")
    p.add_argument("--shift", type=float, default=12.0, help="flow shift without --pipeline (default 12)")
    p.add_argument("--boundary-ratio", type=float, default=0.875, help="without --pipeline (default 0.875)")
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--guidance-scale-2", type=float, default=3.0)
    p.add_argument("--granularity", default="tensor", choices=("tensor", "row"))
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    p.add_argument("--convert-on", default=None, choices=("cuda", "cpu"),
                   help="where convert_to_fp8 quantizes (default: --device's type; cuda: layer by layer on "
                        "the GPU, faster; cpu: never more than the CPU's copy, as on a 24 GB card)")
    p.add_argument("--disk", default=None, help="group_disk_fp8: a folder with ~30 GB free (default: a "
                                                "temporary folder)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", default=None, help="append the row to this JSON list")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch
    if not torch.cuda.is_available() and (args.device.startswith("cuda") or args.convert_on == "cuda"):
        parser.error("needs a CUDA GPU (offloading moves weights between the GPU and the CPU); "
                     "--model tiny --device cpu dry-runs the script's logic")
    if args.mode == "group_fp8" and not args.device.startswith("cuda"):
        parser.error("--mode group_fp8 transfers on CUDA streams; on the CPU use group_fp8_sync (the same "
                     "without streams)")
    if args.convert_on is None:
        args.convert_on = torch.device(args.device).type
    row = run(args)
    print(json.dumps(row, indent=1))
    if args.json:
        path = Path(args.json)
        rows = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps([*rows, row], indent=1))
    return 0


def build_pipeline(args):
    import torch
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    import fp8_fx
    if args.pipeline:
        path = Path(args.pipeline)
        index = json.loads((path / "model_index.json").read_text())
        load = dict(torch_dtype=torch.bfloat16, local_files_only=True)
        t1 = WanTransformer3DModel.from_pretrained(str(path), subfolder="transformer", **load)
        t2 = WanTransformer3DModel.from_pretrained(str(path), subfolder="transformer_2", **load)
        scheduler = UniPCMultistepScheduler.from_pretrained(str(path), subfolder="scheduler")
        boundary = index.get("boundary_ratio", args.boundary_ratio)
    else:
        t1 = fp8_fx.wan.build_wan(args.model, dtype=torch.bfloat16, device="cpu")
        t2 = copy.deepcopy(t1)
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            num_train_timesteps=1000, flow_shift=args.shift)
        boundary = args.boundary_ratio
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=t1,
                       transformer_2=t2, boundary_ratio=boundary)
    return pipe


def setup(pipe, args):
    """Compile and offload as the mode says; returns fp8_fx's CompiledExperts or backends."""
    import torch
    import fp8_fx
    config = fp8_fx.FP8Config(granularity=args.granularity)
    kwargs = {} if args.compile_mode == "default" else {"mode": args.compile_mode}
    device = torch.device(args.device)
    if args.mode in FP8_AT_REST_MODES:
        experts = fp8_fx.compile_experts(pipe, config, fp8_at_rest=True, device=args.convert_on, **kwargs)
        if args.mode == "resident_fp8":
            for n in experts.names:
                getattr(pipe, n).to(device)
        elif args.mode == "model_fp8":
            pipe.enable_model_cpu_offload(device=args.device)
        else:
            disk = args.disk or tempfile.mkdtemp(prefix="fp8_fx_offload_")
            for n in experts.names:
                getattr(pipe, n).enable_group_offload(
                    onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
                    num_blocks_per_group=1, use_stream=args.mode == "group_fp8",
                    offload_to_disk_path=os.path.join(disk, n) if args.mode == "group_disk_fp8" else None)
        return experts
    if args.mode == "model_bf16":
        for n in ("transformer", "transformer_2"):
            getattr(pipe, n).compile_repeated_blocks(fullgraph=True, **kwargs)
        pipe.enable_model_cpu_offload(device=args.device)
        return None
    if args.mode == "model_bf16_fp8fx_cache":
        backends = {}
        for n in ("transformer", "transformer_2"):
            backends[n] = fp8_fx.make_fp8_backend(config, name=n)
            getattr(pipe, n).compile_repeated_blocks(backend=backends[n], fullgraph=True, **kwargs)
        pipe.enable_model_cpu_offload(device=args.device)
        return backends
    raise ValueError(args.mode)


def synchronize(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_gib(device) -> dict:
    """Peak/current GPU memory (None on the CPU: a dry run of the script's logic)."""
    import torch
    if device.type != "cuda":
        return dict(peak_gib=None, peak_reserved_gib=None, idle_gib=None)
    gib = 2 ** 30
    return dict(peak_gib=round(torch.cuda.max_memory_allocated(device) / gib, 2),
                peak_reserved_gib=round(torch.cuda.max_memory_reserved(device) / gib, 2),
                idle_gib=round(torch.cuda.memory_allocated(device) / gib, 2))


class StepClock:
    """Seconds per denoising step (callback_on_step_end, CUDA-synchronized) and which expert
    ran it (forward pre-hooks on the top modules, outside the compiled blocks)."""

    def __init__(self, pipe, device):
        self.device = device
        self.steps, self.ran, self._last = [], [], None
        self.handles = [getattr(pipe, n).register_forward_pre_hook(lambda m, a, n=n: self.ran.append(n))
                        for n in ("transformer", "transformer_2")]

    def start(self):
        synchronize(self.device)
        self.steps, self.ran, self._last = [], [], time.perf_counter()

    def callback(self, pipe, i, t, kwargs):
        synchronize(self.device)
        now = time.perf_counter()
        expert = self.ran[-1] if self.ran else "?"
        self.steps.append(dict(step=i, timestep=float(t), seconds=round(now - self._last, 4), expert=expert))
        self._last = now
        return {}


def call(pipe, args, clock, embeds):
    import torch
    generator = torch.Generator().manual_seed(0)
    clock.start()
    with torch.no_grad():
        pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, num_frames=args.frames, height=args.height,
             width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
             guidance_scale_2=args.guidance_scale_2, output_type="latent", generator=generator,
             callback_on_step_end=clock.callback)
    synchronize(clock.device)


def stranded_copies_bytes(pipe) -> int:
    from fp8_fx import weight_cache
    total = 0
    for n in ("transformer", "transformer_2"):
        for p in getattr(pipe, n).parameters():
            for entry in (p.__dict__.get(weight_cache._ATTR) or {}).values():
                for t in (entry.fp8, entry.scale):
                    if t.device.type != "cpu":
                        total += t.numel() * t.element_size()
    return total


def run(args) -> dict:
    import torch
    import fp8_fx
    device = torch.device(args.device)
    t0 = time.perf_counter()
    pipe = build_pipeline(args)
    built_s = time.perf_counter() - t0
    compiled = setup(pipe, args)
    clock = StepClock(pipe, device)
    embeds = torch.randn(1, 512, pipe.transformer.config.text_dim, dtype=torch.bfloat16, device=device)

    t0 = time.perf_counter()
    call(pipe, args, clock, embeds)  # warm-up: compiles both experts
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    call(pipe, args, clock, embeds)
    pipeline_s = time.perf_counter() - t0
    GiB = 2 ** 30

    per_expert = {}
    for n in ("transformer", "transformer_2"):
        secs = [s["seconds"] for s in clock.steps if s["expert"] == n]
        per_expert[n] = dict(steps=len(secs), first=secs[0] if secs else None,
                             median=statistics.median(secs[1:]) if len(secs) > 1 else None)
    t2 = per_expert["transformer_2"]
    t1 = per_expert["transformer"]
    row = dict(
        mode=args.mode, model=args.pipeline or args.model,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
        torch=torch.__version__, frames=args.frames, height=args.height, width=args.width, steps=args.steps,
        guidance=(args.guidance_scale, args.guidance_scale_2), granularity=args.granularity,
        compile_mode=args.compile_mode, convert_on=args.convert_on,
        **memory_gib(device),
        stranded_fp8_copies_gib=round(stranded_copies_bytes(pipe) / GiB, 2),
        steps_detail=clock.steps,
        step_s={n: e["median"] for n, e in per_expert.items()},
        switch_s=(round(t2["first"] - t2["median"], 3) if t2["median"] is not None else None),
        first_step_s=(round(t1["first"] - t1["median"], 3) if t1["median"] is not None else None),
        warmup_s=round(warmup_s, 1), pipeline_s=round(pipeline_s, 2), build_s=round(built_s, 1),
        fp8_gib_per_expert={n: round(fp8_fx.fp8_weight_bytes(getattr(pipe, n))["fp8"] / GiB, 2)
                            for n in ("transformer", "transformer_2")},
        host_rss_gib=_rss_gib(),
        cudagraph_counters={k: v for k, v in torch._dynamo.utils.counters["inductor"].items() if "cudagraph" in k},
    )
    if isinstance(compiled, fp8_fx.CompiledExperts):
        row.update(calls=compiled.calls, report=compiled.report.summary(),
                   offloading={n: [str(o) for o in f] for n, f in compiled.offloading().items()})
    elif isinstance(compiled, dict):
        row.update(report="\n".join(f"{n}: {len(b.report)} records in {len(b.graphs)} graphs"
                                    for n, b in compiled.items()))
    for n, e in per_expert.items():
        if e["steps"] < 2:
            row.setdefault("warnings", []).append(f"{n} ran {e['steps']} step(s): raise --steps for its median")
    return row


def _rss_gib():
    try:
        import resource
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB on Linux
    except Exception:  # noqa: BLE001 - informative only
        return None


if __name__ == "__main__":
    sys.exit(main())

"""The whole Wan text-to-video pipeline (text encoder, transformer, VAE) in bf16 and in FP8,
from the same prompt, seed and latents: a side-by-side video, per-frame PSNR/SSIM of the
decoded videos, the transformer's per-step velocity error and the time per step.

    python -m fp8_fx demo --pipeline PATH --prompt "a cat surfing" \\
        --frames 81 --height 480 --width 832 --steps 50 --device cuda --video cat.mp4

PATH is a local diffusers `WanPipeline` folder (model_index.json, tokenizer/, text_encoder/,
transformer/, vae/, scheduler/); nothing is downloaded. No checkpoint at hand? Save a tiny
random one (CPU, seconds) and run the command on it:

    python -c "import fp8_fx.pipeline_demo as p; p.save_tiny_pipeline('tiny_wan_pipeline')"

Needs the `pipeline` extra: pip install -e ".[pipeline]" (transformers, PyAV, and `wan`).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .demo import (DTYPES, UsageError, _sync, cosine, finish, first_steps_of_each_kind, rel_err, summarize,
                   validate)
from .denoising_steps import chained_step_callback

INSTALL = "pip install -e '.[pipeline]'  (or pip install 'fp8_fx[pipeline]')"
# (module to import, pip name) for everything --pipeline needs beyond torch
NEEDS = (("diffusers", "diffusers"), ("transformers", "transformers"), ("av", "av"),
         ("skimage", "scikit-image"), ("tqdm", "tqdm"))
# options of the DiT-only demo that mean nothing here, and what to do instead
NOT_WITH_PIPELINE = {
    "model": "the transformer comes from PATH/transformer",
    "checkpoint": "the transformer comes from PATH/transformer (--checkpoint is the DiT-only demo's)",
    "text_embeds": "the pipeline's own text encoder encodes --prompt",
}
DEFAULT_VIDEO = "wan_bf16_vs_fp8.mp4"


class PipelineError(ValueError):
    """PATH is not a loadable Wan text-to-video pipeline folder, or it cannot run as asked."""


# ---------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The --pipeline options (demo.build_parser adds them to the demo's parser)."""
    g = parser.add_argument_group(
        "whole pipeline (--pipeline PATH)",
        "Run a local diffusers WanPipeline folder end to end (umT5 text encoder, transformer, VAE)\n"
        "in --dtype and in FP8 from the same prompt, seed and latents; write the two videos side by\n"
        "side (left: --dtype, right: FP8); report per-frame PSNR/SSIM, per-step velocity error and\n"
        "time per step. --frames --height --width --steps --seed --device --dtype --granularity\n"
        "--fallback --attention --json --plot apply; --shift, if given, replaces the scheduler's.\n"
        "Needs: " + INSTALL)
    g.add_argument("--pipeline", metavar="PATH",
                   help="local diffusers WanPipeline folder (e.g. Wan2.1-T2V-1.3B-Diffusers); "
                        "fp8_fx.pipeline_demo.save_tiny_pipeline(PATH) writes a tiny random one")
    g.add_argument("--prompt", help="the text prompt (required with --pipeline)")
    g.add_argument("--negative-prompt", default="", help="negative prompt for guidance (default empty)")
    g.add_argument("--guidance-scale", type=float, default=5.0,
                   help="classifier-free guidance (Wan: 5.0; <= 1 turns it off: one forward per step)")
    g.add_argument("--video", default=DEFAULT_VIDEO,
                   help=f"side-by-side H.264 .mp4 to write (default {DEFAULT_VIDEO})")
    g.add_argument("--fps", type=int, default=16, help="frames per second of the video (Wan: 16)")
    g.add_argument("--baseline", choices=("compiled", "eager"), default="compiled",
                   help="the --dtype transformer torch.compile'd with Inductor (default: fair "
                        "timing) or eager, as diffusers runs it (one compile less)")


def given_options(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> set:
    """The destinations the user wrote on the command line (not defaults)."""
    saved = [(a, a.default) for a in parser._actions]
    for action, _ in saved:
        action.default = argparse.SUPPRESS
    try:
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in saved:
            action.default = default


def missing_packages() -> List[str]:
    return [pip for module, pip in NEEDS if importlib.util.find_spec(module) is None]


def check_folder(path: Path) -> dict:
    """model_index.json of a WanPipeline folder, or PipelineError saying what PATH is instead."""
    index = path / "model_index.json"
    if not index.is_file():
        if (path / "config.json").is_file():
            raise PipelineError(f"{path} is a single model folder (config.json), not a pipeline folder "
                                "(model_index.json): for a transformer alone use --checkpoint PATH; "
                                "--pipeline needs the whole diffusers WanPipeline folder")
        raise PipelineError(f"{path} has no model_index.json: not a diffusers pipeline folder. Give the "
                            "folder of a Wan text-to-video pipeline (e.g. Wan2.1-T2V-1.3B-Diffusers: "
                            "model_index.json, tokenizer/, text_encoder/, transformer/, vae/, "
                            "scheduler/), or write a tiny random one with "
                            "fp8_fx.pipeline_demo.save_tiny_pipeline(PATH)")
    try:
        config = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{index} is not valid JSON ({e})") from e
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name != "WanPipeline":
        raise PipelineError(f"{path} holds a {name or 'pipeline of unknown class'}, not a WanPipeline: "
                            "--pipeline runs Wan text-to-video pipelines only (Wan2.1/2.2 T2V, TI2V "
                            "without an image); for the transformer alone use --checkpoint "
                            f"{path / 'transformer'}")
    missing = [c for c in ("tokenizer", "text_encoder", "vae", "scheduler")
               if not (isinstance(config.get(c), list) and config[c][0] and (path / c).is_dir())]
    if not any(isinstance(config.get(c), list) and config[c][0] and (path / c).is_dir()
               for c in ("transformer", "transformer_2")):
        missing.append("transformer")
    if missing:
        raise PipelineError(f"{path}: the WanPipeline is missing {', '.join(missing)} (listed as null in "
                            "model_index.json or no such subfolder); --pipeline needs the text encoder, "
                            "tokenizer, transformer, VAE and scheduler all in the folder")
    return config


def validate_pipeline(args, parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> None:
    given = given_options(parser, argv)
    for name, why in NOT_WITH_PIPELINE.items():
        if name in given:
            parser.error(f"--{name.replace('_', '-')} does not go with --pipeline: {why}")
    validate(args, parser)  # the demo's checks: frames, sizes, steps, device, --json/--plot paths
    args.shift_given = "shift" in given
    if not args.prompt:
        parser.error('--pipeline needs --prompt "..." (the text the video is made from)')
    if args.fps < 1:
        parser.error(f"--fps must be at least 1, got {args.fps}")
    missing = missing_packages()
    if missing:
        parser.error(f"--pipeline needs {', '.join(missing)} (not installed): {INSTALL}")
    path = Path(args.pipeline)
    if not path.exists():
        parser.error(f"--pipeline {path} does not exist (a local folder; nothing is downloaded)")
    if not path.is_dir():
        parser.error(f"--pipeline {path} is a file; give the diffusers WanPipeline folder "
                     "(for one transformer file use --checkpoint)")
    try:
        check_folder(path)
    except PipelineError as e:
        parser.error(str(e))
    video = Path(args.video)
    if video.suffix.lower() != ".mp4":
        parser.error(f"--video {video}: give a .mp4 path (H.264 in MP4 plays in every browser)")
    if video.is_dir():
        parser.error(f"--video {video} is a folder; give a file path, e.g. {video / DEFAULT_VIDEO}")
    if not video.parent.is_dir():
        parser.error(f"--video {video}: the folder {video.parent} does not exist; create it first "
                     f"(mkdir -p {video.parent}) or give another path")
    if str(video.resolve()) in {str(Path(p).resolve()) for p in (args.json, args.plot) if p}:
        parser.error(f"--video {video} is also the --json/--plot path; give each its own file")


def main(args, parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> int:
    """demo.main hands over here when --pipeline is given."""
    validate_pipeline(args, parser, argv)
    return finish(args, lambda: run_pipeline(args), print_summary, (PipelineError, UsageError))


# ---------------------------------------------------------------------------------------
# measuring


class StepRecorder:
    """Forward hooks on the transformer(s) the pipeline calls, and its step-end callback: the
    seconds and outputs (velocity) of the transformer calls of each denoising step (two with
    guidance: cond and uncond). With `reference` (another recorder's steps) each step's
    outputs are compared at once and dropped, so only one run's outputs are ever kept."""

    def __init__(self, device: torch.device, reference: Optional[List[dict]] = None):
        self.device, self.reference = device, reference
        self.steps: List[dict] = []
        self._calls: List[tuple] = []
        self._start = 0.0
        self._handles = []

    def attach(self, module: torch.nn.Module) -> None:
        self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
        self._handles.append(module.register_forward_hook(self._post, with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, module, args, kwargs):
        _sync(self.device)
        self._start = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        _sync(self.device)
        seconds = time.perf_counter() - self._start
        out = output[0] if isinstance(output, (tuple, list)) else output.sample
        self._calls.append((seconds, out.detach().float().cpu()))

    def step_end(self, pipe, i: int, t, callback_kwargs: dict) -> dict:
        """callback_on_step_end: close step i."""
        seconds = sum(s for s, _ in self._calls)
        velocity = torch.cat([o.flatten() for _, o in self._calls]) if self._calls else torch.zeros(0)
        step = dict(step=i, timestep=round(float(t), 3), seconds=seconds, calls=len(self._calls))
        if self.reference is None:
            step["velocity"] = velocity
        else:
            ref = self.reference[i]["velocity"]
            if ref.shape != velocity.shape:
                raise PipelineError(f"step {i}: the FP8 run called the transformer {len(self._calls)} "
                                    "time(s) with outputs of another shape than the baseline run")
            step.update(rel_err=rel_err(velocity, ref), cosine=cosine(velocity, ref),
                        finite=bool(torch.isfinite(velocity).all()))
        self.steps.append(step)
        self._calls = []
        return {}


def frame_psnr(a, ref) -> float:
    """PSNR in dB of one frame against a reference, both in [0, 1] (inf when identical)."""
    import numpy as np
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(ref, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def frame_ssim(a, ref) -> float:
    """SSIM of one RGB frame (H, W, 3) in [0, 1] against a reference (scikit-image)."""
    import numpy as np
    from skimage.metrics import structural_similarity
    side = min(ref.shape[:2])
    if side < 3:
        return math.nan  # SSIM needs a window of at least 3x3 pixels
    win = min(7, side if side % 2 else side - 1)
    return float(structural_similarity(np.asarray(ref, np.float64), np.asarray(a, np.float64),
                                       channel_axis=-1, data_range=1.0, win_size=win))


def video_metrics(video, ref) -> Dict[str, list]:
    """Per-frame PSNR and SSIM of `video` against `ref`, both (frames, H, W, 3) in [0, 1]."""
    if video.shape != ref.shape:
        raise ValueError(f"videos of different shapes: {video.shape} vs {ref.shape}")
    return dict(psnr_db=[frame_psnr(a, r) for a, r in zip(video, ref)],
                ssim=[frame_ssim(a, r) for a, r in zip(video, ref)])


def _stats(values: List[float], name: str) -> dict:
    worst = min(range(len(values)), key=lambda i: values[i])
    return {f"{name}_mean": statistics.mean(values), f"{name}_min": values[worst],
            f"{name}_min_frame": worst}


def to_uint8(video):
    import numpy as np
    return (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)


def write_side_by_side(path, left, right, fps: int = 16) -> dict:
    """An H.264 MP4 (yuv420p, browser-playable) of `left | right`, both (frames, H, W, 3) in
    [0, 1], written with PyAV. Returns what was written."""
    import av
    import numpy as np
    frames = to_uint8(np.concatenate([left, right], axis=2))
    count, height, width = frames.shape[:3]
    if height % 2 or width % 2:  # yuv420p halves the chroma planes
        frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        height, width = frames.shape[1:3]
    codec = next((c for c in ("libx264", "h264", "libopenh264") if c in av.codecs_available), None)
    if codec is None:
        raise PipelineError("this PyAV build has no H.264 encoder (libx264); install PyAV's wheel: "
                            "pip install --force-reinstall av")
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "16", "preset": "medium"}
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return dict(path=str(path), frames=count, width=width, height=height, fps=fps, codec=codec)


# ---------------------------------------------------------------------------------------
# running


def load_pipeline(path: Path, dtype: torch.dtype):
    """WanPipeline.from_pretrained(path) on the CPU, local files only; the VAE in fp32 (as
    Wan's own examples run it, so the two videos differ by the transformer alone)."""
    from diffusers import WanPipeline
    check_folder(path)
    try:
        return WanPipeline.from_pretrained(str(path), dtype={"default": dtype, "vae": torch.float32},
                                           local_files_only=True)
    except Exception as e:  # diffusers, transformers and safetensors each raise their own kinds
        raise PipelineError(f"could not load the WanPipeline from {path}: {type(e).__name__}: {e}") from e


def _transformers(pipe) -> Dict[str, torch.nn.Module]:
    return {n: getattr(pipe, n) for n in ("transformer", "transformer_2") if getattr(pipe, n, None) is not None}


def _check_geometry(pipe, args) -> None:
    t = next(iter(_transformers(pipe).values())).config
    spatial = pipe.vae_scale_factor_spatial * t.patch_size[1]
    temporal = pipe.vae_scale_factor_temporal
    for name in ("height", "width"):
        if getattr(args, name) % spatial:
            raise UsageError(f"--{name} {getattr(args, name)}: this pipeline needs a multiple of {spatial} "
                             f"(VAE {pipe.vae_scale_factor_spatial}x x patch {t.patch_size[1]})")
    if (args.frames - 1) % temporal:
        raise UsageError(f"--frames {args.frames}: this pipeline needs {temporal}k+1 frames")


def _fp8_config(args):
    from .config import AttentionConfig, FP8Config
    first, last = args.attention_bf16_steps
    attention = None if args.attention == "off" else AttentionConfig(
        recipe=args.attention, bf16_first_steps=first, bf16_last_steps=last)
    return FP8Config(granularity=args.granularity, fallback=args.fallback, attention=attention)


def _set_shift(pipe, shift: float) -> None:
    config = dict(pipe.scheduler.config)
    key = next((k for k in ("flow_shift", "shift") if k in config), None)
    if key is None:
        raise UsageError(f"--shift: the pipeline's {type(pipe.scheduler).__name__} has no shift setting")
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **{key: shift})


def _denoise(pipe, recorder: StepRecorder, device, prompt_embeds, negative_embeds, latents, args, label,
             backends=(), warmup=(0,)):
    """One pipeline call with the recorder on; returns the decoded video (F, H, W, 3) in [0, 1].
    Each backend is told the steps (its attention policy: AttentionConfig.bf16_*_steps)."""

    tell_backends = chained_step_callback(backends)

    def step_end(pipe, i, t, callback_kwargs):
        return tell_backends(pipe, i, t, recorder.step_end(pipe, i, t, callback_kwargs))

    pipe.set_progress_bar_config(desc=label, file=sys.stdout)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
                   latents=latents.clone(), num_frames=args.frames, height=args.height, width=args.width,
                   num_inference_steps=args.steps, guidance_scale=args.guidance_scale, output_type="np",
                   callback_on_step_end=step_end, callback_on_step_end_tensor_inputs=["latents"])
    _sync(device)
    total = time.perf_counter() - start
    video = out.frames[0]
    if len(recorder.steps) != args.steps:
        raise PipelineError(f"the pipeline ran {len(recorder.steps)} denoising steps, {args.steps} asked")
    seconds = [s["seconds"] for s in recorder.steps]
    timing = dict(summarize(seconds, warmup), pipeline_s=round(total, 2),
                  decode_and_rest_s=round(max(total - sum(seconds), 0.0), 2))
    if device.type == "cuda":
        timing["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return video, timing


def run_pipeline(args) -> dict:
    from .backend import make_fp8_backend
    from .modules import convert_to_fp8

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    path = Path(args.pipeline)
    pipe = load_pipeline(path, dtype)
    _check_geometry(pipe, args)
    if args.shift_given:
        _set_shift(pipe, args.shift)
    shift = next((pipe.scheduler.config[k] for k in ("flow_shift", "shift") if k in pipe.scheduler.config), None)
    models = _transformers(pipe)
    first = next(iter(models.values())).config
    guidance = args.guidance_scale > 1.0

    # The prompt once, with the pipeline's own text encoder; then the encoder leaves the GPU.
    pipe.text_encoder.to(device)
    with torch.no_grad():
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            args.prompt, args.negative_prompt, do_classifier_free_guidance=guidance, device=device)
    pipe.text_encoder.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    pipe.vae.to(device)
    for m in models.values():
        m.to(device)

    # The same starting noise for both runs (the pipeline's own shape rule).
    g = torch.Generator().manual_seed(args.seed)
    shape = (1, first.in_channels, (args.frames - 1) // pipe.vae_scale_factor_temporal + 1,
             args.height // pipe.vae_scale_factor_spatial, args.width // pipe.vae_scale_factor_spatial)
    latents = torch.randn(shape, generator=g).to(device)
    tokens = math.prod(s // p for s, p in zip(shape[2:], first.patch_size))
    print(f"WanPipeline {path}: {', '.join(models)} ({first.num_layers} blocks, dim "
          f"{first.num_attention_heads * first.attention_head_dim}); {args.frames} frames "
          f"{args.width}x{args.height} ({tokens} video tokens), {args.steps} steps, guidance "
          f"{args.guidance_scale}, {args.dtype} on {device}; prompt {args.prompt!r}")

    # 1. the baseline: the transformer(s) as loaded, in --dtype
    runs = {}
    base_rec = StepRecorder(device)
    for name, m in models.items():
        wrapped = torch.compile(m) if args.baseline == "compiled" else m
        setattr(pipe, name, wrapped)
        base_rec.attach(wrapped)
    label = f"{args.dtype} {args.baseline}"
    base_video, runs["baseline"] = _denoise(pipe, base_rec, device, prompt_embeds, negative_embeds, latents,
                                            args, label)
    base_rec.detach()
    for name, m in models.items():
        setattr(pipe, name, m)
    if args.baseline == "compiled":
        torch._dynamo.reset()  # drop the baseline's compiled code before the FP8 compile

    # 2. FP8: convert in place (FP8 weights at rest: the --dtype weights are not needed again,
    # so one copy of the weights is ever in memory) and compile with a backend per transformer
    config = _fp8_config(args)
    backends, fp8_rec = {}, StepRecorder(device, reference=base_rec.steps)
    for name, m in models.items():
        convert_to_fp8(m, config)
        backends[name] = make_fp8_backend(config, name=name)
        compiled = torch.compile(m, backend=backends[name])
        setattr(pipe, name, compiled)
        fp8_rec.attach(compiled)
    fp8_video, runs["fp8"] = _denoise(pipe, fp8_rec, device, prompt_embeds, negative_embeds, latents,
                                      args, "fp8 compiled", backends=list(backends.values()),
                                      warmup=first_steps_of_each_kind(args.steps, config.attention))
    fp8_rec.detach()
    for name, m in models.items():
        setattr(pipe, name, m)

    video = write_side_by_side(args.video, base_video, fp8_video, args.fps)
    metrics = video_metrics(fp8_video, base_video)
    per_step = [{k: s[k] for k in ("step", "timestep", "rel_err", "cosine", "finite")} for s in fp8_rec.steps]
    for s, b in zip(per_step, base_rec.steps):
        s["baseline_s"], s["fp8_s"] = round(b["seconds"], 4), round(fp8_rec.steps[s["step"]]["seconds"], 4)
    decisions = [(name, d) for name, b in backends.items() for d in b.report]
    return dict(
        pipeline=str(path), model=path.name, prompt=args.prompt, negative_prompt=args.negative_prompt,
        transformers=list(models), device=str(device), dtype=args.dtype, baseline=args.dtype,
        baseline_mode=args.baseline, vae_dtype="fp32", granularity=args.granularity, fallback=args.fallback,
        attention=args.attention, frames=args.frames, height=args.height, width=args.width,
        steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed, tokens=tokens,
        scheduler=type(pipe.scheduler).__name__, shift=shift, torch=torch.__version__,
        video=dict(video, left=f"{args.dtype}", right="fp8"),
        report=[dict(transformer=n, qualname=d.qualname, action=d.action, reason=d.reason,
                     in_features=d.in_features, out_features=d.out_features) for n, d in decisions],
        report_counts=dict(Counter(d.action for _, d in decisions)),
        attention_bf16_steps=list(args.attention_bf16_steps),
        attention_report=[dict(transformer=n, qualname=d.qualname, action=d.action, reason=d.reason)
                          for n, b in backends.items() for d in b.report.attention],
        report_table="\n".join(f"{n}:\n{b.report}" for n, b in backends.items()),
        bf16=runs["baseline"], fp8=runs["fp8"],
        speedup=round(runs["baseline"]["step_ms"] / runs["fp8"]["step_ms"], 3),
        fidelity=dict(per_step=per_step,
                      frames=dict(psnr_db=metrics["psnr_db"], ssim=metrics["ssim"],
                                  **_stats(metrics["psnr_db"], "psnr_db"), **_stats(metrics["ssim"], "ssim"))))


def _db(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2f}"


def print_summary(r: dict) -> None:
    base = f"{r['baseline']} {r['baseline_mode']}"
    counts = ", ".join(f"{n} {a}" for a, n in sorted(r["report_counts"].items()))
    print(f"\nFP8 run: {', '.join(r['transformers'])} converted in place after the {r['baseline']} run "
          f"(convert_to_fp8: FP8 weights at rest), compiled with make_fp8_backend; linears "
          f"({r['granularity']}, fallback {r['fallback']}): {counts} (per linear: --json)")
    if r["attention_report"]:
        attention = Counter(d["action"] for d in r["attention_report"])
        first, last = r["attention_bf16_steps"]
        reason = next((d["reason"] for d in r["attention_report"] if d["action"] != "skipped"), "")
        print(f"attention calls: {', '.join(f'{n} {a}' for a, n in sorted(attention.items()))}"
              + (f" ({reason})" if reason else "")
              + (f"; bf16 attention at the first {first} and last {last} steps" if first or last else ""))
    calls = 2 if r["guidance_scale"] > 1 else 1
    print(f"\nTime per denoising step ({calls} transformer forward{'s' if calls > 1 else ''}; "
          "median after the first, which compiles):")
    for key, label in (("bf16", base), ("fp8", "fp8 compiled")):
        s = r[key]
        mem = f", peak {s['peak_gib']} GiB" if "peak_gib" in s else ""
        print(f"  {label:18s} {s['step_ms']:9.1f} ms/step, compile ~{s['compile_s']:.1f} s, "
              f"whole pipeline {s['pipeline_s']:.1f} s{mem}")
    if r["device"].startswith("cuda"):
        print(f"  speedup fp8 vs {base}: {r['speedup']:.2f}x")
    else:
        print("  (no FP8 tensor cores here: these times measure the fp32 emulation, not FP8 speed)")
    print(f"\nVelocity (the transformer's output) per step, FP8 vs {r['baseline']}, each run on its own "
          "trajectory:")
    for s in r["fidelity"]["per_step"]:
        print(f"  step {s['step']:3d} (t={s['timestep']:7.1f}): rel err {s['rel_err']:.4f}, "
              f"cosine {s['cosine']:.6f}")
    f = r["fidelity"]["frames"]
    print(f"\nDecoded video, FP8 vs {r['baseline']}, per frame ({r['frames']} frames):")
    print(f"  PSNR mean {_db(f['psnr_db_mean'])} dB, min {_db(f['psnr_db_min'])} dB (frame "
          f"{f['psnr_db_min_frame']})")
    print(f"  SSIM mean {f['ssim_mean']:.4f}, min {f['ssim_min']:.4f} (frame {f['ssim_min_frame']})")
    v = r["video"]
    print(f"\nwrote {v['path']} (left: {v['left']}, right: FP8; {v['frames']} frames, {v['width']}x"
          f"{v['height']}, {v['fps']} fps, H.264)")


# ---------------------------------------------------------------------------------------
# a tiny random pipeline to try the command on


def tiny_tokenizer():
    """A byte-level tokenizer built offline (every string tokenizes; 259 ids), as a
    transformers PreTrainedTokenizerFast with umT5's special tokens (pad 0, eos 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512)


def build_tiny_pipeline(seed: int = 0):
    """A WanPipeline with random weights, small enough for a CPU: umT5 encoder (2 layers,
    d_model 64), the tiny Wan DiT (fp8_fx.wan "tiny": 2 blocks, dim 64, text_dim 64), a
    small AutoencoderKLWan (4x temporal, 8x spatial, 16 latent channels), Wan's UniPC
    flow scheduler. Built offline."""
    missing = [p for m, p in NEEDS + (("tokenizers", "tokenizers"),) if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"a tiny Wan pipeline needs {', '.join(missing)}: {INSTALL}")
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from .wan import WAN_CONFIGS, build_wan
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=WAN_CONFIGS["tiny"]["text_dim"], d_kv=16, d_ff=128, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1)).eval()
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    transformer = build_wan("tiny", dtype=torch.float32, seed=seed)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)


def save_tiny_pipeline(path, seed: int = 0) -> Path:
    """Write a tiny random WanPipeline (build_tiny_pipeline) to the folder `path`, for
    `python -m fp8_fx demo --pipeline path --prompt ...` without a real checkpoint."""
    path = Path(path)
    build_tiny_pipeline(seed).save_pretrained(str(path))
    return path

"""The main job: the same Wan denoising loop in bf16 and in FP8, side by side.

    python examples/wan_fp8.py            # tiny random Wan DiT on CPU, about a minute
    python -m fp8_fx demo --model 1.3B --device cuda --frames 81 --height 480 --width 832
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from .backend import make_fp8_backend
from .config import ATTENTION_RECIPES, AttentionConfig, FP8Config
from .denoising_steps import DenoisingSteps
from .modules import FP8Linear
from .wan import TEXT_TOKENS, WAN_CONFIGS, CheckpointError, build_wan, latent_shape, load_wan

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_parser(prog: str = "python -m fp8_fx demo") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help=f"preset size: {', '.join(WAN_CONFIGS)} (default tiny)")
    p.add_argument("--checkpoint", help="local diffusers folder or .safetensors file (diffusers or "
                   "original Wan2.1 names, or an FP8 file from fp8_fx.save_fp8_checkpoint); overrides "
                   "--model's weights")
    p.add_argument("--frames", type=int, default=17, help="video frames, 4k+1 (default 17)")
    p.add_argument("--height", type=int, default=128, help="pixels, multiple of 16 (default 128)")
    p.add_argument("--width", type=int, default=128, help="pixels, multiple of 16 (default 128)")
    p.add_argument("--steps", type=int, default=8, help="denoising steps (default 8)")
    p.add_argument("--shift", type=float, default=5.0, help="flow-matching shift (Wan: 5.0; 3.0 at 480p)")
    p.add_argument("--granularity", choices=("tensor", "row"), default="tensor")
    p.add_argument("--fallback", choices=("emulate", "weight_only"), default="emulate",
                   help="without FP8 tensor cores (CPU): 'emulate' reproduces the GPU's FP8 numerics "
                        "(default here, so the fidelity numbers mean something on CPU); "
                        "'weight_only' keeps FP8 weights and computes in bf16")
    p.add_argument("--attention", choices=("off", *ATTENTION_RECIPES), default="off",
                   help="FP8 self-attention (attn1) with this recipe as well (default off); on a GPU "
                        "'tensor' runs cuDNN's FP8 kernel (Hopper, nvidia-cudnn-frontend) and "
                        "'smooth_int8' fp8_fx's Triton kernel (sm89+); elsewhere --fallback emulate "
                        "runs the recipe in fp32")
    p.add_argument("--attention-bf16-steps", default="0,0", metavar="FIRST,LAST",
                   help="with --attention: keep attention in bf16 for the first FIRST and the last LAST "
                        "denoising steps (default 0,0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-embeds", help="a torch.save'd tensor (1, tokens, text_dim) of text "
                   "embeddings; default: random")
    p.add_argument("--json", help="write every number printed here to this JSON file")
    p.add_argument("--plot", help="write a PNG of the per-step error to this file")
    from .pipeline_demo import add_arguments  # --pipeline PATH: the whole WanPipeline
    add_arguments(p)
    return p


class UsageError(ValueError):
    """A bad argument found past argparse: validate turns it into parser.error, main (for what
    only the loaded model can tell) into exit status 2 with the message."""


def load_text_embeds(path: str) -> torch.Tensor:
    try:
        text = torch.load(path, map_location="cpu")
    except Exception as e:  # pickle, zip and weights_only errors alike
        raise UsageError(f"--text-embeds {path}: torch.load cannot read it ({type(e).__name__}: {e}); "
                         "give a file written by torch.save(tensor, path)") from e
    if not isinstance(text, torch.Tensor):
        raise UsageError(f"--text-embeds {path} holds a {type(text).__name__}, not a tensor; "
                         "torch.save the (1, tokens, text_dim) embeddings tensor itself")
    return text


def check_text_dim(text: torch.Tensor, text_dim: int, path: str) -> None:
    if text.dim() != 3 or text.shape[0] != 1 or text.shape[-1] != text_dim:
        raise UsageError(f"--text-embeds {path} has shape {tuple(text.shape)}; this model expects "
                         f"(1, tokens, text_dim) = (1, tokens, {text_dim}): one prompt's text-encoder "
                         "output (umT5 for Wan)")


def validate(args, parser: argparse.ArgumentParser) -> None:
    if args.model not in WAN_CONFIGS:
        parser.error(f"unknown --model {args.model!r}: choose one of {', '.join(WAN_CONFIGS)}")
    if args.frames < 1 or (args.frames - 1) % 4:
        parser.error(f"--frames must be 4k+1 (1, 5, ..., 81), got {args.frames}")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v < 16 or v % 16:
            parser.error(f"--{name} must be a positive multiple of 16, got {v}")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if isinstance(args.attention_bf16_steps, str):
        parts = args.attention_bf16_steps.split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            parser.error(f"--attention-bf16-steps takes FIRST,LAST (whole numbers, e.g. 2,2), "
                         f"got {args.attention_bf16_steps!r}")
        args.attention_bf16_steps = tuple(int(p) for p in parts)
    if args.attention == "off" and any(args.attention_bf16_steps):
        parser.error("--attention-bf16-steps applies to FP8 attention: add --attention tensor (or smooth_int8)")
    if not args.shift > 0:
        parser.error(f"--shift must be > 0 (flow matching shifts the timesteps by it; Wan uses 5.0, "
                     f"3.0 at 480p), got {args.shift}")
    try:
        torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device; use cpu, cuda or cuda:N")
    if args.checkpoint and not Path(args.checkpoint).exists():
        parser.error(f"--checkpoint {args.checkpoint} does not exist (local paths only; nothing is downloaded)")
    if args.text_embeds and not Path(args.text_embeds).exists():
        parser.error(f"--text-embeds {args.text_embeds} does not exist")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda given but no CUDA GPU is visible")
    for name, example in (("json", "demo.json"), ("plot", "err.png")):  # fail now, not after the run
        path = getattr(args, name)
        if path is None:
            continue
        folder = Path(path).parent
        if Path(path).is_dir():
            parser.error(f"--{name} {path} is a folder; give a file path, e.g. {Path(path) / example}")
        if not folder.is_dir():
            parser.error(f"--{name} {path}: the folder {folder} does not exist; create it first "
                         f"(mkdir -p {folder}) or give another path")
        if not os.access(folder, os.W_OK):
            parser.error(f"--{name} {path}: the folder {folder} is not writable; give a path in a "
                         "writable folder")
    if args.text_embeds:  # read and check it now, not after building and compiling the model
        try:
            text = load_text_embeds(args.text_embeds)
            if not args.checkpoint:  # a checkpoint's text_dim is known once it is loaded (run)
                check_text_dim(text, WAN_CONFIGS[args.model]["text_dim"], args.text_embeds)
        except UsageError as e:
            parser.error(str(e))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def denoise(model: Callable, latents: torch.Tensor, text: torch.Tensor, steps: int, shift: float,
            dtype: torch.dtype, desc: str, set_step: Optional[Callable[[int, int], None]] = None):
    """Wan's flow-matching loop. Returns final latents, the velocity of each step, step seconds.
    `set_step(i, steps)` is called before step i (FP8Backend.set_step: the attention policy)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from tqdm.auto import tqdm

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps, device=latents.device)
    velocities, seconds = [], []
    with torch.no_grad():
        for i, t in enumerate(tqdm(scheduler.timesteps, desc=desc, file=sys.stdout)):
            if set_step is not None:
                set_step(i, steps)
            _sync(latents.device)
            start = time.perf_counter()
            v = model(latents.to(dtype), t.expand(latents.shape[0]), text, return_dict=False)[0]
            _sync(latents.device)
            seconds.append(time.perf_counter() - start)
            velocities.append(v.float())
            latents = scheduler.step(v.float(), t, latents, return_dict=False)[0].float()
    return latents, velocities, seconds


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def cosine(a: torch.Tensor, ref: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), ref.double().flatten(), dim=0).item()


def psnr_db(a: torch.Tensor, ref: torch.Tensor) -> float:
    data_range = (ref.max() - ref.min()).double().item()
    mse = ((a.double() - ref.double()) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def ssim(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean SSIM over latent frames, channels as colour (scikit-image)."""
    from skimage.metrics import structural_similarity
    a, ref = a[0].double().cpu().numpy(), ref[0].double().cpu().numpy()  # (C, F, H, W)
    data_range = float(ref.max() - ref.min())
    side = min(ref.shape[2:])
    if side < 3:
        return math.nan  # SSIM needs a window of at least 3x3 latent pixels
    win = min(7, side if side % 2 else side - 1)  # odd, no larger than the frame
    return statistics.mean(
        structural_similarity(ref[:, f], a[:, f], channel_axis=0, data_range=data_range, win_size=win)
        for f in range(ref.shape[1]))


def summarize(seconds: List[float], warmup: Sequence[int] = (0,)) -> dict:
    """Median step time over the steps that did not run a graph for the first time
    (`warmup`: step 0, and with an attention policy the first step of each precision)."""
    steady = [s for i, s in enumerate(seconds) if i not in warmup] or seconds
    step = statistics.median(steady)
    return dict(step_ms=round(step * 1e3, 2), first_step_s=round(seconds[0], 2),
                compile_s=round(sum(max(seconds[i] - step, 0.0) for i in warmup if i < len(seconds)), 2),
                steps_s=[round(s, 4) for s in seconds])


def first_steps_of_each_kind(steps: int, attention: Optional[AttentionConfig]) -> List[int]:
    """The steps that run a compiled graph for the first time: with the attention policy,
    the first bf16-attention step and the first FP8-attention step."""
    if attention is None:
        return [0]
    policy = DenoisingSteps(attention)  # the backend's own rule, step by step
    kinds = []
    for i in range(steps):
        policy.set(i, steps)
        kinds.append(policy.fp8_attention_now())
    return sorted({kinds.index(k) for k in set(kinds)})


def run(args) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.checkpoint:
        transformer = load_wan(args.checkpoint, dtype=dtype, device=device)
    else:
        transformer = build_wan(args.model, dtype=dtype, device=device, seed=args.seed)
    cfg = transformer.config
    g = torch.Generator().manual_seed(args.seed)
    latents = torch.randn(latent_shape(args.frames, args.height, args.width, cfg.in_channels), generator=g)
    if args.text_embeds:
        text = load_text_embeds(args.text_embeds)
        check_text_dim(text, cfg.text_dim, args.text_embeds)
    else:
        text = torch.randn(1, TEXT_TOKENS.get(args.model, 512), cfg.text_dim, generator=g)
    latents, text = latents.to(device), text.to(device, dtype)
    tokens = math.prod(s // p for s, p in zip(latents.shape[2:], cfg.patch_size))
    print(f"Wan DiT {args.checkpoint or args.model}: {cfg.num_layers} blocks, dim "
          f"{cfg.num_attention_heads * cfg.attention_head_dim}, {tokens} video tokens, {args.steps} steps, "
          f"{args.dtype} on {device}")
    fp8_weights = any(isinstance(m, FP8Linear) for m in transformer.modules())
    baseline = f"{args.dtype}+fp8w" if fp8_weights else args.dtype
    if fp8_weights:
        print(f"FP8 checkpoint: the baseline run ({baseline}) is the weight-only FP8 model (FP8 weights, "
              f"{args.dtype} compute), so the fidelity below is that of FP8 activations alone")

    results = {}
    first, last = args.attention_bf16_steps
    attention = None if args.attention == "off" else AttentionConfig(
        recipe=args.attention, bf16_first_steps=first, bf16_last_steps=last)
    backend = make_fp8_backend(FP8Config(granularity=args.granularity, fallback=args.fallback,
                                         attention=attention))
    for name, compiled in (("baseline", torch.compile(transformer)),
                           ("fp8", torch.compile(transformer, backend=backend))):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        final, velocities, seconds = denoise(compiled, latents, text, args.steps, args.shift, dtype,
                                             desc=f"{baseline if name == 'baseline' else name} compiled",
                                             set_step=backend.set_step if name == "fp8" else None)
        warmup = first_steps_of_each_kind(args.steps, attention) if name == "fp8" else [0]
        results[name] = dict(final=final, velocities=velocities, **summarize(seconds, warmup))
        if device.type == "cuda":
            results[name]["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)

    base, fp8 = results["baseline"], results["fp8"]
    per_step = [dict(step=i, rel_err=rel_err(v8, v16), cosine=cosine(v8, v16))
                for i, (v8, v16) in enumerate(zip(fp8["velocities"], base["velocities"]))]
    final = dict(psnr_db=psnr_db(fp8["final"], base["final"]), ssim=ssim(fp8["final"], base["final"]),
                 rel_err=rel_err(fp8["final"], base["final"]), cosine=cosine(fp8["final"], base["final"]))
    strip = ("final", "velocities")
    return dict(
        model=args.checkpoint or args.model, device=str(device), dtype=args.dtype,
        baseline=baseline, baseline_dtype=args.dtype, fp8_weights_at_rest=fp8_weights,
        granularity=args.granularity, fallback=args.fallback, attention=args.attention,
        attention_bf16_steps=list(args.attention_bf16_steps), frames=args.frames, height=args.height,
        width=args.width, steps=args.steps, shift=args.shift, seed=args.seed, tokens=tokens,
        torch=torch.__version__,
        report=[dict(qualname=d.qualname, action=d.action, reason=d.reason, in_features=d.in_features,
                     out_features=d.out_features) for d in backend.report],
        attention_report=[dict(qualname=d.qualname, action=d.action, reason=d.reason)
                          for d in backend.report.attention],
        report_table=str(backend.report),
        bf16={k: v for k, v in base.items() if k not in strip},  # the baseline run in baseline_dtype (old key)
        fp8={k: v for k, v in fp8.items() if k not in strip},
        speedup=round(base["step_ms"] / fp8["step_ms"], 3),
        fidelity=dict(per_step=per_step, final=final))


def print_summary(r: dict) -> None:
    print("\nWhich linears became FP8, and why the others did not:")
    print(r["report_table"])
    base = r["baseline"]
    print("\nTime per step (median after the first, which compiles):")
    for name, label in (("bf16", base), ("fp8", "fp8")):
        s = r[name]
        mem = f", peak {s['peak_gib']} GiB" if "peak_gib" in s else ""
        print(f"  {label + ' compiled':18s} {s['step_ms']:9.1f} ms/step, compile ~{s['compile_s']:.1f} s{mem}")
    if r["device"].startswith("cuda"):
        print(f"  speedup fp8 vs {base}: {r['speedup']:.2f}x")
    else:  # the emulation's time on a CPU says nothing about FP8 speed: no speedup line
        print("  (no FP8 tensor cores here: these times measure the fp32 emulation, not FP8 speed)")
    print(f"\nFidelity of FP8 against {base} (velocity per step; final latents):")
    for s in r["fidelity"]["per_step"]:
        print(f"  step {s['step']:3d}: rel err {s['rel_err']:.4f}, cosine {s['cosine']:.6f}")
    f = r["fidelity"]["final"]
    print(f"  final latents: PSNR {f['psnr_db']:.1f} dB, SSIM {f['ssim']:.4f}, rel err {f['rel_err']:.4f}, "
          f"cosine {f['cosine']:.6f}")


def plot(r: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [s["step"] for s in r["fidelity"]["per_step"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [s["rel_err"] for s in r["fidelity"]["per_step"]], "o-", label="relative error")
    ax.plot(steps, [1 - s["cosine"] for s in r["fidelity"]["per_step"]], "s-", label="1 - cosine")
    ax.set_yscale("log")
    ax.set_xlabel("denoising step")
    ax.set_title(f"FP8 ({r['granularity']}) vs {r['baseline']} velocity, Wan {r['model']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Optional[List[str]] = None, prog: str = "python -m fp8_fx demo") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.pipeline is not None:  # the whole WanPipeline, bf16 vs FP8: pipeline_demo.py
        from .pipeline_demo import main as pipeline_main
        return pipeline_main(args, parser, argv)
    validate(args, parser)
    return finish(args, lambda: run(args), print_summary, (CheckpointError, UsageError))


def finish(args, run_demo: Callable[[], dict], print_summary: Callable[[dict], None], errors) -> int:
    """Run a demo; print its summary, write --json and --plot; exit status 2 on `errors`."""
    try:
        result = run_demo()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0

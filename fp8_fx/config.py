"""FP8Config (the target presets are presets.py's).

The config is the only input to the pass's decisions; it is frozen so a backend's
behaviour cannot change after it was built.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Tuple

from . import presets
# The Wan preset's entries live with the other presets; their names stay importable from here.
from .presets import (DIFFUSERS_WAN_TARGETS, FASTVIDEO_WAN_TARGETS,  # noqa: F401 - re-exported
                      ORIGINAL_WAN_TARGETS, WAN_I2V_IMAGE_KV_TARGETS, WAN_TARGETS)

Granularity = Literal["tensor", "row"]
Fallback = Literal["weight_only", "emulate"]
AttentionRecipe = Literal["tensor", "smooth_int8"]

GRANULARITIES = ("tensor", "row")
FALLBACKS = ("weight_only", "emulate")
ATTENTION_RECIPES = ("tensor", "smooth_int8")


def _entries(owner: str, field: str, value) -> Tuple[str, ...]:
    """A targets/exclude field as a tuple of valid entries, or a clear error."""
    if isinstance(value, str):
        raise TypeError(f"{owner}.{field} must be a sequence of entries, not one string "
                        f"(write ({value!r},) for a single suffix)")
    entries = tuple(value)
    bad = [e for e in entries if not isinstance(e, str) or not e or e.startswith(".") or e.endswith(".")]
    if bad:
        raise ValueError(f"{owner}.{field} has invalid entries {bad}: use dotted module-path endings "
                         "such as 'attn1.to_q', or glob patterns such as 'attn?.to_out.0'")
    return entries


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """FP8 attention: which attention modules' scaled_dot_product_attention calls run in
    FP8, and with which recipe (attention_recipes.py).

    recipe: "tensor" (default; cuDNN's FP8 attention on Hopper: one FP8 scale per Q, K,
        V, K smoothed, FP8 output) or "smooth_int8" (K smoothed, INT8 Q/K per 64-token
        block, FP8 P and V, output in the model's dtype; more accurate; fp8_fx's Triton
        kernel on sm89+: 0.46x torch's bf16 SDPA on the H200, for accuracy, not speed).
    rotate: both recipes multiply Q and K by one Hadamard matrix before quantizing (exact:
        QH (KH)^T = QK^T), which spreads outlier channels over the head dim (power-of-two
        head dims; others are not rotated).
    targets: attention module paths, matched as FP8Config.targets are. Default (None):
        the model preset's self- or joint attention (Wan: `attn1`; Flux, QwenImage,
        HunyuanVideo: `attn`; presets.py); Wan's cross-attention (`attn2`, 512 text keys,
        ~1% of the time) stays in bf16, where quantizing would cost more than it saves.
    exclude: never converted; exclude wins. Per-block entries (`blocks.0.attn1`: keep the
        first block's attention in bf16) need a whole-model compile: under regional
        compilation one graph serves every block, and such entries are refused.
    bf16_first_steps, bf16_last_steps: denoising steps whose attention runs as the model
        wrote it (bf16), the rest in FP8. The backend compiles each graph both ways once
        and picks per call by the step it was told (backend.set_step, or
        backend.step_callback as a diffusers callback_on_step_end): no recompile per step.
    """

    recipe: AttentionRecipe = "tensor"
    rotate: bool = True
    targets: Optional[Tuple[str, ...]] = None
    exclude: Tuple[str, ...] = ()
    bf16_first_steps: int = 0
    bf16_last_steps: int = 0

    def __post_init__(self):
        if self.recipe not in ATTENTION_RECIPES:
            raise ValueError(f"AttentionConfig.recipe must be one of {ATTENTION_RECIPES}, got {self.recipe!r}")
        if not isinstance(self.rotate, bool):
            raise TypeError(f"AttentionConfig.rotate must be True or False, got {self.rotate!r}")
        for field in ("bf16_first_steps", "bf16_last_steps"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"AttentionConfig.{field} must be a whole number of steps >= 0, got {value!r}")
        for field in ("targets", "exclude"):
            value = getattr(self, field)
            if value is not None or field == "exclude":
                object.__setattr__(self, field, _entries("AttentionConfig", field, value))


@dataclasses.dataclass(frozen=True)
class FP8Config:
    """What to convert and how.

    granularity: "tensor" (one dynamic scale per activation tensor and per weight)
        or "row" (one scale per token x one scale per output channel).
    targets: module paths to convert: suffixes of whole dotted components, or glob
        patterns (`*`, `?`, `[`) over the path or any dotted tail of it (targeting.py).
        None (default): the preset's.
    exclude: entries of the same kinds never converted; exclude wins over targets.
    fallback: what a targeted layer becomes where FP8 tensor cores are missing:
        "weight_only" keeps FP8 weights and multiplies in the activation dtype;
        "emulate" reproduces the FP8 path's numerics in fp32 on any device.
    fast_accum: let FP8 tensor-core GEMMs accumulate without periodic fp32 promotion
        (faster; torchao's inference default). False gives sums as exact as "emulate".
    triton_quantize: quantize activations that come straight out of library kernels
        (attention, a GEMM, or the GELU of a GEMM's output: Inductor has no producer
        kernel to fuse them into) with fp8_fx's Triton kernels (triton_quantize.py)
        instead of Inductor's standalone ones. Same numerics; False for A/B timing.
    attention: None (default: attention runs as the model wrote it) or an AttentionConfig
        for FP8 attention in the modules it targets.
    preset: where the targets come from when `targets` is not given (presets.py).
        "auto" (default): the backend chooses per graph from the classes it traced
        (FluxTransformer2DModel -> "flux", ...), falling back to "wan" with a warning.
        A name ("flux", "wan", ...): that preset, whatever the model. Given `targets`,
        it reads None (your targets, no preset). After construction `targets` always
        holds a tuple: the named preset's entries, or for "auto" the Wan preset's (what
        code without a model at hand uses: convert_to_fp8, calibrate_input_amax); so
        targets=WAN_TARGETS reads as "auto": pin Wan with preset="wan".
    """

    granularity: Granularity = "tensor"
    targets: Optional[Tuple[str, ...]] = None
    exclude: Tuple[str, ...] = ()
    fallback: Fallback = "weight_only"
    fast_accum: bool = True
    triton_quantize: bool = True
    attention: Optional[AttentionConfig] = None
    preset: Optional[str] = presets.AUTO

    def __post_init__(self):
        self._resolve_preset()
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"FP8Config.granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.fallback not in FALLBACKS:
            raise ValueError(
                f"FP8Config.fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        for field in ("targets", "exclude"):
            object.__setattr__(self, field, _entries("FP8Config", field, getattr(self, field)))
        if self.attention is not None and not isinstance(self.attention, AttentionConfig):
            raise TypeError("FP8Config.attention must be None (attention stays as it is) or an "
                            f"AttentionConfig(...), got {self.attention!r}")

    def _resolve_preset(self) -> None:
        """Fill `targets` from the preset, or set `preset` to None for the user's targets.
        A preset's own targets given back with it (dataclasses.replace) are accepted, so a
        copy keeps its preset; for "auto" that is the Wan preset's tuple."""
        preset = self.preset
        if preset is not None and not isinstance(preset, str):
            raise TypeError(f"FP8Config.preset must be a preset name, 'auto' or None, got {preset!r}")
        if preset is None:
            own = None
        elif preset == presets.AUTO:
            own = presets.FALLBACK.targets
        else:
            own = presets.get(preset).targets  # an unknown name: an error listing the known ones
        if self.targets is None:
            if own is None:
                raise ValueError("FP8Config(preset=None) means your own targets: pass targets=(...), "
                                 "or a preset name, or leave preset='auto'")
            object.__setattr__(self, "targets", own)
        elif preset == presets.AUTO:
            if _entries("FP8Config", "targets", self.targets) != own:
                object.__setattr__(self, "preset", None)  # your targets, no preset
        elif preset is not None and _entries("FP8Config", "targets", self.targets) != own:
            raise ValueError(
                f"FP8Config: pass preset={preset!r} or targets=..., not both. To add to the preset, "
                f"targets=(*fp8_fx.presets.get({preset!r}).targets, ...) (full module paths; a "
                "regionally compiled block needs its in-block names: presets.get(...).targets_for(block class))")

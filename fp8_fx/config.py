"""FP8Config and the Wan target presets.

The config is the only input to the pass's decisions; it is frozen so a backend's
behaviour cannot change after it was built.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Tuple

Granularity = Literal["tensor", "row"]
Fallback = Literal["weight_only", "emulate"]
AttentionRecipe = Literal["smooth_int8", "tensor"]

# Attention projections and FFN layers of the three Wan codebases (see README).
# Matched as whole dotted components at the end of the module path.
DIFFUSERS_WAN_TARGETS: Tuple[str, ...] = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ffn.net.0.proj", "ffn.net.2",
)
FASTVIDEO_WAN_TARGETS: Tuple[str, ...] = (
    # FastVideo's self-attention projections sit directly on the block.
    "to_q", "to_k", "to_v", "to_out",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out",
    "ffn.fc_in", "ffn.fc_out",
)
ORIGINAL_WAN_TARGETS: Tuple[str, ...] = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
    "ffn.0", "ffn.2",
)
# The I2V image-conditioning K/V projections (diffusers add_k_proj/add_v_proj,
# Wan2.1 k_img/v_img) read the CLIP image tokens: 257 tokens per sample, a
# negligible share of the FLOPs, and cross-attention is the most FP8-sensitive
# part of the block. They stay in bf16 by default; add them to `targets` to opt in.
WAN_I2V_IMAGE_KV_TARGETS: Tuple[str, ...] = (
    "attn2.add_k_proj", "attn2.add_v_proj", "cross_attn.k_img", "cross_attn.v_img",
)
# Once each: diffusers and FastVideo share the cross-attention q/k/v names.
WAN_TARGETS: Tuple[str, ...] = tuple(dict.fromkeys(
    DIFFUSERS_WAN_TARGETS + FASTVIDEO_WAN_TARGETS + ORIGINAL_WAN_TARGETS))

GRANULARITIES = ("tensor", "row")
FALLBACKS = ("weight_only", "emulate")
ATTENTION_RECIPES = ("smooth_int8", "tensor")


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

    recipe: "smooth_int8" (K smoothed, INT8 Q/K per 64-token block, FP8 P and V; output
        in the model dtype) or "tensor" (cuDNN's: one FP8 scale per Q, K, V; FP8 output).
    targets: attention module paths, matched as FP8Config.targets are. Default: Wan's
        self-attention `attn1`; cross-attention (`attn2`, 512 text keys, ~1% of the
        time) stays in bf16, where quantizing would cost more than it saves.
    exclude: never converted; exclude wins. Per-block entries (`blocks.0.attn1`: keep the
        first block's attention in bf16) need a whole-model compile: under regional
        compilation one graph serves every block, and such entries are refused.
    """

    recipe: AttentionRecipe = "smooth_int8"
    targets: Tuple[str, ...] = ("attn1",)
    exclude: Tuple[str, ...] = ()

    def __post_init__(self):
        if self.recipe not in ATTENTION_RECIPES:
            raise ValueError(f"AttentionConfig.recipe must be one of {ATTENTION_RECIPES}, got {self.recipe!r}")
        for field in ("targets", "exclude"):
            object.__setattr__(self, field, _entries("AttentionConfig", field, getattr(self, field)))


@dataclasses.dataclass(frozen=True)
class FP8Config:
    """What to convert and how.

    granularity: "tensor" (one dynamic scale per activation tensor and per weight)
        or "row" (one scale per token x one scale per output channel).
    targets: module paths to convert: suffixes of whole dotted components, or glob
        patterns (`*`, `?`, `[`) over the path or any dotted tail of it (targeting.py).
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
    """

    granularity: Granularity = "tensor"
    targets: Tuple[str, ...] = WAN_TARGETS
    exclude: Tuple[str, ...] = ()
    fallback: Fallback = "weight_only"
    fast_accum: bool = True
    triton_quantize: bool = True
    attention: Optional[AttentionConfig] = None

    def __post_init__(self):
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

"""Target presets: which linears of a known DiT run in FP8, chosen from the model's classes.

A preset converts a model's attention projections (q/k/v/out, and the added-context
ones of the MMDiT models) and its feed-forward layers, and nothing else: embedders,
modulation (the AdaLayerNorms' `norm1.linear`), the token refiners and the model's
final `proj_out` stay in their original precision.

Each diffusers preset is written per block class, as paths inside the block
(`attn.to_q`, `proj_out`). From those it has two sets of entries (targeting.py rules):
- `targets`, over full module paths and scoped to the block container
  (`single_transformer_blocks.*.proj_out`): what a whole-model graph and
  `convert_to_fp8` match. Scoping tells a single block's `proj_out` (its FFN output)
  from the model's final `proj_out`, and HunyuanVideo's text token refiner (an
  embedder, with attention of its own) from the blocks;
- `targets_for(block class)`: the block's own paths, for a graph whose root is that
  block (regional compilation, `compile_repeated_blocks`), where paths start inside it.

The Wan preset keeps the bare in-block names of the three Wan codebases (see config.py),
as fp8_fx always had them; it is also the fallback for models no preset knows.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from typing import Dict, Iterable, List, Optional, Tuple, Union

AUTO = "auto"

# ---- Wan: the three codebases' names (FP8Config's historical default) -------------------
# Attention projections and FFN layers, matched as whole dotted components at the end of
# the module path.
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


ClassLike = Union[type, str]


@dataclasses.dataclass(frozen=True)
class Preset:
    """name: what FP8Config(preset=...) takes. classes: the class names it is chosen
    from (fnmatch patterns; a subclass of one counts too): the model, its blocks, and
    modules it knows hold nothing to convert. targets: entries over full module paths.
    blocks: (block class, entries over the block's own paths) pairs. attention: the
    attention modules whose SDPA calls AttentionConfig() converts by default (suffixes:
    the self- or joint attention, not text cross-attention)."""

    name: str
    model: str  # what it is for, in words
    classes: Tuple[str, ...]
    targets: Tuple[str, ...]
    blocks: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
    attention: Tuple[str, ...] = ("attn1",)

    def applies_to(self, cls: ClassLike) -> Optional[str]:
        """The name (of `cls` or a base class) this preset knows, else None."""
        return next((n for n in _names(cls) if any(fnmatch.fnmatchcase(n, p) for p in self.classes)), None)

    def targets_for(self, root: Optional[ClassLike]) -> Tuple[str, ...]:
        """The entries for a graph Dynamo traced from a module of class `root`: a block's
        own paths when it is one of this preset's blocks, else `targets`."""
        blocks = dict(self.blocks)
        for name in _names(root) if root is not None else ():
            if name in blocks:
                return blocks[name]
        return self.targets


def _names(cls: ClassLike) -> List[str]:
    if isinstance(cls, str):
        return [cls.rpartition(".")[2]]
    return [c.__name__ for c in cls.__mro__]


# ---- the diffusers DiTs ------------------------------------------------------------------

def _in(parent: str, *names: str) -> Tuple[str, ...]:
    return tuple(f"{parent}.{n}" for n in names)


# q, k, v, out; and diffusers' fused forms (fuse_qkv_projections) of the same weights.
QKVO = ("to_q", "to_k", "to_v", "to_out.0", "to_qkv")
# The MMDiT's text-stream projections in the joint attention.
ADDED_QKVO = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_added_qkv")
# diffusers' FeedForward: net.0 is the activation module (GELU's proj), net.2 the output.
FFN = ("net.0.proj", "net.2")
# Flux-style single blocks: attention without an out projection (pre_only), and an MLP
# whose output projection `proj_out` also takes the attention output (concatenated).
SINGLE_BLOCK = (*_in("attn", "to_q", "to_k", "to_v", "to_qkv"), "proj_mlp", "proj_out")
MMDIT_BLOCK = (*_in("attn", *QKVO, *ADDED_QKVO), *_in("ff", *FFN), *_in("ff_context", *FFN))


def _diffusers(name: str, model: str, blocks: Dict[str, Tuple[str, Tuple[str, ...]]],
               attention: Tuple[str, ...]) -> Preset:
    """blocks: block class -> (the model attribute holding such blocks, entries inside one).
    A class with no entries is known and converts nothing (a text refiner, an embedder)."""
    targets = tuple(dict.fromkeys(f"{container}.*.{entry}"
                                  for container, entries in blocks.values() for entry in entries))
    return Preset(name, f"{model} (diffusers)", (model, *blocks), targets,
                  tuple((cls, entries) for cls, (_, entries) in blocks.items()), attention)


_PRESETS = (
    # Wan 2.1/2.2 in diffusers (WanTransformer3DModel, VACE), FastVideo and the original
    # code (WanModel/WanAttentionBlock): their classes are all named Wan...
    # Self-attention: diffusers' and FastVideo's attn1, original Wan2.1's self_attn.
    Preset("wan", "Wan (diffusers, FastVideo, original Wan2.1)", ("Wan*",), WAN_TARGETS,
           attention=("attn1", "self_attn")),
    _diffusers("flux", "FluxTransformer2DModel", {
        "FluxTransformerBlock": ("transformer_blocks", MMDIT_BLOCK),
        "FluxSingleTransformerBlock": ("single_transformer_blocks", SINGLE_BLOCK),
    }, attention=("attn",)),
    _diffusers("sd3", "SD3Transformer2DModel", {
        # attn2: SD3.5's second self-attention (dual_attention_layers).
        "JointTransformerBlock": ("transformer_blocks", (*MMDIT_BLOCK, *_in("attn2", *QKVO))),
    }, attention=("attn", "attn2")),
    _diffusers("hunyuan_video", "HunyuanVideoTransformer3DModel", {
        "HunyuanVideoTransformerBlock": ("transformer_blocks", MMDIT_BLOCK),
        "HunyuanVideoSingleTransformerBlock": ("single_transformer_blocks", SINGLE_BLOCK),
        # image_condition_type="token_replace" (I2V): same layers.
        "HunyuanVideoTokenReplaceTransformerBlock": ("transformer_blocks", MMDIT_BLOCK),
        "HunyuanVideoTokenReplaceSingleTransformerBlock": ("single_transformer_blocks", SINGLE_BLOCK),
        # The text token refiner is the context embedder; compile_repeated_blocks compiles
        # it (and the patch embedder) as blocks of their own.
        "HunyuanVideoTokenRefiner": ("context_embedder", ()),
        "HunyuanVideoPatchEmbed": ("x_embedder", ()),
    }, attention=("attn",)),
    _diffusers("ltx_video", "LTXVideoTransformer3DModel", {
        "LTXVideoTransformerBlock": ("transformer_blocks",
                                     (*_in("attn1", *QKVO), *_in("attn2", *QKVO), *_in("ff", *FFN))),
    }, attention=("attn1",)),
    _diffusers("cogvideox", "CogVideoXTransformer3DModel", {
        # attn1 is the joint (text + video) attention.
        "CogVideoXBlock": ("transformer_blocks", (*_in("attn1", *QKVO), *_in("ff", *FFN))),
    }, attention=("attn1",)),
    _diffusers("qwenimage", "QwenImageTransformer2DModel", {
        "QwenImageTransformerBlock": ("transformer_blocks", (*_in("attn", *QKVO, *ADDED_QKVO),
                                                             *_in("img_mlp", *FFN), *_in("txt_mlp", *FFN))),
    }, attention=("attn",)),
)
PRESETS: Dict[str, Preset] = {p.name: p for p in _PRESETS}
FALLBACK = PRESETS["wan"]


def get(name: str) -> Preset:
    """The preset called `name`, or an error that lists the known ones."""
    if name not in PRESETS:
        raise ValueError(f"fp8_fx: unknown preset {name!r}; known: {AUTO!r} (chosen from the model's "
                         f"classes), " + ", ".join(repr(n) for n in PRESETS))
    return PRESETS[name]


def choose(classes: Iterable[ClassLike]) -> Optional[Tuple[Preset, str]]:
    """The preset of the first of `classes` (or of a base class) that one knows, with the
    class it was chosen from; None when no preset knows any of them."""
    for cls in classes:
        for preset in _PRESETS:
            known = preset.applies_to(cls)
            if known:
                name = _names(cls)[0]
                return preset, name if name == known else f"{name}, a {known}"
    return None


@dataclasses.dataclass(frozen=True)
class Choice:
    """What one graph is matched against. `why`: the class it was chosen from, the
    config's preset, or the fallback's reason; `fallback`: no preset knew the classes
    (`seen`, the model's own: not torch's)."""

    preset: Preset
    why: str
    targets: Tuple[str, ...]
    fallback: bool = False
    seen: Tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.preset.name} ({self.why})"


def resolve(preset: Optional[str], root: Optional[ClassLike], classes: Iterable[ClassLike]) -> Optional[Choice]:
    """The preset for a graph traced from a module of class `root` (None: a function)
    whose layers belong to `classes`. `preset`: FP8Config.preset; None (the user's own
    targets) gives None."""
    if preset is None:
        return None
    if preset != AUTO:
        chosen = get(preset)
        return Choice(chosen, f"FP8Config(preset={preset!r})", chosen.targets_for(root))
    seen = [root, *classes] if root is not None else list(classes)
    found = choose(seen)
    if found is None:
        names = tuple(model_classes(seen))
        return Choice(FALLBACK, "fallback: no preset for " + ", ".join(names), FALLBACK.targets_for(root),
                      fallback=True, seen=names)
    chosen, name = found
    return Choice(chosen, f"from {name}", chosen.targets_for(root))


def model_classes(classes: Iterable[ClassLike]) -> List[str]:
    """The names of `classes` that say what the model is, once each: not torch's (nn.Linear,
    ModuleList, ...), fp8_fx's (FP8Linear) or PEFT's (LoRA wrappers)."""
    names = []
    for cls in classes:
        if isinstance(cls, type) and cls.__module__.split(".")[0] in ("torch", "fp8_fx", "peft"):
            continue
        names.append(_names(cls)[0])
    return list(dict.fromkeys(names)) or ["no module classes"]


def for_model(model) -> Choice:
    """The preset `FP8Config(preset="auto")` would choose for `model` (an nn.Module):
    from its own class, else from its submodules'."""
    return resolve(AUTO, type(model), (type(m) for m in model.modules()))


def config_for_model(config, model):
    """`config` with FP8Config(preset="auto") resolved for `model` as the backend would
    resolve a whole-model graph: for code that sees the model, not a graph
    (convert_to_fp8, calibrate_input_amax). Other configs come back as they are."""
    if config.preset != AUTO:
        return config
    choice = for_model(model)
    if choice.fallback:
        warnings.warn(f"fp8_fx: no target preset knows {type(model).__name__} ({', '.join(choice.seen)}); "
                      "using the Wan preset. Choose one with FP8Config(preset=...) or set targets.",
                      stacklevel=3)
    return dataclasses.replace(config, preset=None, targets=choice.targets)

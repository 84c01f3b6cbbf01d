"""Offloading (diffusers, accelerate) under an fp8_fx-compiled transformer: what works,
what is refused, and why. `compile_experts` runs these checks (at its call and before
each forward of an expert, so the order of compiling and offloading does not matter);
`check(model)` runs them on any model.

What the offloading modes do to the weights, and what that means for fp8_fx:

- `pipe.enable_model_cpu_offload()` (accelerate `CpuOffload`): `model.to(device)` before
  the model's forward when it is not there yet; the next model's hook sends it back to the CPU.
  Whole-model moves, outside the compiled blocks.
- `pipe.enable_sequential_cpu_offload()` (accelerate `AlignDevicesHook(offload=True)` on
  every module): each layer's weights live on the meta device and are loaded, as new
  Parameters, at that layer's call, in hooks Dynamo may not trace (`torch.compiler.disable`).
- group offloading (`transformer.enable_group_offload(...)`, `apply_group_offloading`):
  block level: each group of blocks is onloaded before its first block runs and offloaded
  after its last (`param.data = ...`), in `torch.compiler.disable`d calls inside the hooked
  block forward; leaf level: the same around every layer. `offload_to_disk_path` reloads
  the weights from safetensors files at every onload.

fp8_fx's weight cache (weight_cache.py) keeps the FP8 copy of a bf16 weight on the
parameter and reuses it while the parameter keeps its data pointer. Offloading that
moves weights hands the parameter new storage at each onload: the copy is made again,
on the onload device, and stays there when the weight goes back (the memory offloading
was meant to free). FP8 weights at rest (`convert_to_fp8`) need no copies: offloading
then moves the FP8 weights themselves, half of bf16's bytes. Hence the rules:

| mode | bf16 weights (FP8 copies at run time) | FP8 weights at rest |
|---|---|---|
| model CPU offload | refused when weights move (copies re-made, stranded on the GPU) | works |
| group offload, block level | refused when weights move (every block, every forward) | works |
| group offload, leaf level | refused: one graph per layer, linears left in bf16 | refused, same |
| sequential CPU offload | refused: one graph per layer, linears left in bf16 | refused, same |
| group offload to one disk folder for two experts | refused: diffusers names the files after module paths, so one expert loads the other's weights (wrong with or without fp8_fx) | refused, same |

"When weights move": onload and offload devices differ, or a disk folder is used. With
onload == offload (a CPU-only run) nothing moves and bf16 weights are fine.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from . import presets, targeting
from .config import FP8Config
from .qualname import ADAPTER, module_path

GROUP_HOOK = "group_offloading"  # diffusers.hooks.group_offloading._GROUP_OFFLOADING
MODEL, SEQUENTIAL, GROUP = "model CPU offload", "sequential CPU offload", "group offloading"
FIX_AT_REST = ("Convert to FP8 weights at rest before offloading: fp8_fx.compile_experts(pipe, "
               "fp8_at_rest=True), or fp8_fx.convert_to_fp8(model) before compiling. Offloading then "
               "moves the FP8 weights themselves (half of bf16's bytes) and nothing is quantized at run time.")
FIX_BLOCK_LEVEL = ("Use block-level group offloading with FP8 weights at rest instead: "
                   "fp8_fx.compile_experts(pipe, fp8_at_rest=True), then for each expert "
                   "pipe.transformer.enable_group_offload(onload_device='cuda', offload_type='block_level', "
                   "num_blocks_per_group=1, use_stream=True); or pipe.enable_model_cpu_offload() when one "
                   "expert fits on the GPU.")


class OffloadError(ValueError):
    """An offloading setup that fp8_fx would run slowly, without FP8, or wrongly."""


@dataclasses.dataclass(frozen=True)
class Offloading:
    """One offloading setup found on a model (find_offloading)."""
    kind: str  # MODEL, SEQUENTIAL or GROUP
    onload_device: str
    offload_device: str
    level: str = ""  # group offloading: "block_level" or "leaf_level"
    disk_path: Optional[str] = None  # group offloading to safetensors files
    stream: bool = False  # group offloading on a side stream (prefetching)

    @property
    def moves_weights(self) -> bool:
        """Whether each onload gives the parameters new storage. `cpu` and `cpu:0` count
        as two devices: `.to("cpu:0")` copies a tensor that is on `cpu`."""
        if self.kind == SEQUENTIAL or self.disk_path:
            return True
        try:
            return torch.device(self.onload_device) != torch.device(self.offload_device)
        except (RuntimeError, TypeError):  # a device string torch does not parse: assume it moves
            return self.onload_device != self.offload_device

    def __str__(self) -> str:
        where = f"{self.onload_device} <-> {self.disk_path or self.offload_device}"
        level = f", {self.level}" if self.level else ""
        return f"{self.kind} ({where}{level}{', stream' if self.stream else ''})"


def unwrap(model: nn.Module) -> nn.Module:
    """The module a torch.compile wrapper (OptimizedModule) holds, else the module."""
    return getattr(model, "_orig_mod", model)


def _accelerate_hooks(hook) -> List[object]:
    if hook is None:
        return []
    inner = getattr(hook, "hooks", None)  # accelerate's SequentialHook holds several
    if isinstance(inner, (list, tuple)):
        return [h for x in inner for h in _accelerate_hooks(x)]
    return [hook]


def _modules(model: nn.Module) -> List[nn.Module]:
    """The wrapper (hooks may sit on a torch.compile wrapper) and every module inside."""
    inner = unwrap(model)
    return ([model] if inner is not model else []) + list(inner.modules())


def _device(device) -> str:
    """accelerate takes an int, a string or a torch.device."""
    try:
        return str(torch.device(device))
    except (RuntimeError, TypeError):
        return str(device)


def find_offloading(model: nn.Module) -> List[Offloading]:
    """The distinct offloading setups on `model` and its modules (accelerate's hooks,
    diffusers' group offloading), in module order."""
    found: Dict[Offloading, None] = {}
    for m in _modules(model):
        for hook in _accelerate_hooks(getattr(m, "_hf_hook", None)):
            kind = type(hook).__name__
            if kind == "CpuOffload":
                found[Offloading(MODEL, _device(hook.execution_device), "cpu")] = None
            elif kind == "AlignDevicesHook" and getattr(hook, "offload", False):
                found[Offloading(SEQUENTIAL, _device(hook.execution_device), "cpu")] = None
        registry = getattr(m, "_diffusers_hook", None)
        hook = registry.get_hook(GROUP_HOOK) if hasattr(registry, "get_hook") else None
        group = getattr(hook, "group", None)
        if group is not None:
            level = getattr(getattr(getattr(hook, "config", None), "offload_type", None), "value", "")
            found[Offloading(GROUP, str(group.onload_device), str(group.offload_device), str(level),
                             group.offload_to_disk_path, group.stream is not None)] = None
    return list(found)


def hook_signature(modules: Iterable[nn.Module]) -> Tuple:
    """A cheap fingerprint of the offloading hooks on `modules` (a model and its blocks):
    it changes when offloading is enabled, disabled or set up anew."""
    sig = []
    for m in modules:
        registry = getattr(m, "_diffusers_hook", None)
        hook = getattr(m, "_hf_hook", None)
        sig.append((id(hook), type(hook).__name__, id(registry), tuple(getattr(registry, "_hook_order", ()))))
    return tuple(sig)


def runtime_quantized_weights(model: nn.Module, config: Optional[FP8Config] = None) -> List[Tuple[str, int]]:
    """(path, numel) of each bf16/fp16/fp32 nn.Linear weight that an fp8_fx backend with
    `config` would quantize at run time (the weight cache's copies). FP8Linear layers
    (FP8 weights at rest) have none."""
    model = unwrap(model)
    config = presets.config_for_model(config or FP8Config(), model)
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        where = module_path(model, name)
        if where.peft == ADAPTER:
            continue
        if (targeting.why_not_targeted(where.qualname, config)
                or targeting.why_not_fp8_shape(module.in_features, module.out_features)
                or targeting.why_not_fp8_dtype(module.weight.dtype)):
            continue
        out.append((where.qualname, module.weight.numel()))
    return out


def check(model: nn.Module, config: Optional[FP8Config] = None, name: str = "the model") -> List[Offloading]:
    """Raise OffloadError, naming the problem and the fix, if `model`'s offloading would make
    an fp8_fx-compiled `model` run without FP8, re-quantize at every onload, or strand FP8
    copies on the onload device. Returns the offloading found (empty: none)."""
    found = find_offloading(model)
    refuse_modes(found, name)
    moving = [o for o in found if o.moves_weights]
    if moving:
        runtime = runtime_quantized_weights(model, config)
        if runtime:
            o = moving[0]
            size = _size(sum(n for _, n in runtime))  # one byte per FP8 value
            how = ("reloads them from safetensors files at every onload" if o.disk_path else
                   f"moves them between {o.offload_device} and {o.onload_device}")
            raise OffloadError(
                f"fp8_fx: {name} has {len(runtime)} bf16 linears ({runtime[0][0]}, ...) that fp8_fx "
                f"quantizes at run time, and its {o} {how}. Each onload hands those layers new "
                "weight tensors: their FP8 copies would be made again at every onload (silently "
                f"slow), and the copies made on {o.onload_device} would stay there after the weights "
                f"are offloaded ({size} that offloading was meant to free). {FIX_AT_REST}")
    return found


def refuse_modes(found: List[Offloading], name: str) -> None:
    """Raise OffloadError for the offloading modes fp8_fx never runs under, whatever the
    weights' precision (sequential CPU offload, leaf-level group offloading)."""
    for o in found:
        if o.kind == SEQUENTIAL:
            raise OffloadError(
                f"fp8_fx: {name} runs under {SEQUENTIAL} (pipe.enable_sequential_cpu_offload, "
                "accelerate.cpu_offload): accelerate keeps each layer's weights on the meta device and "
                "loads them, as new Parameters, at that layer's call, in hooks torch.compile does not "
                "trace (torch.compiler.disable). Compiled, every layer becomes a graph of its own, Dynamo "
                "runs out of recompiles and the rest runs eagerly: the linears would silently not run in "
                f"FP8, and an FP8 copy of a bf16 weight would be made at every call. {FIX_BLOCK_LEVEL}")
        if o.kind == GROUP and o.level == "leaf_level":
            raise OffloadError(
                f"fp8_fx: {name} uses leaf-level {GROUP}: diffusers hooks every layer with "
                "torch.compiler.disable'd onload/offload calls, so a compiled block breaks into one "
                "graph per layer, Dynamo runs out of recompiles and the rest runs eagerly: the linears "
                f"would silently not run in FP8. {FIX_BLOCK_LEVEL}")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def check_disk_folders(models: Dict[str, nn.Module]) -> None:
    """Two models group-offloaded to one disk folder: diffusers names each group's file
    after module paths (`blocks_0_0`, `<Class>_unmatched_group`), which two experts of one
    class share, so the second expert would read the first one's weights."""
    owners: Dict[str, str] = {}
    for name, model in models.items():
        for path in {o.disk_path for o in find_offloading(model) if o.disk_path}:
            key = str(path)
            if key in owners and owners[key] != name:
                raise OffloadError(
                    f"fp8_fx: {owners[key]} and {name} are group-offloaded to the same disk folder "
                    f"{key!r}: diffusers names each group's file after its module paths, which two "
                    "experts of one class share, so one expert would load the other's weights (a "
                    "silently wrong video, with or without fp8_fx; pipe.enable_group_offload gives every "
                    "component the same folder, and the second expert's weights in memory are already "
                    "replaced by empty tensors). Reload the pipeline and give each expert an empty "
                    "folder of its own (diffusers reuses a file it finds there): "
                    f"pipe.{owners[key]}.enable_group_offload(..., offload_to_disk_path='{key}/{owners[key]}') "
                    f"and pipe.{name}.enable_group_offload(..., offload_to_disk_path='{key}/{name}').")
            owners[key] = name

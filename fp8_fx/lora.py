"""PEFT LoRA adapters on an fp8_fx model: diffusers' `load_lora_weights` /
`load_lora_adapter`, `add_adapter`, `set_adapters`, `fuse_lora` / `unfuse_lora`.

    transformer.load_lora_adapter(path, adapter_name="style")   # or pipe.load_lora_weights(...)
    fp8_fx.lora.lora_scales_as_tensors(transformer)              # strength changes never recompile
    compiled = torch.compile(transformer, backend=fp8_fx.fp8_backend)
    transformer.set_adapters(["style"], weights=[0.6])           # no recompile, no re-quantization

What happens to a layer PEFT wrapped (qualname.resolve_peft has the rule):
- The base layer (`...to_q.base_layer`) answers to the wrapper's path (`...to_q`): the
  targets match it as before and it runs as an FP8 GEMM (or emulated / weight-only).
- The adapter branch (`...to_q.lora_A.<adapter>`, `lora_B`) runs in the input dtype on the
  same input, as PEFT wrote it; the report says "LoRA adapter branch". Its cost is
  r * (in + out) per token against in * out for the base: ~1-3% of the FLOPs at rank 32-64.
- Strength: PEFT keeps each adapter's scale as a Python float and Dynamo specializes on
  it, so the first change of `set_adapters(..., weights=...)` recompiles (plain
  torch.compile does the same). `lora_scales_as_tensors` keeps the scales in 0-dim
  tensors updated in place: no strength change recompiles, and the FP8 copy of the base
  weight never changes with the strength (it does not depend on it).
- `fuse_lora` / `unfuse_lora`: PEFT adds the delta to `base_layer.weight.data` in place,
  which no cheap check sees (weight_cache.py). `follow_merges` wraps the PEFT layer class's
  `merge` / `unmerge` (the pass does it when it meets a PEFT base layer) so that each
  merge drops the FP8 copies of that layer's base weight: the next call quantizes the
  fused (or unfused) weight, once.
- FP8 weights at rest (`convert_to_fp8`): PEFT knows no FP8Linear. fp8_fx adds that one
  case to PEFT's LoRA layer dispatch (`enable_peft_fp8_layers`, done when an FP8Linear is
  made and peft is installed): an FP8Linear target gets `FP8LoraLinear`, PEFT's LoRA
  Linear with FP8 merges; every other layer is dispatched by PEFT as before.
"""
from __future__ import annotations

import functools
import importlib.util
import warnings
from typing import Optional

import torch

from . import ops, weight_cache

ADAPTER_REASON = "LoRA adapter branch (runs in the input dtype by design)"
_FOLLOWS = "_fp8_fx_follows_merges"  # set on the merge/unmerge wrappers


# ---------------------------------------------------------------------------------------
# Strength changes without recompiling

class TensorScales(dict):
    """A PEFT layer's `scaling` ({adapter: scale}) holding each scale as a 0-dim fp32
    tensor that writes update in place. PEFT and diffusers write floats into it
    (`set_scale`, `scale_layer`, `unscale_layer`, `update_layer`); the compiled graph
    reads the same tensor as an input, so its value is never a guard."""

    def __init__(self, scaling=(), device=None) -> None:
        super().__init__()
        self._device = device
        for key, value in dict(scaling).items():
            self[key] = value

    def __setitem__(self, key, value) -> None:
        current = self.get(key)
        if isinstance(current, torch.Tensor):
            if value is not current:  # `scaling[a] *= s` already changed it in place
                with torch.no_grad():
                    current.copy_(torch.as_tensor(value, dtype=torch.float32))
            return
        if isinstance(value, torch.Tensor):
            value = value.detach().to(torch.float32).clone()
        else:
            value = torch.tensor(float(value), dtype=torch.float32, device=self._device)
        dict.__setitem__(self, key, value)


def _peft_layers(model: torch.nn.Module):
    from .qualname import is_peft_layer
    return [(name, m) for name, m in model.named_modules() if is_peft_layer(type(m))]


def lora_scales_as_tensors(model: torch.nn.Module) -> int:
    """Keep the adapter scales of `model`'s PEFT LoRA layers in 0-dim tensors (on each
    layer's device), so that `set_adapters(..., weights=...)`, `fuse_lora(lora_scale=...)`
    and the like never recompile a compiled model (fp8_fx's backend or any other).
    Call it after loading the adapters and moving the model to its device, before the
    first compiled call (a model already compiled recompiles once). Idempotent: call it
    again after loading another adapter into new layers, or after moving the model (the
    scales are plain tensors in a dict, which `.to()` does not move; Inductor would copy a
    CPU scale to the GPU at every call). Returns the number of layers."""
    count = 0
    for _, layer in _peft_layers(model):
        scaling = getattr(layer, "scaling", None)
        if not isinstance(scaling, dict):
            continue
        follow_merges(type(layer))
        device = _layer_device(layer)
        if not isinstance(scaling, TensorScales):
            layer.scaling = TensorScales(scaling, device)
        elif device is not None and scaling._device != device:  # the model moved since
            scaling._device = device
            for key, value in list(scaling.items()):
                dict.__setitem__(scaling, key, value.to(device))
        count += 1
    return count


def _layer_device(layer: torch.nn.Module) -> Optional[torch.device]:
    for t in layer.parameters():
        if t.device.type != "meta":
            return t.device
    return None


# ---------------------------------------------------------------------------------------
# fuse_lora / unfuse_lora: the FP8 copies follow

def follow_merges(layer_type: type) -> None:
    """Make `layer_type.merge` / `.unmerge` (a PEFT tuner layer class) drop the FP8 copies
    of the layer's base weights after they run: PEFT merges in place through
    `weight.data`, which the weight cache cannot see. Idempotent, class-wide."""
    for name in ("merge", "unmerge"):
        method = getattr(layer_type, name, None)
        if method is None or getattr(method, _FOLLOWS, False):
            continue
        setattr(layer_type, name, _dropping_fp8_copies(method))


def _dropping_fp8_copies(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        finally:
            for t in self.get_base_layer().parameters():
                weight_cache.forget(t)
    setattr(wrapper, _FOLLOWS, True)
    return wrapper


# ---------------------------------------------------------------------------------------
# FP8 weights at rest: LoRA around an FP8Linear

_enabled = False
_peft_installed: Optional[bool] = None


def enable_peft_fp8_layers() -> bool:
    """Teach PEFT's LoRA dispatch one layer type: an FP8Linear target becomes an
    FP8LoraLinear (PEFT refuses unknown layer types). Every other target is dispatched by
    PEFT as before. Idempotent; False when peft is not installed."""
    global _enabled, _peft_installed
    if _enabled:
        return True
    if _peft_installed is None:
        _peft_installed = importlib.util.find_spec("peft") is not None
    if not _peft_installed:
        return False
    try:
        from peft.tuners.lora.model import LoraModel
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:  # noqa: BLE001 - a broken peft install must not break FP8 models
        _peft_installed = False
        return False
    from .modules import FP8Linear

    original = LoraModel.__dict__.get("_create_new_module")
    if not isinstance(original, staticmethod):  # a peft whose dispatch moved: PEFT's own error stays
        _peft_installed = False
        return False
    original = original.__func__

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, FP8Linear) and kwargs.get("parameter_name") is None:
            kwargs.pop("parameter_name", None)
            return fp8_lora_linear_class()(target, adapter_name, config=lora_config, **kwargs)
        return original(lora_config, adapter_name, target, **kwargs)

    _create_new_module.__wrapped__ = original
    LoraModel._create_new_module = staticmethod(_create_new_module)
    _enabled = True
    return True


@functools.lru_cache(maxsize=None)
def fp8_lora_linear_class() -> type:
    """FP8LoraLinear, made on first use (it subclasses peft's LoRA Linear)."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from .modules import FP8Linear

    class FP8LoraLinear(LoraLinear):
        """PEFT's LoRA Linear around an FP8Linear (FP8 weights at rest).

        Unfused: the FP8Linear runs as it does without an adapter (weight-only eagerly, an
        FP8 GEMM under the backend) and the LoRA branch in the activation dtype (the
        adapter's weights take the FP8Linear's bias dtype, the model's).
        Fused (`merge`, `fuse_lora`): the weight is dequantized to fp32, the delta added and
        the sum quantized again (new scale, the layer's granularity), in place. That is one
        more FP8 rounding of the fused weight than quantizing the fused bf16 weight makes:
        measured on the tiny Wan (rank 4 on every block linear, adapters moving the output
        by 3-19%), the fused weights are 3.4-3.7% (relative Frobenius) from the exact fused
        weights against 2.6-2.7% for quantizing the fused bf16 weights, and the output
        1.1% from the eager bf16 fused model against 0.8-1.0%. `unmerge` subtracts the
        delta and quantizes back onto the scale from before the merge: 14-23% of the
        codes end one FP8 step from where they were, and the output sits 1.1-1.2% from
        the bf16 model instead of 0.8-1.0%. (Exact restoration would need a copy of the
        FP8 weights, as large as the weights at rest.) To fuse with no extra rounding,
        fuse into the bf16 model, `unload_lora()`, then `convert_to_fp8`.
        LoRA variants that read the base weight (DoRA, ...) are refused.
        """

        def _get_in_out_features(self, module):
            if isinstance(module, FP8Linear):
                return module.in_features, module.out_features
            return super()._get_in_out_features(module)

        def _get_base_layer_device_and_dtype(self, base_layer):
            if isinstance(base_layer, FP8Linear):  # never cast the adapter to float8
                bias = base_layer.bias
                return base_layer.weight.device, bias.dtype if bias is not None else None
            return super()._get_base_layer_device_and_dtype(base_layer)

        def resolve_lora_variant(self, *, config, **kwargs):
            variant = super().resolve_lora_variant(config=config, **kwargs)
            if variant is not None:
                raise ValueError(
                    f"fp8_fx: the LoRA variant {type(variant).__name__} reads the base layer's dense "
                    "weight, which an FP8Linear (FP8 weights at rest) does not have. Add the adapter "
                    "to the bf16 model (the backend then keeps FP8 copies of the base weights), or "
                    "use plain LoRA.")
            return None

        def _fp8_delta(self, adapter: str) -> torch.Tensor:
            a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
            return (b.float() @ a.float()) * self.scaling[adapter]

        def _requantize(self, sign: float, adapters, scale: Optional[torch.Tensor] = None) -> None:
            """Weight <- quantize(dequantize(weight) + sign * deltas), with `scale` if given
            (unmerge: the scale from before the merge, so that the weight goes back to the
            same grid) or a new one."""
            base = self.get_base_layer()
            with torch.no_grad():
                w = ops.dequantize_weight(base.weight, base.weight_scale, torch.float32)
                for adapter in adapters:
                    w = w + sign * self._fp8_delta(adapter)
                if not bool(torch.isfinite(w).all()):
                    raise ValueError(f"fp8_fx: merging adapters {list(adapters)} gives non-finite weights")
                if scale is None:
                    wq, scale = ops.quantize_weight(w, base.granularity)
                else:
                    scale = scale.to(w.device)
                    wq = ops.cast_to_fp8(w, scale)
                # In place: compiled graphs and FSDP keep reading the same tensors.
                base.weight.data.copy_(wq)
                base.weight_scale.copy_(scale)

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            from peft.tuners.tuners_utils import check_adapters_to_merge
            adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
            if not adapter_names:
                return
            warnings.warn(
                "fp8_fx: fusing a LoRA into FP8 weights at rest re-quantizes them (dequantize, add the delta, "
                "quantize): one more FP8 rounding of each fused weight, and unfuse_lora restores the weights "
                "only to within one FP8 step. For no extra rounding, fuse into the bf16 model before "
                "convert_to_fp8 (see fp8_fx.lora.FP8LoraLinear).", UserWarning, stacklevel=2)
            if not self.merged_adapters:  # unmerge quantizes back onto this grid
                self._fp8_fx_scale_before_merge = self.get_base_layer().weight_scale.detach().clone()
            self._requantize(1.0, adapter_names)  # safe_merge: _requantize checks finiteness anyway
            self._merge_biases(adapter_names, 1.0)
            self.merged_adapters.extend(adapter_names)

        def unmerge(self) -> None:
            if not self.merged:
                warnings.warn("Already unmerged. Nothing to do.")
                return
            adapters = [a for a in reversed(self.merged_adapters) if a in self.lora_A]
            self._requantize(-1.0, adapters, getattr(self, "_fp8_fx_scale_before_merge", None))
            self._fp8_fx_scale_before_merge = None
            self._merge_biases(adapters, -1.0)
            self.merged_adapters.clear()

        def _merge_biases(self, adapters, sign: float) -> None:
            base = self.get_base_layer()
            with torch.no_grad():
                for adapter in adapters:
                    if self.lora_bias.get(adapter):
                        if base.bias is None:
                            raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the "
                                               "base layer has no bias.")
                        delta = self.lora_B[adapter].bias * self.scaling[adapter]
                        base.bias.data += sign * delta.to(base.bias.dtype)

    FP8LoraLinear.__module__ = __name__
    FP8LoraLinear.__qualname__ = "FP8LoraLinear"
    return FP8LoraLinear


def convert_peft_wrapper(wrapper: torch.nn.Module, name: str) -> None:
    """Make a PEFT LoRA Linear whose base layer convert_to_fp8 just made an FP8Linear an
    FP8LoraLinear (same state, FP8 merges). Other PEFT layer types are refused."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    cls = fp8_lora_linear_class()
    if isinstance(wrapper, cls):
        return
    if type(wrapper) is not LoraLinear:
        raise ValueError(
            f"convert_to_fp8: {name} is wrapped by {type(wrapper).__name__} (PEFT), which fp8_fx cannot run "
            "around FP8 weights at rest (only plain LoRA: peft's lora.Linear). Convert before adding the "
            "adapter, fuse and unload it first, or exclude the layer.")
    if any(a in wrapper.lora_variant for a in wrapper.lora_A):
        raise ValueError(f"convert_to_fp8: {name} has a LoRA variant (DoRA, ...) that reads the dense base "
                         "weight: convert before adding the adapter, or exclude the layer.")
    wrapper.__class__ = cls


def __getattr__(name: str):
    if name == "FP8LoraLinear":  # subclasses peft's class: made when first asked for
        return fp8_lora_linear_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

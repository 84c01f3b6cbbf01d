"""FP8 weights at rest: convert a model's targeted linears to FP8 storage, on the way to
the GPU (checkpoints.py saves and loads them).

    model = WanTransformer3DModel.from_pretrained(path, torch_dtype=torch.bfloat16)  # on CPU
    fp8_fx.convert_to_fp8(model, device="cuda")   # one bf16 layer on the GPU at a time
    compiled = torch.compile(model, backend=fp8_fx.fp8_backend)

A converted layer is an `FP8Linear`: FP8 `weight`, fp32 `weight_scale`, bias as it was,
and optionally a calibrated static `input_scale` (calibrate.py).
Eagerly it runs the weight-only op, so the module still works without compiling; the
backend's pass turns it into an FP8 GEMM (or keeps it weight-only) with no bf16 copy.

LoRA (PEFT) on a converted model: PEFT wraps an FP8Linear in lora.FP8LoraLinear (fp8_fx
teaches PEFT's dispatch that one layer type when an FP8Linear is made). A model that
already has adapters converts its base layers (their wrappers' paths are what the targets
match) and never the adapter branches.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn

from . import lora, ops, presets, targeting  # lora: PEFT adapters on FP8 models (fp8_fx.lora)
from .config import FP8Config
from .qualname import ADAPTER, BASE, module_path
from .report import LinearDecision


class FP8Linear(nn.Module):
    """A linear layer whose weight is stored in float8_e4m3fn with an fp32 scale."""

    def __init__(self, in_features: int, out_features: int, bias: bool, granularity: str,
                 device=None, bias_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        lora.enable_peft_fp8_layers()  # PEFT can then wrap this layer in a LoRA adapter (lora.py)
        self.in_features, self.out_features, self.granularity = in_features, out_features, granularity
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=ops.FP8_DTYPE, device=device),
                                   requires_grad=False)
        scale_shape = (out_features, 1) if granularity == "row" else ()
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
                     if bias else None)
        # A calibrated fp32 scale for the input (fp8_fx.set_input_scales); None: dynamic.
        self.register_buffer("input_scale", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, granularity: str, device=None) -> "FP8Linear":
        """Quantize `linear` (its weight moved to `device` first: one bf16 layer there at a time)."""
        fp8 = cls(linear.in_features, linear.out_features, linear.bias is not None, granularity,
                  device="meta")
        wq, scale = ops.quantize_weight(linear.weight.detach().to(device), granularity)
        fp8.weight = nn.Parameter(wq, requires_grad=False)
        fp8.weight_scale = scale
        if linear.bias is not None:
            fp8.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
        return fp8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is None:
            return ops.weight_only_linear(x, self.weight, self.weight_scale, self.bias)
        return ops.weight_only_linear(x, self.weight, self.weight_scale, self.bias, self.input_scale)

    def extra_repr(self) -> str:
        static = ", static input scale" if self.input_scale is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, granularity={self.granularity!r}{static}")


def _convertible(name: str, module: nn.Module, config: FP8Config, peft: Optional[str] = None) -> Optional[str]:
    """None if `module` should become FP8, else why not. `name`: the path targets match
    (a PEFT base layer's is its wrapper's); `peft`: its PEFT role (qualname.resolve_peft)."""
    if not isinstance(module, nn.Linear):
        return "not an nn.Linear"
    if peft == ADAPTER:
        return lora.ADAPTER_REASON
    why_not = (targeting.why_not_targeted(name, config)
               or targeting.why_not_fp8_shape(module.in_features, module.out_features)
               or targeting.why_not_fp8_dtype(module.weight.dtype))
    if why_not:
        return why_not
    if module.weight.device.type == "meta":
        raise ValueError(f"{name}.weight is on the meta device: load real weights before convert_to_fp8")
    return None


def _fsdp_sharded_paths(model: nn.Module) -> List[str]:
    """Paths of the modules of `model` that FSDP2's fully_shard manages."""
    if not torch.distributed.is_available():
        return []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]


def _under(name: str, paths: List[str]) -> Optional[str]:
    """The innermost of `paths` that holds module `name`, else None."""
    holders = [p for p in paths if p == "" or name == p or name.startswith(p + ".")]
    return max(holders, key=len) if holders else None


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def convert_to_fp8(model: nn.Module, config: Optional[FP8Config] = None,
                   device: Union[str, torch.device, None] = None) -> List[LinearDecision]:
    """Replace the targeted nn.Linear layers of `model` by FP8Linear, in place.

    With `device`, each targeted weight is moved there and quantized one layer at a time,
    then the rest of the model follows: the full bf16 model never sits on `device`.
    Returns one record per nn.Linear (converted or why not)."""
    config = presets.config_for_model(config or FP8Config(), model)
    decisions = []
    sharded = _fsdp_sharded_paths(model)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        where = module_path(model, name)
        why_not = _convertible(where.qualname, module, config, where.peft)
        holder = _under(name, sharded) if why_not is None else None
        if holder is not None:
            # fully_shard registered this layer's bf16 parameters: a module swapped in now
            # would hold tensors FSDP does not manage (and crash in the forward).
            raise ValueError(
                f"convert_to_fp8: {name} is already sharded by fully_shard (FSDP module "
                f"{holder or '(the root)'!r}). Convert first, then fully_shard: "
                "fp8_fx.convert_to_fp8(model); fp8_fx.distributed.fsdp.fully_shard_fp8(block, ...)")
        if why_not is None:
            if where.peft == BASE:  # its LoRA wrapper will merge into FP8 weights (or refuses first)
                lora.convert_peft_wrapper(model.get_submodule(where.wrapper), where.qualname)
            with torch.no_grad():
                set_submodule(model, name, FP8Linear.from_linear(module, config.granularity, device))
        decisions.append(LinearDecision(where.qualname, "skipped" if why_not else "weight_only",
                                        why_not or f"FP8 weights at rest ({config.granularity})",
                                        module.in_features, module.out_features))
    if device is not None:
        model.to(device)
    return decisions


def fp8_weight_bytes(model: nn.Module) -> Dict[str, int]:
    """Bytes this process holds of `model`: FP8 weights + scales, and everything else. A
    sharded parameter (DTensor: FSDP2, tensor parallel) counts its local shard only."""
    fp8 = rest = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        t = t.to_local() if hasattr(t, "to_local") else t
        nbytes = t.numel() * t.element_size()
        if t.dtype == ops.FP8_DTYPE or name.endswith("weight_scale"):
            fp8 += nbytes
        else:
            rest += nbytes
    return {"fp8": fp8, "rest": rest}

"""Static (calibrated) activation scales: measure once, then no amax pass per call.

    amax = fp8_fx.calibrate_input_amax(model, lambda: run_some_denoising_steps(model))
    fp8_fx.convert_to_fp8(model, device="cuda")      # tensor granularity
    fp8_fx.set_input_scales(model, amax)
    compiled = torch.compile(model, backend=fp8_fx.fp8_backend)

A dynamic tensor-wise scale needs the amax of the whole activation before any value
can be cast: one more pass over it, and the producer kernel (LayerNorm + modulation)
writes the bf16 activation out for a separate cast kernel. With a calibrated scale the
cast fuses into the producer. The price: a value beyond the calibrated range saturates
to +-448 * scale, so calibrate on inputs that cover what the model will see (prompts,
every denoising step, the resolutions you serve).

The scale lives on the FP8Linear as the buffer `input_scale`: it is saved with FP8
checkpoints, moves with the model, and reaches the compiled graph as an input, so one
regionally compiled block graph serves blocks with different scales.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

import torch
import torch.nn as nn

from . import ops, presets
from .config import FP8Config
from .modules import FP8Linear
from .qualname import ADAPTER, module_path
from .targeting import why_not_targeted


def _targeted(model: nn.Module, name: str, module: nn.Module, config: FP8Config) -> bool:
    """Targeted as convert_to_fp8 decides it: by the path targets see (a PEFT base layer's
    is its wrapper's; an adapter branch never)."""
    if not isinstance(module, (nn.Linear, FP8Linear)):
        return False
    where = module_path(model, name)
    return where.peft != ADAPTER and why_not_targeted(where.qualname, config) is None


def calibrate_input_amax(model: nn.Module, run: Callable[[], Any],
                         config: Optional[FP8Config] = None) -> Dict[str, float]:
    """Run `run()` (eagerly, no grad) and return the max |input| of every targeted
    linear layer (nn.Linear or FP8Linear) it called, by module path.
    Raises if an input held NaN/inf (no finite scale covers it) or if no targeted
    layer ran (wrong model, or targets that match nothing)."""
    config = presets.config_for_model(config or FP8Config(), model)
    amax: Dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach()
            if x.numel():
                value = x.abs().amax().float()
                amax[name] = value if name not in amax else torch.maximum(amax[name], value)
        return record

    handles = [m.register_forward_pre_hook(hook(name))
               for name, m in model.named_modules() if _targeted(model, name, m, config)]
    if not handles:
        raise ValueError("calibrate_input_amax: no module of the model matches FP8Config.targets "
                         f"{config.targets[:4]}...; pass the config you convert with")
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    if not amax:
        raise ValueError("calibrate_input_amax: run() called none of the targeted layers; "
                         "it must run the model it was given")
    result = {name: float(v) for name, v in amax.items()}
    bad = {name: v for name, v in result.items() if not torch.isfinite(torch.tensor(v))}
    if bad:
        raise ValueError(f"calibrate_input_amax: non-finite inputs to {sorted(bad)[:5]}: "
                         "fix the model or the calibration inputs (no static scale covers NaN/inf)")
    return result


def set_input_scales(model: nn.Module, amax: Optional[Mapping[str, float]]) -> None:
    """Give each FP8Linear named in `amax` the static input scale amax / 448 (the dynamic
    recipe's scale for that amax). Layers not named keep dynamic scales; `amax=None`
    makes every layer dynamic again. The layers must be FP8Linear (convert_to_fp8
    first) with tensor granularity: a row-wise weight scale does not combine with one
    scale for the whole input in cuBLAS's FP8 GEMM."""
    fp8 = {name: m for name, m in model.named_modules() if isinstance(m, FP8Linear)}
    if amax is None:
        for m in fp8.values():
            m.input_scale = None
        return
    unknown = sorted(set(amax) - set(fp8))
    if unknown:
        raise ValueError(f"set_input_scales: {unknown[:5]} are not FP8Linear layers of this model; "
                         "call convert_to_fp8 before set_input_scales, with the same targets")
    row = sorted(name for name in amax if fp8[name].granularity != "tensor")
    if row:
        raise ValueError(f"set_input_scales: {row[:5]} have row-wise weight scales; static input scales "
                         "need convert_to_fp8(model, FP8Config(granularity='tensor'))")
    for name, value in amax.items():
        value = float(value)
        if not value >= 0 or value == float("inf"):
            raise ValueError(f"set_input_scales: amax for {name} is {value}; it must be finite and >= 0")
        m = fp8[name]
        m.input_scale = ops.amax_to_scale(torch.tensor(value, dtype=torch.float32, device=m.weight.device))

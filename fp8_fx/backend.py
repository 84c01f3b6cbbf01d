"""The torch.compile backend: the FX pass, then Inductor.

    config -> rewrite_linears (decisions, rewritten graph) -> compile_fx (Inductor)
           -> a callable that feeds cached FP8 weights to the compiled graph
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.fx
from torch._inductor.compile_fx import compile_fx

from .config import FP8Config
from .report import Report
from .rewrite import RewriteResult, rewrite_linears
from .weights import QuantizedWeightCache


class FP8Backend:
    """A torch.compile backend. After compiling: `.report` (one record per linear op),
    `.graphs` (the rewritten FX GraphModules, before Inductor)."""

    def __init__(self, config: Optional[FP8Config] = None,
                 inductor_config_patches: Optional[Dict[str, Any]] = None) -> None:
        self.config = config if config is not None else FP8Config()
        if not isinstance(self.config, FP8Config):
            raise TypeError(f"make_fp8_backend takes an FP8Config, got {type(config).__name__}")
        self.inductor_config_patches = dict(inductor_config_patches or {})
        self.report = Report()
        self.graphs: List[torch.fx.GraphModule] = []
        self.weights = QuantizedWeightCache()

    def __repr__(self) -> str:
        c = self.config  # short: Dynamo prints this in every error message
        return (f"FP8Backend(granularity={c.granularity!r}, fallback={c.fallback!r}, "
                f"{len(c.targets)} targets, {len(c.exclude)} excluded)")

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        result = rewrite_linears(gm, self.config)
        self.report.add_graph(result.decisions)
        gm = result.graph_module
        self.graphs.append(gm)
        self._warn_if_nothing_matched(result)
        if result.converted and torch.is_grad_enabled():
            raise RuntimeError(
                "fp8_fx is inference-only (its FP8 ops have no backward). Call the compiled "
                "model under torch.no_grad() or torch.inference_mode().")

        slots = result.weight_slots
        _check_no_meta_weights(result, example_inputs)
        example_fp8 = self.weights.quantized_inputs(example_inputs, slots)
        # Hand Inductor fake tensors with static shapes for the new inputs: fakified by
        # AOTAutograd they would get fresh symbolic sizes with no Dynamo source, and a
        # guard on one (e.g. _scaled_mm's K % 16 check) breaks Dynamo's guard building.
        fake_mode = torch._guards.detect_fake_mode(example_inputs)
        if fake_mode is not None:
            example_fp8 = [fake_mode.from_tensor(t, static_shapes=True) for t in example_fp8]
        compiled = compile_fx(gm, [*example_inputs, *example_fp8],
                              config_patches=self.inductor_config_patches or None)
        if not slots:
            return compiled
        weights = self.weights

        def run_with_fp8_weights(*args):
            # Dynamo calls compiled graphs unboxed: compiled_fn(*args).
            return compiled(*args, *weights.quantized_inputs(args, slots))

        return run_with_fp8_weights

    def _warn_if_nothing_matched(self, result: RewriteResult) -> None:
        decisions = result.decisions
        if decisions and not any(d.reason != "not targeted" for d in decisions):
            warnings.warn(
                f"fp8_fx: none of the {len(decisions)} linear ops in this graph matched the "
                f"targets {self.config.targets}; they stay in their original precision. "
                "Check FP8Config.targets against backend.report (qualnames).",
                stacklevel=2)


def _check_no_meta_weights(result: RewriteResult, example_inputs: Sequence[Any]) -> None:
    for slot in result.weight_slots:
        if example_inputs[slot.input_index].device.type == "meta":
            raise ValueError(
                "fp8_fx: a targeted weight is on the meta device, so there is nothing to "
                "quantize. Load real weights before compiling (from_pretrained(...), "
                "load_state_dict(state, assign=True), or to_empty(device=...) and then load).")


def make_fp8_backend(config: Optional[FP8Config] = None,
                     inductor_config_patches: Optional[Dict[str, Any]] = None) -> FP8Backend:
    """A backend for torch.compile(model, backend=...). `inductor_config_patches` are
    passed to Inductor for this backend's graphs only (global config is left alone)."""
    return FP8Backend(config, inductor_config_patches)


# The default-config backend; also registered as torch.compile(backend="fp8_fx").
fp8_backend = make_fp8_backend()

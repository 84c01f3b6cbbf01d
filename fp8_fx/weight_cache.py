"""Quantize each weight tensor once, and hand its FP8 copy to every later call.

Why not constants in the graph: Dynamo reuses a compiled graph for a second instance of
the same class and passes that instance's parameters as inputs, so anything baked from
the first instance's tensors would be silently wrong.

The FP8 copy lives on the parameter itself (an attribute), so it dies with it and a
second model gets its own. It is reused only while the parameter still has the same
data pointer, dtype, device, shape and version counter: `load_state_dict`, `copy_` and
`add_` on the parameter, `p.data = new`, `model.to(dtype)` and `swap_tensors` (torch's
`set_swap_module_params_on_conversion`) all change one of them. Comparing them costs a
few attribute reads per weight per call, off the GPU.

What no cheap check sees: an edit through `p.data` in place (`p.data += delta`;
`p.data.copy_(...)`), whose version counter is not the parameter's, and in-place edits of
inference tensors (no version counter). After such an edit call
`fp8_fx.refresh_weights(model)`. PEFT merges a LoRA that way (`fuse_lora`); fp8_fx follows
those merges by itself: lora.follow_merges makes PEFT's merge/unmerge `forget` the copies
of the base layer's weights.

No weak references: `torch.utils.swap_tensors` refuses tensors that have one.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import ops
from .distributed import tensor_parallel

_ATTR = "_fp8_fx_weights"  # {granularity: _Entry} on each quantized parameter


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _identity(t: torch.Tensor) -> tuple:
    if tensor_parallel.is_dtensor(t):  # a tensor-parallel weight: its shard, and how it is laid out
        return (_identity(t.to_local()), _version(t), tuple(t.placements))
    return (t.data_ptr(), t.dtype, t.device, tuple(t.shape), _version(t))


@dataclasses.dataclass
class _Entry:
    identity: tuple
    fp8: torch.Tensor
    scale: torch.Tensor
    requantized_in_a_row: int = 0  # calls in a row that found the weight changed


# A weight found changed at this many calls in a row is being handed new storage at every
# call (offloading that moves bf16 weights, or a loop that reloads them), not edited once
# (a LoRA fused, new weights loaded: the calls in between find it unchanged).
REQUANTIZED_IN_A_ROW_WARNING = 3
_warned_requantized = False  # once per process: every weight of the model would say the same


class _Entries(dict):
    """{granularity: _Entry}. Copied or pickled with its parameter, it comes out empty:
    FP8 copies are derived data, never part of a saved or copied model."""

    def __deepcopy__(self, memo):
        return _Entries()

    def __reduce__(self):
        return (_Entries, ())


def quantized_weight(weight: torch.Tensor, granularity: str, qualname: str = "") -> Tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, fp32 scale) of `weight` as it is now: cached on the tensor. For a
    DTensor (a tensor-parallel weight) those of this rank's shard, as plain tensors: each
    shard has scales of its own (distributed/tensor_parallel.py)."""
    entries: Optional[Dict[str, _Entry]] = weight.__dict__.get(_ATTR)
    identity = _identity(weight)
    streak = 0
    if entries is not None:
        entry = entries.get(granularity)
        if entry is not None:
            if entry.identity == identity:
                if entry.requantized_in_a_row:
                    entry.requantized_in_a_row = 0
                return entry.fp8, entry.scale
            streak = entry.requantized_in_a_row + 1
            if streak == REQUANTIZED_IN_A_ROW_WARNING:
                _warn_requantized(qualname, weight, entry)
    if weight.device.type == "meta":
        raise ValueError(
            "fp8_fx: a converted weight is on the meta device; load real weights before "
            "running the compiled model")
    with torch.no_grad():
        fp8, scale = ops.quantize_weight(tensor_parallel.local_tensor(weight.detach()), granularity)
    if not bool(torch.isfinite(scale).all()):  # once per quantization, off the hot path
        rows = "every output" if granularity == "tensor" else "the outputs of its non-finite rows"
        warnings.warn(f"fp8_fx: the weight of {qualname or 'a converted layer'} holds NaN or Inf; "
                      f"with {granularity!r} scaling that makes {rows} non-finite. Fix the weights "
                      "(or exclude the layer).", RuntimeWarning, stacklevel=3)
    if entries is None:
        entries = _Entries()
        weight.__dict__[_ATTR] = entries
    entries[granularity] = _Entry(identity, fp8, scale, streak)
    return fp8, scale


def _warn_requantized(qualname: str, weight: torch.Tensor, old: _Entry) -> None:
    global _warned_requantized
    if _warned_requantized:
        return
    _warned_requantized = True
    warnings.warn(
        f"fp8_fx: the weight of {qualname or 'a converted layer'} (and likely the others) had new storage at "
        f"{REQUANTIZED_IN_A_ROW_WARNING} calls in a row (on {weight.device} now; its last FP8 copy was "
        f"made on {old.fp8.device}), so its FP8 copy is made again at every call: offloading that moves "
        "bf16 weights (model CPU offload, group offloading) or a loop that reloads them. That is slow, "
        "and copies made on the GPU outlive the offloaded weights. Convert to FP8 weights at rest "
        "first (fp8_fx.convert_to_fp8(model) before compiling, or fp8_fx.compile_experts(pipe, "
        "fp8_at_rest=True)): offloading then moves the FP8 weights themselves. (Said once per process.)",
        RuntimeWarning, stacklevel=3)


def quantized_inputs(inputs: Sequence[torch.Tensor], slots) -> List[torch.Tensor]:
    """The extra graph inputs for `slots`: fp8 weight, scale, fp8 weight, scale, ..."""
    extra: List[torch.Tensor] = []
    for slot in slots:
        extra.extend(quantized_weight(inputs[slot.input_index], slot.granularity, slot.qualname))
    return extra


def fp8_copies(model: torch.nn.Module) -> int:
    """How many of `model`'s parameters and buffers hold an FP8 copy made at run time."""
    return sum(_ATTR in t.__dict__ for t in [*model.parameters(), *model.buffers()])


def forget(t: torch.Tensor) -> bool:
    """Drop the FP8 copies of one tensor (the next call quantizes it as it is then).
    True if it had any."""
    return t.__dict__.pop(_ATTR, None) is not None


def refresh_weights(model: torch.nn.Module) -> int:
    """Drop the FP8 copies of `model`'s parameters and buffers: the next call quantizes
    the weights as they are then. Needed only after an edit no cheap check sees
    (`p.data += delta`, `p.data.copy_(...)`, in-place edits of inference tensors).
    Returns how many tensors had copies."""
    return sum(forget(t) for t in [*model.parameters(), *model.buffers()])

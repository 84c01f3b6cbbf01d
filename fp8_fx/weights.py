"""Quantize each weight tensor once, and hand its FP8 copy to every later call.

Why a cache and not constants in the graph: Dynamo reuses a compiled graph for a
second instance of the same class and passes that instance's parameters as inputs,
so anything baked from the first instance's tensors would be silently wrong. The
cache is keyed by the identity of the weight tensor and its version counter: a new
instance, or weights changed in place (load_state_dict, copy_), get quantized anew;
the same weights are never quantized twice.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import ops


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter (and can't change)
        return None


@dataclasses.dataclass
class _Entry:
    ref: weakref.ref
    version: Optional[int]
    fp8: torch.Tensor
    scale: torch.Tensor


class QuantizedWeightCache:
    def __init__(self) -> None:
        self._entries: Dict[Tuple[int, str], _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, weight: torch.Tensor, granularity: str) -> Tuple[torch.Tensor, torch.Tensor]:
        key = (id(weight), granularity)
        entry = self._entries.get(key)
        if entry is not None and entry.ref() is weight and entry.version == _version(weight):
            return entry.fp8, entry.scale
        if weight.device.type == "meta":
            raise ValueError(
                "fp8_fx: a converted weight is on the meta device; load real weights before "
                "running the compiled model")
        with torch.no_grad():
            fp8, scale = ops.quantize_weight(weight.detach(), granularity)
        entries = self._entries
        ref = weakref.ref(weight, lambda _, key=key: entries.pop(key, None))
        self._entries[key] = _Entry(ref, _version(weight), fp8, scale)
        return fp8, scale

    def quantized_inputs(self, inputs: Sequence[torch.Tensor], slots) -> List[torch.Tensor]:
        """The extra graph inputs for `slots`: fp8 weight, scale, fp8 weight, scale, ..."""
        extra: List[torch.Tensor] = []
        for slot in slots:
            extra.extend(self.get(inputs[slot.input_index], slot.granularity))
        return extra

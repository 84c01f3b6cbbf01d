"""FSDP2 (`torch.distributed.fsdp.fully_shard`) with FP8 weights at rest.

    fp8_fx.convert_to_fp8(model)                    # first: FP8Linear, scales of whole weights
    for block in model.blocks:
        fully_shard_fp8(block, mesh=mesh)           # = fully_shard, plus the mixed-precision fix below
    fully_shard_fp8(model, mesh=mesh)
    for block in model.blocks:
        block.compile(backend=fp8_fx.make_fp8_backend())

Why convert first: fully_shard registers the parameters it finds at the time of the call;
a module swapped in later (what convert_to_fp8 does) holds tensors FSDP does not manage,
and the old bf16 ones would still be all-gathered (convert_to_fp8 refuses a sharded
model for that reason). Converted first, each rank keeps a dim-0 shard of every FP8
weight (1 byte per value) and the `weight_scale` buffer whole: buffers are never
sharded, so the scale stays the one of the whole weight, computed before sharding, and
the all-gathered weight is the same FP8 tensor as on one process. FSDP2 all-gathers a
group whose parameters have different dtypes (FP8 weights, bf16 biases and norms) as
raw bytes (uint8), so the FP8 bytes travel as they are: half of bf16's traffic.

Compiling: Dynamo runs FSDP2's hooks eagerly (torch._dynamo.config.skip_fsdp_hooks), so
a block compiled with the backend sees its unsharded FP8 weights as graph inputs, like a
converted model on one process. Compile per block or the whole model (Dynamo then breaks
the graph at each FSDP-managed block).

Mixed precision: `MixedPrecisionPolicy(param_dtype=bf16)` makes FSDP2 cast every
floating-point parameter to bf16 before the all-gather: the FP8 weights would travel and
sit unsharded in bf16 (exact values, twice the bytes, silently). fully_shard_fp8 puts
the module's FP8Linears in a group of their own without param_dtype (one more all-gather
per call, of FP8 bytes), and the rest of the module gets the policy as given.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.nn as nn

from ..modules import FP8Linear


def _fsdp():
    try:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError as e:  # torch < 2.6 had FSDP2 under torch.distributed._composable
        raise ImportError(f"fp8_fx.distributed.fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard): {e}") from e
    return FSDPModule, MixedPrecisionPolicy, fully_shard


def _unsharded_fp8_linears(module: nn.Module) -> List[FP8Linear]:
    """The FP8Linears under `module` that no inner fully_shard manages yet."""
    FSDPModule, _, _ = _fsdp()
    found: List[FP8Linear] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, FSDPModule):
                continue  # its parameters are its own group's
            if isinstance(child, FP8Linear):
                found.append(child)
            else:
                visit(child)

    if isinstance(module, FP8Linear):
        return [module]
    visit(module)
    return found


def fully_shard_fp8(module: nn.Module, **kwargs):
    """`fully_shard(module, **kwargs)` that keeps FP8 weights FP8 on the wire and at rest.

    Without a mixed-precision `param_dtype` this is fully_shard itself. With one, the
    module's FP8Linears not yet sharded are first sharded together as one group whose
    policy has no param_dtype (reduce_dtype etc. kept): FSDP2 has no per-parameter
    dtype, and casting FP8 to bf16 would double the all-gather and unsharded bytes."""
    _, MixedPrecisionPolicy, fully_shard = _fsdp()
    if not any(isinstance(m, FP8Linear) for m in module.modules()):
        warnings.warn(f"fully_shard_fp8: {type(module).__name__} holds no FP8Linear, so its weights are "
                      "sharded and all-gathered in their own dtype; call fp8_fx.convert_to_fp8(model) "
                      "before sharding for FP8 weights at rest", stacklevel=2)
    policy = kwargs.get("mp_policy")
    if policy is not None and policy.param_dtype is not None:
        fp8_linears = _unsharded_fp8_linears(module)
        if fp8_linears:
            if fp8_linears == [module]:
                raise ValueError("fully_shard_fp8: an FP8Linear sharded on its own takes no mixed-precision "
                                 "param_dtype (its weight is FP8 at rest); pass mp_policy without param_dtype")
            fp8_policy = dataclasses.replace(policy, param_dtype=None, output_dtype=None,
                                             cast_forward_inputs=False)
            fully_shard(fp8_linears, **{**kwargs, "mp_policy": fp8_policy})
    return fully_shard(module, **kwargs)


def _all_gather_base():
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather  # no public path yet
    return AllGather


class CountingAllGather(_all_gather_base()):
    """FSDP2's all-gather, counting what it sends: install with
    `fsdp_module.set_custom_all_gather(counter)` (one counter may serve every module).
    `calls` holds (dtype on the wire, bytes this rank sends, bytes it receives)."""

    def __init__(self) -> None:
        self.calls: List[tuple] = []

    @property
    def sent_bytes(self) -> int:
        return sum(sent for _, sent, _ in self.calls)

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, async_op: bool = False):
        self.calls.append((input_tensor.dtype, input_tensor.numel() * input_tensor.element_size(),
                           output_tensor.numel() * output_tensor.element_size()))
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return gather(output_tensor, input_tensor, group=group, async_op=async_op)


def count_all_gathers(model: nn.Module) -> CountingAllGather:
    """Install one CountingAllGather on every FSDP module of `model` and return it."""
    FSDPModule, _, _ = _fsdp()
    counter = CountingAllGather()
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not modules:
        raise ValueError("count_all_gathers: no FSDP module in the model (call fully_shard first)")
    for m in modules:
        if not hasattr(m, "set_custom_all_gather"):
            raise NotImplementedError("this torch's FSDP2 has no set_custom_all_gather (torch >= 2.8 has)")
        m.set_custom_all_gather(counter)
    return counter

"""FP8 linears on tensor-parallel (DTensor) weights: each rank runs the FP8 GEMM on its
own shard, with scales of its own.

torch's tensor parallelism (`parallelize_module` with ColwiseParallel / RowwiseParallel)
makes the weights DTensors and runs `linear(x, w, b)` on DTensors; DTensor's dispatch
turns that into a local matmul plus the collectives the placements need. fp8_fx's ops
are CompositeImplicitAutograd (so Inductor can fuse the activation quantization), and
DTensor's dispatch sees an op only after such ops are decomposed: a tensor-wise amax
over a sharded input would become an all-reduce per linear, and the weight scales
global ones. Instead the pass rewrites a sharded linear on local tensors:

    x_local = x.to_local()                       # the rank's view of the input
    y_local = fp8 linear(x_local, weight shard quantized on its own, bias shard)
    y       = DTensor.from_local(y_local, mesh, output placement)   # what linear returned

so the FP8 ops only ever see plain tensors (no sharding rules needed, the same code on
every path: scaled_mm, emulate, weight_only) and DTensor keeps doing the collectives
that follow (the RowwiseParallel all-reduce, ...). What the scales mean per shard:

- colwise (weight Shard(0), input Replicate, output Shard(-1)): every rank quantizes the
  whole input (the same activation scales as one process) and its slice of the output
  channels. "row": each output channel's scale is the single-process one, so the answer
  equals one process's. "tensor": each rank's weight slice has its own scale (amax of
  its rows), at least as fine as one process's.
- rowwise (weight Shard(1), input Shard(-1), output Partial(sum)): each rank holds a
  slice of the input features; its activation slice and its weight slice each get
  their own scale ("tensor": one per slice; "row": one per token / output channel over
  the slice's features), the partial products are scaled on each rank, then summed by
  DTensor's all-reduce; the bias is added once, after the sum.
- replicated (weight Replicate, input Replicate or sharded on a leading dim, e.g.
  sequence parallel): one process's recipe on the rank's rows; "row" gives one
  process's answer, "tensor" an activation scale per rank's rows.

Scales are never all-reduced: no sync per linear, and an answer that differs from one
process's only by where the scale boundaries fall (measured in the tests).

Supported: 1-D device meshes, shards that split evenly (DTensor's from_local assumes
equal local shapes), bf16/fp16/fp32 weights. Anything else is left to DTensor with a
reason in the report.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple

import torch

from .. import ops  # noqa: F401 - defines fp8_fx.weight_only_linear, given sharding rules below


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # noqa: BLE001 - torch built without distributed
        return None
    return DTensor


def is_dtensor(t: Optional[torch.Tensor]) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank's shard of a DTensor (a plain tensor as it is)."""
    return t.to_local() if is_dtensor(t) else t


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """How one linear's operands are laid out over the ranks, and what it returns."""
    kind: str  # "colwise", "rowwise" or "replicated"
    mesh: object  # the DeviceMesh
    output_placements: tuple
    bias_in_gemm: bool  # False for rowwise: the bias is added once, after the partial sums

    def local_weight_shape(self, shape) -> Tuple[int, int]:
        """(out_features, in_features) of the rank's weight shard (shards are even)."""
        n = self.mesh.size()
        out_features, in_features = int(shape[0]), int(shape[1])
        if self.kind == "colwise":
            return out_features // n, in_features
        if self.kind == "rowwise":
            return out_features, in_features // n
        return out_features, in_features

    def describe(self, granularity: str) -> str:
        n = self.mesh.size()
        scales = {
            "colwise": f"each rank's output channels with own weight scale{'s' if granularity == 'row' else ''}",
            "rowwise": "each rank's input-feature slice with own activation and weight scales, "
                       "partial sums all-reduced after scaling",
            "replicated": "the full weight on every rank",
        }[self.kind]
        return f"tensor-parallel {self.kind} shard on a {n}-rank mesh ({scales}); "


def _placements(t) -> str:
    return "(" + ", ".join(str(p) for p in t.placements) + ")"


def shard_layout(x, weight, bias) -> Tuple[Optional[ShardLayout], str]:
    """(layout, "") for a linear whose operands (example values) are DTensors laid out
    the way fp8_fx supports, else (None, why not). Call only if one of them is a DTensor."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    def shard_dim(p, ndim: int) -> Optional[int]:
        return (p.dim % ndim) if isinstance(p, Shard) else None

    if not is_dtensor(weight) or not is_dtensor(x):
        plain = "input" if is_dtensor(weight) else "weight"
        return None, f"DTensor and plain {plain} mixed in one linear: fp8_fx needs both as DTensors"
    if bias is not None and not is_dtensor(bias):
        return None, "DTensor weight with a plain bias: fp8_fx needs the bias as a DTensor too"
    mesh = weight.device_mesh
    if mesh.ndim != 1 or x.device_mesh != mesh or (bias is not None and bias.device_mesh != mesh):
        return None, (f"DTensor on a {mesh.ndim}-D mesh or on different meshes: fp8_fx's "
                      "tensor-parallel linears support one 1-D mesh")
    (wp,), (xp,) = weight.placements, x.placements
    bp = bias.placements[0] if bias is not None else None
    last = x.dim() - 1
    n = mesh.size()
    where = f"weight {_placements(weight)}, input {_placements(x)}"
    if isinstance(xp, Partial) or isinstance(wp, Partial) or isinstance(bp, Partial):
        return None, f"Partial placement ({where}): not a tensor-parallel layout fp8_fx supports"
    if shard_dim(wp, 2) == 0 and isinstance(xp, Replicate) and (bp is None or shard_dim(bp, 1) == 0):
        if weight.shape[0] % n:
            return None, f"colwise shard of {weight.shape[0]} output features over {n} ranks is uneven"
        return ShardLayout("colwise", mesh, (Shard(last),), True), ""
    if shard_dim(wp, 2) == 1 and shard_dim(xp, x.dim()) == last and (bp is None or isinstance(bp, Replicate)):
        if weight.shape[1] % n:
            return None, f"rowwise shard of {weight.shape[1]} input features over {n} ranks is uneven"
        return ShardLayout("rowwise", mesh, (Partial(),), False), ""
    if isinstance(wp, Replicate) and (bp is None or isinstance(bp, Replicate)) and (
            isinstance(xp, Replicate) or shard_dim(xp, x.dim()) not in (None, last)):
        if isinstance(xp, Shard) and x.shape[xp.dim % x.dim()] % n:
            return None, f"input sharded unevenly on dim {xp.dim} over {n} ranks"
        return ShardLayout("replicated", mesh, (xp,), True), ""
    return None, (f"sharded layout {where}, bias {_placements(bias) if bias is not None else None}: "
                  "fp8_fx supports colwise (Shard(0) weight, Replicate input), rowwise "
                  "(Shard(1) weight, Shard(-1) input) and replicated weights")


def local_to_dtensor(mesh, placements) -> Callable[[torch.Tensor], torch.Tensor]:
    """A graph target that turns the rank's local result back into the DTensor the
    replaced linear returned. A closure, not a node argument: the mesh is a Python object
    that FX code cannot spell (the function is kept in the generated code's globals)."""
    from torch.distributed.tensor import DTensor

    def fp8_fx_local_to_dtensor(y: torch.Tensor):
        return DTensor.from_local(y, mesh, placements, run_check=False)

    return fp8_fx_local_to_dtensor


def _register_weight_only_sharding() -> None:
    """DTensor sharding rules for `fp8_fx.weight_only_linear`, the one opaque op that can
    meet DTensors outside the pass: an FP8Linear whose FP8 weight and scale were
    distributed by hand (parallelize_module refuses FP8Linear itself). Its scales are the
    ones it was converted with (one process's), so the rules only say where each piece
    lives: colwise (weight and row scales Shard(0), input Replicate), rowwise (weight
    Shard(1), input Shard(-1), bias Partial so it is counted once), all replicated."""
    try:
        from torch.distributed.tensor import Partial, Replicate, Shard
        from torch.distributed.tensor.experimental import register_sharding
    except Exception:  # noqa: BLE001 - torch built without distributed
        return

    @register_sharding(torch.ops.fp8_fx.weight_only_linear.default)
    def weight_only_linear_sharding(x, wq, w_scale, bias, input_scale=None):
        def given(spec, placement):  # None where the op got None
            return None if spec is None else placement

        rows = w_scale.ndim > 0
        last = x.ndim - 1
        in_scale = given(input_scale, Replicate())
        return [
            ([Replicate()], [Replicate(), Replicate(), Replicate(), given(bias, Replicate()), in_scale]),
            ([Shard(last)], [Replicate(), Shard(0), Shard(0) if rows else Replicate(),
                             given(bias, Shard(0)), in_scale]),
            ([Partial()], [Shard(last), Shard(1), Replicate(), given(bias, Partial()), in_scale]),
        ]


_register_weight_only_sharding()


def parallelize_wan(transformer, mesh) -> None:
    """Megatron-style tensor parallelism for diffusers' WanTransformer3DModel, in place:
    q/k/v and the FFN's first linear column-wise, `to_out.0` and the FFN's second row-wise,
    each attention left with heads / world_size heads per rank.

    Wan normalizes q and k over all heads (RMSNorm over the whole inner dim), so a rank's
    slice of q/k cannot be normalized alone: to_q/to_k hand their output on as DTensors,
    the norm sees it whole (all-gathered, with its weight replicated) and gives the rank
    its slice back as a plain tensor, as the attention processor expects."""
    from torch.distributed.tensor import Replicate, Shard, distribute_module
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    ranks = mesh.size()
    plan = {}
    for i, block in enumerate(transformer.blocks):
        for name in ("attn1", "attn2"):
            attention = getattr(block, name)
            if attention.heads % ranks:
                raise ValueError(f"parallelize_wan: blocks.{i}.{name} has {attention.heads} heads, which "
                                 f"do not split over {ranks} ranks")
            prefix = f"blocks.{i}.{name}"
            plan[f"{prefix}.to_q"] = ColwiseParallel(use_local_output=False)
            plan[f"{prefix}.to_k"] = ColwiseParallel(use_local_output=False)
            plan[f"{prefix}.to_v"] = ColwiseParallel()
            plan[f"{prefix}.to_out.0"] = RowwiseParallel()
        plan[f"blocks.{i}.ffn.net.0.proj"] = ColwiseParallel()
        plan[f"blocks.{i}.ffn.net.2"] = RowwiseParallel()
    parallelize_module(transformer, mesh, plan)

    def whole(module, inputs, device_mesh):
        return tuple(t.redistribute(device_mesh, (Replicate(),)) for t in inputs)

    def rank_slice(module, output, device_mesh):
        return output.redistribute(device_mesh, (Shard(-1),)).to_local()

    for block in transformer.blocks:
        for attention in (block.attn1, block.attn2):
            attention.heads //= ranks
            for norm in (attention.norm_q, attention.norm_k):
                distribute_module(norm, mesh, input_fn=whole, output_fn=rank_slice)

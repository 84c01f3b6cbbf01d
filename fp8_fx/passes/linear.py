"""The FX pass: find the linear ops of a Dynamo graph, decide each one, rewrite.

Dynamo inlines nn.Modules: a linear arrives as `call_function torch._C._nn.linear`
whose weight is a graph placeholder (the real parameter is an example input, and a
second model instance reuses the graph with its own parameters). So the pass never
bakes a weight into the graph: each converted weight placeholder gets two new
placeholders, its FP8 copy and its scale, which the backend feeds at run time from a
cache that quantizes each parameter once (see weight_cache.py).

    x, weight, bias                    x, weight_fp8, weight_scale, bias
    linear(x, weight, bias)     ->     xq, x_scale = fp8_fx.quantize(x)      # once per x
                                       fp8_fx.scaled_mm(xq, x_scale, weight_fp8, weight_scale, bias)

Where x comes straight out of a library kernel (cuDNN attention, a GEMM, or the GELU
of a GEMM's output) there is no Inductor kernel to fuse its quantization into; the pass
emits `fp8_fx.triton_quantize(source, granularity, activation)` instead, fp8_fx's own
kernels (kernels/triton_quantize.py), with the GELU folded in.

The pass touches nothing but the linear calls it converts: no dead-code elimination
(FX's would also delete in-place ops whose result is unused, such as a buffer's
`copy_`), only the replaced call is erased.

Tensor-parallel linears (DTensor weights, torch's ColwiseParallel / RowwiseParallel) get
the same ops on this rank's shards: x.to_local(), the weight cache's FP8 copy of the
local shard, then DTensor.from_local with the placement the linear returned (a rowwise
bias added once, after the partial sums). Layouts it does not run stay DTensor linears,
with a reason (distributed/tensor_parallel.py).

Layers converted before compiling (FP8Linear, see modules.py) arrive as
`fp8_fx.weight_only_linear(x, weight_fp8, scale, bias)` with FP8 weights already in the
graph: they get the same rewrite, without new inputs. With a calibrated static input
scale (calibrate.py) the call carries it, and x is cast with it by
`fp8_fx.quantize_static`, which Inductor fuses into the producer of x; layers sharing x
(q, k, v) share one cast, with the largest of their scales.

Layers wrapped by PEFT (LoRA adapters, see lora.py) are decided by the rule of
qualname.resolve_peft: the base layer answers to the wrapper's path, so the targets match
it and it is converted as the layer it replaced; the adapter branch's linears
(`lora_A`, `lora_B`) are skipped and run in the input dtype on the same input.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx

from .. import attention_recipes  # noqa: F401 - fp8_attention, a library kernel below
from .. import ops, targeting
from ..config import FP8Config
from ..distributed import tensor_parallel
from ..kernels import triton_quantize
from ..qualname import ADAPTER, BASE, ModulePath, node_module_path
from ..report import LinearDecision
from . import FP8Pass, PassResult
from .fx_utils import call, copy_dynamo_graph_module, example_value, weight_placeholder

_LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear, torch.ops.aten.linear.default)
_OP_FOR_ACTION = {
    "scaled_mm": torch.ops.fp8_fx.scaled_mm.default,
    "emulate": torch.ops.fp8_fx.emulated_scaled_mm.default,
}


# Ops whose output is a fresh buffer written by a library kernel (cuBLAS, cuDNN).
_LIBRARY_KERNELS = (*_LINEAR_TARGETS, torch.nn.functional.scaled_dot_product_attention,
                    torch.matmul, torch.bmm, torch.mm, operator.matmul,
                    torch.ops.fp8_fx.scaled_mm.default, torch.ops.fp8_fx.weight_only_linear.default,
                    torch.ops.fp8_fx.fp8_attention.default)
_GELUS = (torch._C._nn.gelu, torch.nn.functional.gelu, torch.ops.aten.gelu.default)
# Ops that pass their input's values on unchanged (checked: same dtype and numel).
# Methods that reshape or re-lay out their input; with the casts (to the same dtype, checked
# where used), the methods that pass their input's values on unchanged.
_SHAPE_METHODS = ("view", "reshape", "flatten", "unflatten", "permute", "transpose", "contiguous",
                  "squeeze", "unsqueeze")
_SAME_DTYPE_CASTS = ("type_as", "to")
_VIEW_METHODS = (*_SHAPE_METHODS, *_SAME_DTYPE_CASTS)
_VIEW_FUNCTIONS = (torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
                   torch.unsqueeze, torch.unflatten)
_DROPOUTS = (torch.nn.functional.dropout, torch.dropout)


@dataclasses.dataclass(frozen=True)
class WeightSlot:
    """Graph input `input_index` (a bf16 weight) is fed quantized as two extra inputs."""
    input_index: int
    granularity: str
    qualname: str = ""  # for messages about this weight (a non-finite amax)


@dataclasses.dataclass
class RewriteResult:
    graph_module: torch.fx.GraphModule  # the rewritten copy
    decisions: List[LinearDecision]
    weight_slots: List[WeightSlot]  # in the order of the placeholders appended to the graph

    @property
    def converted(self) -> int:
        return sum(d.converted for d in self.decisions)


@dataclasses.dataclass
class _Linear:
    node: torch.fx.Node
    x: torch.fx.Node
    weight: torch.fx.Node
    bias: Optional[torch.fx.Node]
    scale: Optional[torch.fx.Node] = None  # set when the weight is already FP8 (FP8Linear)
    input_scale: Optional[torch.fx.Node] = None  # a calibrated static scale for x (FP8Linear)

    @property
    def static(self) -> bool:
        """A calibrated input scale that applies: one scale for x needs a per-tensor weight
        scale (cuBLAS pairs tensor with tensor, row with row)."""
        return self.input_scale is not None and self.at_rest_granularity == "tensor"

    @property
    def at_rest_granularity(self) -> Optional[str]:
        if self.scale is None:
            return None
        scale = example_value(self.scale)
        return "row" if scale is not None and scale.dim() > 0 else "tensor"


def _as_linear(node: torch.fx.Node) -> Optional[_Linear]:
    if node.op != "call_function":
        return None
    if node.target is torch.ops.fp8_fx.weight_only_linear.default:  # an FP8Linear module
        x, weight, scale, bias, input_scale = (*node.args, None)[:5]
        return _Linear(node, x, weight, bias, scale, node.kwargs.get("input_scale", input_scale))
    if node.target not in _LINEAR_TARGETS:
        return None
    args = list(node.args) + [None] * (3 - len(node.args))
    x = node.kwargs.get("input", args[0])
    weight = node.kwargs.get("weight", args[1])
    bias = node.kwargs.get("bias", args[2])
    return _Linear(node, x, weight, bias)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:{index} (sm{major}{minor})"
    return str(device)


def _is_subclass(t: Optional[torch.Tensor]) -> bool:
    """A tensor subclass other than DTensor (whose tensor-parallel layouts the pass runs
    on local shards, see distributed/tensor_parallel.py): fp8_fx's ops do not know what
    its data means, so such layers are left alone rather than crash in propagation."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    return t is not None and is_traceable_wrapper_subclass(t) and not tensor_parallel.is_dtensor(t)


def _shard_layout(linear: _Linear):
    """(ShardLayout or None, why not) for a linear with DTensor operands; (None, "") for
    plain ones."""
    w, x = example_value(linear.weight), example_value(linear.x)
    if not (tensor_parallel.is_dtensor(w) or tensor_parallel.is_dtensor(x)):
        return None, ""
    bias = example_value(linear.bias) if linear.bias is not None else None
    return tensor_parallel.shard_layout(x, w, bias)


def decide(linear: _Linear, qualname: Optional[str], config: FP8Config,
           fp8_tensor_cores: Optional[bool] = None, where: Optional[ModulePath] = None) -> Tuple[str, str]:
    """(action, reason) for one linear op. Pure: reads only the node metadata and config.
    fp8_tensor_cores: None asks the weight's device; True/False decides as if on one
    (`python -m fp8_fx inspect` shows a GPU's decisions on a CPU).
    where: the module's place (qualname.node_module_path), for PEFT-wrapped layers."""
    action, reason = _decide(linear, qualname, config, fp8_tensor_cores, where)
    if where is not None and where.peft == BASE and action != "skipped":
        reason = "PEFT base layer; " + reason
    return action, reason


def _decide(linear: _Linear, qualname: Optional[str], config: FP8Config,
            fp8_tensor_cores: Optional[bool], where: Optional[ModulePath]) -> Tuple[str, str]:
    w, x = example_value(linear.weight), example_value(linear.x)
    subclass = next((t for t in (w, x) if _is_subclass(t)), None)
    if subclass is not None:
        return "skipped", (f"{type(subclass).__name__} {'weight' if subclass is w else 'input'} "
                           "(a tensor subclass): fp8_fx's ops run on plain tensors and DTensors only")
    if where is not None and where.peft == ADAPTER:
        from ..lora import ADAPTER_REASON
        return "skipped", (ADAPTER_REASON if where.adapter_component.startswith("lora_")
                           else ADAPTER_REASON.replace("LoRA", "PEFT", 1))
    sharded = tensor_parallel.is_dtensor(w) or tensor_parallel.is_dtensor(x)
    if linear.scale is not None and sharded:
        return "skipped", ("FP8 weights at rest (FP8Linear) on DTensors: left weight-only, run by "
                           "DTensor with fp8_fx's sharding rules and the scales it was converted with; "
                           "for FP8 GEMMs on each rank's shard, parallelize the bf16 model and let "
                           "the backend quantize the shards")
    if linear.scale is not None:  # converted before compiling: no targeting decision left
        return _device_action(linear, config, fp8_tensor_cores,
                              f"FP8 weights at rest ({linear.at_rest_granularity}); ")
    why_not = targeting.why_not_targeted(qualname, config)
    if why_not:
        return "skipped", why_not
    if linear.weight.op != "placeholder" or w is None:
        return "skipped", "weight is computed in the graph, not a parameter"
    out = example_value(linear.node)
    if w.dim() != 2 or x is None or out is None:
        return "skipped", "not a 2-D weight with known shapes"
    why_not = targeting.why_not_fp8_dtype(w.dtype)
    if why_not:
        return "skipped", why_not
    if not (x.dtype == w.dtype == out.dtype):
        return "skipped", (f"mixed dtypes (input {x.dtype}, weight {w.dtype}, output {out.dtype}; "
                           "autocast?): cast the model instead of using autocast")
    why_not = targeting.why_not_fp8_shape(in_features=w.shape[1], out_features=w.shape[0])
    if why_not:
        return "skipped", why_not
    prefix = ""
    if sharded:
        layout, why_not = _shard_layout(linear)
        if layout is None:
            return "skipped", f"tensor-parallel (DTensor) linear left to DTensor: {why_not}"
        out_local, in_local = layout.local_weight_shape(w.shape)
        why_not = targeting.why_not_fp8_shape(in_features=in_local, out_features=out_local)
        if why_not:
            return "skipped", f"tensor-parallel {layout.kind} shard: the rank's local weight has {why_not}"
        prefix = layout.describe(config.granularity)
    return _device_action(linear, config, fp8_tensor_cores, prefix)


def _device_action(linear: _Linear, config: FP8Config, fp8_tensor_cores: Optional[bool],
                   prefix: str = "") -> Tuple[str, str]:
    w = example_value(linear.weight)
    if fp8_tensor_cores is None:
        fp8_tensor_cores = ops.has_fp8_tensor_cores(w.device)
        where = _device_name(w.device)
        if w.device.type == "meta":
            where = "meta (traced without a device: pass --gpu to inspect to decide as on an sm89+ GPU)"
    else:
        where = "the assumed device"
    if fp8_tensor_cores:
        action, why = "scaled_mm", f"FP8 tensor cores on {where}"
    else:
        action, why = config.fallback, f"no FP8 tensor cores on {where}: fallback={config.fallback!r}"
    if linear.static and action != "weight_only":  # weight-only does not quantize x at all
        prefix += "static input scale; "
    return action, prefix + why


def _same_values_input(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    """The input whose values `node` passes on unchanged (a view, a cast to the same
    dtype, dropout in eval mode), else None."""
    if node.op == "call_method" and node.target in _VIEW_METHODS:
        source = node.args[0]
    elif node.op == "call_function" and node.target in _VIEW_FUNCTIONS:
        source = node.args[0]
    elif node.op == "call_function" and node.target in _DROPOUTS:
        args = list(node.args) + [None] * 3
        p, training = node.kwargs.get("p", args[1]), node.kwargs.get("train", node.kwargs.get("training", args[2]))
        source = node.args[0] if (p == 0 or training is False) else None
    else:
        return None
    out, src = example_value(node), example_value(source)
    if out is None or src is None or out.dtype != src.dtype or out.numel() != src.numel():
        return None
    return source


def _is_pure_passthrough(node: torch.fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _VIEW_METHODS) or (
        node.op == "call_function" and node.target in (*_VIEW_FUNCTIONS, *_GELUS))  # not dropout: RNG


def _value_source(node: torch.fx.Node) -> torch.fx.Node:
    while (source := _same_values_input(node)) is not None:
        node = source
    return node


def _from_library_kernel(node: torch.fx.Node) -> bool:
    """Whether node's values are a buffer some library kernel (or the caller) wrote."""
    node = _value_source(node)
    return node.op in ("placeholder", "get_attr") or (
        node.op == "call_function" and node.target in _LIBRARY_KERNELS)


def fp8_attention_output(x: torch.fx.Node) -> Optional[Tuple[torch.fx.Node, List[torch.fx.Node]]]:
    """(the `fp8_fx.dequantize` of an FP8 attention output, the shape ops from it to x)
    when x is that output seen through shape ops only (and casts to its own dtype), else
    None: its FP8 codes and scale can then be the GEMM's input as they are."""
    chain: List[torch.fx.Node] = []
    node = x
    while True:
        if node.op == "call_function" and node.target is torch.ops.fp8_fx.dequantize.default:
            return node, chain
        shape_op = (node.op == "call_method" and node.target in _SHAPE_METHODS) or (
            node.op == "call_function" and node.target in _VIEW_FUNCTIONS)
        cast = node.op == "call_method" and node.target in _SAME_DTYPE_CASTS and _same_values_input(node) is not None
        if not (shape_op or cast) or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return None
        if shape_op:
            chain.append(node)
        node = node.args[0]


def triton_quantize_input(x: torch.fx.Node) -> Optional[Tuple[torch.fx.Node, str]]:
    """(input, activation) for `fp8_fx.triton_quantize` when the linear input x has no
    Inductor producer kernel to fuse its quantization into, else None."""
    source = _value_source(x)
    if source.op == "call_function" and source.target in _GELUS:
        approximate = source.kwargs.get("approximate", source.args[1] if len(source.args) > 1 else "none")
        pre = source.args[0]
        same_shape = example_value(source) is not None and example_value(x) is not None and (
            example_value(source).shape == example_value(x).shape)
        if approximate in ("none", "tanh") and same_shape and _from_library_kernel(pre):
            return pre, "gelu" if approximate == "none" else "gelu_tanh"
        return None
    return (x, "none") if _from_library_kernel(source) else None


def _static_scales_by_input(graph: torch.fx.Graph) -> Dict[torch.fx.Node, List[torch.fx.Node]]:
    """For each input x, the static scale nodes of the FP8Linear calls reading it."""
    scales: Dict[torch.fx.Node, List[torch.fx.Node]] = {}
    for node in graph.nodes:
        linear = _as_linear(node)
        if linear is not None and linear.static:
            scales.setdefault(linear.x, [])
            if linear.input_scale not in scales[linear.x]:
                scales[linear.x].append(linear.input_scale)
    return scales


def _largest(graph: torch.fx.Graph, scales: List[torch.fx.Node], name: str) -> torch.fx.Node:
    """One scale for an input shared by layers calibrated apart: the largest saturates
    none of them (calibration gives layers that share an input the same scale)."""
    largest = scales[0]
    for other in scales[1:]:
        largest = call(graph, torch.maximum, (largest, other), name)
    return largest


class _Rewriter:
    """The state of one graph's rewrite: FP8 weight inputs and quantized activations
    made so far (each made once and shared: q, k and v read one quantization of x)."""

    def __init__(self, graph: torch.fx.Graph, config: FP8Config, use_triton: bool) -> None:
        self.graph, self.config, self.use_triton = graph, config, use_triton
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self.placeholders = set(placeholders)
        self.input_index = {n: i for i, n in enumerate(placeholders)}
        self.insert_point = placeholders[-1] if placeholders else None
        self.slots: List[WeightSlot] = []
        self.fp8_weights: Dict[torch.fx.Node, Tuple[torch.fx.Node, torch.fx.Node]] = {}
        self.fp8_inputs: Dict[Tuple[torch.fx.Node, str], Tuple[torch.fx.Node, torch.fx.Node]] = {}
        self.static_scales = _static_scales_by_input(graph)
        self.local_views: Dict[torch.fx.Node, torch.fx.Node] = {}

    def fp8_weight(self, linear: _Linear, stem: str, qualname: str) -> Tuple[torch.fx.Node, torch.fx.Node]:
        """(fp8 weight, scale): the FP8Linear's own tensors, or two new graph inputs the
        backend feeds from its weight cache."""
        if linear.scale is not None:
            return linear.weight, linear.scale
        if linear.weight not in self.fp8_weights:
            with self.graph.inserting_after(self.insert_point):
                wq = weight_placeholder(self.graph, f"{stem}_weight_fp8")
            with self.graph.inserting_after(wq):
                ws = weight_placeholder(self.graph, f"{stem}_weight_scale")
            self.insert_point = ws
            self.fp8_weights[linear.weight] = (wq, ws)
            self.slots.append(WeightSlot(self.input_index[linear.weight], self.config.granularity, qualname))
        return self.fp8_weights[linear.weight]

    def fp8_input(self, linear: _Linear, action: str, granularity: str) -> Tuple[torch.fx.Node, torch.fx.Node]:
        """(fp8 x, scale), made before the first linear that reads x."""
        graph, static = self.graph, linear.static
        key = (linear.x, "static" if static else granularity)
        if key in self.fp8_inputs:
            return self.fp8_inputs[key]
        x_name = linear.x.name
        attention_out = fp8_attention_output(linear.x) if not static and granularity == "tensor" else None
        if static:
            xs = _largest(graph, self.static_scales[linear.x], f"{x_name}_static_scale")
            quant = call(graph, torch.ops.fp8_fx.quantize_static.default, (linear.x, xs), f"{x_name}_fp8")
            made = (quant, xs)
        elif attention_out is not None:
            # The attention kernel's FP8 output and its scale are this GEMM's input already:
            # the same shape ops on the codes, no amax pass, no second rounding.
            (dequantize, chain), quant = attention_out, None
            codes, scale = dequantize.args[0], dequantize.args[1]
            for op in reversed(chain):
                codes = (graph.call_method(op.target, (codes, *op.args[1:]), op.kwargs) if op.op == "call_method"
                         else graph.call_function(op.target, (codes, *op.args[1:]), op.kwargs))
                codes.name = f"{op.name}_fp8"
            made = (codes, scale)
        else:
            source = triton_quantize_input(linear.x) if action == "scaled_mm" and self.use_triton else None
            if source is not None:
                quant = call(graph, torch.ops.fp8_fx.triton_quantize.default,
                             (source[0], granularity, source[1]), f"{x_name}_quantized")
            else:
                quant = call(graph, torch.ops.fp8_fx.quantize.default, (linear.x, granularity),
                             f"{x_name}_quantized")
            made = (call(graph, operator.getitem, (quant, 0), f"{x_name}_fp8"),
                    call(graph, operator.getitem, (quant, 1), f"{x_name}_scale"))
        for n in {quant, *made} - self.placeholders - {None}:  # where it was inserted
            n.meta["nn_module_stack"] = linear.node.meta.get("nn_module_stack", {})
        self.fp8_inputs[key] = made
        return made

    def local(self, node: torch.fx.Node) -> torch.fx.Node:
        """`node.to_local()` (made once, before its first use): a DTensor's shard on this rank."""
        if node not in self.local_views:
            local = self.graph.call_method("to_local", (node,))
            local.name = f"{node.name}_local"
            local.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
            self.local_views[node] = local
        return self.local_views[node]

    def rewrite(self, linear: _Linear, action: str, qualname: Optional[str]) -> None:
        node = linear.node
        # Readable names in the rewritten graph: blocks_0_attn1_to_q_weight_fp8, ...
        stem = (qualname or node.name).replace(".", "_")
        granularity = linear.at_rest_granularity or self.config.granularity
        wq, ws = self.fp8_weight(linear, stem, qualname or "")  # a DTensor's: its local shard's
        layout, _ = _shard_layout(linear)
        with self.graph.inserting_before(node):
            # Tensor parallel: the same FP8 ops on this rank's shards (distributed/tensor_parallel.py).
            local = linear if layout is None else dataclasses.replace(
                linear, x=self.local(linear.x),
                bias=self.local(linear.bias) if layout.bias_in_gemm and linear.bias is not None else None)
            if action == "weight_only":
                new = call(self.graph, torch.ops.fp8_fx.weight_only_linear.default,
                           (local.x, wq, ws, local.bias), stem)
            else:
                xq, xs = self.fp8_input(local, action, granularity)
                args = (xq, xs, wq, ws, local.bias, example_value(node).dtype)
                if action == "scaled_mm":
                    args += (self.config.fast_accum,)
                new = call(self.graph, _OP_FOR_ACTION[action], args, stem)
            if layout is not None:
                new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
                new = call(self.graph, tensor_parallel.local_to_dtensor(layout.mesh, layout.output_placements),
                           (new,), f"{stem}_dtensor")
                if linear.bias is not None and not layout.bias_in_gemm:  # once, after the partial sums
                    new = call(self.graph, operator.add, (new, linear.bias), f"{stem}_plus_bias")
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        self._erase_if_dead(linear.x)

    def _erase_if_dead(self, node: torch.fx.Node) -> None:
        """Erase the views and GELU that fed x into a folded-in quantization (triton_quantize
        reads the GELU's input; an FP8 attention output's codes replace its dequantization),
        once nothing reads them. Only these known-pure ops: a
        whole-graph dead-code elimination would also delete in-place ops (`buf.copy_(x)`)."""
        while node.op in ("call_function", "call_method") and not node.users and (
                _is_pure_passthrough(node) or node.target is torch.ops.fp8_fx.dequantize.default):
            source = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
            self.graph.erase_node(node)  # then up its value's source (type_as's other input is not one)
            if source is None:
                return
            node = source


class LinearPass(FP8Pass):
    """FP8 linears: one decision per linear op, converted ones rewritten to fp8_fx ops."""

    name = "fp8_fx.linear"

    def __init__(self, config: FP8Config, fp8_tensor_cores: Optional[bool] = None) -> None:
        super().__init__(config)
        self.fp8_tensor_cores = fp8_tensor_cores

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        config, graph = self.config, gm.graph
        use_triton = config.triton_quantize and (
            self.fp8_tensor_cores if self.fp8_tensor_cores is not None else triton_quantize.available())
        rewriter = _Rewriter(graph, config, use_triton)
        decisions: List[LinearDecision] = []
        for node in list(graph.nodes):
            linear = _as_linear(node)
            if linear is None:
                continue
            where = node_module_path(node)
            qualname = where.qualname if where is not None else None
            action, reason = decide(linear, qualname, config, self.fp8_tensor_cores, where)
            w = example_value(linear.weight)
            decisions.append(LinearDecision(
                qualname=qualname or "", action=action, reason=reason,
                in_features=int(w.shape[-1]) if w is not None else -1,
                out_features=int(w.shape[0]) if w is not None else -1))
            if action == "skipped" or (action == "weight_only" and linear.scale is not None):
                continue  # left as it is (an FP8Linear already runs weight-only)
            if where is not None and where.peft == BASE and linear.scale is None:
                from ..lora import follow_merges  # fuse_lora edits the weight unseen: drop its copies then
                follow_merges(where.wrapper_type)
            rewriter.rewrite(linear, action, qualname)
        graph.lint()
        gm.recompile()
        return PassResult(decisions, rewriter.slots)


def rewrite_linears(gm: torch.fx.GraphModule, config: FP8Config,
                    fp8_tensor_cores: Optional[bool] = None) -> RewriteResult:
    """A rewritten copy of `gm` and one decision per linear op, in graph order."""
    gm = copy_dynamo_graph_module(gm)
    result = LinearPass(config, fp8_tensor_cores).run(gm)
    return RewriteResult(gm, result.decisions, result.weight_slots)

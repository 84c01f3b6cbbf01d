"""The FX pass: find the linear ops of a Dynamo graph, decide each one, rewrite.

Dynamo inlines nn.Modules: a linear arrives as `call_function torch._C._nn.linear`
whose weight is a graph placeholder (the real parameter is an example input, and a
second model instance reuses the graph with its own parameters). So the pass never
bakes a weight into the graph: each converted weight placeholder gets two new
placeholders, its FP8 copy and its scale, which the backend feeds at run time from a
cache that quantizes each parameter once (see weights.py).

    x, weight, bias                    x, weight_fp8, weight_scale, bias
    linear(x, weight, bias)     ->     xq, x_scale = fp8_fx.quantize(x)      # once per x
                                       fp8_fx.scaled_mm(xq, x_scale, weight_fp8, weight_scale, bias)

Where x comes straight out of a library kernel (cuDNN attention, a GEMM, or the GELU
of a GEMM's output) there is no Inductor kernel to fuse its quantization into; the pass
emits `fp8_fx.triton_quantize(source, granularity, activation)` instead, fp8_fx's own
kernels (triton_quantize.py), with the GELU folded in.

Layers converted before compiling (FP8Linear, see fp8_weights.py) arrive as
`fp8_fx.weight_only_linear(x, weight_fp8, scale, bias)` with FP8 weights already in the
graph: they get the same rewrite, without new inputs. With a calibrated static input
scale (calibrate.py) the call carries it, and x is cast with it by
`fp8_fx.quantize_static`, which Inductor fuses into the producer of x; layers sharing x
(q, k, v) share one cast, with the largest of their scales.
"""
from __future__ import annotations

import copy
import dataclasses
import operator
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx

from . import ops, triton_quantize
from .config import FP8Config
from .qualname import matching_suffix, node_qualname
from .report import LinearDecision

_LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear, torch.ops.aten.linear.default)
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_OP_FOR_ACTION = {
    "scaled_mm": torch.ops.fp8_fx.scaled_mm.default,
    "emulate": torch.ops.fp8_fx.emulated_scaled_mm.default,
}


# Ops whose output is a fresh buffer written by a library kernel (cuBLAS, cuDNN).
_LIBRARY_KERNELS = (*_LINEAR_TARGETS, torch.nn.functional.scaled_dot_product_attention,
                    torch.matmul, torch.bmm, torch.mm, operator.matmul,
                    torch.ops.fp8_fx.scaled_mm.default, torch.ops.fp8_fx.weight_only_linear.default)
_GELUS = (torch._C._nn.gelu, torch.nn.functional.gelu, torch.ops.aten.gelu.default)
# Ops that pass their input's values on unchanged (checked: same dtype and numel).
_VIEW_METHODS = ("view", "reshape", "flatten", "unflatten", "permute", "transpose",
                 "contiguous", "type_as", "to", "squeeze", "unsqueeze")
_VIEW_FUNCTIONS = (torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
                   torch.unsqueeze, torch.unflatten)
_DROPOUTS = (torch.nn.functional.dropout, torch.dropout)


@dataclasses.dataclass(frozen=True)
class WeightSlot:
    """Graph input `input_index` (a bf16 weight) is fed quantized as two extra inputs."""
    input_index: int
    granularity: str


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
        scale = _example(self.scale)
        return "row" if scale is not None and scale.dim() > 0 else "tensor"


def _example(node) -> Optional[torch.Tensor]:
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


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


def decide(linear: _Linear, qualname: Optional[str], config: FP8Config,
           fp8_tensor_cores: Optional[bool] = None) -> Tuple[str, str]:
    """(action, reason) for one linear op. Pure: reads only the node metadata and config.
    fp8_tensor_cores: None asks the weight's device; True/False decides as if on one
    (`python -m fp8_fx inspect` shows a GPU's decisions on a CPU)."""
    if linear.scale is not None:  # converted before compiling: no targeting decision left
        static = "static input scale; " if linear.static else ""
        return _device_action(linear.weight, config, fp8_tensor_cores,
                              f"FP8 weights at rest ({linear.at_rest_granularity}); {static}")
    if qualname is None:
        return "skipped", "no module path (F.linear called outside any module)"
    excluded = matching_suffix(qualname, config.exclude)
    if excluded:
        return "skipped", f"excluded by {excluded!r}"
    if not matching_suffix(qualname, config.targets):
        return "skipped", "not targeted"
    w = _example(linear.weight)
    if linear.weight.op != "placeholder" or w is None:
        return "skipped", "weight is computed in the graph, not a parameter"
    x = _example(linear.x)
    out = _example(linear.node)
    if w.dim() != 2 or x is None or out is None:
        return "skipped", "not a 2-D weight with known shapes"
    if w.dtype not in _FLOAT_DTYPES:
        return "skipped", f"weight dtype {w.dtype} is not bf16/fp16/fp32"
    if not (x.dtype == w.dtype == out.dtype):
        return "skipped", (f"mixed dtypes (input {x.dtype}, weight {w.dtype}, output {out.dtype}; "
                           "autocast?): cast the model instead of using autocast")
    n, k = w.shape
    bad = [f"{name}={v}" for name, v in (("in_features", k), ("out_features", n)) if v % 16 or v == 0]
    if bad:
        return "skipped", f"{' and '.join(bad)} not a positive multiple of 16 (FP8 GEMM needs it)"
    return _device_action(linear.weight, config, fp8_tensor_cores)


def _device_action(weight: torch.fx.Node, config: FP8Config, fp8_tensor_cores: Optional[bool],
                   prefix: str = "") -> Tuple[str, str]:
    w = _example(weight)
    if fp8_tensor_cores is None:
        fp8_tensor_cores = ops.has_fp8_tensor_cores(w.device)
        where = _device_name(w.device)
    else:
        where = "the assumed device"
    if fp8_tensor_cores:
        return "scaled_mm", f"{prefix}FP8 tensor cores on {where}"
    return config.fallback, f"{prefix}no FP8 tensor cores on {where}: fallback={config.fallback!r}"


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
    out, src = _example(node), _example(source)
    if out is None or src is None or out.dtype != src.dtype or out.numel() != src.numel():
        return None
    return source


def _value_source(node: torch.fx.Node) -> torch.fx.Node:
    while (source := _same_values_input(node)) is not None:
        node = source
    return node


def _from_library_kernel(node: torch.fx.Node) -> bool:
    """Whether node's values are a buffer some library kernel (or the caller) wrote."""
    node = _value_source(node)
    return node.op in ("placeholder", "get_attr") or (
        node.op == "call_function" and node.target in _LIBRARY_KERNELS)


def triton_quantize_input(x: torch.fx.Node) -> Optional[Tuple[torch.fx.Node, str]]:
    """(input, activation) for `fp8_fx.triton_quantize` when the linear input x has no
    Inductor producer kernel to fuse its quantization into, else None."""
    source = _value_source(x)
    if source.op == "call_function" and source.target in _GELUS:
        approximate = source.kwargs.get("approximate", source.args[1] if len(source.args) > 1 else "none")
        pre = source.args[0]
        same_shape = _example(source) is not None and _example(x) is not None and (
            _example(source).shape == _example(x).shape)
        if approximate in ("none", "tanh") and same_shape and _from_library_kernel(pre):
            return pre, "gelu" if approximate == "none" else "gelu_tanh"
        return None
    return (x, "none") if _from_library_kernel(source) else None


def _call(graph: torch.fx.Graph, target, args, name: str) -> torch.fx.Node:
    return graph.create_node("call_function", target, args, name=name)


def _weight_placeholder(graph: torch.fx.Graph, name: str) -> torch.fx.Node:
    node = graph.placeholder(name)
    # AOTAutograd reads these off Dynamo placeholders: no user-code source (like the
    # inputs DDPOptimizer adds), and static, so CUDA graphs need not copy them.
    node._dynamo_source = None
    node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
    return node


def _copy_dynamo_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy to rewrite: Dynamo reads its own graph's placeholders after the backend
    returns, so that one must stay as it was."""
    graph = torch.fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    old_to_new: Dict[torch.fx.Node, torch.fx.Node] = {}
    output_value, old_output = graph.graph_copy(gm.graph, old_to_new, return_output_node=True)
    graph.output(output_value, type_expr=getattr(old_output, "type", None)).meta.update(old_output.meta)
    for old, new in old_to_new.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    new_gm = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new_gm.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        new_gm._param_name_to_source = gm._param_name_to_source
    return new_gm


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
        largest = _call(graph, torch.maximum, (largest, other), name)
    return largest


def rewrite_linears(gm: torch.fx.GraphModule, config: FP8Config,
                    fp8_tensor_cores: Optional[bool] = None) -> RewriteResult:
    """Return a rewritten copy of `gm` and one decision per linear op, in graph order."""
    gm = _copy_dynamo_graph_module(gm)
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    input_index = {n: i for i, n in enumerate(placeholders)}
    insert_point = placeholders[-1] if placeholders else None

    use_triton = config.triton_quantize and (
        fp8_tensor_cores if fp8_tensor_cores is not None else triton_quantize.available())
    decisions: List[LinearDecision] = []
    slots: List[WeightSlot] = []
    fp8_weights: Dict[torch.fx.Node, Tuple[torch.fx.Node, torch.fx.Node]] = {}
    fp8_inputs: Dict[Tuple[torch.fx.Node, str], Tuple[torch.fx.Node, torch.fx.Node]] = {}
    static_scales = _static_scales_by_input(graph)

    for node in list(graph.nodes):
        linear = _as_linear(node)
        if linear is None:
            continue
        qualname = node_qualname(node)
        action, reason = decide(linear, qualname, config, fp8_tensor_cores)
        w = _example(linear.weight)
        decisions.append(LinearDecision(
            qualname=qualname or "", action=action, reason=reason,
            in_features=int(w.shape[-1]) if w is not None else -1,
            out_features=int(w.shape[0]) if w is not None else -1))
        if action == "skipped" or (action == "weight_only" and linear.scale is not None):
            continue  # left as it is (an FP8Linear already runs weight-only)

        # Readable names in the rewritten graph: blocks_0_attn1_to_q_weight_fp8, ...
        stem = (qualname or node.name).replace(".", "_")
        granularity = linear.at_rest_granularity or config.granularity
        if linear.scale is not None:
            fp8_weights[linear.weight] = (linear.weight, linear.scale)
        if linear.weight not in fp8_weights:
            with graph.inserting_after(insert_point):
                wq = _weight_placeholder(graph, f"{stem}_weight_fp8")
            with graph.inserting_after(wq):
                ws = _weight_placeholder(graph, f"{stem}_weight_scale")
            insert_point = ws
            fp8_weights[linear.weight] = (wq, ws)
            slots.append(WeightSlot(input_index[linear.weight], config.granularity))
        wq, ws = fp8_weights[linear.weight]

        with graph.inserting_before(node):
            if action == "weight_only":
                new = _call(graph, torch.ops.fp8_fx.weight_only_linear.default,
                            (linear.x, wq, ws, linear.bias), stem)
            else:
                static = linear.static
                key = (linear.x, "static" if static else granularity)
                if key not in fp8_inputs:  # q, k and v share one quantization
                    x_name = linear.x.name
                    source = (triton_quantize_input(linear.x)
                              if action == "scaled_mm" and use_triton and not static else None)
                    if static:
                        xs = _largest(graph, static_scales[linear.x], f"{x_name}_static_scale")
                        quant = _call(graph, torch.ops.fp8_fx.quantize_static.default, (linear.x, xs),
                                      f"{x_name}_fp8")
                        fp8_inputs[key] = (quant, xs)
                    elif source is not None:
                        quant = _call(graph, torch.ops.fp8_fx.triton_quantize.default,
                                      (source[0], granularity, source[1]), f"{x_name}_quantized")
                    else:
                        quant = _call(graph, torch.ops.fp8_fx.quantize.default,
                                      (linear.x, granularity), f"{x_name}_quantized")
                    if not static:
                        fp8_inputs[key] = (_call(graph, operator.getitem, (quant, 0), f"{x_name}_fp8"),
                                           _call(graph, operator.getitem, (quant, 1), f"{x_name}_scale"))
                    for n in {quant, *fp8_inputs[key]} - set(placeholders):  # where it was inserted
                        n.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
                xq, xs = fp8_inputs[key]
                args = (xq, xs, wq, ws, linear.bias, _example(node).dtype)
                if action == "scaled_mm":
                    args += (config.fast_accum,)
                new = _call(graph, _OP_FOR_ACTION[action], args, stem)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)

    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return RewriteResult(gm, decisions, slots)

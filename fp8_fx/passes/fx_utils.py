"""FX helpers the passes share."""
from __future__ import annotations

import copy
from typing import Dict, Optional

import torch
import torch.fx


def example_value(node) -> Optional[torch.Tensor]:
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def call(graph: torch.fx.Graph, target, args, name: str) -> torch.fx.Node:
    return graph.create_node("call_function", target, args, name=name)


def weight_placeholder(graph: torch.fx.Graph, name: str) -> torch.fx.Node:
    node = graph.placeholder(name)
    # AOTAutograd reads these off Dynamo placeholders: no user-code source (like the
    # inputs DDPOptimizer adds), and static, so CUDA graphs need not copy them.
    node._dynamo_source = None
    node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
    return node


def copy_dynamo_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
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



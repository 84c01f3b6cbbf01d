"""The FP8 attention pass: one decision per scaled_dot_product_attention call.

    SDPA(q, k, v)  in a targeted attention module (AttentionConfig.targets, e.g. `attn1`)
      -> q8, qs, k8, ks, v8, vs = fp8_fx.quantize_attention_inputs(q, k, v, recipe, rotate)
         o = fp8_fx.fp8_attention(q8, qs, k8, ks, v8, vs, softmax_scale, recipe, kernel, o_dtype)
         out = fp8_fx.dequantize(o, vs, dtype)          # "tensor" only: its kernel writes FP8

The quantization is decomposable, so Inductor fuses it into the kernels that produce
Q, K and V; `fp8_attention` is the kernel (attention_recipes.py). Runs before the linear
pass, which takes the FP8 output's codes and scale as to_out's GEMM input as they are
(tensor granularity; linear.fp8_attention_output), or fuses the dequantization into its
row quantization: the FP8 output is never written back in bf16.

The kernel, one per call, in the report: "cudnn" (recipe "tensor" on sm90+ with
nvidia-cudnn-frontend; the graph is built at compile time, so cuDNN's refusal of a shape
is a reason in the report, not an error in the first forward); "triton" (recipe
"smooth_int8" on sm89+, our kernel, compiled and checked against the emulation once per
device and head dim at compile time); else the fp32 emulation ("emulate") where
FP8Config.fallback is "emulate"; else the call stays as it is, with the missing kernel
named.
"""
from __future__ import annotations

import contextlib
import dataclasses
import operator
from typing import List, Optional, Tuple

import torch
import torch.fx

from .. import attention_recipes, presets, targeting
from ..kernels import cudnn_attention, triton_attention
from ..config import AttentionConfig, FP8Config
from ..qualname import node_qualname
from ..report import AttentionDecision
from . import FP8Pass, PassResult
from .fx_utils import call, example_value

_SDPA = (torch.nn.functional.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = dict(attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)


def sdpa_arguments(node: torch.fx.Node) -> dict:
    """SDPA's arguments by name, defaults filled in."""
    bound = dict(_SDPA_DEFAULTS)
    bound.update(zip(_SDPA_PARAMS, node.args))
    bound.update(node.kwargs)
    return bound


def why_not_fp8_attention(args: dict) -> Optional[str]:
    """None when the FP8 recipes compute this call, else why not."""
    if args["attn_mask"] is not None:
        return "an attention mask (the FP8 recipes take none)"
    if args["is_causal"]:
        return "causal attention (the FP8 recipes are bidirectional, as DiTs are)"
    if args["dropout_p"] != 0.0:
        return f"dropout_p={args['dropout_p']} (inference attention has none)"
    if args["enable_gqa"]:
        return "grouped-query attention (enable_gqa)"
    if not isinstance(args["scale"], (float, int, type(None))):
        return "a softmax scale that is not a number known at compile time"
    q, k, v = (example_value(args[n]) for n in ("query", "key", "value"))
    if q is None or k is None or v is None:
        return "Q, K or V without a traced value"
    if not (q.dim() == k.dim() == v.dim() == 4):
        return f"Q/K/V of {q.dim()}/{k.dim()}/{v.dim()} dims (the recipes take (batch, heads, tokens, head dim))"
    if q.dtype not in targeting.FLOAT_DTYPES or not (q.dtype == k.dtype == v.dtype):
        return f"Q/K/V dtypes {q.dtype}/{k.dtype}/{v.dtype} (bf16/fp16/fp32, all one)"
    if q.shape[1] != k.shape[1] or k.shape[-2] != v.shape[-2] or q.shape[-1] != k.shape[-1]:
        return f"Q {tuple(q.shape)}, K {tuple(k.shape)} and V {tuple(v.shape)} do not pair up head by head"
    if not all(isinstance(d, int) for d in (q.shape[-1], v.shape[-1])):
        return "a symbolic head dim"
    if isinstance(k.shape[-2], int) and k.shape[-2] == 0:
        return "no keys (Sk = 0)"
    return None


def softmax_scale_of(args: dict) -> float:
    head_dim = example_value(args["query"]).shape[-1]
    return float(args["scale"]) if args["scale"] is not None else head_dim ** -0.5


def _quantized_examples(args: dict, attention: AttentionConfig):
    """Q8/K8/V8 as the rewritten graph will make them (their layouts), on fake tensors."""
    q, k, v = (example_value(args[n]) for n in ("query", "key", "value"))
    mode = getattr(q, "fake_mode", None)  # Dynamo's, whose tensors these are
    with mode if mode is not None else contextlib.nullcontext():
        q8, _, k8, _, v8, _ = torch.ops.fp8_fx.quantize_attention_inputs(q, k, v, attention.recipe,
                                                                          attention.rotate)
    return q8, k8, v8


def _recipe_text(attention: AttentionConfig, head_dim: int) -> str:
    rotated = attention_recipes.rotates(head_dim, attention.rotate)
    return f"recipe {attention.recipe!r}, Q/K {'rotated' if rotated else 'not rotated'}"


def decide(node: torch.fx.Node, qualname: Optional[str], attention: AttentionConfig,
           fallback: str) -> Tuple[str, str]:
    """(action, reason): the kernel ("cudnn", "triton" or "emulate"), or "skipped"."""
    not_targeted = targeting.why_not_targeted(qualname, attention)
    if not_targeted:
        return "skipped", not_targeted
    args = sdpa_arguments(node)
    why_not = why_not_fp8_attention(args)
    if why_not:
        return "skipped", why_not
    q = example_value(args["query"])
    recipe = _recipe_text(attention, q.shape[-1])
    if q.device.type != "cuda":
        missing = f"no FP8 attention kernel for {q.device.type}"
    elif attention.recipe == "smooth_int8":
        v = example_value(args["value"])
        missing = triton_attention.why_not(q.device, q.shape[-1], v.shape[-1], q.dtype, softmax_scale_of(args))
        if missing is None:
            return "triton", f"{recipe}, fp8_fx's Triton kernel"
        missing = f"no FP8 attention kernel here: {missing}"
    else:
        missing = cudnn_attention.why_not(*_quantized_examples(args, attention), softmax_scale_of(args))
        if missing is None:
            return "cudnn", f"{recipe}, cuDNN FP8 SDPA"
        missing = f"no FP8 attention kernel here: {missing}"
        if triton_attention.why_not_device(q.device) is None:
            missing += "; AttentionConfig(recipe='smooth_int8') runs fp8_fx's Triton kernel on this GPU"
    if fallback == "emulate":
        return "emulate", f"{recipe}, emulated in fp32 (fallback='emulate'; {missing})"
    return "skipped", f"{missing} (FP8Config(fallback='emulate') runs {recipe} in fp32)"


class AttentionPass(FP8Pass):
    """FP8 attention: one decision per SDPA call, converted ones rewritten to fp8_fx ops."""

    name = "fp8_fx.attention"
    config: FP8Config

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        attention, graph = self.config.attention, gm.graph
        decisions: List[AttentionDecision] = []
        if attention is None:
            return PassResult(decisions, [])
        if attention.targets is None:  # the backend gives the model preset's; alone: Wan's
            attention = dataclasses.replace(attention, targets=presets.FALLBACK.attention)
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in _SDPA:
                continue
            qualname = node_qualname(node)
            action, reason = decide(node, qualname, attention, self.config.fallback)
            if action != "skipped" and (attention.bf16_first_steps or attention.bf16_last_steps):
                reason += (f"; as the model wrote it at the first {attention.bf16_first_steps} and last "
                           f"{attention.bf16_last_steps} denoising steps")
            decisions.append(AttentionDecision(qualname=qualname or "", action=action, reason=reason,
                                               recipe=attention.recipe))
            if action != "skipped":
                _rewrite(graph, node, attention, action, (qualname or node.name).replace(".", "_"))
        graph.lint()
        gm.recompile()
        return PassResult(decisions, [])


def _rewrite(graph: torch.fx.Graph, node: torch.fx.Node, attention: AttentionConfig, kernel: str,
             stem: str) -> None:
    args = sdpa_arguments(node)
    recipe, dtype = attention.recipe, example_value(node).dtype
    with graph.inserting_before(node):
        quant = call(graph, torch.ops.fp8_fx.quantize_attention_inputs.default,
                     (args["query"], args["key"], args["value"], recipe, attention.rotate), f"{stem}_qkv_quantized")
        parts = [call(graph, operator.getitem, (quant, i), f"{stem}_{name}")
                 for i, name in enumerate(("q8", "q_scale", "k8", "k_scale", "v8", "v_scale"))]
        made = [quant, *parts]
        new = call(graph, torch.ops.fp8_fx.fp8_attention.default,
                   (*parts, softmax_scale_of(args), recipe, kernel, attention_recipes.output_dtype(recipe, dtype)),
                   f"{stem}_fp8_attention")
        if recipe == "tensor":  # an FP8 output, at V's scale
            made.append(new)
            new = call(graph, torch.ops.fp8_fx.dequantize.default, (new, parts[5], dtype), f"{stem}_attention_out")
    for n in made:
        n.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)

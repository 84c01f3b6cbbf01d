"""`python -m fp8_fx inspect`: what the pass does to a Wan DiT, without compiling it
and without a GPU: the report table and the rewritten FX graph of one block (or all)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from .config import FP8Config
from .qualname import node_qualname
from .report import format_table
from .passes.linear import rewrite_linears
from .wan import TEXT_TOKENS, WAN_CONFIGS, CheckpointError, build_wan, load_wan


def capture_graph(model: torch.nn.Module, *inputs, **kwargs) -> torch.fx.GraphModule:
    """The FX graph Dynamo hands a backend for `model(*inputs)` (no Inductor)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, fullgraph=True, dynamic=False)(*inputs, **kwargs)
    return graphs[0]


def one_block_code(gm: torch.fx.GraphModule, prefix: str = "blocks.0.") -> str:
    """The lines of the rewritten forward computed inside the module `prefix`."""
    names = {n.name for n in gm.graph.nodes
             if n.op in ("call_function", "call_method") and (node_qualname(n) or "").startswith(prefix)}
    keep = [line.split(";  ")[0] for line in gm.code.splitlines()  # drop `x = None` bookkeeping
            if line.strip().split(" = ")[0] in names]
    return "\n".join(keep)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fp8_fx inspect", description=__doc__)
    p.add_argument("--model", default="tiny", choices=sorted(WAN_CONFIGS))
    p.add_argument("--checkpoint", help="local diffusers folder or .safetensors file")
    p.add_argument("--granularity", choices=("tensor", "row"), default="tensor")
    p.add_argument("--gpu", action="store_true",
                   help="decide as on a GPU with FP8 tensor cores (default: as on this machine)")
    p.add_argument("--full", action="store_true", help="print the whole rewritten graph")
    args = p.parse_args(argv)
    try:
        model = load_wan(args.checkpoint) if args.checkpoint else None
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if model is None:
        # Real sizes are traced on the meta device: no memory, same graph and decisions.
        device = "cpu" if args.model == "tiny" else "meta"
        model = build_wan(args.model, device=device)
    cfg, device = model.config, next(model.parameters()).device
    latents = torch.randn(1, cfg.in_channels, 2, 4, 4, dtype=torch.bfloat16, device=device)
    text = torch.randn(1, TEXT_TOKENS.get(args.model, 512), cfg.text_dim, dtype=torch.bfloat16, device=device)
    gm = capture_graph(model, latents, torch.tensor([500], device=device), text, return_dict=False)
    result = rewrite_linears(gm, FP8Config(granularity=args.granularity),
                             fp8_tensor_cores=True if args.gpu else None)
    print(format_table(result.decisions))
    print("\nRewritten graph" + (":" if args.full else " of blocks.0 (--full for all):"))
    print(result.graph_module.code if args.full else one_block_code(result.graph_module))
    return 0

"""Module paths as Dynamo records them, normalized (matching them is targeting.py's)."""
from __future__ import annotations

import re
from typing import Optional

import torch.fx

# `['name']` and `["name"]` subscripts become `.name`.
_SUBSCRIPT = re.compile(r"\[(['\"])(.*?)\1\]")
_INDEX = re.compile(r"\[(\d+)\]")  # `blocks[0]` -> `blocks.0`
# `getattr(<path>, 'name')` (children fetched by name, e.g. `get_submodule`) -> `<path>.name`.
_GETATTR = re.compile(r"getattr\(([^()]*), (['\"])(.*?)\2\)")


def normalize_qualname(path: str) -> str:
    """`L['self'].__dict__['_modules']['blocks'].0.attn1` -> `blocks.0.attn1`.

    Handles the forms Dynamo produces: a leading `L['self']`/`L['mod']` root,
    `__dict__['_modules']`, `._modules['x']` and `_modules.x` hops, `getattr(p, 'x')`.
    """
    while True:  # innermost getattr first
        unwrapped = _GETATTR.sub(r"\1.\3", path)
        if unwrapped == path:
            break
        path = unwrapped
    path = _INDEX.sub(r".\1", _SUBSCRIPT.sub(r".\2", path))
    parts = [p for p in path.split(".") if p]
    if parts and parts[0] in ("L", "G"):
        parts = parts[2:]  # `L`, then the root variable name (`self`, `mod`, ...)
    return ".".join(p for p in parts if p not in ("__dict__", "_modules"))


def node_qualname(node: torch.fx.Node) -> Optional[str]:
    """Normalized path of the innermost module that issued `node`, if any."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _module_type = list(stack.values())[-1]
    return normalize_qualname(path)

"""Module paths as Dynamo records them, normalized (matching them is targeting.py's), and
the one rule for layers that PEFT wrapped (LoRA adapters: `resolve_peft`)."""
from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any, Optional, Sequence, Tuple

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


# PEFT (diffusers' `load_lora_weights`, `add_adapter`) replaces a layer at path P by a
# wrapper (peft's BaseTunerLayer, e.g. LoRA's lora.Linear) that runs the original layer
# as `P.base_layer` and the adapter's own modules as `P.lora_A.<adapter>`, `P.lora_B.<adapter>`.
PEFT_BASE_LAYER = "base_layer"
BASE, ADAPTER = "base", "adapter"


@dataclasses.dataclass(frozen=True)
class ModulePath:
    """Where a module sits, as targeting sees it.

    qualname: the path targets match and reports print. A PEFT base layer answers to its
        wrapper's path (`blocks.0.attn1.to_q`, not `...to_q.base_layer`): the layer the
        targets name is still there, running the same weight.
    peft: None (no PEFT wrapper around it), BASE (the wrapped original layer) or ADAPTER
        (a module of the adapter branch, `...to_q.lora_A.default`: never converted, it runs
        in the input dtype by design).
    wrapper: the PEFT wrapper's path ("" without one); wrapper_type: its class.
    """
    qualname: str
    peft: Optional[str] = None
    wrapper: str = ""
    wrapper_type: Any = None

    @property
    def adapter_component(self) -> str:
        """For an ADAPTER module, the wrapper's attribute holding it (`lora_A`, `lora_B`)."""
        return self.qualname[len(self.wrapper) + 1 if self.wrapper else 0:].split(".")[0]


def is_peft_layer(module_type: Any) -> bool:
    """Whether `module_type` is a PEFT tuner layer (a wrapper holding a `base_layer`).
    Reads peft only if it is imported: without it no such layer can exist."""
    utils = sys.modules.get("peft.tuners.tuners_utils")
    base = getattr(utils, "BaseTunerLayer", None)
    return base is not None and isinstance(module_type, type) and issubclass(module_type, base)


def resolve_peft(chain: Sequence[Tuple[str, Any]]) -> ModulePath:
    """The one rule for PEFT-wrapped layers. `chain`: (normalized path, module class) from
    the outermost module to the innermost, the module in question last (Dynamo's
    nn_module_stack, or a model's modules along a named_modules path).

    The `base_layer` hop right below a PEFT wrapper is dropped (the base layer answers to
    the wrapper's path); any other module below a PEFT wrapper is its adapter branch."""
    if not chain:
        return ModulePath("")
    path = chain[-1][0]
    wrappers = [(p, t) for p, t in chain[:-1] if is_peft_layer(t) and _below(path, p)]
    if not wrappers:
        return ModulePath(path)
    inner_path, inner_type = wrappers[-1]
    parts = path.split(".")
    for wrapper, _ in reversed(wrappers):  # nested wrappers: `P.base_layer.base_layer`
        depth = len(wrapper.split(".")) if wrapper else 0
        if depth < len(parts) and parts[depth] == PEFT_BASE_LAYER:
            del parts[depth]
        else:
            return ModulePath(path, ADAPTER, wrapper, _type_of(chain, wrapper))
    return ModulePath(".".join(parts), BASE, inner_path, inner_type)


def _below(path: str, ancestor: str) -> bool:
    return path != ancestor and (ancestor == "" or path.startswith(ancestor + "."))


def _type_of(chain: Sequence[Tuple[str, Any]], path: str) -> Any:
    return next(t for p, t in chain if p == path)


def module_path(model: torch.nn.Module, name: str) -> ModulePath:
    """`resolve_peft` for the module `name` of `model` (a `named_modules` path)."""
    parts = name.split(".") if name else []
    chain = [(".".join(parts[:i]), type(model.get_submodule(".".join(parts[:i]))))
             for i in range(len(parts) + 1)]
    return resolve_peft(chain)


def node_module_path(node: torch.fx.Node) -> Optional[ModulePath]:
    """Where the innermost module that issued `node` sits (None outside any module)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return resolve_peft([(normalize_qualname(path), module_type) for path, module_type in stack.values()])


def node_qualname(node: torch.fx.Node) -> Optional[str]:
    """Normalized path of the innermost module that issued `node`, if any (a PEFT base
    layer's is its wrapper's, see `resolve_peft`)."""
    where = node_module_path(node)
    return where.qualname if where is not None else None

"""The backend's graph passes, and the identity that enters Inductor's cache key.

Each pass is a small unit: `run(gm) -> PassResult` rewrites the (copied) Dynamo graph in
place and returns one decision per op it considered. Its `uuid()` hashes fp8_fx's whole
source (the pass, the ops it emits, their kernels) and its config.

Why the whole source: fp8_fx's ops are CompositeImplicitAutograd, so AOTAutograd inlines
their bodies and its cache (and Inductor's FX graph cache) hash the graph *before* that,
by op name. An edited op body, a new release, or an editable install's local change
would otherwise reuse kernels compiled from the old code. `CacheKey` carries the uuids
into both caches through Inductor's `post_grad_custom_pre_pass` hook, whose `uuid()`
enters the key; it changes nothing in the graph.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path
from typing import Any, List, Sequence

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass

_PACKAGE = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    """sha256 of every .py file of the fp8_fx package (read once per process)."""
    h = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        h.update(str(path.relative_to(_PACKAGE)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@dataclasses.dataclass
class PassResult:
    decisions: List[Any]  # one record per op the pass considered (report.py)
    weight_slots: List[Any]  # graph inputs the backend feeds quantized (weight_cache.py)


class FP8Pass:
    """Base of the backend's passes: a name, a config, and a stable identity."""

    name = "fp8_fx.pass"

    def __init__(self, config) -> None:
        self.config = config

    def run(self, gm: torch.fx.GraphModule) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def uuid(self) -> str:
        return hashlib.sha256(f"{self.name}|{source_hash()}|{self.config!r}".encode()).hexdigest()


class CacheKey(CustomGraphPass):
    """A post-grad pass that changes nothing: it only carries the passes' identity into
    Inductor's (and AOTAutograd's) cache keys."""

    def __init__(self, passes: Sequence[FP8Pass]) -> None:
        self.key = hashlib.sha256("|".join(p.uuid() for p in passes).encode()).hexdigest()

    def __call__(self, graph: torch.fx.Graph) -> None:
        pass

    def uuid(self) -> str:
        return self.key


def cache_key_patch(passes: Sequence[FP8Pass], patches: dict) -> dict:
    """`patches` plus a `post_grad_custom_pre_pass` list: our CacheKey first, then whatever
    pass the user had set there (Inductor runs and hashes each element of a list)."""
    from torch._inductor import config as inductor_config
    user = patches.get("post_grad_custom_pre_pass", inductor_config.post_grad_custom_pre_pass)
    users = list(user) if isinstance(user, (list, tuple)) else [user] if user else []
    key = CacheKey(passes)
    return {**patches, "post_grad_custom_pre_pass": [key, *users] if users else key}


def run_passes(passes: Sequence[FP8Pass], gm: torch.fx.GraphModule) -> List[PassResult]:
    """Run `passes` on `gm`, the backend's copy of Dynamo's graph, which outlives the
    compile (backend.graphs, and the compiled function holds it)."""
    results = [p.run(gm) for p in passes]
    # Dynamo's placeholders carry a GraphArg holding a weak reference to the real input
    # (each parameter); Dynamo drops them from its own graph after compiling, but the
    # copy kept them, and torch.utils.swap_tensors (load_state_dict and model.to under
    # set_swap_module_params_on_conversion) refuses tensors that have a weak reference.
    # Nothing after Dynamo reads them.
    for node in gm.graph.nodes:
        node.meta.pop("grapharg", None)
    return results



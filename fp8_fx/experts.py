"""Every transformer of a pipeline in one call: Wan 2.2 A14B's two experts (`transformer`
for the high-noise steps, `transformer_2` for the low-noise ones), or the one of Wan 2.1.

    experts = fp8_fx.compile_experts(pipe, fp8_fx.FP8Config(), fp8_at_rest=True)
    video = pipe(prompt, ...).frames
    print(experts.report)          # one table per graph, each headed with its expert's name
    experts.calls                  # {"transformer": n, "transformer_2": m}: FP8 graph calls

Each expert gets a backend of its own, named after the pipeline attribute: Dynamo keeps
one compiled graph per backend, so the two experts (one class, one block code) never
share a graph or a report, and every record names its expert (`record.graph.model`).

Regional by default (diffusers' `compile_repeated_blocks`: one graph per expert serves
its 40 blocks); `regional=False` compiles each whole expert and puts the compiled module
on the pipeline. `fp8_at_rest=True` converts each expert first (`convert_to_fp8`,
optionally onto `device`): 2 x 14B experts hold 2 x 14 GiB in FP8 instead of 2 x 28 GiB
in bf16, and offloading then moves FP8 bytes (offload.py).

Before every forward of an expert the offloading hooks on it are compared with the last
ones seen (a few attribute reads); when they changed, offload.check runs: modes that
would run without FP8, re-quantize at every onload or load the wrong weights are
refused with the fix, whatever order compiling and offloading came in. Group offloading
hooks run inside each compiled block and break its graph at the onload/offload calls,
so blocks compiled with fullgraph=True by default are compiled again with fullgraph=False
when group offloading appears (the block's own ops stay one graph).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import offload
from .backend import FP8Backend
from .config import FP8Config
from .denoising_steps import chained_step_callback
from .modules import convert_to_fp8
from .report import LinearDecision, Records, format_attention_table, format_table

EXPERT_NAMES = ("transformer", "transformer_2")


class _ExpertBackend(FP8Backend):
    """An FP8Backend that counts the calls of each graph it compiled."""

    def __init__(self, config: FP8Config, inductor_config_patches: Optional[Dict[str, Any]], name: str) -> None:
        super().__init__(config, inductor_config_patches, name)
        self._counters: Dict[int, List[int]] = {}  # graph index -> [calls]

    def __call__(self, gm, example_inputs, mode=None, options=None):
        compiled = super().__call__(gm, example_inputs, mode=mode, options=options)
        counter = [0]
        self._counters[len(self.graphs) - 1] = counter  # the graph super() just added

        def run(*args):
            counter[0] += 1
            return compiled(*args)

        return run

    @property
    def graph_calls(self) -> List[int]:
        """Calls of each compiled graph, in the order of `graphs` and `report.graphs`."""
        return [self._counters.get(i, [0])[0] for i in range(len(self.graphs))]

    def clear(self) -> None:
        super().clear()
        self._counters = {}  # graphs compiled before keep counting into their own (dropped) counters

    def _warn_fallback(self, choice) -> None:
        # A graph with no module classes at all (the piece before a group-offloading hook's
        # onload call) has no layer to target: no preset to warn about.
        if choice is not None and not choice.seen:
            return
        super()._warn_fallback(choice)


class ExpertsReport(Records):
    """The reports of every expert's backend as one: iterable as records (in expert, then
    graph order), each naming its expert (`record.graph.model`); printable, one table per
    graph headed `graph N (transformer_2: WanTransformerBlock, compile 0/1)`. A live view:
    graphs compiled later (at the first call) appear in it."""

    def __init__(self, backends: Dict[str, FP8Backend]) -> None:
        self._backends = backends

    @property
    def experts(self) -> Tuple[str, ...]:
        return tuple(self._backends)

    def by_expert(self, name: str) -> List[LinearDecision]:
        if name not in self._backends:
            raise KeyError(f"no expert {name!r}; the experts are {list(self._backends)}")
        return self._backends[name].report.records

    @property
    def records(self) -> List[LinearDecision]:
        return [d for b in self._backends.values() for d in b.report.records]

    @property
    def graphs(self) -> List[List[LinearDecision]]:
        """One list of records per graph, every expert's."""
        return [g for b in self._backends.values() for g in b.report.graphs]

    @property
    def attention(self):
        return [d for b in self._backends.values() for d in b.report.attention]

    def summary(self) -> str:
        """One line per expert: its graphs and what its linears became."""
        lines = []
        for name, b in self._backends.items():
            graphs = [g for g in b.report.graphs if g]
            counts = Counter(d.action for g in graphs for d in g)
            what = ", ".join(f"{n} {a}" for a, n in counts.items()) or "no linear ops seen"
            lines.append(f"{name}: {len(graphs)} graph{'s' * (len(graphs) != 1)} with linears "
                         f"({what})" if graphs else f"{name}: not compiled yet (at its first call)")
        return "\n".join(lines)

    def __str__(self) -> str:
        sections = []
        for b in self._backends.values():
            attention: Dict[Any, list] = {}
            for d in b.report.attention:
                attention.setdefault(d.graph, []).append(d)
            infos = {g[0].graph: g for g in b.report.graphs if g}
            for info in [*infos, *(i for i in attention if i not in infos)]:
                lines = [f"{info}:"]
                if info.preset_line:
                    lines.append(info.preset_line)
                if info in infos:
                    lines.append(format_table(infos[info]))
                if attention.get(info):
                    lines.append(format_attention_table(attention[info]))
                sections.append("\n".join(lines))
        return "\n\n".join([*sections, self.summary()])

    def __repr__(self) -> str:
        return f"<fp8_fx ExpertsReport: {len(self)} linears of {', '.join(self._backends)}>\n{self}"


class CompiledExperts:
    """What compile_experts did: `backends` ({name: FP8Backend}), `report` (ExpertsReport),
    `calls` (FP8 graph calls per expert), `conversions` (convert_to_fp8's records per expert
    with fp8_at_rest), `offloading()` (the offloading found on each expert now)."""

    def __init__(self, pipe: Any, names: Sequence[str], config: FP8Config, regional: bool, fullgraph: Dict[str, bool],
                 fullgraph_given: bool, compile_kwargs: Dict[str, Any], inductor_config_patches, fp8_at_rest: bool):
        self.pipe = pipe
        self.names = tuple(names)
        self.config = config  # what the backends compile with
        self.regional = regional
        self.fullgraph = dict(fullgraph)
        self.fp8_at_rest = fp8_at_rest
        self.backends: Dict[str, _ExpertBackend] = {
            n: _ExpertBackend(config, inductor_config_patches, n) for n in self.names}
        self.report = ExpertsReport(self.backends)
        self.conversions: Dict[str, List[LinearDecision]] = {}
        self._fullgraph_given = fullgraph_given
        self._compile_kwargs = compile_kwargs
        self._watched: Dict[str, List[nn.Module]] = {}
        self._signatures: Dict[str, Tuple] = {}
        self._cudagraphs_warned = False

    def __repr__(self) -> str:
        how = "regional" if self.regional else "whole model"
        rest = ", FP8 weights at rest" if self.fp8_at_rest else ""
        return f"CompiledExperts({', '.join(self.names)}; {how}{rest}; calls {self.calls})"

    @property
    def calls(self) -> Dict[str, int]:
        """Calls of each expert's graphs that hold FP8 linears (a graph serves every block:
        40 calls per forward of a 40-block expert under regional compilation)."""
        out = {}
        for name, b in self.backends.items():
            graphs = b.report.graphs
            out[name] = sum(c for c, g in zip(b.graph_calls, graphs) if any(d.converted for d in g))
        return out

    def offloading(self) -> Dict[str, List[offload.Offloading]]:
        return {n: offload.find_offloading(getattr(self.pipe, n)) for n in self.names}

    def check_offloading(self) -> None:
        """Run the offloading checks on every expert now (they also run by themselves
        before a forward whose hooks changed)."""
        for name in self.names:
            self._check(name)

    def set_step(self, step: int, num_steps: Optional[int] = None) -> None:
        """Tell every expert's backend the denoising step (AttentionConfig.bf16_*_steps)."""
        for b in self.backends.values():
            b.set_step(step, num_steps)

    @property
    def step_callback(self) -> Callable[[Any, int, Any, Dict], Dict]:
        """`pipe(..., callback_on_step_end=experts.step_callback)`. A property, as the
        backend's: fetching it tells every backend that steps will come, before step 0
        runs (diffusers calls the callback only after each step)."""
        return chained_step_callback(self.backends.values())

    def clear(self) -> None:
        """Forget every expert's report and graphs (compiled code stays)."""
        for b in self.backends.values():
            b.clear()

    # -- compiling and watching ----------------------------------------------------------

    def _compile(self, name: str, module: nn.Module) -> None:
        kwargs = dict(self._compile_kwargs, backend=self.backends[name], fullgraph=self.fullgraph[name])
        if self.regional:
            module.compile_repeated_blocks(**kwargs)
            target = module
        else:
            target = torch.compile(module, **kwargs)
            setattr(self.pipe, name, target)
        blocks = _repeated_blocks(module)
        self._watched[name] = [target, *([module] if target is not module else []), *blocks]
        target.register_forward_pre_hook(functools.partial(self._before_forward, name))
        self._signatures[name] = offload.hook_signature(self._watched[name])  # checked just before

    def _before_forward(self, name: str, module: nn.Module, args) -> None:
        # Eager: the pre-hook of the uncompiled top module (regional) or of the
        # torch.compile wrapper, outside the compiled code.
        signature = offload.hook_signature(self._watched[name])
        if signature != self._signatures.get(name):
            self._check(name)
            self._signatures[name] = signature

    def _check(self, name: str) -> None:
        offload.check_disk_folders({n: getattr(self.pipe, n) for n in self.names})  # wrong weights: first
        found = offload.check(getattr(self.pipe, name), self.config, name=name)
        if self.regional and self.fullgraph[name] and any(o.kind == offload.GROUP for o in found):
            if self._fullgraph_given:
                raise offload.OffloadError(_FULLGRAPH_WITH_GROUP_OFFLOAD.format(name=name))
            self.fullgraph[name] = False  # the blocks again, breaking at the hooks' calls
            kwargs = dict(self._compile_kwargs, backend=self.backends[name], fullgraph=False)
            offload.unwrap(getattr(self.pipe, name)).compile_repeated_blocks(**kwargs)
        if found and not self._cudagraphs_warned and _uses_cudagraphs(self._compile_kwargs) \
                and any(o.moves_weights for o in found):
            self._cudagraphs_warned = True
            warnings.warn(
                f"fp8_fx: {name} is compiled with CUDA graphs (mode={self._compile_kwargs.get('mode')!r}) and "
                f"offloaded ({found[0]}): CUDA graphs record the weights' addresses and offloading gives them "
                "new ones at every onload, so expect re-recording on every call (not measured yet). Compile "
                "without CUDA graphs (mode=None or 'max-autotune-no-cudagraphs') when offloading.", stacklevel=3)


_FULLGRAPH_WITH_GROUP_OFFLOAD = (
    "fp8_fx: {name} uses group offloading, whose hooks run inside each compiled block and break its "
    "graph at their onload/offload calls (torch.compiler.disable): fullgraph=True cannot compile that. "
    "Leave fullgraph unset: compile_experts then compiles the blocks with fullgraph=False (the block's "
    "own ops stay one graph).")


def _uses_cudagraphs(kwargs: Dict[str, Any]) -> bool:
    from torch._inductor import list_mode_options
    mode, options = kwargs.get("mode"), kwargs.get("options") or {}
    patches = dict(list_mode_options(mode) if mode else {}, **options)
    return bool(patches.get("triton.cudagraphs"))


def _repeated_blocks(module: nn.Module) -> List[nn.Module]:
    names = set(getattr(module, "_repeated_blocks", None) or ())
    return [m for m in module.modules() if type(m).__name__ in names]


def _experts(pipe: Any, names: Sequence[str]) -> Dict[str, nn.Module]:
    if isinstance(pipe, nn.Module):
        raise TypeError(f"compile_experts takes a pipeline (an object with {' / '.join(names)} "
                        f"attributes, e.g. diffusers' WanPipeline), got the model {type(pipe).__name__}: "
                        "for one model use torch.compile(model, backend=fp8_fx.make_fp8_backend(...)) or "
                        "model.compile_repeated_blocks(backend=...)")
    found = {n: getattr(pipe, n, None) for n in names}
    experts = {n: m for n, m in found.items() if m is not None}
    for n, m in experts.items():
        if not isinstance(m, nn.Module):
            raise TypeError(f"compile_experts: pipe.{n} is a {type(m).__name__}, not a torch.nn.Module")
        if m is not offload.unwrap(m):
            raise ValueError(f"compile_experts: pipe.{n} is torch.compile'd already; give the pipeline its "
                             f"original transformer (pipe.{n} = pipe.{n}._orig_mod) and compile once, here")
    if not experts:
        raise ValueError(f"compile_experts: {type(pipe).__name__} has none of {list(names)} (or all are None): "
                         "nothing to compile")
    return experts


def compile_experts(pipe: Any, config: Optional[FP8Config] = None, *, regional: bool = True,
                    fp8_at_rest: bool = False, device: Union[str, torch.device, None] = None,
                    fullgraph: Optional[bool] = None, mode: Optional[str] = None,
                    options: Optional[Dict[str, Any]] = None,
                    inductor_config_patches: Optional[Dict[str, Any]] = None,
                    names: Sequence[str] = EXPERT_NAMES) -> CompiledExperts:
    """Compile every transformer of `pipe` (`transformer`, and `transformer_2` when present)
    with an FP8 backend of its own, named after the attribute. Returns a CompiledExperts
    whose `.report` names the expert of every record.

    regional: diffusers' `compile_repeated_blocks` (default), else `torch.compile` of the
        whole expert, put back on the pipeline.
    fp8_at_rest: `convert_to_fp8(expert, config, device)` first (FP8 weights, no bf16 copy;
        the backends then run only the converted layers). `device`: quantize layer by
        layer onto it, then move the expert there.
    fullgraph: None (default): True for regional blocks, unless group offloading hooks sit in
        them (then False, see the module docstring); False for whole experts.
    mode, options: torch.compile's, passed on (Inductor config for these graphs only).
    Offloading enabled before or after this call is checked (offload.py); enable it after
    this call when fp8_at_rest=True (the offload hooks hold the layers being replaced).
    """
    config = FP8Config() if config is None else config
    if not isinstance(config, FP8Config):
        raise TypeError(f"compile_experts takes an FP8Config, got {type(config).__name__}")
    if device is not None and not fp8_at_rest:
        raise ValueError("compile_experts: device= goes with fp8_at_rest=True (quantize on the way to the "
                         "device); otherwise move the pipeline yourself (pipe.to(device))")
    experts = _experts(pipe, names)
    for name, module in experts.items():
        if regional and not hasattr(module, "compile_repeated_blocks"):
            raise ValueError(f"compile_experts: pipe.{name} ({type(module).__name__}) has no "
                             "compile_repeated_blocks (diffusers ModelMixin with _repeated_blocks); pass "
                             "regional=False to compile the whole model")
    offloaded = {n: offload.find_offloading(m) for n, m in experts.items()}
    if fp8_at_rest and any(offloaded.values()):
        name, found = next((n, f) for n, f in offloaded.items() if f)
        offload.refuse_modes(found, name)  # refused in either order: say why, not "convert first"
        raise offload.OffloadError(
            f"fp8_fx: compile_experts(fp8_at_rest=True) on {name}, which already uses {found[0]}: the "
            "offloading hooks hold its bf16 layers (and their files or devices), which converting "
            "replaces. Convert first, then offload: compile_experts(pipe, fp8_at_rest=True), then "
            "enable_model_cpu_offload() / enable_group_offload(...).")
    # With FP8 weights at rest the converted layers are the FP8 ones (convert_to_fp8 saw full
    # paths, excludes included): the backends compile those and quantize nothing at run time.
    compile_config = (dataclasses.replace(config, targets=(), exclude=(), preset=None)
                      if fp8_at_rest else config)
    group_offloaded = {n for n, f in offloaded.items() if any(o.kind == offload.GROUP for o in f)}
    if fullgraph and regional and group_offloaded:
        raise offload.OffloadError(_FULLGRAPH_WITH_GROUP_OFFLOAD.format(name=sorted(group_offloaded)[0]))
    per_expert = {n: (fullgraph if fullgraph is not None else (regional and n not in group_offloaded))
                  for n in experts}
    compile_kwargs = {k: v for k, v in (("mode", mode), ("options", options)) if v is not None}
    result = CompiledExperts(pipe, list(experts), compile_config, regional, per_expert, fullgraph is not None,
                             compile_kwargs, inductor_config_patches, fp8_at_rest)
    result.check_offloading()  # before converting or compiling anything
    for name, module in experts.items():
        if fp8_at_rest:
            result.conversions[name] = convert_to_fp8(module, config, device=device)
        result._compile(name, module)
    return result

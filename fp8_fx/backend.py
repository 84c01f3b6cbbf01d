"""The torch.compile backend: the passes, then Inductor.

    config -> passes (one decision per op, rewritten copy of the graph) -> compile_fx (Inductor)
           -> a callable that feeds cached FP8 weights to the compiled graph

Inductor options come as config patches for this backend's graphs only: `mode` and
`options` given to torch.compile, `inductor_config_patches` given here, and the
`CacheKey` that makes Inductor's caches key on fp8_fx's code and config (passes/).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx
from torch._inductor.compile_fx import compile_fx

from . import offload, presets, targeting, weight_cache
from .config import FP8Config
from .denoising_steps import DenoisingSteps
from .passes import FP8Pass, cache_key_patch, run_passes
from .passes.fx_utils import copy_dynamo_graph_module
from .passes.attention import AttentionPass
from .passes.linear import LinearPass
from .report import GraphInfo, Report


class FP8Backend:
    """A torch.compile backend. After compiling: `.report` (one record per linear op per
    graph), `.graphs` (the rewritten FX GraphModules, before Inductor). Both grow with
    every graph this backend compiles; `clear()` empties them."""

    def __init__(self, config: Optional[FP8Config] = None,
                 inductor_config_patches: Optional[Dict[str, Any]] = None, name: str = "") -> None:
        self.config = config if config is not None else FP8Config()
        if not isinstance(self.config, FP8Config):
            raise TypeError(f"make_fp8_backend takes an FP8Config, got {type(config).__name__}")
        self.inductor_config_patches = dict(inductor_config_patches or {})
        _check_inductor_keys(self.inductor_config_patches, "make_fp8_backend(inductor_config_patches=...)")
        self.name = name
        self.report = Report()
        self.graphs: List[torch.fx.GraphModule] = []
        self.steps = DenoisingSteps(self.config.attention)
        self._fallbacks_warned: set = set()

    def __repr__(self) -> str:
        c = self.config  # short: Dynamo prints this in every error message
        name = f"name={self.name!r}, " if self.name else ""
        targets = f"preset {c.preset!r}" if c.preset else f"{len(c.targets)} targets"
        return (f"FP8Backend({name}granularity={c.granularity!r}, fallback={c.fallback!r}, "
                f"{targets}, {len(c.exclude)} excluded)")

    def passes(self, config: Optional[FP8Config] = None) -> List[FP8Pass]:
        config = config or self.config
        # Attention first: the linear pass then sees fp8_attention's output as a library
        # kernel's, as it saw SDPA's. Without FP8Config.attention it changes nothing.
        return [AttentionPass(config), LinearPass(config)]

    def set_step(self, step: int, num_steps: Optional[int] = None) -> None:
        """The denoising step the next forwards belong to (of num_steps): with
        AttentionConfig.bf16_first_steps / bf16_last_steps, it picks their attention."""
        self.steps.set(step, num_steps)

    @property
    def step_callback(self) -> Callable[[Any, int, Any, Dict], Dict]:
        """`pipe(..., callback_on_step_end=backend.step_callback)`: a diffusers pipeline
        tells the backend each step (see denoising_steps.py). Until the first step ends,
        forwards are step 0 (fetching the callback says steps will come)."""
        self.steps.told = True
        return self.steps.diffusers_callback

    # Named clear(), not reset(): torch._dynamo.reset() calls reset() on every backend
    # it has cached, and a report must outlive the compiled code it describes.
    def clear(self) -> None:
        """Forget the report and graphs of everything compiled so far (compiled code stays)."""
        self.report.clear()
        self.graphs.clear()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                 mode: Optional[str] = None, options: Optional[Dict[str, Any]] = None) -> Callable:
        patches = _inductor_patches(mode, options, self.inductor_config_patches)
        root_module, root = _traced_root()
        root_class = type(root_module) if root_module is not None else None
        # The preset for this graph (FP8Config.preset), chosen from the classes it traced:
        # the passes then see its entries as the targets (a block's own under regional
        # compilation), and the cache key sees them too.
        classes = _module_classes(gm)
        choice = presets.resolve(self.config.preset, root_class, classes)
        config = self.config if choice is None else dataclasses.replace(
            self.config, preset=None, targets=choice.targets)
        # AttentionConfig(targets=None): the model's preset's attention modules (chosen as
        # for the linears, even when the linears' targets are the user's own).
        attention_preset = config.attention is not None and config.attention.targets is None
        if attention_preset:
            known = choice or presets.resolve(presets.AUTO, root_class, classes)
            config = dataclasses.replace(config, attention=dataclasses.replace(
                config.attention, targets=known.preset.attention))
        passes = self.passes(config)
        as_written = copy_dynamo_graph_module(gm) if self.steps.active else None  # bf16-attention steps
        gm = copy_dynamo_graph_module(gm)  # Dynamo reads its own graph after we return
        attention, linear = run_passes(passes, gm)
        self.report.add_graph(_graph_info(len(self.graphs), self.name, root, choice), linear.decisions,
                              attention.decisions)
        self.graphs.append(gm)
        self._warn_fallback(choice)
        self._check_entries(linear.decisions, root, config, choice)
        self._check_attention_entries(attention.decisions, root, config, attention_preset)
        if any(d.converted for d in [*linear.decisions, *attention.decisions]) and torch.is_grad_enabled():
            raise RuntimeError(
                "fp8_fx is inference-only (its FP8 ops have no backward). Call the compiled "
                "model under torch.no_grad() or torch.inference_mode().")

        if root_module is not None:  # offloading this backend would run slowly, without FP8 or wrongly
            offload.check(root_module, config, name=f"the compiled {root}")
        slots = linear.weight_slots
        _check_no_meta_weights(slots, example_inputs)
        example_fp8 = weight_cache.quantized_inputs(example_inputs, slots)
        # Hand Inductor fake tensors with static shapes for the new inputs: fakified by
        # AOTAutograd they would get fresh symbolic sizes with no Dynamo source, and a
        # guard on one (e.g. _scaled_mm's K % 16 check) breaks Dynamo's guard building.
        fake_mode = torch._guards.detect_fake_mode(example_inputs)
        if fake_mode is not None:
            example_fp8 = [fake_mode.from_tensor(t, static_shapes=True) for t in example_fp8]
        # Inductor gets a copy: its passes may edit the graph they are given, and
        # backend.graphs shows the rewritten graph as the passes left it.
        compiled = compile_fx(copy_dynamo_graph_module(gm), [*example_inputs, *example_fp8],
                              config_patches=cache_key_patch(passes, patches))
        bf16_attention = None
        if as_written is not None and any(d.converted for d in attention.decisions):
            # The same graph with attention as the model wrote it, for the steps that keep
            # it (AttentionConfig.bf16_first/last_steps): the same linears, the same inputs.
            linear_only = [LinearPass(config)]
            (plain,) = run_passes(linear_only, as_written)
            if plain.weight_slots != slots:
                raise RuntimeError("fp8_fx internal error: the bf16-attention graph has other FP8 weights")
            bf16_attention = compile_fx(as_written, [*example_inputs, *example_fp8],
                                        config_patches=cache_key_patch(linear_only, patches))
        unforgotten = _fake_modes(gm)  # until the first call: Dynamo is done with them then
        steps = self.steps

        def run_with_fp8_weights(*args):
            while unforgotten:
                _forget_real_inputs(unforgotten.pop())
            run = compiled
            if bf16_attention is not None:  # picked per call: no guard, no recompile per step
                fp8 = steps.fp8_attention_now()
                steps.count(fp8)
                run = compiled if fp8 else bf16_attention
            # Dynamo calls compiled graphs unboxed: compiled_fn(*args).
            return run(*args, *weight_cache.quantized_inputs(args, slots))

        return run_with_fp8_weights

    def _warn_fallback(self, choice: Optional[presets.Choice]) -> None:
        """No preset knew the graph's classes: say so once per set of classes."""
        if choice is None or not choice.fallback or choice.why in self._fallbacks_warned:
            return
        self._fallbacks_warned.add(choice.why)
        warnings.warn(
            f"fp8_fx: no target preset knows this graph's classes ({', '.join(choice.seen)}); using the "
            "Wan preset, whose names (to_q, attn1.to_out.0, ffn.net.2, ...) may convert only part of another "
            "model's attention and FFN layers. Choose a preset with FP8Config(preset=...) (one of "
            f"{', '.join(presets.PRESETS)}) or list the layers to convert with FP8Config(targets=...): "
            "backend.report shows this graph's module paths.", stacklevel=4)

    def _check_entries(self, decisions, root: str, config: FP8Config,
                       choice: Optional[presets.Choice] = None) -> None:
        """Targets and excludes that cannot apply to this graph are named, never ignored.
        A preset's entries are fp8_fx's, not the user's: most never match one graph."""
        # A root-level linear (compiling an nn.Linear itself) has the path "" and is
        # targeted by "*"; F.linear outside any module has no path and matches nothing.
        qualnames = [d.qualname for d in decisions if not d.reason.startswith("no module path")]
        users = (*(config.targets if choice is None else ()), *config.exclude)
        _refuse_above_root(config, qualnames, root, (
            "Use an in-block entry ('ffn.net.2'), compile the whole model, or "
            "convert_to_fp8(model, FP8Config(exclude=...)) before compiling (it sees full paths) and "
            "compile with FP8Config(targets=()), so that only the converted layers run in FP8."), users)
        if decisions and all(d.reason == "not targeted" for d in decisions):
            if choice is not None and not choice.targets:
                return  # the preset knows this module converts nothing (HunyuanVideo's token refiner)
            warnings.warn(
                f"fp8_fx: none of the {len(decisions)} linear ops in this graph ({root}) matched the "
                f"targets {_describe_targets(config.targets, choice)}; they stay in their original "
                "precision (expected for a graph of embedders only, e.g. after a graph break). "
                "Check FP8Config.targets against backend.report (qualnames).",
                stacklevel=3)
            return
        _warn_unmatched(config, qualnames, "linear op", root,
                        ("targets", "exclude") if choice is None else ("exclude",))

    def _check_attention_entries(self, decisions, root: str, config: FP8Config, from_preset: bool) -> None:
        attention = config.attention
        if attention is None or not decisions:  # a graph without attention calls says nothing
            return
        qualnames = [d.qualname for d in decisions]
        _refuse_above_root(attention, qualnames, root, (
            "Use an in-block entry ('attn1'), or compile the whole model (torch.compile(transformer, "
            "...)) for per-block choices."), entries=attention.exclude if from_preset else None)
        if self.config.fallback != "emulate" and any("no FP8 attention kernel" in d.reason for d in decisions):
            warnings.warn(
                f"fp8_fx: FP8Config.attention is set, but there is no FP8 attention kernel for this device "
                f"yet: the {len(qualnames)} attention calls of this graph ({root}) stay as they are. "
                "FP8Config(fallback='emulate') runs the recipe in fp32 (for accuracy, not speed).",
                stacklevel=3)
        _warn_unmatched(attention, qualnames, "attention call", root,
                        ("exclude",) if from_preset else ("targets", "exclude"))


def _refuse_above_root(config, qualnames, root: str, advice: str, entries=None) -> None:
    """Entries naming paths above the graph's root (per-block entries under regional
    compilation) cannot apply to it: an error that says so and what to do instead.
    `entries`: those to check (default: the config's targets and excludes)."""
    entries = (*config.targets, *config.exclude) if entries is None else entries
    above = targeting.entries_above_root(qualnames, entries)
    if above:
        raise ValueError(
            f"fp8_fx: {type(config).__name__} entries {above} name module paths above this graph's root "
            f"({root or 'no module'}: its paths look like {next((q for q in qualnames if q), '')!r}). "
            "Under regional compilation (compile_repeated_blocks) one graph serves every block, so a "
            f"per-block entry cannot apply. {advice}")


def _warn_unmatched(config, qualnames, what: str, root: str, fields=("targets", "exclude")) -> None:
    """Name each entry of config.targets / config.exclude that matched none of qualnames."""
    for field in fields:
        unmatched = targeting.unmatched_entries(qualnames, getattr(config, field))
        if unmatched:
            warnings.warn(
                f"fp8_fx: {type(config).__name__}.{field} entries {unmatched} matched no {what} in this "
                f"graph ({root}); a typo? The graph's module paths are in backend.report.", stacklevel=4)


def _describe_targets(targets, choice: Optional[presets.Choice] = None) -> str:
    return f"of the {choice.preset.name!r} preset ({choice.why})" if choice is not None else str(targets)


def _fake_modes(gm: torch.fx.GraphModule) -> list:
    """The fake modes of the graph's example values (which keep them alive)."""
    modes = {}
    for node in gm.graph.nodes:
        mode = getattr(node.meta.get("example_value"), "fake_mode", None)
        if mode is not None:
            modes[id(mode)] = mode
    return list(modes.values())


def _forget_real_inputs(fake_mode) -> None:
    """Drop the fake mode's weak references to the real inputs (each parameter), which
    our graph's example values keep alive: torch.utils.swap_tensors (load_state_dict and
    .to() under set_swap_module_params_on_conversion) refuses a tensor that has one.
    Dynamo does the same after compiling, but only for backends registered by name, so
    the backend does it at the compiled graph's first call, once Dynamo is done with the
    fake mode. The describer's table only numbers tensors for logs; private API, so best
    effort."""
    describer = getattr(getattr(getattr(fake_mode, "fake_tensor_converter", None), "meta_converter", None),
                        "describer", None)
    for table in ("lookup_tensor", "lookup_storage"):
        getattr(describer, table, {}).clear()


def _inductor_patches(mode: Optional[str], options: Optional[Dict[str, Any]],
                      ours: Dict[str, Any]) -> Dict[str, Any]:
    """torch.compile's `mode` and `options` as Inductor takes them, then this backend's."""
    from torch._inductor import list_mode_options
    patches: Dict[str, Any] = {}
    if mode is not None:
        modes = list_mode_options()
        if mode not in modes:
            raise ValueError(f"fp8_fx: unknown torch.compile mode {mode!r}; one of {sorted(modes)}")
        patches.update(list_mode_options(mode))
    _check_inductor_keys(options or {}, "torch.compile(options=...)")
    patches.update(options or {})
    patches.update(ours)
    return patches


def _check_inductor_keys(patches: Dict[str, Any], where: str) -> None:
    """Name an unknown Inductor option now, not deep inside the first compile."""
    from torch._inductor import config as inductor_config
    known = inductor_config.get_config_copy()
    unknown = sorted(k for k in patches if k not in known)
    if unknown:
        raise ValueError(f"fp8_fx: {where} has unknown Inductor options {unknown}; the names are "
                         "those of torch._inductor.config (e.g. 'max_autotune', 'triton.cudagraphs')")


def _traced_root() -> Tuple[Optional[torch.nn.Module], str]:
    """(module, label) of the module Dynamo traced (the model, or a block under regional
    compilation; the first module among the traced frame's arguments, which after a graph
    break in a hook is the hooked module); (None, the function's name) for a function.
    Dynamo's tracer is private API: on a torch where it moved this says (None, "") rather
    than fail a compile (the preset is then chosen from the graph's module classes alone,
    and no offloading check runs at compile time)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        tx = InstructionTranslator.current_tx()
        code = tx.f_code
        # The module is forward's first argument, whatever it is called; after a graph
        # break (offloading hooks: `new_forward(module, ...)` resumed) another argument.
        for name in code.co_varnames[:code.co_argcount]:
            value = tx.f_locals.get(name)
            if isinstance(value, torch.nn.Module):
                return value, type(value).__name__
        return None, code.co_name
    except Exception:  # noqa: BLE001 - a label and a hint only
        return None, ""


def _module_classes(gm: torch.fx.GraphModule) -> List[Any]:
    """The module classes the graph's ops came from (nn_module_stack: (path, class) pairs),
    each once, outermost first, in graph order."""
    classes: Dict[Any, None] = {}
    for node in gm.graph.nodes:
        for _path, cls in (node.meta.get("nn_module_stack") or {}).values():
            classes.setdefault(cls, None)
    return list(classes)


def _graph_info(index: int, name: str, root: str, choice: Optional[presets.Choice]) -> GraphInfo:
    compile_id = torch._guards.CompileContext.current_compile_id()
    return GraphInfo(index=index, compile_id=str(compile_id) if compile_id is not None else "-",
                     root=root, model=name, preset=choice.preset.name if choice else "",
                     preset_why=choice.why if choice else "")


def _check_no_meta_weights(slots, example_inputs: Sequence[Any]) -> None:
    for slot in slots:
        if example_inputs[slot.input_index].device.type == "meta":
            raise ValueError(
                "fp8_fx: a targeted weight is on the meta device, so there is nothing to "
                "quantize. Load real weights before compiling (from_pretrained(...), "
                "load_state_dict(state, assign=True), or to_empty(device=...) and then load).")


def make_fp8_backend(config: Optional[FP8Config] = None,
                     inductor_config_patches: Optional[Dict[str, Any]] = None,
                     name: str = "") -> FP8Backend:
    """A backend for torch.compile(model, backend=...). `inductor_config_patches` are
    passed to Inductor for this backend's graphs only (global config is left alone).
    `name` labels this backend's graphs in its report (e.g. "transformer_2")."""
    return FP8Backend(config, inductor_config_patches, name)


# The default-config backend; also registered as torch.compile(backend="fp8_fx"). Shared by
# everything compiled with it: its report and graphs keep growing (clear() empties them);
# make a backend of your own for a report of one model.
fp8_backend = make_fp8_backend()

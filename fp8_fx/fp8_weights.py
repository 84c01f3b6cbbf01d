"""FP8 weights at rest: convert a model's targeted linears to FP8 storage, on the way to
the GPU, and save / load FP8 safetensors checkpoints.

    model = WanTransformer3DModel.from_pretrained(path, torch_dtype=torch.bfloat16)  # on CPU
    fp8_fx.convert_to_fp8(model, device="cuda")   # one bf16 layer on the GPU at a time
    compiled = torch.compile(model, backend=fp8_fx.fp8_backend)

A converted layer is an `FP8Linear`: FP8 `weight`, fp32 `weight_scale`, bias as it was,
and optionally a calibrated static `input_scale` (calibrate.py).
Eagerly it runs the weight-only op, so the module still works without compiling; the
backend's pass turns it into an FP8 GEMM (or keeps it weight-only) with no bf16 copy.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn

from . import ops
from .config import FP8Config
from .qualname import matching_suffix
from .report import LinearDecision

FORMAT = "fp8_fx/1"


class FP8Linear(nn.Module):
    """A linear layer whose weight is stored in float8_e4m3fn with an fp32 scale."""

    def __init__(self, in_features: int, out_features: int, bias: bool, granularity: str,
                 device=None, bias_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.granularity = in_features, out_features, granularity
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=ops.FP8_DTYPE, device=device),
                                   requires_grad=False)
        scale_shape = (out_features, 1) if granularity == "row" else ()
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
                     if bias else None)
        # A calibrated fp32 scale for the input (fp8_fx.set_input_scales); None: dynamic.
        self.register_buffer("input_scale", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, granularity: str, device=None) -> "FP8Linear":
        """Quantize `linear` (its weight moved to `device` first: one bf16 layer there at a time)."""
        fp8 = cls(linear.in_features, linear.out_features, linear.bias is not None, granularity,
                  device="meta")
        wq, scale = ops.quantize_weight(linear.weight.detach().to(device), granularity)
        fp8.weight = nn.Parameter(wq, requires_grad=False)
        fp8.weight_scale = scale
        if linear.bias is not None:
            fp8.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
        return fp8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is None:
            return ops.weight_only_linear(x, self.weight, self.weight_scale, self.bias)
        return ops.weight_only_linear(x, self.weight, self.weight_scale, self.bias, self.input_scale)

    def extra_repr(self) -> str:
        static = ", static input scale" if self.input_scale is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, granularity={self.granularity!r}{static}")


def _convertible(name: str, module: nn.Module, config: FP8Config) -> Optional[str]:
    """None if `module` should become FP8, else why not."""
    if not isinstance(module, nn.Linear):
        return "not an nn.Linear"
    if matching_suffix(name, config.exclude):
        return "excluded"
    if not matching_suffix(name, config.targets):
        return "not targeted"
    if module.in_features % 16 or module.out_features % 16:
        return "in/out features not a multiple of 16"
    if module.weight.device.type == "meta":
        raise ValueError(f"{name}.weight is on the meta device: load real weights before convert_to_fp8")
    return None


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def convert_to_fp8(model: nn.Module, config: Optional[FP8Config] = None,
                   device: Union[str, torch.device, None] = None) -> List[LinearDecision]:
    """Replace the targeted nn.Linear layers of `model` by FP8Linear, in place.

    With `device`, each targeted weight is moved there and quantized one layer at a time,
    then the rest of the model follows: the full bf16 model never sits on `device`.
    Returns one record per nn.Linear (converted or why not)."""
    config = config or FP8Config()
    decisions = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        why_not = _convertible(name, module, config)
        if why_not is None:
            with torch.no_grad():
                _set_submodule(model, name, FP8Linear.from_linear(module, config.granularity, device))
        decisions.append(LinearDecision(name, "skipped" if why_not else "weight_only",
                                        why_not or f"FP8 weights at rest ({config.granularity})",
                                        module.in_features, module.out_features))
    if device is not None:
        model.to(device)
    return decisions


def fp8_weight_bytes(model: nn.Module) -> Dict[str, int]:
    """Bytes of FP8 weights + scales, and of everything else, in `model`."""
    fp8 = rest = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        nbytes = t.numel() * t.element_size()
        if t.dtype == ops.FP8_DTYPE or name.endswith("weight_scale"):
            fp8 += nbytes
        else:
            rest += nbytes
    return {"fp8": fp8, "rest": rest}


# ---- checkpoints -------------------------------------------------------------------------

def save_fp8_checkpoint(model: nn.Module, path: Union[str, Path]) -> None:
    """One safetensors file: FP8 weights, fp32 scales, the rest as it is, and metadata
    recording the format, the granularity, the FP8 modules and (diffusers) the config."""
    from safetensors.torch import save_file
    fp8_modules = {n: m.granularity for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    if not fp8_modules:
        raise ValueError("save_fp8_checkpoint: the model has no FP8Linear layers; call convert_to_fp8 first")
    metadata = {"format": FORMAT, "fp8_modules": json.dumps(fp8_modules),
                "granularity": ",".join(sorted(set(fp8_modules.values())))}
    config = getattr(model, "config", None)
    if config is not None and hasattr(model, "save_config"):
        metadata["diffusers_class"] = type(model).__name__
        metadata["diffusers_config"] = json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")})
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata)


class FP8CheckpointError(ValueError):
    pass


def _read(path: Union[str, Path]):
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise FP8CheckpointError(f"FP8 checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except Exception as e:  # safetensors' own error types
        raise FP8CheckpointError(f"{path} is not a readable safetensors file: {e}") from e


CPU_ALIGNMENT = 64  # bytes: what torch's CPU allocator gives every tensor


def own_aligned_cpu_memory(model: nn.Module) -> nn.Module:
    """Give each CPU parameter and buffer that is a view into a safetensors file's buffer
    (at whatever offset the file put it) memory of its own. Inductor compiles CPU kernels
    for aligned inputs and treats misaligned ones differently (seen: other numerics), so
    a model loaded from a file would compile unlike the same weights built in memory.
    GPU tensors were copied on the way there and are left alone."""
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for t in tensors.values():
                if t is not None and t.device.type == "cpu" and t.data_ptr() % CPU_ALIGNMENT:
                    t.data = t.data.clone()
    return model


def _ecosystem_to_ours(state: dict) -> Dict[str, str]:
    """Pre-quantized Wan files from other tools (ComfyUI-style): e4m3fn `X.weight` with a
    per-tensor fp32 `X.scale_weight`. Renames in place; returns {module: granularity}."""
    fp8_modules = {}
    for key in [k for k in state if k.endswith(".scale_weight")]:
        module = key[: -len(".scale_weight")]
        scale = state.pop(key).float()
        if scale.numel() != 1:
            raise FP8CheckpointError(f"{key}: expected one per-tensor scale, got shape {tuple(scale.shape)}")
        state[f"{module}.weight_scale"] = scale.reshape(())
        fp8_modules[module] = "tensor"
    state.pop("scaled_fp8", None)  # a marker tensor some tools write
    return fp8_modules


def _fp8_modules_of(state: dict, metadata: dict, path) -> Dict[str, str]:
    if metadata.get("format") == FORMAT:
        return json.loads(metadata["fp8_modules"])
    if any(k.endswith(".scale_weight") for k in state):
        return _ecosystem_to_ours(state)
    fp8_keys = [k for k, v in state.items() if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)]
    if fp8_keys:
        raise FP8CheckpointError(
            f"{path}: {len(fp8_keys)} FP8 tensors (e.g. {fp8_keys[0]}) but no scales in a format fp8_fx "
            "knows (fp8_fx metadata, or per-tensor `.scale_weight` entries). Refusing to guess: a cast "
            "without the right scales gives silently wrong weights.")
    raise FP8CheckpointError(f"{path} has no FP8 weights: load it as a bf16 checkpoint (fp8_fx.load_wan) "
                             "and call convert_to_fp8")


def _check(state: dict, fp8_modules: Dict[str, str], path) -> None:
    for module, granularity in fp8_modules.items():
        w, s = state.get(f"{module}.weight"), state.get(f"{module}.weight_scale")
        if w is None or s is None:
            raise FP8CheckpointError(f"{path}: {module} is listed as FP8 but its "
                                     f"{'weight' if w is None else 'weight_scale'} is missing")
        if w.dtype != ops.FP8_DTYPE:
            raise FP8CheckpointError(f"{path}: {module}.weight is {w.dtype}, expected float8_e4m3fn")
        expected = (w.shape[0], 1) if granularity == "row" else ()
        if tuple(s.shape) != expected:
            raise FP8CheckpointError(
                f"{path}: {module}.weight_scale has shape {tuple(s.shape)}, but {granularity!r} granularity "
                f"for a {tuple(w.shape)} weight needs {expected}")


def load_fp8_checkpoint(path: Union[str, Path], model: Optional[nn.Module] = None,
                        device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Load an FP8 checkpoint (ours, or a per-tensor `scale_weight` file from other tools)
    into `model` (a skeleton with the same module tree, any dtype, meta is fine), or,
    for an fp8_fx diffusers checkpoint, into a new model built from its recorded config.
    Tensors are loaded as stored: bit-exact FP8 weights and scales."""
    state, metadata = _read(path)
    state = {k.removeprefix("model.diffusion_model."): v for k, v in state.items()}
    return load_fp8_checkpoint_state(state, metadata, model, path, device)


def load_fp8_checkpoint_state(state: dict, metadata: dict, model: Optional[nn.Module], path,
                              device: Union[str, torch.device] = "cpu") -> nn.Module:
    """load_fp8_checkpoint for a state dict already read (and renamed) by the caller."""
    fp8_modules = _fp8_modules_of(state, metadata, path)
    if model is None:
        model = _skeleton_from_metadata(metadata, state, fp8_modules, path)
    for name in list(fp8_modules):
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise FP8CheckpointError(f"{path}: FP8 module {name} does not exist in the model") from None
        if not isinstance(old, FP8Linear):
            w = state[f"{name}.weight"]
            bias = state.get(f"{name}.bias")
            old = FP8Linear(w.shape[1], w.shape[0], bias is not None, fp8_modules[name], device="meta",
                            bias_dtype=bias.dtype if bias is not None else torch.bfloat16)
            _set_submodule(model, name, old)
        if f"{name}.input_scale" in state and old.input_scale is None:  # saved after calibration
            old.input_scale = torch.empty((), dtype=torch.float32, device="meta")
    _check(state, fp8_modules, path)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not _is_nonpersistent(model, k)]
    if missing or unexpected:
        raise FP8CheckpointError(f"{path} does not match the model: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
    return own_aligned_cpu_memory(model.to(device).eval())


def _is_nonpersistent(model: nn.Module, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    return leaf in getattr(model.get_submodule(parent) if parent else model, "_non_persistent_buffers_set", ())


def _skeleton_from_metadata(metadata: dict, state: dict, fp8_modules, path) -> nn.Module:
    if "diffusers_config" not in metadata:
        raise FP8CheckpointError(f"{path}: no model config recorded; pass model= (a skeleton with the same "
                                 "module tree, e.g. built on the meta device)")
    import diffusers
    from accelerate import init_empty_weights
    cls = getattr(diffusers, metadata["diffusers_class"])
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rope) real
        return cls.from_config(json.loads(metadata["diffusers_config"]))

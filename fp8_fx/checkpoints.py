"""FP8 checkpoints: save an FP8 model to one safetensors file and load it back bit-exactly;
read the pre-quantized formats of other tools (ComfyUI-style per-tensor `scale_weight`).

    fp8_fx.save_fp8_checkpoint(model, "wan_fp8.safetensors")
    model = fp8_fx.load_fp8_checkpoint("wan_fp8.safetensors", model=skeleton)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from . import ops
from .modules import FP8Linear, set_submodule

FORMAT = "fp8_fx/1"


def save_fp8_checkpoint(model: nn.Module, path: Union[str, Path]) -> None:
    """One safetensors file: FP8 weights, fp32 scales, the rest as it is, and metadata
    recording the format, the granularity, the FP8 modules and (diffusers) the config."""
    from safetensors.torch import save_file
    from .qualname import is_peft_layer
    adapted = [n for n, m in model.named_modules() if is_peft_layer(type(m))]
    if adapted:
        raise ValueError(
            f"save_fp8_checkpoint: the model has PEFT (LoRA) adapters ({len(adapted)} layers, e.g. {adapted[0]}); "
            "an FP8 checkpoint holds the base model only. Save the adapter on its own (diffusers' "
            "save_lora_adapter / save_lora_weights) and remove it first (unload_lora(), or fuse_lora() then "
            "unload_lora() to keep it fused in).")
    fp8_modules = {n: m.granularity for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    if not fp8_modules:
        raise ValueError("save_fp8_checkpoint: the model has no FP8Linear layers; call convert_to_fp8 first")
    metadata = {"format": FORMAT, "fp8_modules": json.dumps(fp8_modules),
                "granularity": ",".join(sorted(set(fp8_modules.values())))}
    config = getattr(model, "config", None)
    if config is not None and hasattr(model, "save_config"):
        metadata["diffusers_class"] = type(model).__name__
        metadata["diffusers_config"] = json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")})
    folder = Path(path).parent
    if not folder.is_dir():
        raise FileNotFoundError(f"save_fp8_checkpoint: the folder {folder} does not exist; create it first "
                                f"(Path({str(folder)!r}).mkdir(parents=True))")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata)


class FP8CheckpointError(ValueError):
    pass


def _read(path: Union[str, Path]):
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = Path(path)
    if path.is_dir():
        raise FP8CheckpointError(
            f"{path} is a folder; an FP8 checkpoint is one .safetensors file (save_fp8_checkpoint's). "
            "For a bf16 diffusers folder use fp8_fx.wan.load_wan(path, fp8=True).")
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
    raise FP8CheckpointError(f"{path} has no FP8 weights: load it as a bf16 checkpoint (fp8_fx.wan.load_wan) "
                             "and call convert_to_fp8")


def _check(state: dict, fp8_modules: Dict[str, str], path) -> None:
    _check_header({k: (tuple(v.shape), v.dtype) for k, v in state.items()}, fp8_modules, path)


def _check_header(header: Dict[str, Tuple[tuple, torch.dtype]], fp8_modules: Dict[str, str], path) -> None:
    """The FP8 modules' weights and scales: present, FP8, scales of the granularity's shape.
    header: {key: (shape, dtype)}, from tensors or from a file's header alone."""
    for module, granularity in fp8_modules.items():
        w, s = header.get(f"{module}.weight"), header.get(f"{module}.weight_scale")
        if w is None or s is None:
            raise FP8CheckpointError(f"{path}: {module} is listed as FP8 but its "
                                     f"{'weight' if w is None else 'weight_scale'} is missing")
        (w_shape, w_dtype), (s_shape, _) = w, s
        if w_dtype != ops.FP8_DTYPE:
            raise FP8CheckpointError(f"{path}: {module}.weight is {w_dtype}, expected float8_e4m3fn")
        expected = (w_shape[0], 1) if granularity == "row" else ()
        if tuple(s_shape) != expected:
            raise FP8CheckpointError(
                f"{path}: {module}.weight_scale has shape {tuple(s_shape)}, but {granularity!r} granularity "
                f"for a {tuple(w_shape)} weight needs {expected}")


def install_fp8_modules(model: nn.Module, fp8_modules: Dict[str, str],
                        header: Dict[str, Tuple[tuple, torch.dtype]], path) -> nn.Module:
    """Make each of `fp8_modules` an FP8Linear (on the meta device where it is not one yet),
    with an `input_scale` buffer where the checkpoint has one. Reads shapes only."""
    for name in list(fp8_modules):
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise FP8CheckpointError(f"{path}: FP8 module {name} does not exist in the model") from None
        if not isinstance(old, FP8Linear):
            w_shape = header[f"{name}.weight"][0]
            bias = header.get(f"{name}.bias")
            old = FP8Linear(w_shape[1], w_shape[0], bias is not None, fp8_modules[name], device="meta",
                            bias_dtype=bias[1] if bias is not None else torch.bfloat16)
            set_submodule(model, name, old)
        if f"{name}.input_scale" in header and old.input_scale is None:  # saved after calibration
            old.input_scale = torch.empty((), dtype=torch.float32, device="meta")
    return model


def load_fp8_checkpoint(path: Union[str, Path], model: Optional[nn.Module] = None,
                        device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Load an FP8 checkpoint (ours, or a per-tensor `scale_weight` file from other tools)
    into `model` (a skeleton with the same module tree, any dtype, meta is fine), or,
    for an fp8_fx diffusers checkpoint, into a new model built from its recorded config.
    Tensors are loaded as stored: bit-exact FP8 weights and scales. Every process that
    calls this reads the whole file; under FSDP2, load each rank's shards only with
    fp8_fx.distributed.sharded_loading.load_fp8_checkpoint_sharded."""
    state, metadata = _read(path)
    state = {k.removeprefix("model.diffusion_model."): v for k, v in state.items()}
    return load_fp8_checkpoint_state(state, metadata, model, path, device)


def load_fp8_checkpoint_state(state: dict, metadata: dict, model: Optional[nn.Module], path,
                              device: Union[str, torch.device] = "cpu") -> nn.Module:
    """load_fp8_checkpoint for a state dict already read (and renamed) by the caller."""
    fp8_modules = _fp8_modules_of(state, metadata, path)
    if model is None:
        model = _skeleton_from_metadata(metadata, fp8_modules, path)
    _check(state, fp8_modules, path)
    install_fp8_modules(model, fp8_modules, {k: (tuple(v.shape), v.dtype) for k, v in state.items()}, path)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not _is_nonpersistent(model, k)]
    if missing or unexpected:
        raise FP8CheckpointError(f"{path} does not match the model: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
    return own_aligned_cpu_memory(model.to(device).eval())


def _is_nonpersistent(model: nn.Module, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    return leaf in getattr(model.get_submodule(parent) if parent else model, "_non_persistent_buffers_set", ())


def _skeleton_from_metadata(metadata: dict, fp8_modules, path) -> nn.Module:
    if "diffusers_config" not in metadata:
        raise FP8CheckpointError(f"{path}: no model config recorded; pass model= (a skeleton with the same "
                                 "module tree, e.g. built on the meta device)")
    import diffusers
    from accelerate import init_empty_weights
    cls = getattr(diffusers, metadata["diffusers_class"])
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rope) real
        return cls.from_config(json.loads(metadata["diffusers_config"]))

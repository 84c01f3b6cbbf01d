"""Load an FP8 checkpoint into an FSDP2-sharded model, each rank reading only its shards.

    model = fp8_skeleton(path)                     # header only: meta parameters, FP8Linear layers
    for block in model.blocks:
        fully_shard_fp8(block, mesh=mesh)
    fully_shard_fp8(model, mesh=mesh)
    load_fp8_checkpoint_sharded(path, model)       # this rank's rows of each weight, from the file

No process ever holds the whole model: the skeleton has no parameter memory, fully_shard
of a meta model keeps meta shards, and each sharded parameter is filled with the rows of
this rank's shard read through safetensors' `get_slice` (which reads only those bytes of
the file). Tensors FSDP does not shard (buffers: the FP8 scales, which must be the whole
weight's; parameters outside every fully_shard) are read whole on every rank.

The file is save_fp8_checkpoint's (one safetensors file, fp8_fx metadata). Other tools'
FP8 files: load them once with fp8_fx.load_fp8_checkpoint and save_fp8_checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..checkpoints import (FORMAT, FP8CheckpointError, _check_header, _is_nonpersistent,
                           _skeleton_from_metadata, install_fp8_modules)
from ..modules import FP8Linear

_SAFETENSORS_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BF16": torch.bfloat16,
                       "F16": torch.float16, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64,
                       "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


@dataclasses.dataclass
class ShardedLoad:
    """What one rank read: `bytes_read` of the file's `bytes_in_file` (tensor data)."""
    sliced: int = 0  # tensors of which this rank read its shard only
    whole: int = 0  # tensors read whole (buffers, unsharded parameters)
    bytes_read: int = 0
    bytes_in_file: int = 0


def _open(path: Union[str, Path]):
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FP8CheckpointError(f"FP8 checkpoint not found: {path}" + (
            " (a folder: an FP8 checkpoint is one .safetensors file)" if path.is_dir() else ""))
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors' own error types
        raise FP8CheckpointError(f"{path} is not a readable safetensors file: {e}") from e


def _header(f) -> Dict[str, Tuple[tuple, torch.dtype]]:
    """{key: (shape, dtype)} from the file's header, reading no tensor data."""
    header = {}
    for key in f.keys():
        sl = f.get_slice(key)
        dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
        if dtype is None:
            raise FP8CheckpointError(f"{key}: safetensors dtype {sl.get_dtype()} is not supported here")
        header[key] = (tuple(sl.get_shape()), dtype)
    return header


def _fp8_modules(metadata: dict, path) -> Dict[str, str]:
    if metadata.get("format") != FORMAT:
        raise FP8CheckpointError(
            f"{path} is not an fp8_fx checkpoint (no '{FORMAT}' metadata). Sharded loading reads "
            "save_fp8_checkpoint's files; convert another tool's file once with "
            "fp8_fx.save_fp8_checkpoint(fp8_fx.load_fp8_checkpoint(path, model=...), new_path).")
    return json.loads(metadata["fp8_modules"])


def _match_header(model: nn.Module, header: Dict[str, Tuple[tuple, torch.dtype]]) -> None:
    """Give each meta parameter and buffer the file's shape and dtype (a skeleton built in
    fp32, or a bf16 FP8Linear bias placeholder), so fully_shard sees what will be loaded."""
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for tensors in (module._parameters, module._buffers):
            for leaf, t in list(tensors.items()):
                entry = header.get(prefix + leaf)
                if t is None or entry is None or t.device.type != "meta":
                    continue
                shape, dtype = entry
                if tuple(t.shape) != shape or t.dtype != dtype:
                    new = torch.empty(shape, dtype=dtype, device="meta")
                    tensors[leaf] = nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new


def fp8_skeleton(path: Union[str, Path], model: Optional[nn.Module] = None) -> nn.Module:
    """The model to shard before load_fp8_checkpoint_sharded: FP8Linear where the file
    has FP8 layers, every meta parameter in the file's shape and dtype. Reads the file's
    header only. `model`: your skeleton (meta parameters, same module tree); by default
    built from the diffusers config the file records (buffers such as RoPE tables real)."""
    with _open(path) as f:
        metadata = f.metadata() or {}
        header = _header(f)
    fp8_modules = _fp8_modules(metadata, path)
    if model is None:
        model = _skeleton_from_metadata(metadata, fp8_modules, path)
    _check_header(header, fp8_modules, path)
    install_fp8_modules(model, fp8_modules, header, path)
    _match_header(model, header)
    for p in model.parameters():
        p.requires_grad_(False)  # inference: FP8 parameters cannot take gradients anyway
    return model.eval()


def _shard_slices(global_shape: tuple, mesh, placements) -> Tuple[slice, ...]:
    """The index of this rank's shard of a tensor placed on `mesh`: Shard(d) splits dim d
    as torch.chunk does (what DTensor and FSDP2 do), Replicate keeps it whole."""
    from torch.distributed.tensor import Replicate, Shard
    bounds = [[0, n] for n in global_shape]
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard:  # _StridedShard (FSDP over TP), Partial
            raise NotImplementedError(
                f"load_fp8_checkpoint_sharded: placement {placement} is not supported (Shard(d) and "
                "Replicate are); FSDP combined with tensor parallelism is not handled here")
        start, stop = bounds[placement.dim]
        size, parts, rank = stop - start, mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
        chunk = -(-size // parts)
        lo = min(start + rank * chunk, stop)
        bounds[placement.dim] = [lo, min(lo + chunk, stop)]
    return tuple(slice(lo, hi) for lo, hi in bounds)


def _device_of(mesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def load_fp8_checkpoint_sharded(path: Union[str, Path], model: nn.Module,
                                device: Union[str, torch.device, None] = None) -> ShardedLoad:
    """Fill `model` (from fp8_skeleton, sharded with fully_shard) from an FP8 checkpoint:
    each DTensor parameter gets this rank's shard only, read by slice from the file;
    buffers and unsharded parameters are read whole. In place; returns what was read.
    `device`: where tensors that are not DTensors go (default: the mesh's device, or CPU)."""
    from torch.distributed.tensor import DTensor
    with _open(path) as f:
        metadata = f.metadata() or {}
        header = _header(f)
        fp8_modules = _fp8_modules(metadata, path)
        _check_header(header, fp8_modules, path)
        not_fp8 = [n for n in fp8_modules if not isinstance(model.get_submodule(n), FP8Linear)]
        if not_fp8:
            raise FP8CheckpointError(
                f"{path}: {not_fp8[:3]} are FP8 in the file but not FP8Linear in the model. Build the "
                "model with fp8_skeleton(path, model) before fully_shard (FSDP2 cannot take new modules "
                "after sharding).")
        targets = model.state_dict()
        missing = [k for k in targets if k not in header and not _is_nonpersistent(model, k)]
        unexpected = [k for k in header if k not in targets]
        if missing or unexpected:
            raise FP8CheckpointError(f"{path} does not match the model: missing {missing[:5]}, "
                                     f"unexpected {unexpected[:5]}")
        meshes = [t.device_mesh for t in targets.values() if isinstance(t, DTensor)]
        default_device = torch.device(device) if device is not None else (
            _device_of(meshes[0]) if meshes else torch.device("cpu"))
        stats = ShardedLoad(bytes_in_file=sum(_nbytes(*header[k]) for k in header))
        loaded: Dict[str, torch.Tensor] = {}
        for key, target in targets.items():
            if key not in header:
                continue
            shape, dtype = header[key]
            if tuple(target.shape) != shape or target.dtype != dtype:
                raise FP8CheckpointError(
                    f"{path}: {key} is {tuple(shape)} {dtype} in the file but {tuple(target.shape)} "
                    f"{target.dtype} in the model; build the model with fp8_skeleton(path, model) "
                    "before fully_shard")
            if isinstance(target, DTensor):
                loaded[key] = _read_shard(f, key, target, shape, dtype)
                stats.sliced += 1
                stats.bytes_read += _nbytes(loaded[key].to_local().shape, dtype)
            else:
                where = target.device if target.device.type != "meta" else default_device
                loaded[key] = f.get_tensor(key).to(where)
                stats.whole += 1
                stats.bytes_read += _nbytes(shape, dtype)
    # assign=True: the shards become the parameters; FSDP2's load_state_dict hook then
    # re-pads them and points its sharded storage at them.
    model.load_state_dict(loaded, strict=False, assign=True)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if _is_meta(t)]
    if still_meta:
        raise FP8CheckpointError(
            f"after loading {path}, {still_meta[:5]} are still on the meta device (non-persistent "
            "buffers are not in a checkpoint: build the skeleton with real buffers, e.g. accelerate's "
            "init_empty_weights(include_buffers=False))")
    return stats


def _read_shard(f, key: str, target, shape: tuple, dtype: torch.dtype):
    from torch.distributed.tensor import DTensor
    index = _shard_slices(shape, target.device_mesh, target.placements)
    local_shape = tuple(s.stop - s.start for s in index)
    if local_shape != tuple(target.to_local().shape):
        raise FP8CheckpointError(
            f"{key}: this rank's shard would be {local_shape}, but the sharded parameter's local "
            f"tensor is {tuple(target.to_local().shape)}; a sharding this loader does not know")
    device = _device_of(target.device_mesh) if target.to_local().is_meta else target.to_local().device
    if 0 in local_shape:  # an empty shard (fewer rows than ranks): nothing to read
        local = torch.empty(local_shape, dtype=dtype, device=device)
    else:
        local = f.get_slice(key)[index].to(device)
    return DTensor.from_local(local, target.device_mesh, target.placements, run_check=False,
                              shape=torch.Size(shape), stride=_contiguous_stride(shape))


def _contiguous_stride(shape: tuple) -> Tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def _is_meta(t: torch.Tensor) -> bool:
    return (t.to_local() if hasattr(t, "to_local") else t).is_meta


"""The real Wan DiT: diffusers' WanTransformer3DModel, built from a size preset or
loaded from a local checkpoint (never from the network)."""
from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Dict

import torch

# Wan 2.1 T2V sizes. "tiny" is ours: every targeted dim a multiple of 16, small enough
# for a 2-core CPU to compile and denoise in seconds.
WAN_CONFIGS: Dict[str, dict] = {
    "tiny": dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16,
                 out_channels=16, text_dim=64, freq_dim=32, ffn_dim=128, num_layers=2,
                 rope_max_seq_len=64),
    "1.3B": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                 out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30),
    "14B": dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40),
}
TEXT_TOKENS = {"tiny": 16, "1.3B": 512, "14B": 512}  # umT5 sequence length in Wan pipelines


class CheckpointError(ValueError):
    pass


def _wan_class():
    try:
        from diffusers import WanTransformer3DModel
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the Wan DiT needs diffusers: pip install -e '.[wan]'") from e
    return WanTransformer3DModel


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def cast_like_diffusers(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model.to(dtype)` but keep the modules diffusers keeps in fp32 (norms, time embedder,
    modulation tables), as `from_pretrained(torch_dtype=...)` does. FP8Linear weights and
    their fp32 scales stay as they are (only their bias follows `dtype`)."""
    from .modules import FP8Linear
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    fp8 = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, t in tensors:
        module, _, leaf = name.rpartition(".")
        if t.is_floating_point() and not (module in fp8 and leaf != "bias"):
            t.data = t.data.to(torch.float32 if keep & set(name.split(".")) else dtype)
    return model


def build_wan(model: str = "tiny", dtype: torch.dtype = torch.bfloat16, device="cpu",
              seed: int = 0) -> torch.nn.Module:
    """A randomly initialised WanTransformer3DModel of a preset size."""
    if model not in WAN_CONFIGS:
        raise ValueError(f"unknown model {model!r}: choose one of {sorted(WAN_CONFIGS)}")
    torch.manual_seed(seed)
    # Initialise directly in the target dtype and device: 14B in fp32 is 57 GB.
    with torch.device(device), _default_dtype(dtype if dtype != torch.float16 else torch.float32):
        net = _wan_class()(**WAN_CONFIGS[model])
    return cast_like_diffusers(net, dtype).eval()


def _is_original_wan(state: dict) -> bool:
    return any(k.endswith("head.modulation") or ".self_attn." in k for k in state)


def infer_wan_config(state: dict) -> dict:
    """A diffusers WanTransformer3DModel config from the shapes of a diffusers-named state dict."""
    try:
        dim, in_channels = state["patch_embedding.weight"].shape[:2]
        patch = tuple(state["patch_embedding.weight"].shape[2:])
        layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        ffn_dim = state["blocks.0.ffn.net.0.proj.weight"].shape[0]
        text_dim = state["condition_embedder.text_embedder.linear_1.weight"].shape[1]
        freq_dim = state["condition_embedder.time_embedder.linear_1.weight"].shape[1]
        out_channels = state["proj_out.weight"].shape[0] // (patch[0] * patch[1] * patch[2])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"not a Wan transformer checkpoint: missing or malformed {e}") from e
    head_dim = 128 if dim % 128 == 0 else 16  # Wan uses 128; our tiny preset 16
    config = dict(patch_size=patch, num_attention_heads=dim // head_dim, attention_head_dim=head_dim,
                  in_channels=in_channels, out_channels=out_channels, text_dim=text_dim,
                  freq_dim=freq_dim, ffn_dim=ffn_dim, num_layers=layers)
    if "condition_embedder.image_embedder.ff.net.0.proj.weight" in state:  # I2V
        config["image_dim"] = state["condition_embedder.image_embedder.ff.net.0.proj.weight"].shape[1]
        config["added_kv_proj_dim"] = dim
    if dim < 128:
        config["rope_max_seq_len"] = 64
    return config


def load_wan(path, dtype: torch.dtype = torch.bfloat16, device="cpu", fp8=None) -> torch.nn.Module:
    """Load a local Wan DiT: a diffusers folder (a transformer folder, or a pipeline folder
    with `transformer/`) or one `.safetensors` file in diffusers or original Wan2.1 names.
    An FP8 file (save_fp8_checkpoint's, or other tools' `scale_weight` files) is loaded by
    load_wan_fp8: its weights stay FP8 (fp8 is then moot), the rest is cast to `dtype`.

    fp8: True or an FP8Config to load to the CPU and convert the targeted weights to FP8 on
    the way to `device`, one layer at a time (the full bf16 model never sits on `device`).
    Tensors left on the CPU get memory of their own (see own_aligned_cpu_memory)."""
    from .checkpoints import FP8CheckpointError, own_aligned_cpu_memory
    from .modules import convert_to_fp8
    if is_fp8_file(Path(path)):
        try:
            model = load_wan_fp8(path, device=device)
        except FP8CheckpointError as e:
            raise CheckpointError(str(e)) from e
        return own_aligned_cpu_memory(cast_like_diffusers(model, dtype))
    if fp8:
        from .config import FP8Config
        model = _load_wan(Path(path), dtype, "cpu")
        convert_to_fp8(model, fp8 if isinstance(fp8, FP8Config) else None, device=device)
        return own_aligned_cpu_memory(model)
    return own_aligned_cpu_memory(_load_wan(Path(path), dtype, device))


def is_fp8_file(path: Path) -> bool:
    """A .safetensors file holding FP8 weights: fp8_fx's format in its metadata, per-tensor
    `.scale_weight` entries, or any float8 tensor. Reads only the header."""
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open
    from .checkpoints import FORMAT
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("format") == FORMAT:
                return True
            return any(k.endswith(".scale_weight") or f.get_slice(k).get_dtype().startswith("F8")
                       for k in f.keys())
    except Exception:  # unreadable: _load_wan says why
        return False


def _load_wan(path: Path, dtype: torch.dtype, device) -> torch.nn.Module:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (give a local folder or .safetensors file;"
                              " nothing is downloaded)")
    cls = _wan_class()
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer" / "config.json").exists() else path
        if not (folder / "config.json").exists():
            raise CheckpointError(f"{path} has no config.json (nor transformer/config.json): not a "
                                  "diffusers model folder")
        try:
            net = cls.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"could not load the diffusers folder {folder}: {e}") from e
        return net.to(device).eval()
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: expected a .safetensors file or a diffusers folder")
    from safetensors.torch import load_file
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    state = {k.removeprefix("model.diffusion_model."): v for k, v in state.items()}
    original = _is_original_wan(state)
    if original:
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
        converted = convert_wan_transformer_to_diffusers(dict(state))
    else:
        converted = state
    config = infer_wan_config(converted)
    if original:  # diffusers' own single-file loader, with a local config: no download
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps({"_class_name": cls.__name__, **config}))
            net = cls.from_single_file(str(path), config=tmp, local_files_only=True)
        return cast_like_diffusers(net, dtype).to(device).eval()
    net = wan_skeleton(config)
    missing, unexpected = net.load_state_dict(converted, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match a Wan transformer: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    return cast_like_diffusers(net, dtype).to(device).eval()


def wan_skeleton(config: dict) -> torch.nn.Module:
    """A WanTransformer3DModel with parameters on the meta device (no memory, no random
    init) and real buffers (rope tables), ready for load_state_dict(..., assign=True)."""
    from accelerate import init_empty_weights
    with init_empty_weights(include_buffers=False):
        return _wan_class()(**config)


def latent_shape(frames: int, height: int, width: int, channels: int = 16):
    """Wan VAE: 4x temporal, 8x spatial compression; frames must be 4k+1."""
    return (1, channels, (frames - 1) // 4 + 1, height // 8, width // 8)


def load_wan_fp8(path, device="cpu") -> torch.nn.Module:
    """An FP8 Wan checkpoint: one saved by fp8_fx.save_fp8_checkpoint, or a pre-quantized
    file from other tools (e4m3fn weights + per-tensor `scale_weight`, diffusers or original
    Wan2.1 names). FP8 weights and scales load bit-exactly; the rest keeps its dtype."""
    from .checkpoints import FP8CheckpointError, _read, load_fp8_checkpoint_state
    state, metadata = _read(path)
    state = {k.removeprefix("model.diffusion_model."): v for k, v in state.items()}
    if "diffusers_config" in metadata:  # ours: the skeleton comes from the recorded config
        return load_fp8_checkpoint_state(state, metadata, None, path, device)
    if _is_original_wan(state):
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
        state = convert_wan_transformer_to_diffusers(dict(state))
    try:
        config = infer_wan_config(state)
    except CheckpointError as e:
        raise FP8CheckpointError(str(e)) from e
    return load_fp8_checkpoint_state(state, metadata, wan_skeleton(config), path, device)

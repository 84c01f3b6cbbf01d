"""cuDNN's FP8 attention forward (Hopper and newer), the "tensor" recipe's GPU kernel.

Reached through NVIDIA's `nvidia-cudnn-frontend` Python package (`pip install
"fp8_fx[cudnn]"`), which drives the libcudnn that torch ships. torch's own SDPA takes no
float8 inputs. The recipe's numbers map onto cuDNN's scale inputs (attention_recipes.py):

    descale_q/k/v = Q/K/V's scales        (fp32 tensors on the GPU: no host sync)
    scale_s = 448, descale_s = 1/448      P~ = exp(S - max) in [0, 1] -> e4m3(448 P~)
    scale_o = 1 / V's scale               O = a convex combination of V's rows: never clips

On Hopper cuDNN writes the output in FP8 only. A graph is built (~0.05 s) once per
device, shape, layout and softmax scale, and cached; `why_not(q, k, v)` builds the one a
traced call will need at compile time, so an unsupported case is reported then, with
cuDNN's reason, instead of failing in the first forward.
"""
from __future__ import annotations

import functools
import threading
from typing import Dict, Optional, Tuple

import torch

from ..ops import FP8_DTYPE, FP8_MAX

try:
    import cudnn
except Exception as error:  # not installed, or no libcudnn to load
    cudnn = None
    _IMPORT_ERROR = f"{type(error).__name__}: {error}"
else:
    _IMPORT_ERROR = ""

MIN_CAPABILITY = (9, 0)
_lock = threading.Lock()
_graphs: Dict[tuple, "_Graph"] = {}


def why_not_device(device: torch.device) -> Optional[str]:
    """None when cuDNN's FP8 attention can run on `device`, else why not."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"cuDNN FP8 attention runs on CUDA GPUs (this is {device.type})"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return f"cuDNN FP8 attention needs sm90+ (Hopper); this GPU is sm{capability[0]}{capability[1]}"
    if cudnn is None:
        return ("cuDNN FP8 attention needs the nvidia-cudnn-frontend package: pip install "
                f"'fp8_fx[cudnn]' ({_IMPORT_ERROR})")
    return None


def _shape_key(t: torch.Tensor) -> tuple:
    return tuple(t.shape), tuple(t.stride())


def _hinted_key(t: torch.Tensor) -> Optional[tuple]:
    """_shape_key with symbolic sizes and strides at their example values (None if one has none)."""
    def value(n):
        if isinstance(n, int):
            return n
        hint = getattr(getattr(n, "node", None), "hint", None)
        return int(hint) if hint is not None else None
    shape, stride = tuple(map(value, t.shape)), tuple(map(value, t.stride()))
    return None if None in shape or None in stride else (shape, stride)


def output_strides(b: int, h: int, s: int, d: int) -> Tuple[int, int, int, int]:
    """(B, H, S, D) strides of a (B, S, H, D) buffer: the layout the attention modules
    transpose back to (B, S, H*D) for to_out, so that transpose is free."""
    return (s * h * d, d, h * d, 1)


class _Graph:
    """One built cuDNN graph and the descriptors its variant pack is keyed by."""

    def __init__(self, device: torch.device, q: tuple, k: tuple, v: tuple, o: tuple, softmax_scale: float):
        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        self.handle = _handle(device.index)
        graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32,
                              handle=self.handle)
        self.q, self.k, self.v = (graph.tensor(name=n, dim=list(shape), stride=list(stride), data_type=e4m3)
                                  for n, (shape, stride) in (("q", q), ("k", k), ("v", v)))
        scalar = dict(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
        self.scales = [graph.tensor(name=n, **scalar)
                       for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
        self.o, _, self.amax_s, self.amax_o = graph.sdpa_fp8(
            self.q, self.k, self.v, *self.scales, generate_stats=False, attn_scale=softmax_scale,
            use_causal_mask=False, name="fp8_fx_attention")
        self.o.set_output(True).set_dim(list(o[0])).set_stride(list(o[1])).set_data_type(e4m3)
        for amax in (self.amax_s, self.amax_o):  # cuDNN computes them; nothing here reads them
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph = graph
        self.workspace_bytes = graph.get_workspace_size()


@functools.lru_cache(maxsize=None)
def _handle(device_index: int):
    with torch.cuda.device(device_index):
        return cudnn.create_handle()


@functools.lru_cache(maxsize=None)
def _p_scales(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(descale_s, scale_s): P~ in [0, 1] maps onto e4m3's range at a fixed 448."""
    return (torch.full((1, 1, 1, 1), 1.0 / FP8_MAX, dtype=torch.float32, device=device),
            torch.full((1, 1, 1, 1), FP8_MAX, dtype=torch.float32, device=device))


def _graph(device: torch.device, q: tuple, k: tuple, v: tuple, o: tuple, softmax_scale: float) -> _Graph:
    key = (device.index, q, k, v, o, float(softmax_scale))
    with _lock:
        if key not in _graphs:
            _graphs[key] = _Graph(device, q, k, v, o, softmax_scale)
        return _graphs[key]


def why_not(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> Optional[str]:
    """None when cuDNN builds an FP8 attention graph for these (traced) Q, K, V, else
    cuDNN's reason. Builds and caches the graph the call will use."""
    reason = why_not_device(q.device)
    if reason:
        return reason
    # Sizes that vary (Dynamo's symbolic shapes) are checked at the traced example's
    # values: the kernel builds a graph per shape anyway, at the first call of each.
    qk, kk, vk = (_hinted_key(t) for t in (q, k, v))
    if None in (qk, kk, vk):
        return "shapes without an example value to check cuDNN's support with"
    b, h, s, d = qk[0]
    dv = vk[0][-1]
    if d % 16 or dv % 16 or d > 256:
        return f"head dims {d}/{dv} (cuDNN FP8 attention takes multiples of 16 up to 256)"
    if min(key[1][-1] for key in (qk, kk, vk)) != 1:
        return "Q/K/V whose head dim is not contiguous"
    o = ((b, h, s, dv), output_strides(b, h, s, dv))
    try:
        _graph(q.device, qk, kk, vk, o, softmax_scale)
    except Exception as error:  # cudnn raises its own types: report its message's first line
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        return f"cuDNN has no FP8 attention plan for Q {tuple(q.shape)}, K {tuple(k.shape)} ({first})"
    return None


def sdpa_fp8(q8: torch.Tensor, q_scale: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor,
             v8: torch.Tensor, v_scale: torch.Tensor, softmax_scale: float, out: torch.Tensor) -> torch.Tensor:
    """FP8 attention into `out` (B, H, Sq, Dv) e4m3, whose scale is v_scale."""
    if cudnn is None or q8.device.type != "cuda":
        raise RuntimeError(why_not_device(q8.device))
    if q8.dtype != FP8_DTYPE or k8.dtype != FP8_DTYPE or v8.dtype != FP8_DTYPE:
        raise TypeError(f"cuDNN FP8 attention takes e4m3 Q/K/V, got {q8.dtype}/{k8.dtype}/{v8.dtype}")
    q8, k8, v8 = (t if t.stride(-1) == 1 else t.contiguous() for t in (q8, k8, v8))
    graph = _graph(q8.device, _shape_key(q8), _shape_key(k8), _shape_key(v8), _shape_key(out), softmax_scale)
    descale_s, scale_s = _p_scales(q8.device)
    scales = [s.reshape(1, 1, 1, 1).float() for s in (q_scale, k_scale, v_scale)]
    scales += [descale_s, scale_s, torch.reciprocal(scales[2])]
    amax = torch.empty(2, 1, 1, 1, dtype=torch.float32, device=q8.device)
    pack = {graph.q: q8, graph.k: k8, graph.v: v8, graph.o: out, graph.amax_s: amax[0:1], graph.amax_o: amax[1:2]}
    pack.update(zip(graph.scales, scales))
    workspace = torch.empty(max(graph.workspace_bytes, 1), dtype=torch.uint8, device=q8.device)
    cudnn.set_stream(handle=graph.handle, stream=torch.cuda.current_stream(q8.device).cuda_stream)
    graph.graph.execute(pack, workspace, handle=graph.handle)
    return out

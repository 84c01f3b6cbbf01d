"""fp8_fx under diffusers' context parallelism (Ulysses and ring), and FP8 on the Ulysses wire.

    import torch.distributed as dist
    from diffusers import ContextParallelConfig
    from fp8_fx.distributed.context_parallel import enable_context_parallel

    dist.init_process_group(...)                      # gloo on CPU, nccl on GPUs
    enable_context_parallel(transformer, ContextParallelConfig(ulysses_degree=2))
    transformer.compile_repeated_blocks(backend=fp8_fx.make_fp8_backend())   # or torch.compile(...)

diffusers splits the video tokens over the ranks at `blocks.0` and gathers them at
`proj_out` (WanTransformer3DModel._cp_plan); attention exchanges Q/K/V (Ulysses: an
all-to-all to whole sequences of H/N heads; ring: an all-gather of K/V). fp8_fx's pass
sees each rank's linears on its slice of the tokens and needs nothing else: row-wise
dynamic scales are per token, so every rank computes bit for bit what one process
computes for those tokens; tensor-wise dynamic scales take the amax of the rank's slice
(see README, "Several GPUs": measured, and why there is no amax all-reduce).

`enable_context_parallel` is `transformer.enable_parallelism(config=...)` plus what
diffusers 0.42 needs to run it on a CPU, to compile it whole and to run ring attention
with its native SDPA backend (each is explained where it is done):
- the CPU: `_resolve_parallel_config` computes `rank % torch.accelerator.device_count()`,
  a ZeroDivisionError where there is no accelerator;
- Wan 2.1's 1-D timestep: the plan's `""` entry expects a 2-D (per-token, Wan 2.2 TI2V)
  timestep and, for any other, calls `logger.warning_once`, which diffusers' logger
  lacks (AttributeError). The plan given here leaves that entry out for 1-D timesteps;
- whole-model torch.compile: the split hook calls `inspect.signature` on first use, a
  graph break that makes Dynamo skip the DiT's forward; the hooks get it filled in first;
- ring attention needs each partial attention's log-sum-exp, which diffusers' native
  backend does not return (its other ring-capable backends are CUDA kernels). On the
  CPU, self-attention gets WanContextParallelAttnProcessor, which runs diffusers' own
  ring/unified algorithm with SDPA's CPU kernel that returns it.

FP8 on the wire (`wire="fp8"`, Ulysses only): WanContextParallelAttnProcessor sends each
Q/K/V row of one token and one head (head_dim values) as e4m3 bytes plus its fp32 scale
(fp8_fx's recipe, row granularity), one all-to-all for Q, K and V together, and the
attention output back the same way (`wire="fp8_qkv"` sends the output in its own dtype):
(head_dim + 4) bytes per row instead of 2 * head_dim for bf16.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import ops

WIRES = ("native", "fp8", "fp8_qkv")
SCALE_BYTES = 4  # one fp32 scale per (token, head) row on the FP8 wire


def _diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("context parallelism needs diffusers: pip install -e '.[wan]'") from e
    from diffusers.models import attention_dispatch
    from diffusers.models.transformers import transformer_wan
    return attention_dispatch, transformer_wan


def wan_cp_plan(transformer, per_token_timesteps: bool = False) -> dict:
    """diffusers' `_cp_plan` for WanTransformer3DModel, without the entry that splits a
    per-token timestep unless `per_token_timesteps` (Wan 2.2 TI2V's 2-D timesteps).
    With a 1-D timestep that entry crashes diffusers 0.42 (see the module docstring)."""
    plan = dict(transformer._cp_plan)
    if not per_token_timesteps:
        plan.pop("", None)
    return plan


def enable_context_parallel(transformer, config, *, wire: str = "native", cp_plan: Optional[dict] = None,
                            per_token_timesteps: bool = False) -> None:
    """`transformer.enable_parallelism(config=config)` for a diffusers Wan DiT, made to run
    on CPU (gloo) and GPUs alike, compiled regionally or whole. Call it on every rank after
    `dist.init_process_group`, before compiling.

    config: diffusers' ContextParallelConfig (ulysses_degree, ring_degree or both).
    wire: "native" (Q/K/V move in the activation dtype, diffusers' own code), "fp8"
        (Ulysses: Q/K/V and the attention output move as FP8 bytes + per-row fp32 scales)
        or "fp8_qkv" (only Q/K/V in FP8).
    cp_plan: diffusers' plan to use instead of wan_cp_plan(transformer, per_token_timesteps).
    """
    attention_dispatch, transformer_wan = _diffusers()
    from diffusers import ContextParallelConfig
    if not isinstance(config, ContextParallelConfig):
        raise TypeError("enable_context_parallel takes diffusers' ContextParallelConfig, "
                        f"got {type(config).__name__}")
    if wire not in WIRES:
        raise ValueError(f"wire must be one of {WIRES}, got {wire!r}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("enable_context_parallel: call torch.distributed.init_process_group first")
    if not isinstance(transformer, transformer_wan.WanTransformer3DModel):
        raise TypeError("enable_context_parallel is written for diffusers' WanTransformer3DModel, got "
                        f"{type(transformer).__name__}; other models: call their enable_parallelism directly")
    heads = transformer.config.num_attention_heads
    if heads % config.ulysses_degree:
        raise ValueError(f"ulysses_degree={config.ulysses_degree} must divide the {heads} attention heads "
                         "(each rank attends over heads/ulysses_degree heads of the whole sequence)")
    if wire != "native" and config.ring_degree > 1:
        raise ValueError(f"wire={wire!r} is built for Ulysses only (ring_degree=1): ring attention all-gathers "
                         "K/V inside diffusers' TemplatedRingAttention, which has no hook for the bytes it sends")
    if transformer._parallel_config is not None:
        raise RuntimeError("enable_context_parallel: this transformer already has diffusers parallelism "
                           "(enable_parallelism or from_pretrained(parallel_config=...)); build a fresh one")
    device = next(transformer.parameters()).device
    ring_needs_lse = config.ring_degree > 1 and device.type == "cpu"
    if (config.ring_degree > 1 and device.type != "cpu"
            and _backend_name(transformer, attention_dispatch) == "native"):
        raise ValueError("ring attention needs an attention backend that returns the log-sum-exp: "
                         "transformer.set_attention_backend('_native_cudnn') (or 'flash', '_native_flash') "
                         "before enable_context_parallel; diffusers' 'native' does not")

    if wire != "native" or ring_needs_lse:
        processor = WanContextParallelAttnProcessor(wire=wire)
        for block in transformer.blocks:
            block.attn1.set_processor(processor)  # cross-attention (attn2) keeps diffusers' processor

    plan = cp_plan if cp_plan is not None else wan_cp_plan(transformer, per_token_timesteps)
    with _cpu_device_count():
        transformer.enable_parallelism(config=config, cp_plan=plan)
    _fill_hook_signatures(transformer)
    transformer.register_forward_pre_hook(_check_token_split, with_kwargs=True)


def _backend_name(transformer, attention_dispatch) -> str:
    backend = transformer.blocks[0].attn1.processor._attention_backend
    if backend is None:  # the process-wide default (DIFFUSERS_ATTN_BACKEND, attention_backend(...))
        backend, _ = attention_dispatch._AttentionBackendRegistry.get_active_backend()
    return str(getattr(backend, "value", backend))


@contextlib.contextmanager
def _cpu_device_count():
    """diffusers 0.42 picks a device as `rank % torch.accelerator.device_count()`, a
    ZeroDivisionError without an accelerator; the device it builds is not used for
    context parallelism (the mesh is). Count one device while it does, on CPU only."""
    count = torch.accelerator.device_count
    if count() > 0:
        yield
        return
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count


def _fill_hook_signatures(transformer) -> None:
    """diffusers' split hooks find their argument's position with inspect.signature on
    first use: inside torch.compile that is a graph break, and Dynamo then runs the whole
    DiT forward eagerly. Fill in what they would compute, before compiling."""
    from diffusers.hooks.context_parallel import ContextParallelSplitHook
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in (registry.hooks.values() if registry is not None else ()):
            metadata = getattr(hook, "module_forward_metadata", None)
            if isinstance(hook, ContextParallelSplitHook) and metadata is not None:
                names = list(inspect.signature(metadata._cls.forward).parameters)[1:]  # not self
                metadata.cached_parameter_indices = {name: i for i, name in enumerate(names)}


def _check_token_split(transformer, args, kwargs) -> None:
    """The video tokens are split evenly over the ranks: say which shape does not split,
    instead of diffusers' bare assertion deep inside the split hook."""
    hidden_states = kwargs.get("hidden_states", args[0] if args else None)
    if hidden_states is None:
        return
    cp = transformer._parallel_config.context_parallel_config
    ranks = cp.ring_degree * cp.ulysses_degree
    p_t, p_h, p_w = transformer.config.patch_size
    _, _, frames, height, width = hidden_states.shape
    tokens = (frames // p_t) * (height // p_h) * (width // p_w)
    if tokens % ranks:
        raise ValueError(f"context parallelism splits the {tokens} video tokens of a latent of shape "
                         f"{tuple(hidden_states.shape)} ({frames // p_t} x {height // p_h} x {width // p_w} after "
                         f"patching) over {ranks} ranks: choose frames/height/width whose token count "
                         f"is a multiple of {ranks}")


class WanContextParallelAttnProcessor:
    """Wan self-attention (attn1) under context parallelism, for what diffusers' own
    processor cannot do: FP8 Q/K/V on the Ulysses wire, and ring attention on a CPU.
    Same projections, norms and rotary embedding as diffusers' WanAttnProcessor (same
    arithmetic, so the same bits); then
    - wire "fp8"/"fp8_qkv": ulysses_attention below;
    - wire "native": diffusers' ring / Ulysses / unified algorithm, with an SDPA that
      returns the log-sum-exp the ring merge needs (SDPA's CPU flash kernel).
    `_parallel_config` is set by enable_parallelism, as on diffusers' processors."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, wire: str = "native") -> None:
        if wire not in WIRES:
            raise ValueError(f"wire must be one of {WIRES}, got {wire!r}")
        self.wire = wire

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, rotary_emb=None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("WanContextParallelAttnProcessor serves self-attention without a mask (attn1); "
                             "keep diffusers' WanAttnProcessor on cross-attention")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)

        config = self._parallel_config
        if config is None or config.context_parallel_config is None:
            out = _sdpa(query, key, value)
        elif self.wire == "native":
            attention_dispatch, _ = _diffusers()
            out = attention_dispatch._templated_context_parallel_attention(
                query, key, value, None, 0.0, False, None, False, False,
                forward_op=_sdpa_with_lse, backward_op=_no_backward, _parallel_config=config)
        else:
            group = config.context_parallel_config._ulysses_mesh.get_group()
            out = ulysses_attention(query, key, value, group, wire=self.wire)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _rotate(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs (x[2i], x[2i+1]); the tables repeat each
    frequency twice, so the even columns of cos and the odd of sin hold one copy each."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).type_as(x)


def _sdpa(query, key, value):
    """(B, S, H, D) layout in and out, as diffusers' attention functions."""
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return out.transpose(1, 2)


def _sdpa_with_lse(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """diffusers' forward_op contract: (B, S, H, D) in; out (B, S, H, D) and, when asked,
    the log-sum-exp (B, S, H). SDPA's CPU flash kernel returns it; CUDA has diffusers'
    own backends for that ('_native_cudnn', 'flash')."""
    if query.device.type != "cpu":
        raise ValueError("fp8_fx's ring attention fallback runs on CPU; on GPUs set diffusers' "
                         "attention backend to '_native_cudnn' or 'flash'")
    if attn_mask is not None or dropout_p or is_causal or enable_gqa:
        raise ValueError("fp8_fx's ring attention fallback takes no mask, dropout, causal or GQA")
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), 0.0, False, scale=scale)
    out = out.transpose(1, 2)
    return (out, lse.transpose(1, 2)) if return_lse else out


def _no_backward(ctx, grad_out, *args, **kwargs):
    raise RuntimeError("fp8_fx's context-parallel attention is inference-only")


# -- Ulysses attention with FP8 on the wire -------------------------------------------------

def ulysses_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group,
                      wire: str = "fp8") -> torch.Tensor:
    """Attention over the whole sequence with the tokens split over the ranks of `group`.
    q/k/v: (B, S_local, H, D), rank r holding tokens [r*S_local, (r+1)*S_local).
    One all-to-all gives each rank all tokens of H/N heads, SDPA runs on them, one
    all-to-all sends each rank its tokens back. wire: "native" (the activations' own
    dtype), "fp8" (Q/K/V and the output as FP8 rows + scales), "fp8_qkv" (Q/K/V only)."""
    if wire not in WIRES:
        raise ValueError(f"wire must be one of {WIRES}, got {wire!r}")
    ranks = dist.get_world_size(group)
    batch, tokens, heads, head_dim = query.shape
    if heads % ranks:
        raise ValueError(f"Ulysses attention over {ranks} ranks needs the {heads} heads to split evenly")
    local_heads = heads // ranks
    # (3, B, S, H, D) -> (N, 3, B, S, H/N, D): slice n goes to rank n (its heads)
    qkv = torch.stack((query, key, value)).unflatten(3, (ranks, local_heads)).permute(3, 0, 1, 2, 4, 5)
    qkv = exchange(qkv, group, fp8=wire in ("fp8", "fp8_qkv"))
    # slice n came from rank n (its tokens): (N, 3, B, S, h, D) -> 3 x (B, N*S, h, D)
    qkv = qkv.permute(1, 2, 0, 3, 4, 5).reshape(3, batch, ranks * tokens, local_heads, head_dim)
    out = _sdpa(*qkv.unbind(0))
    # (B, N*S, h, D) -> (N, B, S, h, D): slice n (rank n's tokens) goes back to rank n
    out = out.unflatten(1, (ranks, tokens)).permute(1, 0, 2, 3, 4)
    out = exchange(out, group, fp8=wire == "fp8")
    # slice n holds heads [n*h, (n+1)*h) of my tokens: (N, B, S, h, D) -> (B, S, H, D)
    return out.permute(1, 2, 0, 3, 4).reshape(batch, tokens, heads, head_dim)


def exchange(x: torch.Tensor, group, fp8: bool) -> torch.Tensor:
    """All-to-all over dim 0 (one slice per rank). fp8: each row of the last dim is sent
    as e4m3 bytes with its fp32 scale appended (fp8_fx's recipe, row granularity) and
    dequantized to x's dtype on arrival."""
    if not fp8:
        return _all_to_all(x.contiguous(), group)
    wire = pack_fp8_rows(x)
    return unpack_fp8_rows(_all_to_all(wire, group), x.dtype)


def pack_fp8_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> uint8 (..., D + 4): per row, D e4m3 codes then the fp32 scale's bytes."""
    codes, scale = ops.quantize(x, "row")
    return torch.cat((codes.view(torch.uint8), scale.contiguous().view(torch.uint8)), dim=-1)


def unpack_fp8_rows(wire: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """pack_fp8_rows' inverse: codes * scale, in `dtype`."""
    codes = wire[..., :-SCALE_BYTES].view(ops.FP8_DTYPE)
    scale = wire[..., -SCALE_BYTES:].contiguous().view(torch.float32)
    return (codes.float() * scale).to(dtype)


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """The one collective of this file (tests count its bytes): equal slices of dim 0."""
    import torch.distributed._functional_collectives as funcol
    out = funcol.all_to_all_single(x.flatten(), None, None, group).reshape(x.shape)
    if isinstance(out, funcol.AsyncCollectiveTensor):
        out = out.wait()
    return out


def wire_bytes(batch: int, tokens: int, heads: int, head_dim: int, ranks: int, wire: str,
               itemsize: int = 2) -> int:
    """Bytes one rank sends per self-attention (Q, K, V and the output), counting the
    slice it keeps for itself as all-to-all implementations do (sizes of the buffers)."""
    rows = batch * tokens * heads  # (token, head) rows of the local tokens
    fp8_row, plain_row = head_dim + SCALE_BYTES, head_dim * itemsize
    qkv = 3 * rows * (fp8_row if wire in ("fp8", "fp8_qkv") else plain_row)
    out = rows * (fp8_row if wire == "fp8" else plain_row)
    return qkv + out


# -- static scales ----------------------------------------------------------------------------

def all_reduce_amax(amax: dict, group=None) -> dict:
    """The max over the ranks of calibrate_input_amax's result, for set_input_scales: static
    tensor-wise scales that are the same on every rank whatever the world size (one
    collective at calibration, none per step). Every rank must hold the same layer names."""
    names = sorted(amax)
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, names, group=group)
    if any(other != names for other in gathered):
        raise ValueError("all_reduce_amax: the ranks calibrated different layers")
    values = torch.tensor([float(amax[n]) for n in names], dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
    return {n: float(v) for n, v in zip(names, values.tolist())}

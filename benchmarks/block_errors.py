"""Per-block ("teacher-forced") error of Wan DiT variants, and the fp32 reference forward.

A full-forward rel_err mixes each block's own error with 40 blocks of amplification:
on the 14B DiT, bf16 compile alone moves the output by 1.7% against bf16 eager, 500x
the fp8_fx / torchao difference it is asked to rank. Here every block i of every variant
runs on the reference's own input to block i (same text, timestep and rotary inputs), and
its output is compared with
- the bf16 eager block's output (what bench_wan's rel_err compares with), and
- the same block in fp32 (weights and inputs upcast): the function bf16 approximates,
so a variant that merely shares bf16 eager's roundings is told from one that is closer
to the true block.

    io = record_block_io(net, lambda: net(*inputs))         # bf16 eager reference run
    errs = block_errors({"fp8_fx": fp8_net, ...}, io, reference_blocks=cpu_net.blocks)
    refs32 = fp32_outputs(cpu_net, draws, kwargs, "cuda")     # the full forward in fp32

Host memory: every block's input and output of one forward (14B, 480p: 41 x 335 MB).
"""
from __future__ import annotations

import copy
import dataclasses
import statistics
from typing import Callable, Dict, List

import torch
import torch.nn as nn


@dataclasses.dataclass
class BlockIO:
    inputs: List[torch.Tensor]   # hidden states into block i (CPU)
    outputs: List[torch.Tensor]  # hidden states out of block i (CPU)
    rest: tuple                  # the other arguments of every block call (device tensors)
    kwargs: dict


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double().flatten(), ref.double().flatten().to(y.device)
    return ((y - ref).norm() / ref.norm()).item()


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def record_block_io(net: nn.Module, run: Callable[[], object]) -> BlockIO:
    """Run `run()` (a forward of `net`) and keep every `net.blocks[i]` call's hidden-state
    input and output on the CPU. The other block arguments must be the same for every
    block (as in Wan: text states, timestep projection, rotary embedding)."""
    io = BlockIO([], [], (), {})

    def before(module, args, kwargs):
        if not io.inputs:
            io.rest, io.kwargs = tuple(args[1:]), dict(kwargs)
        io.inputs.append(args[0].detach().to("cpu"))

    def after(module, args, kwargs, out):
        io.outputs.append(_first(out).detach().to("cpu"))

    handles = []
    for block in net.blocks:
        handles.append(block.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(block.register_forward_hook(after, with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    if len(io.inputs) != len(net.blocks):
        raise RuntimeError(f"recorded {len(io.inputs)} block calls for {len(net.blocks)} blocks: "
                           "run() must call every block of net exactly once")
    return io


def _upcast(x):
    if isinstance(x, (tuple, list)):  # diffusers' rotary embedding: (cos, sin)
        return type(x)(map(_upcast, x))
    return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def fp32_outputs(net: nn.Module, draws: List[tuple], kwargs: dict, device) -> List[torch.Tensor]:
    """The fp32 forward of a copy of `net` (bf16, anywhere) on each draw (inputs upcast),
    on the CPU: the function the bf16 model approximates, end to end. Built and freed on
    `device` before anything else needs it (14B: 56 GB)."""
    net32 = copy.deepcopy(net).to(device).float()  # cast on the device; .float() keeps integer buffers
    outs = []
    with torch.no_grad():
        for d in draws:
            out = _first(net32(*(_upcast(x).to(device) for x in d), **kwargs))
            outs.append(out.to("cpu"))
    del net32
    return outs


def block_errors(nets: Dict[str, nn.Module], io: BlockIO,
                 reference_blocks: nn.ModuleList = None) -> Dict[str, dict]:
    """{name: {"vs_bf16": [rel err per block], "vs_fp32": [...] or None}} for every net in
    `nets` (each with `.blocks`, compiled or not) fed the recorded inputs; with
    `reference_blocks` (the bf16 blocks, anywhere), also "bf16_eager": the recorded
    outputs against fp32. fp32 blocks are built one at a time on the inputs' device."""
    device = io.rest[0].device  # Wan: the text states
    out = {name: {"vs_bf16": [], "vs_fp32": [] if reference_blocks is not None else None} for name in nets}
    if reference_blocks is not None:
        out["bf16_eager"] = {"vs_bf16": [0.0] * len(io.inputs), "vs_fp32": []}
    with torch.no_grad():
        for i, (h, ref) in enumerate(zip(io.inputs, io.outputs)):
            h = h.to(device)
            y32 = None
            if reference_blocks is not None:
                block32 = copy.deepcopy(reference_blocks[i]).to(device).float()
                y32 = _first(block32(h.float(), *map(_upcast, io.rest),
                                     **{k: _upcast(v) for k, v in io.kwargs.items()}))
                del block32
                out["bf16_eager"]["vs_fp32"].append(_rel(ref.to(device), y32))
            for name, net in nets.items():
                y = _first(net.blocks[i](h, *io.rest, **io.kwargs))
                out[name]["vs_bf16"].append(_rel(y, ref))
                if y32 is not None:
                    out[name]["vs_fp32"].append(_rel(y, y32))
            del y32
    return out


def summary(errs: dict) -> dict:
    """Row fields: the mean over blocks and the per-block lists."""
    mean = statistics.mean
    return dict(block_rel_err=mean(errs["vs_bf16"]),
                block_rel_err_fp32=mean(errs["vs_fp32"]) if errs["vs_fp32"] else None,
                block_rel_errs=errs["vs_bf16"], block_rel_errs_fp32=errs["vs_fp32"])

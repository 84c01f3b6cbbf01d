"""A tiny Wan DiT under diffusers' context parallelism, compiled with fp8_fx.

    torchrun --nproc-per-node 2 examples/torchrun_wan_fp8.py                 # Ulysses over 2 ranks
    torchrun --nproc-per-node 4 examples/torchrun_wan_fp8.py --ring 2        # ring 2 x Ulysses 2
    torchrun --nproc-per-node 2 examples/torchrun_wan_fp8.py --wire fp8      # FP8 Q/K/V on the wire
    torchrun --nproc-per-node 2 examples/torchrun_wan_fp8.py --regional --granularity row

CPU processes talk over gloo; with one GPU per process, NCCL. Every rank prints its
output's error against a one-process run of the same model without FP8: the FP8 error,
the same on every rank (the gather at proj_out gives each rank the whole video).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

import fp8_fx
from fp8_fx.distributed.context_parallel import WIRES, enable_context_parallel


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node N examples/torchrun_wan_fp8.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--ring", type=int, default=1, help="ring degree (Ulysses gets world size / ring)")
    p.add_argument("--wire", choices=WIRES, default="native",
                   help="how Ulysses moves Q/K/V: in the activation dtype, or FP8 bytes + scales")
    p.add_argument("--regional", action="store_true", help="compile the repeated block, not the whole DiT")
    p.add_argument("--granularity", choices=("tensor", "row"), default="tensor")
    p.add_argument("--latent", type=int, nargs=3, default=(2, 8, 8), metavar=("FRAMES", "HEIGHT", "WIDTH"),
                   help="latent size; (frames x height/2 x width/2) tokens must split over the ranks")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        device, dtype = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))), torch.bfloat16
        torch.cuda.set_device(device)
    else:
        device, dtype = torch.device("cpu"), torch.float32
    try:
        model = fp8_fx.wan.build_wan("tiny", dtype=dtype, device=device)
        g = torch.Generator().manual_seed(0)  # the same inputs on every rank
        latents = torch.randn(1, 16, *args.latent, generator=g).to(device, dtype)
        text = torch.randn(1, fp8_fx.wan.TEXT_TOKENS["tiny"], 64, generator=g).to(device, dtype)
        timestep = torch.tensor([500.0], device=device)
        with torch.no_grad():
            one_process = model(latents, timestep, text, return_dict=False)[0]

        from diffusers import ContextParallelConfig
        if world % args.ring:
            raise SystemExit(f"--ring {args.ring} must divide the world size {world}")
        ulysses = world // args.ring
        config = ContextParallelConfig(ring_degree=args.ring if args.ring > 1 else None,
                                       ulysses_degree=ulysses if ulysses > 1 else None)
        enable_context_parallel(model, config, wire=args.wire)
        # "emulate": where FP8 tensor cores are missing (this CPU) reproduce their numerics
        backend = fp8_fx.make_fp8_backend(fp8_fx.FP8Config(granularity=args.granularity, fallback="emulate"))
        if args.regional:
            model.compile_repeated_blocks(backend=backend)
        else:
            model = torch.compile(model, backend=backend)
        start = time.perf_counter()
        with torch.no_grad():
            output = model(latents, timestep, text, return_dict=False)[0]
        seconds = time.perf_counter() - start
        error = ((output.double() - one_process.double()).norm() / one_process.double().norm()).item()
        converted = sum(d.converted for d in backend.report)
        print(f"rank {rank}/{world} (ring {args.ring} x Ulysses {ulysses}, wire {args.wire}, "
              f"{'regional' if args.regional else 'whole'} compile, {args.granularity} scales): "
              f"{converted} FP8 linears, compile + first step {seconds:.1f} s, "
              f"FP8 error vs one process without FP8 {error:.4%}", flush=True)
        return {"rank": rank, "error": error, "output": output.cpu(), "converted": converted,
                "graphs": len(backend.graphs)}
    finally:
        if own_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])

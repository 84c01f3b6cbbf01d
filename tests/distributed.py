"""Run a function on several CPU processes with torch.distributed's gloo backend.

    results = run_ranks(fn, world_size, *args)   # [fn's return value on rank 0, 1, ...]

`fn(rank, world_size, *args)` must be a module-level function (it is pickled into
spawned processes). The process group is up when it runs and destroyed after. What it
returns comes back through a file, so tensors are fine; an exception on any rank fails
the call with that rank's traceback.
"""
import os
import pickle
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # several ranks share this machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - sent back to the test
        result = ("error", traceback.format_exc())
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        torch.save(result, f, pickle_protocol=pickle.HIGHEST_PROTOCOL)


def run_ranks(fn, world_size: int, *args):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world_size, _free_port(), out_dir, fn, args),
                           nprocs=world_size, join=True, start_method="spawn")
        results = []
        for rank in range(world_size):
            status, value = torch.load(os.path.join(out_dir, f"{rank}.pkl"), weights_only=False)
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results

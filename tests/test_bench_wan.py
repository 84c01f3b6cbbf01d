"""The parts of benchmarks/bench_wan.py that run without a GPU."""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_wan import build_net  # noqa: E402


def test_weight_seed_picks_the_weight_draw():
    first, again, other = (build_net("1.3B", "block", "cpu", seed=s) for s in (0, 0, 1))
    w = [dict(n.named_parameters()) for n in (first, again, other)]
    assert w[0].keys() == w[2].keys()
    for name in w[0]:
        assert torch.equal(w[0][name], w[1][name]), name  # every variant gets the same weights
    changed = [name for name in w[0] if not torch.equal(w[0][name], w[2][name])]
    assert any("weight" in name for name in changed)


def test_idle_gaps_finds_the_gpu_idle_time_and_what_the_host_did_then():
    from bench_wan import idle_gaps
    gpu = [(0, 10, "gemm"), (5, 20, "side_stream"), (8, 12, "tiny"),  # overlapping work: busy until 20
           (50, 60, "quantize"),                      # 30 us idle before it
           (62, 70, "attention"), (100, 101, "cast")]  # 2 us, then 30 us
    host = [(15, 55, "fp8_fx::fp8_attention"), (25, 45, "cudaStreamSynchronize"),
            (70, 80, "aten::empty"), (200, 210, "after")]
    idle, gaps = idle_gaps(gpu, host, top=2)
    assert idle == 62
    assert gaps[0] == dict(gap_us=30, after="side_stream", before="quantize",
                           host=["fp8_fx::fp8_attention", "cudaStreamSynchronize"])
    assert gaps[1] == dict(gap_us=30, after="attention", before="cast", host=["aten::empty"])

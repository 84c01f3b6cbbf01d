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

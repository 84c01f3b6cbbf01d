"""benchmarks/chain_ranking.py's emulated FP8 linear, checked against the float64 recipe."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from chain_ranking import EmulatedFP8Linear, with_fp8_linears  # noqa: E402
from fp8_fx.wan import build_wan  # noqa: E402
from reference import reference_fp8_linear, rel_err  # noqa: E402


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_emulated_linear_with_fp32_scales_is_the_recipe(granularity):
    torch.manual_seed(7)
    linear = nn.Linear(96, 160).bfloat16()
    x = (torch.randn(2, 33, 96) * 2).bfloat16()
    ref = reference_fp8_linear(x, linear.weight, linear.bias, granularity)
    y = EmulatedFP8Linear(linear, granularity, bf16_rounded=False)(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 33, 160)
    assert rel_err(y, ref) < 4e-3  # the bf16 output rounding
    # bf16-rounded scales are another recipe: bf16-representable, and not the fp32 ones
    theirs = EmulatedFP8Linear(linear, granularity, bf16_rounded=True)
    assert torch.equal(theirs.sw, theirs.sw.bfloat16().float())
    assert not torch.equal(theirs.sw, EmulatedFP8Linear(linear, granularity, False).sw)
    assert rel_err(theirs(x), ref) < 0.1  # still an FP8 linear of the same weights


def test_with_fp8_linears_swaps_the_target_linears_only():
    net = build_wan("tiny")
    fp8 = with_fp8_linears(net, "tensor", bf16_rounded=False)
    swapped = [n for n, m in fp8.named_modules() if isinstance(m, EmulatedFP8Linear)]
    # per block: self and cross attention q, k, v, out, and the FFN's two linears
    assert len(swapped) == 10 * len(net.blocks)
    assert not any(isinstance(m, EmulatedFP8Linear) for m in net.modules())  # a copy
    assert isinstance(fp8.proj_out, nn.Linear)  # not a target

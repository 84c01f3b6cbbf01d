"""The FP8 recipe ops, eagerly, against the independent float64 emulation."""
import pytest
import torch

import fp8_fx  # noqa: F401  (registers the ops)
from fp8_fx import ops
from reference import (output_tolerance, reference_fp8_linear, reference_quantize, rel_err,
                       round_to_e4m3)


def test_reference_rounding_agrees_with_torch_e4m3_cast():
    # The reference's own grid must be the real e4m3fn grid, or every other check is moot.
    v = (torch.rand(100_000, dtype=torch.float64) * 2 - 1) * 448
    v = torch.cat([v, torch.tensor([0.0, 2.0 ** -9, 3 * 2.0 ** -10, 448.0, -448.0, 240.0, 2.0 ** -6])])
    assert torch.equal(round_to_e4m3(v), v.to(torch.float8_e4m3fn).double())


@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("shape", [(64, 48), (2, 7, 32), (2, 3, 5, 16)])
def test_quantize_matches_reference(granularity, shape):
    x = torch.randn(shape) * 3
    xq, scale = ops.quantize(x, granularity)
    ref_q, ref_scale = reference_quantize(x, granularity)
    assert xq.dtype == torch.float8_e4m3fn and xq.shape == x.shape
    assert scale.dtype == torch.float32
    expected_scale_shape = (*shape[:-1], 1) if granularity == "row" else ()
    assert scale.shape == expected_scale_shape
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0)
    assert torch.equal(xq.double(), ref_q)
    # And the quantized tensor really is on a coarse grid: not a no-op.
    assert (xq.double() * scale.double() - x.double()).abs().max() > 1e-3


# The recipe's constants, written out (not read from the library under test).
RECIPE_MIN_SCALE = 1.0 / (448.0 * 512.0)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_quantize_all_zero_uses_minimum_scale_not_nan(granularity):
    xq, scale = ops.quantize(torch.zeros(4, 32), granularity)
    assert torch.all(scale == torch.tensor(RECIPE_MIN_SCALE, dtype=torch.float32))
    assert torch.equal(xq.float(), torch.zeros(4, 32))


def test_minimum_scale_is_where_the_recipe_puts_it():
    # amax / 448 between 1/(448*512) and 1/(448*256): above the floor, so not clamped;
    # a tenth of that is below the floor, so clamped to exactly 1/(448*512).
    torch.manual_seed(0)
    x = torch.rand(4, 32) / 300.0
    x[0, 0] = 1.0 / 300.0
    _, scale = ops.quantize(x, "tensor")
    amax = torch.tensor(1.0 / 300.0, dtype=torch.float32).double()
    assert scale.item() == (amax / 448.0).float().item()
    _, scale = ops.quantize(x / 10, "tensor")
    assert scale.item() == torch.tensor(RECIPE_MIN_SCALE, dtype=torch.float32).item()


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_quantize_empty_input(granularity):
    xq, scale = ops.quantize(torch.randn(0, 32), granularity)
    assert xq.shape == (0, 32)


def test_quantize_rejects_unknown_granularity():
    with pytest.raises(ValueError, match="granularity"):
        ops.quantize(torch.randn(4, 16), "block")


@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_bias", [True, False])
def test_emulated_scaled_mm_matches_reference(granularity, dtype, with_bias):
    x = torch.randn(3, 10, 64, dtype=dtype)
    w = (torch.randn(48, 64) / 8).to(dtype)
    b = torch.randn(48, dtype=dtype) if with_bias else None
    xq, xs = ops.quantize(x, granularity)
    wq, ws = ops.quantize_weight(w, granularity)
    y = torch.ops.fp8_fx.emulated_scaled_mm(xq, xs, wq, ws, b, dtype)
    assert y.shape == (3, 10, 48) and y.dtype == dtype
    ref = reference_fp8_linear(x, w, b, granularity)
    # Only the final rounding to `dtype` (and fp32 summation order) separates the two.
    assert rel_err(y, ref) < output_tolerance(dtype, granularity)
    exact = x.double() @ w.double().T + (b.double() if b is not None else 0)
    assert rel_err(y, exact) > 5e-3  # it really quantized


def test_weight_only_linear_keeps_activation_precision():
    x = torch.randn(5, 32, dtype=torch.float32)
    w = torch.randn(16, 32)
    wq, ws = ops.quantize_weight(w, "row")
    y = ops.weight_only_linear(x, wq, ws, None)
    ref = x.double() @ (wq.double() * ws.double()).T
    assert rel_err(y, ref) < 1e-6

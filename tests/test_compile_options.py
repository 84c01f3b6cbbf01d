"""torch.compile's `mode` and `options` reach Inductor through the backend, as they do
for backend="inductor" (torch.compile passes them to a custom backend as keywords)."""
import pytest
import torch

from fp8_fx import make_fp8_backend
from one_linear import ONE, OneLinear
from reference import output_tolerance, reference_fp8_linear, rel_err


@pytest.mark.parametrize("kwargs", [
    dict(mode="reduce-overhead"),  # CUDA graphs: skipped by Inductor on the CPU
    dict(mode="max-autotune-no-cudagraphs"),
    dict(mode="default"),
    dict(options={"epilogue_fusion": False}),
])
def test_mode_and_options_are_accepted_and_the_answer_is_right(kwargs):
    torch.manual_seed(0)
    model = OneLinear().eval()
    x = torch.randn(4, 64)
    backend = make_fp8_backend(ONE)
    with torch.no_grad():
        y = torch.compile(model, backend=backend, **kwargs)(x)
    lin = model.attn1.to_q
    assert rel_err(y, reference_fp8_linear(x, lin.weight, lin.bias, "tensor")) < output_tolerance(
        torch.float32, "tensor")
    assert [d.action for d in backend.report] == ["emulate"]


def test_options_really_reach_inductor():
    # An option Inductor does not know is Inductor's own error, so the options were passed on.
    with torch.no_grad(), pytest.raises(Exception, match="not_an_inductor_option"):
        torch.compile(OneLinear().eval(), backend=make_fp8_backend(ONE),
                      options={"not_an_inductor_option": 1})(torch.randn(4, 64))


def test_unknown_mode_is_named():
    backend = make_fp8_backend(ONE)
    with pytest.raises(ValueError, match="unknown torch.compile mode 'fastest'"):
        backend(None, [], mode="fastest")  # checked before anything is traced

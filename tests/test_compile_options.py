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


def test_options_really_reach_inductor(monkeypatch):
    import fp8_fx.backend
    seen = []
    real = fp8_fx.backend.compile_fx

    def recording_compile_fx(gm, inputs, config_patches=None):
        seen.append(dict(config_patches or {}))
        return real(gm, inputs, config_patches=config_patches)
    monkeypatch.setattr(fp8_fx.backend, "compile_fx", recording_compile_fx)
    with torch.no_grad():
        torch.compile(OneLinear().eval(), backend=make_fp8_backend(ONE, {"cpp.simdlen": 8}),
                      options={"epilogue_fusion": False})(torch.randn(4, 64))
    assert seen and seen[0]["epilogue_fusion"] is False and seen[0]["cpp.simdlen"] == 8


@pytest.mark.parametrize("where", ["options", "backend"])
def test_unknown_inductor_options_are_named_before_compiling(where):
    with pytest.raises(ValueError, match=r"unknown Inductor options \['not_an_inductor_option'\]"):
        if where == "backend":
            make_fp8_backend(ONE, {"not_an_inductor_option": 1})
        else:
            make_fp8_backend(ONE)(None, [], options={"not_an_inductor_option": 1})


def test_unknown_mode_is_named():
    backend = make_fp8_backend(ONE)
    with pytest.raises(ValueError, match="unknown torch.compile mode 'fastest'"):
        backend(None, [], mode="fastest")  # checked before anything is traced

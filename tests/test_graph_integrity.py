"""The pass changes nothing but the linears it converts: in-place ops and side effects
compute what plain torch.compile computes, whether or not a layer is targeted."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from fp8_fx import FP8Config, make_fp8_backend
from reference import output_tolerance, reference_fp8_linear, rel_err


class InPlaceModel(nn.Module):
    """Fills buffers in place at run time (results unused), as diffusers DiTs do with
    positional tables, then reads them: FX's dead-code elimination would delete the fills."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.register_buffer("table", torch.randn(16, 64))
        self.attn1 = nn.Module()
        self.attn1.to_q = nn.Linear(64, 48)

    def forward(self, x):
        if self.kind == "copy_":
            self.table.copy_(x[0, :16] * 2)
        elif self.kind == "add_":
            self.table.add_(x[0, :16])
        elif self.kind == "masked_fill_":
            self.table.masked_fill_(x[0, :16] > 0.5, 3.0)
        elif self.kind == "data.mul_":
            self.table.data.mul_(-1.5)
        return self.attn1.to_q(x + self.table)


KINDS = ["copy_", "add_", "masked_fill_", "data.mul_"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("targeted", [True, False])
def test_in_place_ops_survive_the_pass(kind, targeted):
    torch.manual_seed(0)
    ours, plain = InPlaceModel(kind).eval(), None
    plain = copy.deepcopy(ours)
    x = torch.randn(2, 16, 64)
    targets = ("attn1.to_q",) if targeted else ("attn1.to_k",)
    backend = make_fp8_backend(FP8Config(targets=targets, fallback="emulate"))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untargeted case warns that nothing matched
        compiled = torch.compile(ours, backend=backend, fullgraph=True)
        reference = torch.compile(plain, backend="inductor", fullgraph=True)
        for _ in range(2):  # the fill must happen on every call
            y = compiled(x)
            y_plain = reference(x)
    assert torch.equal(ours.table, plain.table)  # the side effect happened, identically
    assert [d.converted for d in backend.report] == [targeted]
    if targeted:
        lin = ours.attn1.to_q
        ref = reference_fp8_linear(x + ours.table, lin.weight, lin.bias, "tensor")
        assert rel_err(y, ref) < output_tolerance(torch.float32, "tensor")
    else:
        assert torch.equal(y, y_plain)


def test_the_rewritten_graph_keeps_every_in_place_call():
    torch.manual_seed(0)
    backend = make_fp8_backend(FP8Config(targets=("attn1.to_q",), fallback="emulate"))
    with torch.no_grad():
        torch.compile(InPlaceModel("copy_").eval(), backend=backend, fullgraph=True)(torch.randn(2, 16, 64))
    code = backend.graphs[0].code
    assert "copy_" in code and "fp8_fx.emulated_scaled_mm" in code

"""Weights that are not plain tensors, or change under the compiled model.

DTensor (tensor-parallel) weights run in FP8 on their local shards, other tensor
subclasses are left alone with a reason; parameters swapped by
torch (set_swap_module_params_on_conversion) keep working; weight edits are seen by the
next call (or, for the two edits no cheap check sees, after fp8_fx.refresh_weights);
a non-finite weight warns once, when it is quantized.
"""
import warnings

import pytest
import torch
import torch.nn as nn

import fp8_fx
from fp8_fx import FP8Config, make_fp8_backend
from fp8_fx.weight_cache import fp8_copies
from reference import output_tolerance, reference_fp8_linear, rel_err
from one_linear import ONE, OneLinear


def _reference(model, x):
    lin = model.attn1.to_q
    return reference_fp8_linear(x, lin.weight, lin.bias, "tensor")


def _fresh_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    """Random values of t's shape and dtype, never zeros, clearly unlike t's."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t.shape, generator=g) * 0.3 + 0.05).to(t.dtype)


# ---- DTensor weights --------------------------------------------------------------------

class TPBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = nn.Module()
        self.attn1.to_q = nn.Linear(64, 64)
        self.attn1.to_out = nn.ModuleList([nn.Linear(64, 32)])

    def forward(self, x):
        return self.attn1.to_out[0](torch.relu(self.attn1.to_q(x)))


@pytest.fixture
def cpu_mesh():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fallback", ["weight_only", "emulate"])
def test_dtensor_weights_run_in_fp8_on_their_local_shards(cpu_mesh, fallback):
    """Tensor-parallel layers are converted on each rank's shard (tests/test_tensor_parallel.py
    runs 2 and 4 ranks); on a one-rank mesh the shard is the whole weight, so the answer is
    one process's FP8 recipe."""
    from reference import reference_weight_only_linear
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    torch.manual_seed(0)
    model = TPBlock().eval()
    q, out = model.attn1.to_q, model.attn1.to_out[0]
    params = [(lin.weight.detach().clone(), lin.bias.detach().clone()) for lin in (q, out)]
    parallelize_module(model, cpu_mesh, {"attn1.to_q": ColwiseParallel(),
                                         "attn1.to_out.0": RowwiseParallel()})
    assert isinstance(q.weight, DTensor)
    x = torch.randn(2, 8, 64)

    backend = make_fp8_backend(FP8Config(targets=("attn1.to_q", "attn1.to_out.0"), fallback=fallback))
    with torch.no_grad():
        y = torch.compile(model, backend=backend)(x)
    decisions = {d.qualname: d for d in backend.report}
    assert set(decisions) == {"attn1.to_q", "attn1.to_out.0"}
    for qualname, kind in (("attn1.to_q", "colwise"), ("attn1.to_out.0", "rowwise")):
        d = decisions[qualname]
        assert d.action == fallback and f"tensor-parallel {kind} shard on a 1-rank mesh" in d.reason, d.reason
    assert fp8_copies(model) == 2
    one = reference_weight_only_linear if fallback == "weight_only" else reference_fp8_linear
    h = torch.relu(one(x, *params[0], "tensor")).float()
    assert rel_err(y, one(h, *params[1], "tensor")) < 1e-5


@pytest.mark.filterwarnings("ignore:TwoTensor does not implement _stable_hash_for_caching")
def test_other_tensor_subclasses_are_skipped_with_a_reason():
    """A subclass whose data fp8_fx cannot read (here torch's test TwoTensor) is left to
    Inductor, with a reason."""
    two_tensor = pytest.importorskip("torch.testing._internal.two_tensor")
    torch.manual_seed(0)
    model = OneLinear().eval()
    lin = model.attn1.to_q
    lin.weight = nn.Parameter(two_tensor.TwoTensor(lin.weight.detach(), lin.weight.detach().clone()),
                              requires_grad=False)
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = model(x)
    backend = make_fp8_backend(ONE)
    with torch.no_grad():
        y = torch.compile(model, backend=backend)(x)
    (d,) = backend.report
    assert d.action == "skipped" and "TwoTensor weight (a tensor subclass)" in d.reason, d.reason
    assert rel_err(y, expected) < 1e-6


# ---- torch's parameter swapping ---------------------------------------------------------

@pytest.fixture
def swap_params_on_conversion():
    old = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(old)


def _swap_round_trip(backend, ref_fn):
    """Compile, run, then load_state_dict / .to() under swapping: the compiled model
    keeps answering for the weights it has now."""
    torch.manual_seed(0)
    model = OneLinear().eval()
    lin = model.attn1.to_q
    weight_object = lin.weight
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(5, 64)
    with torch.no_grad():
        compiled(x)
    assert fp8_copies(model) == 1

    new_state = {k: _fresh_like(v, seed=i + 10) for i, (k, v) in enumerate(model.state_dict().items())}
    model.load_state_dict(new_state)  # swap_tensors: raises if the parameter has a weakref
    assert lin.weight is weight_object  # swapped in place, not replaced
    assert torch.equal(lin.weight.detach(), new_state["attn1.to_q.weight"])
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = compiled(x)
    assert rel_err(y, ref_fn(model, x)) < output_tolerance(torch.float32, "tensor")

    model.to(torch.float64)
    model.to(torch.float32)
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = compiled(x)
    assert rel_err(y, ref_fn(model, x)) < output_tolerance(torch.float32, "tensor")

    model.to(torch.bfloat16)
    assert lin.weight is weight_object and lin.weight.dtype == torch.bfloat16
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        y = compiled(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, ref_fn(model, x)) < output_tolerance(torch.bfloat16, "tensor")


def test_swap_module_params_on_conversion_by_registered_name(swap_params_on_conversion):
    """backend="fp8_fx" (the default config: weight-only on CPU)."""
    from reference import reference_weight_only_linear

    def ref(model, x):
        lin = model.attn1.to_q
        return reference_weight_only_linear(x, lin.weight, lin.bias, "tensor")
    _swap_round_trip("fp8_fx", ref)


def test_swap_module_params_on_conversion_own_backend(swap_params_on_conversion):
    """A backend of one's own (make_fp8_backend): Dynamo clears its compile-time weak
    references to the parameters only for registered backends unless told to."""
    with torch._dynamo.config.patch(invalidate_compile_context_weakrefs=True):
        _swap_round_trip(make_fp8_backend(ONE), _reference)


def test_swap_module_params_on_conversion_own_backend_default_dynamo_config(swap_params_on_conversion):
    _swap_round_trip(make_fp8_backend(ONE), _reference)


# ---- weight edits -----------------------------------------------------------------------

def _compiled_once(seed=0):
    torch.manual_seed(seed)
    model = OneLinear().eval()
    compiled = torch.compile(model, backend=make_fp8_backend(ONE), fullgraph=True)
    with torch.no_grad():
        compiled(torch.randn(4, 64))
    assert fp8_copies(model) == 1
    return model, compiled


def _edit_data_assign(lin, new):
    lin.weight.data = new


def _edit_copy(lin, new):
    with torch.no_grad():
        lin.weight.copy_(new)


@pytest.mark.parametrize("edit", [_edit_data_assign, _edit_copy], ids=["data_assign", "copy_"])
def test_detectable_weight_edits_are_seen_by_the_next_call(edit):
    model, compiled = _compiled_once()
    lin = model.attn1.to_q
    old_weight = lin.weight.detach().clone()
    edit(lin, _fresh_like(lin.weight, seed=1))
    assert not torch.equal(lin.weight.detach(), old_weight)
    x = torch.randn(6, 64)
    with torch.no_grad():
        y = compiled(x)
    assert rel_err(y, _reference(model, x)) < output_tolerance(torch.float32, "tensor")
    stale = reference_fp8_linear(x, old_weight, lin.bias, "tensor")
    assert rel_err(y, stale) > 0.5


def test_model_to_bfloat16_is_seen_by_the_next_call():
    model, compiled = _compiled_once()
    model.to(torch.bfloat16)
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        y = compiled(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, _reference(model, x)) < output_tolerance(torch.bfloat16, "tensor")
    assert fp8_copies(model) == 1


def _edit_data_iadd(lin, new):
    lin.weight.data += new - lin.weight.data


def _edit_data_copy(lin, new):
    lin.weight.data.copy_(new)


@pytest.mark.parametrize("edit", [_edit_data_iadd, _edit_data_copy], ids=["data_iadd", "data_copy_"])
def test_undetectable_weight_edits_need_refresh_weights(edit):
    """In-place edits through `.data` bump no version counter the cache sees: the
    compiled model answers for the old weights until refresh_weights (documented)."""
    model, compiled = _compiled_once()
    lin = model.attn1.to_q
    old_weight = lin.weight.detach().clone()
    edit(lin, _fresh_like(lin.weight, seed=2))
    assert rel_err(lin.weight.detach(), old_weight) > 0.5
    x = torch.randn(6, 64)
    stale = reference_fp8_linear(x, old_weight, lin.bias, "tensor")
    with torch.no_grad():
        y = compiled(x)
    assert rel_err(y, stale) < output_tolerance(torch.float32, "tensor")  # stale, as documented
    assert rel_err(y, _reference(model, x)) > 0.5

    assert fp8_fx.refresh_weights(model) == 1
    assert fp8_copies(model) == 0
    with torch.no_grad():
        y = compiled(x)
    assert rel_err(y, _reference(model, x)) < output_tolerance(torch.float32, "tensor")
    assert fp8_copies(model) == 1


# ---- non-finite weights -----------------------------------------------------------------

def _nan_warnings(records):
    return [w for w in records if issubclass(w.category, RuntimeWarning)
            and "attn1.to_q" in str(w.message) and "NaN" in str(w.message)]


def test_nan_weight_warns_once_with_the_layer_name():
    torch.manual_seed(0)
    model = OneLinear().eval()
    with torch.no_grad():
        model.attn1.to_q.weight[3, 5] = float("nan")
    compiled = torch.compile(model, backend=make_fp8_backend(ONE), fullgraph=True)
    with pytest.warns(RuntimeWarning, match=r"attn1\.to_q") as records:
        with torch.no_grad():
            y = compiled(torch.randn(4, 64))
    assert len(_nan_warnings(records)) == 1
    assert not torch.isfinite(y).any()  # one scale per tensor: every output, never a zero

    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        with torch.no_grad():
            compiled(torch.randn(4, 64))
    assert _nan_warnings(again) == []

"""The whole backend on CPU, through Inductor: numerics against the float64 emulation
of the recipe, the decisions it records, and every bad input the README promises."""

import warnings

import pytest
import torch
import torch.nn as nn

import fp8_fx
from fp8_fx import FP8Config, make_fp8_backend
from fp8_fx.weight_cache import fp8_copies
from reference import (output_tolerance, reference_fp8_linear, reference_weight_only_linear,
                       rel_err)
from one_linear import ONE, OneLinear
from wan_like import WanLikeModel, targeted_qualnames

def run(model, *inputs, config=ONE, backend=None, **compile_kwargs):
    backend = backend or make_fp8_backend(config)
    compiled = torch.compile(model, backend=backend, fullgraph=True, **compile_kwargs)
    with torch.no_grad():
        return compiled(*inputs), backend, compiled


def exact(model, x):
    lin = model.attn1.to_q
    y = x.double() @ lin.weight.double().T
    return y + lin.bias.double() if lin.bias is not None else y


# ---- numerics -------------------------------------------------------------------------

@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_emulate_equals_fp64_reference_of_recipe(granularity, dtype):
    model = OneLinear(dtype=dtype).eval()
    x = torch.randn(2, 24, 64, dtype=dtype) * 2
    y, backend, _ = run(model, x, config=FP8Config(targets=("attn1.to_q",), granularity=granularity,
                                                   fallback="emulate"))
    assert [d.action for d in backend.report] == ["emulate"]
    assert y.dtype == dtype and y.shape == (2, 24, 48)
    lin = model.attn1.to_q
    ref = reference_fp8_linear(x, lin.weight, lin.bias, granularity)
    assert rel_err(y, ref) < output_tolerance(dtype, granularity)  # equal up to one rounding
    assert rel_err(y, exact(model, x)) > 5e-3  # and it did quantize: realistic FP8 error
    assert rel_err(y, exact(model, x)) < 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_row_emulation_rounds_like_the_gpu_gemm_compiled_or_not(dtype):
    """A row-wise scaled GEMM writes bf16 whatever the model's dtype; the bias (of the
    model's dtype) is then added and rounded to bf16 again. Inductor would drop those
    roundings inside a kernel: compiled emulation must keep them, as eager does."""
    torch.manual_seed(0)
    model = OneLinear(dtype=dtype).eval()
    x = torch.randn(2, 24, 64, dtype=dtype) * 2
    cfg = FP8Config(targets=("attn1.to_q",), granularity="row", fallback="emulate")
    y, _, _ = run(model, x, config=cfg)
    lin = model.attn1.to_q
    gemm = reference_fp8_linear(x, lin.weight, None, "row").to(torch.bfloat16).double()
    ref = (gemm + lin.bias.double()).to(torch.bfloat16).to(dtype)
    assert rel_err(y, ref) < 2e-4  # a few values one bf16 step apart: fp32 vs fp64 sums near ties
    assert rel_err(y, reference_fp8_linear(x, lin.weight, lin.bias, "row")) > 5e-4  # bf16 is visible
    # And compiled emulation is eager emulation (it was 2.5e-3 apart when Inductor elided them).
    xq, xs = fp8_fx.ops.quantize(x, "row")
    wq, ws = fp8_fx.ops.quantize_weight(lin.weight.detach(), "row")
    eager = torch.ops.fp8_fx.emulated_scaled_mm(xq, xs, wq, ws, lin.bias.detach(), dtype)
    assert rel_err(y, eager) < 1e-6


@pytest.mark.parametrize("granularity, coupled", [("tensor", True), ("row", False)])
def test_batch_coupling_of_the_scales(granularity, coupled):
    """CFG in one batch (cond + uncond): with one tensor-wise scale per activation the
    cond sample's output depends on the other sample (documented); row-wise scales are
    per token, so each sample's output is its own."""
    torch.manual_seed(0)
    model = OneLinear().eval()
    cond, uncond = torch.randn(1, 24, 64), torch.randn(1, 24, 64) * 8  # the larger amax sets the scale
    cfg = FP8Config(targets=("attn1.to_q",), granularity=granularity, fallback="emulate")
    alone, _, _ = run(model, cond, config=cfg)
    torch._dynamo.reset()
    batched, _, _ = run(model, torch.cat([cond, uncond]), config=cfg)
    difference = rel_err(batched[:1], alone)
    if coupled:
        assert 1e-3 < difference < 0.1  # of the order of the FP8 error itself
    else:
        assert difference < 1e-6


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_weight_only_equals_reference(granularity):
    model = OneLinear(dtype=torch.float32).eval()
    x = torch.randn(3, 10, 64)
    cfg = FP8Config(targets=("attn1.to_q",), granularity=granularity, fallback="weight_only")
    y, backend, _ = run(model, x, config=cfg)
    assert [d.action for d in backend.report] == ["weight_only"]
    lin = model.attn1.to_q
    assert rel_err(y, reference_weight_only_linear(x, lin.weight, lin.bias, granularity)) < 1e-6
    assert rel_err(y, exact(model, x)) > 5e-3


@pytest.mark.parametrize("scheme", ["diffusers", "fastvideo", "wan"])
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_wan_like_model_matches_reference_model(scheme, granularity):
    """Whole model: compiled FP8 vs. the eager model whose targeted linears are replaced
    by the float64 reference (forward hooks), in fp32."""
    torch.manual_seed(0)
    model = WanLikeModel(scheme).eval()
    x, ctx = torch.randn(2, 16, 16), torch.randn(2, 8, 32)
    cfg = FP8Config(granularity=granularity, fallback="emulate")
    y, backend, _ = run(model, x, ctx, config=cfg)

    converted = [d.qualname for d in backend.report if d.converted]
    assert converted == targeted_qualnames(scheme)
    skipped = {d.qualname: d.reason for d in backend.report if not d.converted}
    assert skipped == {q: "not targeted" for q in ("patch_embedding", "time_projection", "proj_out")}

    hooks = []
    for name in converted:
        def hook(mod, args, out):
            if granularity == "tensor":
                return reference_fp8_linear(args[0], mod.weight, mod.bias, granularity).to(out.dtype)
            # A row-wise scaled GEMM writes bf16 whatever the model's dtype, and an fp32 bias
            # is added to that bf16 output, rounded to bf16 again (ops.py).
            y = reference_fp8_linear(args[0], mod.weight, None, granularity).to(torch.bfloat16)
            return (y.double() + mod.bias.double()).to(torch.bfloat16).to(out.dtype)
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        ref = model(x, ctx)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        unquantized = model(x, ctx)
    # fp32 model: tensor-wise GEMMs round to fp32, row-wise ones to bf16 (see ops.py).
    assert rel_err(y, ref) < (1e-4 if granularity == "tensor" else 2e-3)
    assert rel_err(y, unquantized) > 3 * rel_err(y, ref)


def test_qkv_share_one_activation_quantization():
    model = WanLikeModel("diffusers", layers=1).eval()
    _, backend, _ = run(model, torch.randn(1, 8, 16), torch.randn(1, 4, 32),
                        config=FP8Config(fallback="emulate"))
    graph = backend.graphs[0].graph
    quantizes = [n for n in graph.nodes if n.target is torch.ops.fp8_fx.quantize.default]
    mms = [n for n in graph.nodes if n.target is torch.ops.fp8_fx.emulated_scaled_mm.default]
    assert len(mms) == 10
    # attn1 q/k/v: 1; attn1 out: 1; attn2 q: 1; attn2 k/v (context): 1; attn2 out: 1; ffn: 2
    assert len(quantizes) == 7
    assert not [n for n in graph.nodes if n.target is torch._C._nn.linear
                and "blocks" in str(n.meta.get("nn_module_stack"))]


# ---- decisions and the report ---------------------------------------------------------

def test_exclude_wins_over_targets_and_is_reported():
    model = WanLikeModel("diffusers", layers=1).eval()
    cfg = FP8Config(exclude=("attn2.to_k", "ffn.net.2"), fallback="emulate")
    _, backend, _ = run(model, torch.randn(1, 8, 16), torch.randn(1, 4, 32), config=cfg)
    by_name = {d.qualname: d for d in backend.report}
    assert by_name["blocks.0.attn2.to_k"].action == "skipped"
    assert by_name["blocks.0.attn2.to_k"].reason == "excluded by 'attn2.to_k'"
    assert by_name["blocks.0.ffn.net.2"].reason == "excluded by 'ffn.net.2'"
    assert by_name["blocks.0.attn2.to_v"].action == "emulate"


def test_dims_not_multiple_of_16_left_in_original_precision():
    model = OneLinear(k=24, n=40).eval()
    x = torch.randn(4, 24)
    y, backend, _ = run(model, x)
    (d,) = backend.report
    assert d.action == "skipped"
    assert "in_features=24" in d.reason and "out_features=40" in d.reason and "16" in d.reason
    assert rel_err(y, exact(model, x)) < 1e-5


class MyLinear(nn.Module):
    """Not an nn.Linear: a custom class whose forward calls F.linear."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(32, 32) / 6)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight)


class CustomFFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.ffn = nn.Module()
        self.ffn.fc_in = MyLinear()

    def forward(self, x):
        return self.ffn.fc_in(x)


def test_custom_linear_module_calling_f_linear_is_converted():
    model = CustomFFN().eval()
    x = torch.randn(4, 32)
    y, backend, _ = run(model, x, config=FP8Config(fallback="emulate"))
    (d,) = backend.report
    assert (d.qualname, d.action) == ("ffn.fc_in", "emulate")
    assert rel_err(y, reference_fp8_linear(x, model.ffn.fc_in.weight, None, "tensor")) < 1e-6


def test_suffix_matches_whole_components_only():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.add_to_q = nn.Linear(32, 32)
            self.attn1 = nn.Module()
            self.attn1.to_q = nn.Linear(32, 32)

        def forward(self, x):
            return self.attn1.to_q(self.add_to_q(x))

    _, backend, _ = run(Odd().eval(), torch.randn(4, 32), config=FP8Config(targets=("to_q",),
                                                                             fallback="emulate"))
    assert {d.qualname: d.action for d in backend.report} == {"add_to_q": "skipped",
                                                              "attn1.to_q": "emulate"}


def test_config_matching_nothing_warns_with_targets():
    with pytest.warns(UserWarning, match=r"none of the 1 linear ops.*'nope\.proj'"):
        run(OneLinear().eval(), torch.randn(4, 64), config=FP8Config(targets=("nope.proj",)))


def test_report_table_is_readable():
    _, backend, _ = run(OneLinear().eval(), torch.randn(4, 64))
    table = str(backend.report)
    assert table.splitlines()[0].split() == ["qualname", "action", "in", "out", "reason"]
    assert "attn1.to_q" in table and "emulate" in table and "1 emulate" in table


# ---- bad inputs -----------------------------------------------------------------------

def test_empty_batch_and_zero_length_sequence():
    model = OneLinear().eval()
    for shape in [(0, 64), (2, 0, 64)]:
        torch._dynamo.reset()
        y, backend, _ = run(model, torch.randn(shape))
        assert y.shape == (*shape[:-1], 48)
        assert backend.report[0].action == "emulate"


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_all_zero_activation_gives_bias_not_nan(granularity):
    model = OneLinear().eval()
    cfg = FP8Config(targets=("attn1.to_q",), granularity=granularity, fallback="emulate")
    y, _, _ = run(model, torch.zeros(3, 64), config=cfg)
    bias = model.attn1.to_q.bias.detach()
    if granularity == "row":  # a row-wise GEMM writes bf16: the fp32 bias comes out rounded
        bias = bias.to(torch.bfloat16).float()
    assert torch.equal(y, bias.expand(3, -1))


@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_not_zeroed(granularity, bad):
    model = OneLinear().eval()
    x = torch.randn(4, 64)
    x[1, 5] = bad
    cfg = FP8Config(targets=("attn1.to_q",), granularity=granularity, fallback="emulate")
    y, _, _ = run(model, x, config=cfg)
    assert not torch.isfinite(y[1]).any()  # the bad token is poisoned, as in bf16
    if granularity == "row":  # per-token scales: the other tokens are unaffected
        ref = reference_fp8_linear(x[[0, 2, 3]], model.attn1.to_q.weight, model.attn1.to_q.bias, "row")
        assert rel_err(y[[0, 2, 3]], ref) < output_tolerance(x.dtype, "row")
    else:  # one scale for the tensor: every output is non-finite, never a silent zero
        assert not torch.isfinite(y).any()


def test_meta_weights_raise_clear_error():
    with torch.device("meta"):
        model = OneLinear()
    with pytest.raises(Exception, match="meta device.*[Ll]oad"):
        run(model, torch.randn(4, 64, device="meta"))


def test_grad_enabled_raises_clear_error():
    model = OneLinear().eval()
    compiled = torch.compile(model, backend=make_fp8_backend(ONE))
    with pytest.raises(Exception, match=r"inference-only.*torch\.no_grad\(\)"):
        compiled(torch.randn(4, 64))


def test_inference_mode_works():
    model = OneLinear().eval()
    compiled = torch.compile(model, backend=make_fp8_backend(ONE))
    with torch.inference_mode():
        y = compiled(torch.randn(4, 64))
    assert y.shape == (4, 48)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fallback", ["emulate", "weight_only"])
def test_dtypes_and_bias(dtype, bias, fallback):
    model = OneLinear(bias=bias, dtype=dtype).eval()
    x = torch.randn(5, 64, dtype=dtype)
    y, backend, _ = run(model, x, config=FP8Config(targets=("attn1.to_q",), fallback=fallback))
    assert y.dtype == dtype
    assert backend.report[0].action == fallback
    lin = model.attn1.to_q
    ref_fn = reference_fp8_linear if fallback == "emulate" else reference_weight_only_linear
    assert rel_err(y, ref_fn(x, lin.weight, lin.bias, "tensor")) < 4e-3


@pytest.mark.parametrize("shape", [(6, 64), (2, 6, 64), (2, 3, 4, 64)])
def test_2d_3d_4d_and_non_contiguous_inputs(shape):
    model = OneLinear().eval()
    base = torch.randn(*shape[:-1], 128)
    x = base[..., ::2]  # strided: not contiguous
    assert not x.is_contiguous()
    y, _, _ = run(model, x)
    assert y.shape == (*shape[:-1], 48)
    lin = model.attn1.to_q
    assert rel_err(y, reference_fp8_linear(x, lin.weight, lin.bias, "tensor")) < 1e-6


def test_second_instance_gets_its_own_weights():
    backend = make_fp8_backend(ONE)
    torch.manual_seed(1)
    a, b = OneLinear().eval(), OneLinear().eval()
    x = torch.randn(4, 64)
    ya, _, _ = run(a, x, backend=backend)
    yb, _, _ = run(b, x, backend=backend)
    for model, y in ((a, ya), (b, yb)):
        lin = model.attn1.to_q
        assert rel_err(y, reference_fp8_linear(x, lin.weight, lin.bias, "tensor")) < 1e-6
    assert rel_err(ya, yb) > 0.5


def test_weights_changed_in_place_are_requantized_once():
    model = OneLinear().eval()
    backend = make_fp8_backend(ONE)
    x = torch.randn(4, 64)
    _, _, compiled = run(model, x, backend=backend)
    lin = model.attn1.to_q
    with torch.no_grad():
        lin.weight.mul_(-2.0)
        y = compiled(x)
        y_again = compiled(x)
    assert rel_err(y, reference_fp8_linear(x, lin.weight, lin.bias, "tensor")) < 1e-6
    assert torch.equal(y, y_again)
    assert fp8_copies(model) == 1


def test_weights_replaced_at_every_call_warn_once_and_edits_now_and_then_do_not(monkeypatch):
    from fp8_fx import weight_cache
    monkeypatch.setattr(weight_cache, "_warned_requantized", False)
    model = OneLinear().eval()
    x = torch.randn(4, 64)
    _, _, compiled = run(model, x, backend=make_fp8_backend(ONE))
    lin = model.attn1.to_q
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(5):  # a weight edited between calls, each edit followed by a call that reuses the copy
            lin.weight.mul_(-1.0)
            compiled(x)
            compiled(x)
        assert not [w for w in caught if "new storage" in str(w.message)]
        for _ in range(3):  # new storage at every call: what offloading that moves weights does
            lin.weight.data = lin.weight.data.clone()
            y = compiled(x)
    said = [str(w.message) for w in caught if "new storage" in str(w.message)]
    assert len(said) == 1 and "attn1.to_q" in said[0] and "convert_to_fp8" in said[0]
    assert rel_err(y, reference_fp8_linear(x, lin.weight, lin.bias, "tensor")) < 1e-6  # still right


def test_changing_sequence_length_compiles_at_most_twice():
    model = WanLikeModel("diffusers", layers=1).eval()
    backend = make_fp8_backend(FP8Config(fallback="emulate"))
    compiled = torch.compile(model, backend=backend)
    ctx = torch.randn(1, 4, 32)
    with torch.no_grad():
        for length in (8, 16, 24, 40, 56):
            y = compiled(torch.randn(1, length, 16), ctx)
            assert y.shape == (1, length, 16)
    assert len(backend.graphs) == 2  # static first, then one dynamic graph for all lengths
    assert [len(g) for g in backend.report.graphs] == [13, 13]  # one record per linear per graph
    assert [d.graph.index for d in backend.report] == [0] * 13 + [1] * 13


def test_backend_by_name():
    assert "fp8_fx" in torch._dynamo.list_backends()
    model = OneLinear().eval()
    with torch.no_grad():
        y = torch.compile(model, backend="fp8_fx", fullgraph=True)(torch.randn(4, 64))
    assert y.shape == (4, 48)
    assert fp8_fx.fp8_backend.report.records[-1].qualname == "attn1.to_q"


def test_config_validation():
    with pytest.raises(ValueError, match="granularity"):
        FP8Config(granularity="block")
    with pytest.raises(ValueError, match="fallback"):
        FP8Config(fallback="bf16")
    with pytest.raises(TypeError, match="single suffix"):
        FP8Config(targets="attn1.to_q")
    with pytest.raises(TypeError, match="FP8Config"):
        make_fp8_backend({"granularity": "row"})


def test_autocast_linears_are_skipped_with_a_reason():
    model = OneLinear().eval()
    backend = make_fp8_backend(ONE)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.compile(model, backend=backend)(torch.randn(4, 64))
    assert y.dtype == torch.bfloat16
    (d,) = backend.report
    assert d.action == "skipped" and "autocast" in d.reason


# ---- which quantize each input gets -------------------------------------------------

def _quantize_calls(gm):
    """[(op name, activation or None, producer of the quantized input)] in graph order."""
    calls = []
    for n in gm.graph.nodes:
        if n.target is torch.ops.fp8_fx.quantize.default:
            calls.append(("quantize", None, n.args[0]))
        elif n.target is torch.ops.fp8_fx.triton_quantize.default:
            calls.append(("triton_quantize", n.args[2], n.args[0]))
    return calls


def test_inputs_out_of_library_kernels_get_triton_quantize():
    from fp8_fx.inspect_graph import capture_graph
    from fp8_fx.passes.linear import rewrite_linears
    from wan_like import WanLikeBlock
    block = WanLikeBlock("diffusers", dim=32, ffn_dim=64, heads=2).eval()
    gm = capture_graph(block, torch.randn(1, 8, 32), torch.randn(1, 4, 32))
    rewritten = rewrite_linears(gm, FP8Config(), fp8_tensor_cores=True).graph_module
    calls = _quantize_calls(rewritten)
    # LayerNorm outputs: Inductor fuses the quantization into the norm kernel. Attention
    # outputs, the text context (a graph input) and GELU(ffn_in): fp8_fx's kernels.
    assert [(op, act) for op, act, _ in calls] == [
        ("quantize", None), ("triton_quantize", "none"),           # attn1 qkv, attn1 out
        ("quantize", None), ("triton_quantize", "none"),           # attn2 q, attn2 k/v (context)
        ("triton_quantize", "none"),                               # attn2 out
        ("quantize", None), ("triton_quantize", "gelu_tanh")]      # ffn in, ffn out
    gelu_input = calls[-1][2]
    assert gelu_input.target is torch.ops.fp8_fx.scaled_mm.default  # the ffn_in GEMM's output
    assert not [n for n in rewritten.graph.nodes if n.target is torch._C._nn.gelu]  # folded in
    assert calls[3][2].op == "placeholder"

    no_triton = rewrite_linears(gm, FP8Config(triton_quantize=False), fp8_tensor_cores=True)
    assert {op for op, _, _ in _quantize_calls(no_triton.graph_module)} == {"quantize"}
    # Off the tensor-core path (fallbacks) nothing changes either.
    fallback = rewrite_linears(gm, FP8Config(fallback="emulate"), fp8_tensor_cores=False)
    assert {op for op, _, _ in _quantize_calls(fallback.graph_module)} == {"quantize"}


@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("activation", ["none", "gelu_tanh", "gelu"])
def test_triton_quantize_off_the_gpu_is_the_recipe(granularity, activation):
    # On CPU the op runs its reference; check that against the float64 emulation.
    from reference import reference_quantize
    torch.manual_seed(0)
    x = torch.randn(6, 96, dtype=torch.bfloat16) * 3
    xq, xs = torch.ops.fp8_fx.triton_quantize(x, granularity, activation)
    act = {"none": x, "gelu_tanh": torch.nn.functional.gelu(x, approximate="tanh"),
           "gelu": torch.nn.functional.gelu(x)}[activation]
    ref_q, ref_s = reference_quantize(act, granularity)
    assert torch.equal(xs, ref_s) and torch.equal(xq.double(), ref_q)
    with pytest.raises(ValueError, match="activation must be one of"):
        torch.ops.fp8_fx.triton_quantize(x, granularity, "relu")

"""Static (calibrated) input scales: calibration, the rewrite, numerics against the
float64 recipe, saturation, regional compilation, checkpoints and bad inputs."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fp8_fx import (FP8Config, FP8Linear, calibrate_input_amax, convert_to_fp8, make_fp8_backend,
                    set_input_scales)
from fp8_fx.inspect_graph import capture_graph
from fp8_fx.passes.linear import rewrite_linears
from reference import output_tolerance, reference_static_fp8_linear, rel_err

EMULATE = FP8Config(fallback="emulate")


class Attention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)


class FFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.net = nn.ModuleList([nn.Module(), nn.Identity(), nn.Linear(hidden, dim)])
        self.net[0].proj = nn.Linear(dim, hidden)


class Block(nn.Module):
    """q, k, v share the LayerNorm output; ffn.net.2 reads a GELU."""

    def __init__(self, dim=64, hidden=128):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn1 = Attention(dim)
        self.ffn = FFN(dim, hidden)

    def forward(self, x):
        h = self.norm(x)
        a = self.attn1.to_q(h) * torch.sigmoid(self.attn1.to_k(h)) + self.attn1.to_v(h)
        return self.ffn.net[2](F.gelu(self.ffn.net[0].proj(a), approximate="tanh"))


def compiled(model, x, config=EMULATE):
    backend = make_fp8_backend(config)
    with torch.no_grad():
        return torch.compile(model, backend=backend, fullgraph=True)(x), backend


def test_calibration_records_the_max_abs_input_of_each_targeted_layer_over_all_runs():
    torch.manual_seed(0)
    model = Block()
    xs = [torch.randn(2, 8, 64), torch.randn(2, 8, 64) * 3]
    amax = calibrate_input_amax(model, lambda: [model(x) for x in xs])
    with torch.no_grad():  # the same activations, computed by hand in float64
        h = [F.layer_norm(x.double(), (64,), model.norm.weight.double(), model.norm.bias.double()) for x in xs]
        a = [F.linear(t, model.attn1.to_q.weight.double(), model.attn1.to_q.bias.double())
             * torch.sigmoid(F.linear(t, model.attn1.to_k.weight.double(), model.attn1.to_k.bias.double()))
             + F.linear(t, model.attn1.to_v.weight.double(), model.attn1.to_v.bias.double()) for t in h]
        g = [F.gelu(F.linear(t, model.ffn.net[0].proj.weight.double(), model.ffn.net[0].proj.bias.double()),
                    approximate="tanh") for t in a]
    expect = {"attn1.to_q": h, "attn1.to_k": h, "attn1.to_v": h, "ffn.net.0.proj": a, "ffn.net.2": g}
    assert set(amax) == set(expect)
    for name, acts in expect.items():
        want = max(t.abs().max().item() for t in acts)
        assert amax[name] == pytest.approx(want, rel=1e-5), name
    assert amax["attn1.to_q"] == amax["attn1.to_k"] == amax["attn1.to_v"]  # one shared input


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_scale_numerics_match_the_float64_recipe_and_saturate_beyond_the_calibrated_range(dtype):
    torch.manual_seed(1)

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.ffn = FFN(64, 64)

        def forward(self, x):
            return self.ffn.net[0].proj(x)

    model = One().to(dtype)
    w, b = model.ffn.net[0].proj.weight.detach().clone(), model.ffn.net[0].proj.bias.detach().clone()
    calib = torch.randn(4, 16, 64, dtype=dtype)
    amax = calibrate_input_amax(model, lambda: model(calib), FP8Config(targets=("ffn.net.0.proj",)))
    convert_to_fp8(model, FP8Config(targets=("ffn.net.0.proj",)))
    set_input_scales(model, amax)
    x = torch.randn(4, 16, 64, dtype=dtype) * 2  # about a third of the values beyond the calibrated amax
    y, backend = compiled(model, x, FP8Config(targets=("ffn.net.0.proj",), fallback="emulate"))
    assert "static input scale" in backend.report.records[0].reason
    ref = reference_static_fp8_linear(x, w, b, amax["ffn.net.0.proj"])
    assert rel_err(y, ref) < output_tolerance(dtype, "tensor")
    # The scale really is the calibrated one: without saturation the result is far off.
    unsaturated = reference_static_fp8_linear(x, w, b, x.float().abs().max().item())
    assert rel_err(y, unsaturated) > 20 * output_tolerance(dtype, "tensor")


class QKV(nn.Module):
    def __init__(self, dim=64):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn1 = Attention(dim)

    def forward(self, x):
        h = self.norm(x)
        return torch.stack([self.attn1.to_q(h), self.attn1.to_k(h), self.attn1.to_v(h)])


def test_layers_sharing_an_input_cast_it_once_with_the_largest_scale():
    torch.manual_seed(2)
    model = QKV()
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        h = model.norm(x)
    bf = {n: (model.get_submodule(n).weight.detach().clone(), model.get_submodule(n).bias.detach().clone())
          for n in ("attn1.to_q", "attn1.to_k", "attn1.to_v")}
    convert_to_fp8(model)
    set_input_scales(model, {"attn1.to_q": 1.0, "attn1.to_k": 4.0, "attn1.to_v": 2.0})
    gm = rewrite_linears(capture_graph(model, x), FP8Config(), fp8_tensor_cores=True).graph_module
    casts = [n for n in gm.graph.nodes if n.target is torch.ops.fp8_fx.quantize_static.default]
    assert len(casts) == 1
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.fp8_fx.quantize.default]
    y, _ = compiled(model, x)
    assert h.abs().max() > 2.0  # q's own amax (1.0) would saturate it
    for i, name in enumerate(bf):
        ref = reference_static_fp8_linear(h, *bf[name], 4.0)
        assert rel_err(y[i], ref) < output_tolerance(torch.float32, "tensor"), name


def test_layers_without_a_static_scale_stay_dynamic_and_clearing_restores_dynamic():
    model = Block()
    x = torch.randn(2, 8, 64)
    convert_to_fp8(model)
    set_input_scales(model, {"ffn.net.2": 3.0})
    _, backend = compiled(model, x)
    static = [d.qualname for d in backend.report if "static input scale" in d.reason]
    assert static == ["ffn.net.2"]
    set_input_scales(model, None)
    torch._dynamo.reset()
    _, backend = compiled(model, x)
    assert not [d for d in backend.report if "static" in d.reason]
    assert all(m.input_scale is None for m in model.modules() if isinstance(m, FP8Linear))


def test_bad_inputs_get_errors_that_name_the_fix():
    model = Block()
    with pytest.raises(ValueError, match="convert_to_fp8 before set_input_scales"):
        set_input_scales(model, {"attn1.to_q": 1.0})
    row = copy.deepcopy(model)
    convert_to_fp8(row, FP8Config(granularity="row"))
    with pytest.raises(ValueError, match="granularity='tensor'"):
        set_input_scales(row, {"attn1.to_q": 1.0})
    convert_to_fp8(model)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="finite and >= 0"):
            set_input_scales(model, {"attn1.to_q": bad})
    with pytest.raises(ValueError, match="not FP8Linear layers"):
        set_input_scales(model, {"attn1.to_z": 1.0})
    with pytest.raises(ValueError, match="matches FP8Config.targets"):
        calibrate_input_amax(nn.Sequential(nn.Linear(16, 16)), lambda: None)
    with pytest.raises(ValueError, match="called none of the targeted layers"):
        calibrate_input_amax(model, lambda: None)
    x = torch.randn(2, 8, 64)
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite inputs"):
        calibrate_input_amax(model, lambda: model(x))


def static_reference_hooks(model):
    """Eager forward hooks that replace each FP8Linear's output with the float64 recipe at
    its own static scale (its FP8 weight dequantizes exactly and re-quantizes to itself)."""
    def hook(m, args, out):
        w = m.weight.double() * m.weight_scale.double()
        amax = (m.input_scale.double() * 448.0).item()
        return reference_static_fp8_linear(args[0], w, m.bias, amax).to(out.dtype)
    return [m.register_forward_hook(hook) for m in model.modules()
            if isinstance(m, FP8Linear) and m.input_scale is not None]


def test_regional_compilation_feeds_each_block_its_own_scales_and_checkpoints_keep_them(tmp_path):
    pytest.importorskip("diffusers")
    from fp8_fx import load_fp8_checkpoint, save_fp8_checkpoint
    from fp8_fx.wan import build_wan
    model = build_wan("tiny", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(1, 16, 3, 16, 16, generator=g), torch.tensor([700]), torch.randn(1, 16, 64, generator=g)

    def forward(m):
        with torch.no_grad():
            return m(x, t, text, return_dict=False)[0]

    amax = calibrate_input_amax(model, lambda: forward(model))
    assert len(amax) == 20  # 10 targeted linears in each of the 2 blocks
    amax = {n: v / 4 if n.startswith("blocks.1.") else v for n, v in amax.items()}  # block 1 saturates
    convert_to_fp8(model)
    set_input_scales(model, amax)
    path = tmp_path / "static.safetensors"
    save_fp8_checkpoint(model, path)
    loaded = load_fp8_checkpoint(path)  # a diffusers skeleton from the recorded config
    for name, m in model.named_modules():
        if isinstance(m, FP8Linear):
            assert torch.equal(loaded.get_submodule(name).input_scale, m.input_scale), name

    hooks = static_reference_hooks(model)
    ref = forward(model)
    for h in hooks:
        h.remove()
    backend = make_fp8_backend(EMULATE)
    loaded.compile_repeated_blocks(backend=backend, fullgraph=True)
    y = forward(loaded)
    assert len(backend.graphs) == 1
    assert all("static input scale" in d.reason for d in backend.report if d.converted)
    err = rel_err(y, ref)
    assert err < 5e-3
    # Block 1 running block 0's (unsaturated) scales would be far off.
    set_input_scales(model, {n: v * (4 if n.startswith("blocks.1.") else 1) for n, v in amax.items()})
    hooks = static_reference_hooks(model)
    wrong = forward(model)
    for h in hooks:
        h.remove()
    assert rel_err(y, wrong) > 10 * err

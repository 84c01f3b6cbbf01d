"""FP8 weights at rest: conversion, checkpoints (ours and the ecosystem's), and the
backend on converted models."""
import json

import pytest
import torch

pytest.importorskip("diffusers")

from fp8_fx import (FP8CheckpointError, FP8Config, FP8Linear, convert_to_fp8, fp8_weight_bytes,  # noqa: E402
                    load_fp8_checkpoint, make_fp8_backend, save_fp8_checkpoint)
from fp8_fx.wan import build_wan, load_wan_fp8  # noqa: E402
from fp8_fx.weight_cache import fp8_copies  # noqa: E402
from reference import rel_err  # noqa: E402
from wan_checkpoints import to_original_wan_names  # noqa: E402
from wan_like import WanLikeModel, targeted_qualnames  # noqa: E402

EMULATE = FP8Config(fallback="emulate")


def wan_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 3, 16, 16, generator=g).bfloat16(), torch.tensor([600]),
            torch.randn(1, 16, 64, generator=g).bfloat16())


def run(model, *inputs, config=EMULATE):
    backend = make_fp8_backend(config)
    with torch.no_grad():
        return torch.compile(model, backend=backend, fullgraph=True)(*inputs, return_dict=False)[0], backend


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_conversion_halves_targeted_weight_bytes(granularity):
    model = WanLikeModel("diffusers", dim=256, ffn_dim=512, heads=4).to(torch.bfloat16)
    names = targeted_qualnames("diffusers")
    before = sum(model.get_submodule(n).weight.numel() * 2 for n in names)
    decisions = convert_to_fp8(model, FP8Config(granularity=granularity))
    assert [d.qualname for d in decisions if d.converted] == names
    after = sum(model.get_submodule(n).weight.numel() + model.get_submodule(n).weight_scale.numel() * 4
                for n in names)
    assert all(isinstance(model.get_submodule(n), FP8Linear) for n in names)
    assert after / before <= 0.52
    assert fp8_weight_bytes(model)["fp8"] == after


def test_converted_eager_model_still_runs_and_matches_the_backend():
    model = build_wan("tiny")
    x, t, text = wan_inputs()
    with torch.no_grad():
        bf16 = model(x, t, text, return_dict=False)[0]
    via_cache, _ = run(model, x, t, text)  # the bf16 model, quantized by the backend
    torch._dynamo.reset()
    convert_to_fp8(model)
    with torch.no_grad():
        eager = model(x, t, text, return_dict=False)[0]  # weight-only, eagerly
    at_rest, backend = run(model, x, t, text)
    assert rel_err(eager, bf16) < 5e-2
    assert torch.equal(at_rest, via_cache)  # same quantization, same recipe, same output
    reasons = {d.reason for d in backend.report if d.converted}
    assert reasons == {"FP8 weights at rest (tensor); no FP8 tensor cores on cpu: fallback='emulate'"}
    assert fp8_copies(model) == 0  # nothing quantized at run time: no second copy


def test_weight_only_fallback_keeps_fp8_storage_after_compile():
    model = build_wan("tiny")
    convert_to_fp8(model)
    x, t, text = wan_inputs()
    y, backend = run(model, x, t, text, config=FP8Config(fallback="weight_only"))
    fp8 = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dtype == torch.float8_e4m3fn]
    assert len(fp8) == 20
    graph = backend.graphs[0].graph
    calls = [n for n in graph.nodes if n.target is torch.ops.fp8_fx.weight_only_linear.default]
    assert len(calls) == 20
    assert all(n.args[1].meta["example_value"].dtype == torch.float8_e4m3fn for n in calls)
    assert fp8_copies(model) == 0 and torch.isfinite(y).all()


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_save_load_round_trip_is_exact_and_compiles_the_same(tmp_path, granularity):
    model = build_wan("tiny", seed=5)
    convert_to_fp8(model, FP8Config(granularity=granularity))
    path = tmp_path / "wan_fp8.safetensors"
    save_fp8_checkpoint(model, path)
    loaded = load_fp8_checkpoint(path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.float8_e4m3fn
                                                         else a[k], b[k].view(torch.uint8)
                                                         if b[k].dtype == torch.float8_e4m3fn else b[k]), k
    # tensors of their own, not views into the file's buffer: Inductor compiles CPU
    # kernels for aligned inputs, and misaligned weights compiled to other numerics
    assert all(t.data_ptr() % 64 == 0 for t in [*loaded.parameters(), *loaded.buffers()])
    x, t, text = wan_inputs(1)
    y_mem, _ = run(model, x, t, text)
    torch._dynamo.reset()
    y_loaded, backend = run(loaded, x, t, text)
    assert torch.equal(y_mem, y_loaded)
    assert sum(d.converted for d in backend.report) == 20


def _tamper(src, dst, edit):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(src))
    new_metadata = edit(state, metadata)
    metadata = new_metadata if isinstance(new_metadata, dict) else metadata
    save_file(state, str(dst), metadata=metadata)


def test_malformed_checkpoints_raise_clear_errors(tmp_path):
    model = build_wan("tiny")
    convert_to_fp8(model)
    good = tmp_path / "good.safetensors"
    save_fp8_checkpoint(model, good)
    scale = "blocks.0.attn1.to_q.weight_scale"

    _tamper(good, tmp_path / "a.safetensors", lambda s, m: s.pop(scale))
    with pytest.raises(FP8CheckpointError, match="to_q is listed as FP8 but its weight_scale is missing"):
        load_fp8_checkpoint(tmp_path / "a.safetensors")

    _tamper(good, tmp_path / "b.safetensors", lambda s, m: s.update({scale: torch.ones(3)}))
    with pytest.raises(FP8CheckpointError, match=r"weight_scale has shape \(3,\)"):
        load_fp8_checkpoint(tmp_path / "b.safetensors")

    def say_row(s, m):
        mods = json.loads(m["fp8_modules"])
        m["fp8_modules"] = json.dumps({k: "row" for k in mods})
    _tamper(good, tmp_path / "c.safetensors", say_row)
    with pytest.raises(FP8CheckpointError, match="'row' granularity"):
        load_fp8_checkpoint(tmp_path / "c.safetensors")

    def unknown_format(s, m):
        for k in [k for k in s if k.endswith("weight_scale")]:
            s.pop(k)
        return {}
    _tamper(good, tmp_path / "d.safetensors", unknown_format)
    with pytest.raises(FP8CheckpointError, match="no scales in a format fp8_fx knows"):
        load_wan_fp8(tmp_path / "d.safetensors")

    _tamper(good, tmp_path / "e.safetensors",
            lambda s, m: s.update({"blocks.0.attn1.to_q.weight": torch.zeros(64, 64, dtype=torch.bfloat16)}))
    with pytest.raises(FP8CheckpointError, match="expected float8_e4m3fn"):
        load_fp8_checkpoint(tmp_path / "e.safetensors")

    with pytest.raises(FP8CheckpointError, match="not found"):
        load_fp8_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="no FP8Linear"):
        save_fp8_checkpoint(build_wan("tiny"), tmp_path / "f.safetensors")


def test_loads_ecosystem_scale_weight_files_in_original_wan_names(tmp_path):
    """e4m3fn weights + per-tensor `scale_weight` (as ComfyUI-style Wan FP8 files)."""
    from safetensors.torch import save_file
    model = build_wan("tiny", seed=7)
    convert_to_fp8(model)  # per-tensor
    ours = model.state_dict()
    theirs = {}
    for k, v in ours.items():
        theirs[k.replace(".weight_scale", ".scale_weight")] = v.reshape(1) if k.endswith("weight_scale") else v
    theirs = {f"model.diffusion_model.{k}": v for k, v in to_original_wan_names(theirs).items()}
    theirs["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    save_file({k: v.contiguous() for k, v in theirs.items()}, str(tmp_path / "wan_fp8_e4m3fn.safetensors"))
    loaded = load_wan_fp8(tmp_path / "wan_fp8_e4m3fn.safetensors")
    for k, v in loaded.state_dict().items():
        ref = ours[k]
        assert v.dtype == ref.dtype, k
        if v.dtype == torch.float8_e4m3fn:
            assert torch.equal(v.view(torch.uint8), ref.view(torch.uint8)), k
        else:
            assert torch.equal(v, ref), k


def test_load_wan_with_fp8_converts_on_the_way(tmp_path):
    from fp8_fx.wan import load_wan
    model = build_wan("tiny", seed=2)
    model.save_pretrained(tmp_path / "wan")
    loaded = load_wan(tmp_path / "wan", fp8=FP8Config(granularity="row"))
    layers = [m for m in loaded.modules() if isinstance(m, FP8Linear)]
    assert len(layers) == 20 and all(m.granularity == "row" for m in layers)
    x, t, text = wan_inputs()
    with torch.no_grad():
        assert rel_err(loaded(x, t, text, return_dict=False)[0], model(x, t, text, return_dict=False)[0]) < 5e-2

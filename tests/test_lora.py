"""PEFT LoRA adapters on the tiny diffusers Wan (fp8_fx/lora.py): unfused adapters (FP8 base,
bf16 branch), strength changes without recompiling or re-quantizing, fuse_lora /
unfuse_lora followed by the FP8 copies, and FP8 weights at rest with adapters loaded
through diffusers' loaders. Every output is checked against the eager bf16 model with the
same adapter.

Tolerance: the FP8 error of the tiny bf16 Wan is ~1% (0.9-1.4% measured here, as in
test_wan.py); 3e-2 leaves room for it. Each adapter moves the output by ~19% (lora_B is
random, not PEFT's zeros), and half its strength by ~10%: a branch that does not run, a
strength that does not take effect or an FP8 copy that misses a fuse is off by 10-19%.
"""
import copy
import warnings

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import fp8_fx  # noqa: E402
from fp8_fx import FP8Config, convert_to_fp8, make_fp8_backend, ops  # noqa: E402
from fp8_fx.lora import ADAPTER_REASON, lora_scales_as_tensors  # noqa: E402
from fp8_fx.qualname import ADAPTER, BASE, resolve_peft  # noqa: E402
from fp8_fx.wan import build_wan  # noqa: E402
from reference import rel_err  # noqa: E402

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
BLOCK_LINEARS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                 "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"]
EXPECTED = [f"blocks.{i}.{name}" for i in range(2) for name in BLOCK_LINEARS]
TOL = 3e-2
EMULATE = FP8Config(fallback="emulate")


def lora_config(**kwargs):
    from peft import LoraConfig
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": LORA_TARGETS, **kwargs})


def randomize_lora_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT initialises B to zero: the adapter would change nothing
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)


def adapted_wan():
    model = build_wan("tiny", dtype=torch.bfloat16, seed=0)
    model.add_adapter(lora_config(), adapter_name="style")
    randomize_lora_b(model)
    return model


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 3, 16, 16, generator=g).bfloat16(), torch.tensor([600]),
            torch.randn(1, 16, 64, generator=g).bfloat16())


def forward(model, args):
    with torch.no_grad():
        return model(*args, return_dict=False)[0]


class Counting:
    """A backend that counts the graphs Dynamo hands to fp8_fx's."""

    def __init__(self, backend):
        self.backend, self.compiles = backend, 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return self.backend(gm, example_inputs)


@pytest.fixture
def weight_quantizations(monkeypatch):
    """How many weights fp8_fx has quantized (cache misses, FP8 merges)."""
    count = [0]
    original = ops.quantize_weight

    def counting(w, granularity):
        count[0] += 1
        return original(w, granularity)

    monkeypatch.setattr(ops, "quantize_weight", counting)
    return count


def test_the_one_rule_for_peft_wrapped_paths():
    from peft.tuners.lora.layer import Linear as LoraLinear
    from torch import nn
    attn = type("WanAttention", (nn.Module,), {})
    base = resolve_peft([("blocks.0.attn1", attn), ("blocks.0.attn1.to_q", LoraLinear),
                         ("blocks.0.attn1.to_q.base_layer", nn.Linear)])
    assert (base.qualname, base.peft, base.wrapper) == ("blocks.0.attn1.to_q", BASE, "blocks.0.attn1.to_q")
    branch = resolve_peft([("attn1", attn), ("attn1.to_q", LoraLinear), ("attn1.to_q.lora_A.style", nn.Linear)])
    assert (branch.qualname, branch.peft, branch.adapter_component) == ("attn1.to_q.lora_A.style", ADAPTER, "lora_A")
    # a module that happens to be called base_layer, with no PEFT wrapper above it, keeps its path
    plain = resolve_peft([("head", attn), ("head.base_layer", nn.Linear)])
    assert (plain.qualname, plain.peft) == ("head.base_layer", None)
    nested = resolve_peft([("to_q", LoraLinear), ("to_q.base_layer", LoraLinear),
                           ("to_q.base_layer.base_layer", nn.Linear)])
    assert (nested.qualname, nested.peft, nested.wrapper) == ("to_q", BASE, "to_q.base_layer")


def test_unfused_adapter_runs_fp8_base_and_bf16_branch_and_strength_changes_do_not_recompile(
        weight_quantizations):
    model = adapted_wan()
    assert lora_scales_as_tensors(model) == 20
    args = inputs(0)
    reference = forward(model, args)
    model.disable_adapters()
    assert rel_err(forward(model, args), reference) > 0.1  # the adapter matters
    model.enable_adapters()

    backend = Counting(make_fp8_backend(EMULATE))
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    assert rel_err(forward(compiled, args), reference) < TOL
    report = backend.backend.report
    assert [d.qualname for d in report if d.converted] == EXPECTED
    assert all(d.reason.startswith("PEFT base layer; ") for d in report if d.converted)
    branches = [d for d in report if ".lora_" in d.qualname]
    assert len(branches) == 40 and {d.reason for d in branches} == {ADAPTER_REASON}
    assert not any(d.converted for d in branches)
    assert backend.compiles == 1 and weight_quantizations[0] == 20

    for seed, strength in ((1, 0.5), (2, 0.0), (3, 1.3)):
        model.set_adapters(["style"], weights=[strength])
        args = inputs(seed)
        y = forward(compiled, args)
        reference = forward(model, args)
        assert rel_err(y, reference) < TOL, strength
    # the last strength really differs from the first (so a stale one would fail above)
    model.set_adapters(["style"], weights=[0.5])
    assert rel_err(forward(model, args), reference) > 0.1
    assert backend.compiles == 1, "a strength change recompiled"
    assert weight_quantizations[0] == 20, "a strength change re-quantized the base weights"


def test_fuse_and_unfuse_lora_requantize_the_fp8_copies_once(weight_quantizations):
    # Regional compilation: one block graph serves both blocks, unfused and fused.
    model = adapted_wan()
    eager = copy.deepcopy(model)  # the same adapter, run eagerly in bf16
    backend = Counting(make_fp8_backend(EMULATE))
    model.compile_repeated_blocks(backend=backend, fullgraph=True)

    args = inputs(0)
    unfused_ref = forward(eager, args)
    assert rel_err(forward(model, args), unfused_ref) < TOL
    assert weight_quantizations[0] == 20  # 2 blocks x 10 base layers

    model.fuse_lora()
    eager.fuse_lora()
    fused_ref = forward(eager, args)
    assert rel_err(forward(model, args), fused_ref) < TOL
    assert weight_quantizations[0] == 40  # each fused weight quantized once...
    forward(model, inputs(1))
    assert weight_quantizations[0] == 40  # ...and not again
    assert rel_err(fused_ref, unfused_ref) < 1e-2  # fusing is (almost) exact in bf16

    model.unfuse_lora()
    eager.unfuse_lora()
    args = inputs(2)
    reference = forward(eager, args)
    assert rel_err(forward(model, args), reference) < TOL
    assert weight_quantizations[0] == 60
    # copies that stayed fused would add the adapter twice: off by the adapter's effect
    eager.disable_adapters()
    assert rel_err(forward(eager, args), reference) > 0.1
    eager.enable_adapters()

    # unfuse and fuse at another strength with no call in between: still followed
    model.fuse_lora()
    model.unfuse_lora()
    model.fuse_lora(lora_scale=0.5)
    eager.fuse_lora(lora_scale=0.5)
    args = inputs(3)
    assert rel_err(forward(model, args), forward(eager, args)) < TOL
    assert backend.compiles == 2  # the unfused block graph and the fused one, each once
    assert [d.qualname for d in backend.backend.report.graphs[1] if d.converted] == BLOCK_LINEARS


def save_adapter(tmp_path):
    """A Wan LoRA file as diffusers writes one, and the bf16 model that made it."""
    from diffusers.loaders import WanLoraLoaderMixin
    from peft.utils import get_peft_model_state_dict
    reference = adapted_wan()
    WanLoraLoaderMixin.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(reference, adapter_name="style"),
        transformer_lora_adapter_metadata=reference.peft_config["style"].to_dict())
    return reference


def fake_wan_pipeline(transformer):
    """The part of WanPipeline that pipe.load_lora_weights uses (no VAE or text encoder)."""
    from diffusers.loaders import WanLoraLoaderMixin

    class Pipeline(WanLoraLoaderMixin):
        hf_device_map = None

        def __init__(self):
            self.transformer = transformer

        @property
        def components(self):
            return {"transformer": self.transformer}

    return Pipeline()


def test_fp8_weights_at_rest_load_a_lora_through_diffusers_and_fuse_on_fp8(tmp_path, weight_quantizations):
    reference = save_adapter(tmp_path)
    model = build_wan("tiny", dtype=torch.bfloat16, seed=0)
    convert_to_fp8(model)
    fake_wan_pipeline(model).load_lora_weights(str(tmp_path), adapter_name="style")  # pipe.load_lora_weights
    wrapper = model.blocks[0].attn1.to_q
    assert type(wrapper).__name__ == "FP8LoraLinear" and isinstance(wrapper.base_layer, fp8_fx.FP8Linear)
    assert wrapper.lora_A["style"].weight.dtype == torch.bfloat16  # the branch runs in the model's dtype
    lora_scales_as_tensors(model)

    args = inputs(0)
    assert rel_err(forward(model, args), forward(reference, args)) < TOL  # eager, weight-only
    backend = Counting(make_fp8_backend(EMULATE))
    model.compile_repeated_blocks(backend=backend, fullgraph=True)
    assert rel_err(forward(model, args), forward(reference, args)) < TOL
    record = next(d for d in backend.backend.report if d.qualname == "attn1.to_q")
    assert record.action == "emulate" and "PEFT base layer; FP8 weights at rest" in record.reason
    model.set_adapters(["style"], weights=[0.5])
    reference.set_adapters(["style"], weights=[0.5])
    assert rel_err(forward(model, args), forward(reference, args)) < TOL
    model.set_adapters(["style"], weights=[1.0])
    reference.set_adapters(["style"], weights=[1.0])

    weight, scale = wrapper.base_layer.weight, wrapper.base_layer.weight_scale.clone()
    codes = weight.detach().clone()
    before = weight_quantizations[0]
    with pytest.warns(UserWarning, match="re-quantizes them"):
        model.fuse_lora()
    assert weight_quantizations[0] - before == 20  # dequantize, add, quantize: once per layer
    assert wrapper.base_layer.weight is weight and not torch.equal(weight, codes)  # in place
    reference.fuse_lora()
    args = inputs(1)
    assert rel_err(forward(model, args), forward(reference, args)) < TOL
    model.unfuse_lora()
    reference.unfuse_lora()
    assert torch.equal(wrapper.base_layer.weight_scale, scale)  # back onto the grid it had
    moved = (weight.view(torch.uint8) != codes.view(torch.uint8)).float().mean().item()
    assert moved < 0.3  # within one step of the old codes, most of them unchanged
    assert rel_err(forward(model, args), forward(reference, args)) < TOL
    assert backend.compiles == 2


def test_adapters_and_convert_to_fp8_in_either_order():
    from peft import LoraConfig
    args = inputs(0)
    # converting a model that already has adapters: base layers by their wrappers' paths
    # (even a catch-all target never converts an adapter branch)
    reference = adapted_wan()
    model = copy.deepcopy(reference)
    records = convert_to_fp8(model, FP8Config(targets=("blocks.*",)))
    converted = [d.qualname for d in records if d.converted]
    assert converted == EXPECTED
    assert {d.reason for d in records if ".lora_" in d.qualname} == {ADAPTER_REASON}
    assert type(model.blocks[1].ffn.net[2]).__name__ == "FP8LoraLinear"
    assert rel_err(forward(model, args), forward(reference, args)) < TOL

    # PEFT's own add_adapter on a converted model
    model = build_wan("tiny", dtype=torch.bfloat16, seed=0)
    convert_to_fp8(model)
    model.add_adapter(lora_config(), adapter_name="style")
    randomize_lora_b(model)
    assert rel_err(forward(model, args), forward(reference, args)) < TOL

    # DoRA reads the dense base weight: refused, with the reason
    model = build_wan("tiny", dtype=torch.bfloat16, seed=0)
    convert_to_fp8(model)
    with pytest.raises(ValueError, match="fp8_fx: the LoRA variant"):
        model.add_adapter(LoraConfig(r=4, target_modules=["to_q"], use_dora=True), adapter_name="dora")

    # an FP8 checkpoint holds the base model only
    model = build_wan("tiny", dtype=torch.bfloat16, seed=0)
    convert_to_fp8(model)
    model.add_adapter(lora_config(), adapter_name="style")
    with pytest.raises(ValueError, match="PEFT \\(LoRA\\) adapters"):
        fp8_fx.save_fp8_checkpoint(model, "/tmp/never_written.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fuse_lora()
    model.unload_lora()  # fused in for good: the base model is FP8Linears again
    assert isinstance(model.blocks[0].attn1.to_q, fp8_fx.FP8Linear)


@pytest.mark.gpu
def test_unfused_adapter_on_the_gpu_runs_scaled_mm_and_follows_strength():
    """On a GPU with FP8 tensor cores: the base layers run as real FP8 GEMMs (`scaled_mm`,
    not the emulation), the adapter branch in bf16 beside them, and a strength change takes
    effect without recompiling, each output against the eager bf16 model with the adapter."""
    model = adapted_wan().cuda()
    assert lora_scales_as_tensors(model) == 20  # after moving the model, as the README says
    backend = Counting(make_fp8_backend(FP8Config()))
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    on_gpu = [tuple(t.cuda() for t in inputs(seed)) for seed in range(3)]
    assert rel_err(forward(compiled, on_gpu[0]), forward(model, on_gpu[0])) < TOL
    report = backend.backend.report
    assert [d.qualname for d in report if d.converted] == EXPECTED
    assert {d.action for d in report if d.converted} == {"scaled_mm"}
    for args, strength in zip(on_gpu[1:], (0.5, 0.0)):
        model.set_adapters(["style"], weights=[strength])
        assert rel_err(forward(compiled, args), forward(model, args)) < TOL, strength
    assert backend.compiles == 1, "a strength change recompiled"

"""The FP8 attention pass: which SDPA calls it converts (one report record each, with
its reason), what the rewritten graph computes (against the float64 recipe), and the
calls it must leave alone."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fp8_fx import AttentionConfig, FP8Config, make_fp8_backend
from fp8_fx.passes import run_passes
from fp8_fx.passes.attention import AttentionPass
from fp8_fx.passes.fx_utils import copy_dynamo_graph_module
from attention_reference import exact_attention, recipe_attention
from reference import rel_err


class Attention(nn.Module):
    """diffusers-style: projections and the SDPA call inside the attention module."""

    def __init__(self, dim=64, heads=2, **sdpa_kwargs):
        super().__init__()
        self.heads, self.sdpa_kwargs = heads, sdpa_kwargs
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))

    def qkv(self, x, context):
        def heads(t):
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        return heads(self.to_q(x)), heads(self.to_k(context)), heads(self.to_v(context))

    def forward(self, x, context):
        q, k, v = self.qkv(x, context)
        return F.scaled_dot_product_attention(q, k, v, **self.sdpa_kwargs).transpose(1, 2).flatten(2)


class Block(nn.Module):
    def __init__(self, dim=64, **sdpa_kwargs):
        super().__init__()
        self.attn1 = Attention(dim, **sdpa_kwargs)
        self.attn2 = Attention(dim)

    def forward(self, x, context):
        x = x + self.attn1(x, x)
        return x + self.attn2(x, context)


def compile_with_pass(model, config, *inputs):
    """torch.compile with a backend that runs only the attention pass (eager after it)."""
    results = []

    def backend(gm, example_inputs):
        gm = copy_dynamo_graph_module(gm)
        (result,) = run_passes([AttentionPass(config)], gm)
        results.append((gm, result.decisions))
        return gm.forward
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(*inputs)
    (gm, decisions), = results
    return out, gm, decisions


def inputs(tokens=70, text=20, dim=64):
    return torch.randn(1, tokens, dim), torch.randn(1, text, dim)


@pytest.mark.parametrize("recipe", ["tensor", "smooth_int8"])
def test_self_attention_is_converted_and_computes_the_recipe(recipe):
    torch.manual_seed(0)
    block = Block().eval()
    x, ctx = inputs()
    config = FP8Config(fallback="emulate", attention=AttentionConfig(recipe=recipe))
    out, gm, decisions = compile_with_pass(block, config, x, ctx)
    assert [(d.qualname, d.action) for d in decisions] == [("attn1", "emulate"), ("attn2", "skipped")]
    assert decisions[1].reason == "not targeted"
    with torch.no_grad():  # the truth: attn1's projections, then the float64 recipe
        q, k, v = block.attn1.qkv(x, x)
        rotate = True  # AttentionConfig's default, both recipes (head dim 32: a power of two)
        h = x.double() + recipe_attention(q, k, v, recipe, rotate=rotate).transpose(1, 2).flatten(2)
        q, k, v = block.attn2.qkv(h.float(), ctx)
        expected = h + exact_attention(q, k, v).transpose(1, 2).flatten(2)
    assert rel_err(out, expected) < 1e-4
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.fp8_fx.fp8_attention.default in targets
    assert targets.count(F.scaled_dot_product_attention) == 1  # attn2's, left alone


def test_without_attention_config_nothing_changes():
    torch.manual_seed(1)
    block = Block().eval()
    x, ctx = inputs()
    out, gm, decisions = compile_with_pass(block, FP8Config(fallback="emulate"), x, ctx)
    assert decisions == []
    with torch.no_grad():
        assert torch.equal(out, block(x, ctx))


def test_targets_exclude_and_the_explicit_scale():
    torch.manual_seed(2)
    block = Block(scale=0.2).eval()
    x, ctx = inputs()
    config = FP8Config(fallback="emulate", attention=AttentionConfig(targets=("attn?",), exclude=("attn2",)))
    out, gm, decisions = compile_with_pass(block, config, x, ctx)
    assert [(d.qualname, d.action, d.reason) for d in decisions][1] == ("attn2", "skipped", "excluded by 'attn2'")
    node = next(n for n in gm.graph.nodes if n.target is torch.ops.fp8_fx.fp8_attention.default)
    assert node.args[6] == 0.2  # the model's softmax scale, not 1/sqrt(head dim)


@pytest.mark.parametrize("kwargs, reason", [
    (dict(is_causal=True), "causal attention"),
    (dict(dropout_p=0.1), "dropout_p=0.1"),
])
def test_calls_the_recipes_do_not_compute_are_left_with_a_reason(kwargs, reason):
    torch.manual_seed(3)
    block = Block(**kwargs).eval()
    x, ctx = inputs()
    config = FP8Config(fallback="emulate", attention=AttentionConfig())
    _, gm, decisions = compile_with_pass(block, config, x, ctx)
    assert decisions[0].action == "skipped" and reason in decisions[0].reason
    assert not any(n.target is torch.ops.fp8_fx.fp8_attention.default for n in gm.graph.nodes)


class MaskedAttention(nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = MaskedAttention()

    def forward(self, q, k, v, mask):
        return self.attn1(q, k, v, mask)


def test_a_mask_is_left_with_a_reason():
    q = k = v = torch.randn(1, 2, 8, 16)
    mask = torch.ones(8, 8, dtype=torch.bool)
    config = FP8Config(fallback="emulate", attention=AttentionConfig(targets=("*",)))
    out, _, decisions = compile_with_pass(Masked(), config, q, k, v, mask)
    assert [(d.action, d.reason) for d in decisions] == [("skipped", "an attention mask (the FP8 recipes take none)")]


def test_without_emulate_the_reason_names_the_missing_kernel():
    torch.manual_seed(4)
    x, ctx = inputs()
    _, _, decisions = compile_with_pass(Block().eval(), FP8Config(attention=AttentionConfig()), x, ctx)
    assert decisions[0].action == "skipped"
    assert "no FP8 attention kernel for cpu" in decisions[0].reason and "fallback='emulate'" in decisions[0].reason


def test_attention_config_is_checked():
    with pytest.raises(ValueError, match="recipe must be one of"):
        AttentionConfig(recipe="fp4")
    with pytest.raises(TypeError, match="not one string"):
        AttentionConfig(targets="attn1")
    with pytest.raises(TypeError, match="AttentionConfig"):
        FP8Config(attention=True)


# ---- through the backend, on diffusers' Wan DiT ----

def wan_inputs():
    from fp8_fx.wan import latent_shape
    torch.manual_seed(5)
    return torch.randn(*latent_shape(5, 64, 64)), torch.tensor([500.0]), torch.randn(1, 16, 64)


def run_wan(model, compile_fn, config):
    from fp8_fx import make_fp8_backend
    backend = make_fp8_backend(config)
    x, t, text = wan_inputs()
    compiled = compile_fn(model, backend)
    with torch.no_grad():
        return compiled(x, t, text, return_dict=False)[0], backend


def test_wan_self_attention_in_fp8_whole_and_regional():
    """The report names each attention call with its decision; whole-model and regional
    compilation agree; FP8 attention moves the output by the recipe's error, no more."""
    import copy
    from fp8_fx.wan import build_wan
    model = build_wan("tiny", dtype=torch.float32).eval()
    attention = FP8Config(fallback="emulate", attention=AttentionConfig())
    linears_only = FP8Config(fallback="emulate")

    def whole(m, backend):
        return torch.compile(m, backend=backend, fullgraph=True)

    def regional(m, backend):
        m = copy.deepcopy(m)
        m.compile_repeated_blocks(backend=backend, fullgraph=True)
        return m
    y_attn, backend = run_wan(model, whole, attention)
    assert [(d.qualname, d.action) for d in backend.report.attention] == [
        ("blocks.0.attn1", "emulate"), ("blocks.0.attn2", "skipped"),
        ("blocks.1.attn1", "emulate"), ("blocks.1.attn2", "skipped")]
    assert "(4 attention calls: 2 emulate, 2 skipped)" in str(backend.report)
    torch._dynamo.reset()
    y_regional, backend = run_wan(model, regional, attention)
    assert [(d.qualname, d.action) for d in backend.report.attention] == [("attn1", "emulate"), ("attn2", "skipped")]
    torch._dynamo.reset()
    y_linears, _ = run_wan(model, whole, linears_only)
    assert rel_err(y_regional, y_attn) < 5e-3  # other fusions: a few fp8 roundings move
    moved = rel_err(y_attn, y_linears)
    assert 1e-4 < moved < 5e-2, moved  # attention really changed, by a recipe-sized amount


def test_attention_target_matching_nothing_is_named():
    from fp8_fx.wan import build_wan
    model = build_wan("tiny", dtype=torch.float32).eval()
    config = FP8Config(fallback="emulate", attention=AttentionConfig(targets=("attn1", "atn2")))
    with pytest.warns(UserWarning, match=r"AttentionConfig.targets entries \['atn2'\]"):
        run_wan(model, lambda m, b: torch.compile(m, backend=b), config)


def test_per_block_attention_entries_under_regional_compilation_are_refused():
    from fp8_fx.wan import build_wan
    model = build_wan("tiny", dtype=torch.float32).eval()
    config = FP8Config(fallback="emulate", attention=AttentionConfig(exclude=("blocks.0.attn1",)))

    def regional(m, backend):
        m.compile_repeated_blocks(backend=backend, fullgraph=True)
        return m
    with pytest.raises(Exception, match=r"blocks\.0\.attn1.*regional compilation"):
        run_wan(model, regional, config)


def test_attention_asked_for_without_a_kernel_warns():
    from fp8_fx.wan import build_wan
    model = build_wan("tiny", dtype=torch.float32).eval()
    with pytest.warns(UserWarning, match="no FP8 attention kernel for this device yet"):
        _, backend = run_wan(model, lambda m, b: torch.compile(m, backend=b), FP8Config(attention=AttentionConfig()))
    assert not any(d.converted for d in backend.report.attention)


class AttentionWithOut(nn.Module):
    """A self-attention whose output goes through to_out, as Wan's does."""

    def __init__(self, dim=64, heads=2):
        super().__init__()
        self.attn1 = Attention(dim, heads)
        self.attn1.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x):
        return self.attn1.to_out[0](self.attn1(x, x).type_as(x))


def test_the_fp8_attention_output_is_to_outs_gemm_input_as_it_is():
    """Recipe "tensor" writes O in FP8 at V's scale: to_out's GEMM takes those codes and
    that scale (no amax pass, no second rounding). float64 truth: O on V's grid, times the
    recipe's FP8 weight; re-quantizing O with its own amax would be ~1e-2 away."""
    from reference import reference_quantize
    torch.manual_seed(5)
    model = AttentionWithOut().eval()
    x = torch.randn(1, 70, 64)
    backend = make_fp8_backend(FP8Config(targets=("to_out.0",), fallback="emulate", attention=AttentionConfig()))
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(x)
        q, k, v = model.attn1.qkv(x, x)
        o = recipe_attention(q, k, v, "tensor", rotate=True).transpose(1, 2).flatten(2)
        wq, ws = reference_quantize(model.attn1.to_out[0].weight, "tensor")
        expected = o @ (wq * ws.double()).T + model.attn1.to_out[0].bias.double()
    assert rel_err(out, expected) < 1e-4
    code = backend.graphs[0].code
    assert "fp8_fx.quantize.default" not in code and "fp8_fx.dequantize" not in code


def _sdpa_on_a_gpu(head_dim=64, v_head_dim=None, **sdpa_kwargs):
    """An SDPA node whose traced values are (fake) CUDA tensors: the pass's GPU branches,
    decided on a machine without one."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    graph = torch.fx.Graph()
    with FakeTensorMode():
        values = [torch.empty(1, 2, 256, d, device="cuda", dtype=torch.bfloat16)
                  for d in (head_dim, head_dim, v_head_dim or head_dim)]
        nodes = []
        for name, value in zip("qkv", values):
            nodes.append(graph.placeholder(name))
            nodes[-1].meta["example_value"] = value
        node = graph.call_function(F.scaled_dot_product_attention, tuple(nodes), sdpa_kwargs)
        node.meta["example_value"] = F.scaled_dot_product_attention(*values, **sdpa_kwargs)
    return node


def test_on_a_gpu_smooth_int8_gets_the_triton_kernel_or_its_reason(monkeypatch):
    from fp8_fx.kernels import cudnn_attention, triton_attention
    from fp8_fx.passes.attention import decide
    node = _sdpa_on_a_gpu()
    int8 = AttentionConfig(recipe="smooth_int8", targets=("attn1",))
    monkeypatch.setattr(triton_attention, "why_not_device", lambda device: None)
    monkeypatch.setattr(triton_attention, "_self_check", lambda *a: None)
    assert decide(node, "attn1", int8, "weight_only") == ("triton", "recipe 'smooth_int8', Q/K rotated, fp8_fx's Triton kernel")
    # the kernel takes the row max through a per-query factor: a positive softmax scale only
    action, reason = decide(_sdpa_on_a_gpu(scale=-0.5), "attn1", int8, "emulate")
    assert action == "emulate" and "softmax scale -0.5 (the 'triton' kernel takes a positive one)" in reason
    monkeypatch.setattr(triton_attention, "why_not", lambda *a: "the kernel failed its self-check: X")
    action, reason = decide(node, "attn1", int8, "weight_only")
    assert action == "skipped" and "no FP8 attention kernel here: the kernel failed its self-check: X" in reason
    # recipe "tensor" where cuDNN's FP8 attention is not (an Ada GPU): the reason points at smooth_int8
    from fp8_fx.passes import attention as attention_pass
    monkeypatch.setattr(attention_pass, "_quantized_examples", lambda args, attention: (None, None, None))
    monkeypatch.setattr(cudnn_attention, "why_not", lambda *a: "cuDNN FP8 attention needs sm90+ (Hopper)")
    monkeypatch.setattr(triton_attention, "why_not_device", lambda device: None)
    action, reason = decide(node, "attn1", AttentionConfig(targets=("attn1",)), "weight_only")
    assert action == "skipped" and "needs sm90+" in reason
    assert "AttentionConfig(recipe='smooth_int8') runs fp8_fx's Triton kernel on this GPU" in reason


def test_the_triton_kernel_names_the_shapes_it_does_not_take(monkeypatch):
    from fp8_fx.kernels import triton_attention
    monkeypatch.setattr(triton_attention, "why_not_device", lambda device: None)
    monkeypatch.setattr(triton_attention, "_self_check", lambda *a: None)
    cuda = torch.device("cuda", 0)
    assert triton_attention.why_not(cuda, 128, 128, torch.bfloat16) is None
    assert "head dim 512 (the 'triton' kernel takes up to 256)" in triton_attention.why_not(cuda, 512, 512, torch.bfloat16)
    assert "V's head dim 64 differs from Q's 128" in triton_attention.why_not(cuda, 128, 64, torch.bfloat16)

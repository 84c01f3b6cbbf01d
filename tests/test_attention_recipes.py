"""FP8 attention recipes (fp8_fx.attention_recipes) against their float64 statement
(tests/attention_reference.py) and against exact attention."""
import pytest
import torch

from fp8_fx.attention_recipes import RECIPES, attention
from attention_reference import exact_attention, recipe_attention
from reference import rel_err


def qkv(b, h, sq, sk, d, dtype=torch.float32, k_bias=3.0):
    q = torch.randn(b, h, sq, d)
    k = torch.randn(b, h, sk, d) + k_bias * torch.randn(d)  # keys with a channel bias, as in DiTs
    v = torch.randn(b, h, sk, d)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("shape", [
    (1, 2, 128, 128, 128),  # Wan's head dim, whole 64-token blocks
    (2, 3, 130, 130, 32),   # a short last block
    (1, 2, 70, 33, 64),     # cross-attention: fewer keys than queries, odd lengths
    (1, 1, 1, 1, 16),
])
def test_emulation_matches_the_float64_recipe(recipe, shape):
    torch.manual_seed(0)
    q, k, v = qkv(*shape)
    out = attention(q, k, v, recipe)
    assert out.shape == (*shape[:3], shape[4]) and out.dtype == torch.float32
    # fp32 against float64: Q/K/V codes and scales agree exactly; a P~ within fp32
    # rounding of an e4m3 tie may round the other way (one P element, one FP8 step: a
    # few 1e-5 of the output). A wrong constant or grouping costs 1e-3 and more.
    assert rel_err(out, recipe_attention(q, k, v, recipe)) < 2e-4


@pytest.mark.parametrize("recipe", RECIPES)
def test_bf16_inputs_give_bf16_output_of_the_recipe(recipe):
    torch.manual_seed(1)
    q, k, v = qkv(1, 2, 96, 96, 64, dtype=torch.bfloat16)
    out = attention(q, k, v, recipe)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, recipe_attention(q, k, v, recipe)) < 4e-3  # one bf16 rounding


def test_an_explicit_softmax_scale_is_used():
    torch.manual_seed(2)
    q, k, v = qkv(1, 2, 64, 64, 64)
    for recipe in RECIPES:
        out = attention(q, k, v, recipe, softmax_scale=0.05)
        assert rel_err(out, recipe_attention(q, k, v, recipe, softmax_scale=0.05)) < 2e-4


def test_smoothing_k_is_what_keeps_channel_biased_keys_accurate():
    """The errors the recipes exist for, against exact attention (not against themselves):
    a channel bias in K sets a per-tensor FP8 scale and costs "tensor" accuracy;
    "smooth_int8" removes it (exact for softmax) and keeps 7 bits of Q and K."""
    torch.manual_seed(3)
    q, k, v = qkv(1, 2, 256, 256, 128, k_bias=4.0)
    exact = exact_attention(q, k, v)
    err = {r: rel_err(attention(q, k, v, r), exact) for r in RECIPES}
    bf16 = rel_err(torch.nn.functional.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16()), exact)
    assert err["smooth_int8"] < 0.05 < err["tensor"]
    assert bf16 < err["smooth_int8"] / 3


@pytest.mark.parametrize("recipe", RECIPES)
def test_empty_queries_or_batch_give_empty_output(recipe):
    for shape in [(1, 2, 0, 5, 32), (0, 2, 4, 5, 32)]:
        q, k, v = qkv(*shape)
        out = attention(q, k, v, recipe)
        assert out.shape == (*shape[:3], 32)


def test_no_keys_is_an_error_that_says_so():
    q, k, v = qkv(1, 2, 4, 0, 32)
    with pytest.raises(ValueError, match="at least one key"):
        attention(q, k, v, "tensor")


def test_unknown_recipe_is_named():
    q, k, v = qkv(1, 1, 4, 4, 16)
    with pytest.raises(ValueError, match="'fp4'"):
        attention(q, k, v, "fp4")


@pytest.mark.parametrize("recipe", RECIPES)
def test_compiled_equals_eager(recipe):
    """Inductor fuses the decomposed quantization: it must not change a code."""
    torch.manual_seed(4)
    q, k, v = qkv(1, 2, 100, 100, 64)
    # Caches off: backend="inductor" keys them on the graph, which holds our ops by name
    # only (fp8_fx's backend adds its source to the key; this test uses plain Inductor).
    compiled = torch.compile(lambda a, b, c: attention(a, b, c, recipe), backend="inductor", fullgraph=True)
    with torch._inductor.config.patch(force_disable_caches=True):
        out = compiled(q, k, v)
    assert rel_err(out, attention(q, k, v, recipe)) < 1e-6

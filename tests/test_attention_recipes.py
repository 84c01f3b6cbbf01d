"""FP8 attention recipes (fp8_fx.attention_recipes) against their float64 statement
(tests/attention_reference.py) and against exact attention."""
import pytest
import torch

from fp8_fx.attention_recipes import RECIPES, attention, output_dtype
from attention_reference import exact_attention, recipe_attention
from reference import rel_err

# (recipe, rotate): each recipe with and without the Hadamard rotation of Q and K.
VARIANTS = [("tensor", False), ("tensor", True), ("smooth_int8", False), ("smooth_int8", True)]


def qkv(b, h, sq, sk, d, dtype=torch.float32, k_bias=3.0):
    q = torch.randn(b, h, sq, d)
    k = torch.randn(b, h, sk, d) + k_bias * torch.randn(d)  # keys with a channel bias, as in DiTs
    v = torch.randn(b, h, sk, d)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("recipe,rotate", VARIANTS)
@pytest.mark.parametrize("shape", [
    (1, 2, 128, 128, 128),  # Wan's head dim, whole 64-token blocks
    (2, 3, 130, 130, 32),   # a short last block
    (1, 2, 70, 33, 64),     # cross-attention: fewer keys than queries, odd lengths
    (1, 1, 1, 1, 16),
])
def test_emulation_matches_the_float64_recipe(recipe, rotate, shape):
    torch.manual_seed(0)
    q, k, v = qkv(*shape)
    out = attention(q, k, v, recipe, rotate=rotate)
    assert out.shape == (*shape[:3], shape[4]) and out.dtype == torch.float32
    # fp32 against float64: Q/K/V codes and scales agree exactly; a P~ within fp32
    # rounding of an e4m3 tie may round the other way (one P element, one FP8 step: a
    # few 1e-5 of the output). A wrong constant or grouping costs 1e-3 and more.
    assert rel_err(out, recipe_attention(q, k, v, recipe, rotate=rotate)) < 2e-4


@pytest.mark.parametrize("recipe,rotate", VARIANTS)
def test_bf16_inputs_give_bf16_output_of_the_recipe(recipe, rotate):
    torch.manual_seed(1)
    q, k, v = qkv(1, 2, 96, 96, 64, dtype=torch.bfloat16)
    out = attention(q, k, v, recipe, rotate=rotate)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, recipe_attention(q, k, v, recipe, rotate=rotate)) < 4e-3  # one bf16 rounding


def test_an_explicit_softmax_scale_is_used():
    torch.manual_seed(2)
    q, k, v = qkv(1, 2, 64, 64, 64)
    for recipe, rotate in VARIANTS:
        out = attention(q, k, v, recipe, softmax_scale=0.05, rotate=rotate)
        assert rel_err(out, recipe_attention(q, k, v, recipe, softmax_scale=0.05, rotate=rotate)) < 2e-4


def test_smoothing_and_rotation_are_what_keep_dit_like_inputs_accurate():
    """The errors the recipes' exact transformations exist for, against exact attention
    (not against themselves). A channel bias in K would set a per-tensor FP8 scale: the
    plain per-tensor recipe, written out here without smoothing, loses 2x; both recipes
    subtract K's token mean. A few outlier channels in Q and K: per-tensor scales lose 4x
    unless the Hadamard rotation spreads them; smooth_int8's 7 bits per block cope, and
    with the rotation lose almost nothing to them."""
    torch.manual_seed(3)
    q, k, v = qkv(1, 2, 256, 256, 128, k_bias=4.0)
    exact = exact_attention(q, k, v)
    plain = _per_tensor_without_smoothing(q, k, v)
    err = {(r, rot): rel_err(attention(q, k, v, r, rotate=rot), exact) for r, rot in VARIANTS}
    assert max(err.values()) < 0.07 < 0.1 < rel_err(plain, exact)
    q, k = q.clone(), k - k.mean(dim=-2, keepdim=True)
    outliers = torch.randperm(128)[:4]
    q[..., outliers] *= 10.0
    k[..., outliers] *= 10.0
    exact = exact_attention(q, k, v)
    err = {(r, rot): rel_err(attention(q, k, v, r, rotate=rot), exact) for r, rot in VARIANTS}
    assert err[("tensor", True)] < 0.08 and err[("smooth_int8", False)] < 0.07 < 0.2 < err[("tensor", False)]
    assert err[("smooth_int8", True)] < 0.7 * err[("smooth_int8", False)]
    bf16 = rel_err(torch.nn.functional.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16()), exact)
    assert bf16 < err[("smooth_int8", False)] / 3


def _per_tensor_without_smoothing(q, k, v):
    """Per-tensor FP8 Q/K/V attention with no smoothing, in float64 (the control)."""
    from attention_reference import _on_grid, _scale
    from reference import E4M3_MAX, round_to_e4m3
    q, k, v = q.double(), k.double(), v.double()
    qd, kd, vd = (_on_grid(t, _scale(t.abs().amax())) for t in (q, k, v))
    s = qd @ kd.transpose(-1, -2) / q.shape[-1] ** 0.5
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    return (round_to_e4m3(p * E4M3_MAX) / E4M3_MAX) @ vd / p.sum(dim=-1, keepdim=True)


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


@pytest.mark.parametrize("recipe,rotate", VARIANTS)
def test_compiled_equals_eager(recipe, rotate):
    """Inductor fuses the decomposed quantization (and the rotation): it must not change a code."""
    torch.manual_seed(4)
    q, k, v = qkv(1, 2, 100, 100, 64)
    # Caches off: backend="inductor" keys them on the graph, which holds our ops by name
    # only (fp8_fx's backend adds its source to the key; this test uses plain Inductor).
    compiled = torch.compile(lambda a, b, c: attention(a, b, c, recipe, rotate=rotate), backend="inductor",
                             fullgraph=True)
    with torch._inductor.config.patch(force_disable_caches=True):
        out = compiled(q, k, v)
    # The rotation is a GEMM: Inductor's sums in another order than eager's, by ulps,
    # which flip the odd e4m3 code (one FP8 step of one Q or K value: ~1e-3 of the output).
    assert rel_err(out, attention(q, k, v, recipe, rotate=rotate)) < (3e-3 if rotate else 1e-6)


def test_the_output_is_laid_out_for_the_transpose_back():
    """(B, H, S, D) viewed from a (B, S, H, D) buffer: .transpose(1, 2) is contiguous."""
    q, k, v = qkv(2, 3, 10, 10, 32)
    for recipe, rotate in VARIANTS:
        assert attention(q, k, v, recipe, rotate=rotate).transpose(1, 2).is_contiguous()


def test_smooth_int8_stores_v_with_the_tokens_contiguous(monkeypatch):
    """The Triton kernel's P @ V reads V's tiles with the tokens contiguous (Hopper's FP8
    MMA wants the summed dim contiguous; benchmarks/README.md shows the pipelining this
    buys): the quantization stores each channel as a row of tokens, padded to 16 bytes,
    and Inductor must hand the kernel that layout, not a copy in another."""
    from fp8_fx import attention_recipes
    from fp8_fx.ops import cast_to_fp8
    torch.manual_seed(5)
    q, k, v = qkv(1, 2, 150, 150, 64)
    v8, v_scale = torch.ops.fp8_fx.quantize_attention_inputs(q, k, v, "smooth_int8", True)[4:]
    assert v8.shape == v.shape and v8.stride()[2:] == (1, 160)
    assert torch.equal(v8.float(), cast_to_fp8(v, v_scale).float())  # the same codes, another layout
    seen = []
    emulation = attention_recipes.emulated_fp8_attention
    monkeypatch.setattr(attention_recipes, "emulated_fp8_attention",
                        lambda q8, qs, k8, ks, v8, *rest: seen.append(v8.stride()) or emulation(q8, qs, k8, ks, v8, *rest))
    compiled = torch.compile(lambda a, b, c: attention(a, b, c, "smooth_int8"), backend="inductor", fullgraph=True)
    with torch._inductor.config.patch(force_disable_caches=True):
        compiled(q, k, v)
    assert seen[-1][2:] == (1, 160)


def test_an_unknown_kernel_is_named():
    q, k, v = qkv(1, 1, 4, 4, 16)
    with pytest.raises(ValueError, match="'flash'"):
        attention(q, k, v, "tensor", kernel="flash")


@pytest.mark.parametrize("recipe", RECIPES)
def test_shapes_that_do_not_pair_up_head_by_head_are_refused(recipe):
    """Grouped-query K/V (fewer heads) would broadcast in the emulation and read past K/V
    in a kernel: both refuse, saying what to do."""
    q = torch.randn(1, 4, 16, 32)
    k = v = torch.randn(1, 1, 16, 32)
    with pytest.raises(ValueError, match=r"same batch and heads .*expand K and V to Q's heads.*Q \(1, 4, 16, 32\)"):
        attention(q, k, v, recipe)
    quantized = list(torch.ops.fp8_fx.quantize_attention_inputs(q, k, v, recipe))
    with pytest.raises(ValueError, match="same batch and heads"):
        torch.ops.fp8_fx.fp8_attention(*quantized, 0.1, recipe, "emulate", output_dtype(recipe, q.dtype))
    with pytest.raises(ValueError, match=r"\(batch, heads, tokens, head dim\)"):
        attention(q[0], q[0], q[0], recipe)
    with pytest.raises(ValueError, match="K and V with the same tokens"):
        attention(q, q, q[:, :, :8], recipe)


def test_the_cudnn_kernel_where_it_cannot_run_says_why():
    q, k, v = qkv(1, 1, 8, 8, 16)
    with pytest.raises(RuntimeError, match="cuDNN FP8 attention runs on CUDA GPUs \\(this is cpu\\)"):
        attention(q, k, v, "tensor", kernel="cudnn")

"""The "smooth_int8" recipe's Triton kernel (kernels/triton_attention.py) against the
float64 recipe written out in attention_reference.py and against exact attention.

On a machine without a GPU these run the kernel's program in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before Triton is imported; `pip install
-e ".[interpret]"` installs a Triton whose interpreter runs it); with a GPU, on the GPU.
The interpreter converts floats to bf16/fp16 by truncation, so on the CPU the kernel
writes fp32 here; bf16 output is checked on the GPU (tests/test_gpu_attention.py)."""
import pytest
import torch

from fp8_fx.attention_recipes import attention, fp8_attention
from fp8_fx.kernels import triton_attention
from attention_reference import exact_attention, recipe_attention
from reference import rel_err

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not triton_attention.interpreting():
    pytest.skip("no GPU, and Triton's interpreter is off (TRITON_INTERPRET=1)", allow_module_level=True)
OUT_DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def qkv(b, h, sq, sk, d, k_bias=3.0, seed=0):
    """(B, S, H, D) buffers viewed (B, H, S, D), as attention modules make them; keys with
    a channel bias, as DiT keys have."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=g)
    k = torch.randn(b, sk, h, d, generator=g) + k_bias * torch.randn(d, generator=g)
    v = torch.randn(b, sk, h, d, generator=g)
    return [t.to(DEVICE, OUT_DTYPE).transpose(1, 2) for t in (q, k, v)]


@pytest.mark.parametrize("shape", [
    (1, 2, 150, 150, 64),   # two key tiles of 128, the second partial; three Q blocks of 64 tokens
    (2, 1, 37, 200, 128),   # Wan's head dim; fewer queries than one program's 128 rows
    (1, 1, 5, 3, 40),       # a head dim that is no power of two (masked to 64); one short tile
    (1, 3, 130, 77, 16),    # head dim 16 (masked to INT8 MMA's 32); cross-attention-like
])
def test_kernel_computes_the_float64_recipe(shape):
    q, k, v = qkv(*shape)
    out = attention(q, k, v, "smooth_int8", kernel="triton")
    assert out.shape == (*shape[:3], shape[4]) and out.dtype == OUT_DTYPE
    expected = recipe_attention(q.cpu(), k.cpu(), v.cpu(), "smooth_int8")
    exact = exact_attention(q.cpu(), k.cpu(), v.cpu())
    # fp32 against float64, one P tile at a time as in the reference: a P~ within fp32
    # rounding of an e4m3 tie may round the other way (a few 1e-5 of the output); a wrong
    # scale, tile or mask costs 1e-3 and more. bf16 output (GPU): one bf16 rounding.
    assert rel_err(out.cpu(), expected) < (2e-4 if OUT_DTYPE == torch.float32 else 4e-3)
    assert rel_err(out.cpu(), exact) < 0.05
    emulated = attention(q, k, v, "smooth_int8", kernel="emulate")
    assert rel_err(out.cpu(), emulated.cpu()) < (2e-4 if OUT_DTYPE == torch.float32 else 4e-3)


def test_kernel_computes_the_rotated_recipe():
    """With the Hadamard rotation of Q and K (AttentionConfig's default): the kernel is the
    same, its inputs are the rotated codes."""
    q, k, v = qkv(1, 2, 100, 100, 64, seed=2)
    out = attention(q, k, v, "smooth_int8", kernel="triton", rotate=True)
    expected = recipe_attention(q.cpu(), k.cpu(), v.cpu(), "smooth_int8", rotate=True)
    assert rel_err(out.cpu(), expected) < (2e-4 if OUT_DTYPE == torch.float32 else 4e-3)


def test_kernel_output_is_laid_out_for_the_transpose_back():
    """(B, H, S, D) viewed from a (B, S, H, D) buffer, as the pass's other kernels write it."""
    q, k, v = qkv(1, 3, 70, 70, 32)
    quantized = torch.ops.fp8_fx.quantize_attention_inputs(q, k, v, "smooth_int8")
    out = fp8_attention(*quantized, 32 ** -0.5, "smooth_int8", "triton", OUT_DTYPE)
    assert out.transpose(1, 2).is_contiguous()


def test_kernel_reads_v_stored_either_way():
    """The quantization stores V with the tokens contiguous (what Hopper's FP8 MMA reads);
    the kernel takes any strides, so V as the model made it gives the same output."""
    q, k, v = qkv(1, 2, 90, 90, 64, seed=3)
    quantized = list(torch.ops.fp8_fx.quantize_attention_inputs(q, k, v, "smooth_int8"))
    assert quantized[4].stride()[2:] == (1, 96)
    stored = fp8_attention(*quantized, 0.125, "smooth_int8", "triton", OUT_DTYPE)
    quantized[4] = quantized[4].transpose(1, 2).contiguous().transpose(1, 2)  # head dim contiguous
    other = fp8_attention(*quantized, 0.125, "smooth_int8", "triton", OUT_DTYPE)
    # the interpreter computes both alike; a GPU compiles each layout apart (the MMAs may sum in
    # another order: fp32 rounding, then one bf16 rounding of the output)
    assert torch.equal(other, stored) if DEVICE == "cpu" else rel_err(other.cpu(), stored.cpu().float()) < 4e-3


def test_an_explicit_softmax_scale_and_no_queries():
    q, k, v = qkv(1, 2, 64, 100, 64, seed=1)
    out = attention(q, k, v, "smooth_int8", softmax_scale=0.05, kernel="triton")
    assert rel_err(out.cpu(), recipe_attention(q.cpu(), k.cpu(), v.cpu(), "smooth_int8", softmax_scale=0.05)) < (
        2e-4 if OUT_DTYPE == torch.float32 else 4e-3)
    empty = attention(q[:, :, :0], k, v, "smooth_int8", kernel="triton")
    assert empty.shape == (1, 2, 0, 64)


def test_kernel_refuses_what_it_does_not_compute(monkeypatch):
    q, k, v = qkv(1, 1, 8, 8, 32)
    quantized = list(torch.ops.fp8_fx.quantize_attention_inputs(q, k, v, "smooth_int8"))
    with pytest.raises(ValueError, match="computes recipe 'smooth_int8', not 'tensor'"):
        fp8_attention(*quantized, 0.1, "tensor", "triton", OUT_DTYPE)
    with pytest.raises(ValueError, match="at least one key"):
        no_keys = list(torch.ops.fp8_fx.quantize_attention_inputs(q, k[:, :, :0], v[:, :, :0], "smooth_int8"))
        fp8_attention(*no_keys, 0.1, "smooth_int8", "triton", OUT_DTYPE)
    with pytest.raises(ValueError, match="same batch and heads"):  # grouped-query K/V: not read past
        gqa = torch.ops.fp8_fx.quantize_attention_inputs(q.expand(1, 4, 8, 32), k, v, "smooth_int8")
        fp8_attention(*gqa, 0.1, "smooth_int8", "triton", OUT_DTYPE)
    for scale in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="takes a positive softmax scale"):
            fp8_attention(*quantized, scale, "smooth_int8", "triton", OUT_DTYPE)
    quantized[4] = quantized[4][..., :16]  # V's head dim other than Q's
    quantized[5] = quantized[5][..., :16]
    with pytest.raises(ValueError, match="V's head dim"):
        fp8_attention(*quantized, 0.1, "smooth_int8", "triton", OUT_DTYPE)
    huge = torch.zeros(1, 1, 1, 32, dtype=torch.int8, device=DEVICE).expand(1, 4096, 2**14, 32)  # 2^31 values
    scale = torch.ones((), device=DEVICE)
    with pytest.raises(ValueError, match="at most 2\\^31 values of Q, K or V per batch element"):
        triton_attention.sdpa_smooth_int8(huge, scale, huge, scale, huge.view(torch.float8_e4m3fn), scale, 0.1,
                                          torch.empty(0, device=DEVICE))
    if DEVICE == "cpu":
        monkeypatch.setattr(triton_attention, "_INTERPRETED_KERNEL", False)  # the variable set too late
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 was set after fp8_fx was imported"):
            attention(q, k, v, "smooth_int8", kernel="triton")
        monkeypatch.setattr(triton_attention, "interpreting", lambda: False)
        with pytest.raises(RuntimeError, match="runs on CUDA GPUs, not cpu"):
            attention(q, k, v, "smooth_int8", kernel="triton")


def test_self_check_reports_a_kernel_that_fails_or_computes_something_else(monkeypatch):
    """What the pass runs once per GPU and head dim before it picks the kernel."""
    device = torch.device(DEVICE)
    assert triton_attention._compare_with_emulation(device, 64, OUT_DTYPE) is None
    real = triton_attention.sdpa_smooth_int8
    monkeypatch.setattr(triton_attention, "sdpa_smooth_int8", lambda *a: real(*a) * 1.05)
    assert "0.05 away from the recipe's emulation" in triton_attention._compare_with_emulation(device, 64, OUT_DTYPE)

    def cannot_compile(*args):
        raise RuntimeError("PassManager::run failed")
    monkeypatch.setattr(triton_attention, "sdpa_smooth_int8", cannot_compile)
    assert "failed its self-check: RuntimeError: PassManager::run failed" in (
        triton_attention._compare_with_emulation(device, 64, OUT_DTYPE))

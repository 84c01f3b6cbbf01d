"""On a Hopper GPU with nvidia-cudnn-frontend: cuDNN's FP8 attention (recipe "tensor")
against the float64 recipe and the fp32 emulation, and the attention pass choosing it
(and, for "smooth_int8", fp8_fx's Triton kernel: tests/test_triton_attention.py has its numerics).
Skipped elsewhere; run with `pytest -m gpu` on the GPU."""
import pytest
import torch
import torch.nn.functional as F

from fp8_fx import AttentionConfig, FP8Config, make_fp8_backend
from fp8_fx.attention_recipes import attention
from fp8_fx.kernels import cudnn_attention, triton_attention
from attention_reference import exact_attention, recipe_attention
from reference import rel_err

pytestmark = pytest.mark.gpu
CUDA = "cuda"


def _skip_without_kernel():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    reason = cudnn_attention.why_not_device(torch.device(CUDA))
    if reason:
        pytest.skip(reason)


def qkv(b, h, sq, sk, d, k_bias=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=g)  # (B, S, H, D) in memory, as attention modules make them
    k = torch.randn(b, sk, h, d, generator=g) + k_bias * torch.randn(d, generator=g)
    v = torch.randn(b, sk, h, d, generator=g)
    return [t.to(CUDA, torch.bfloat16).transpose(1, 2) for t in (q, k, v)]


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("shape", [
    (1, 4, 1024, 1024, 128),  # Wan's head dim
    (2, 3, 333, 333, 64),     # odd lengths, another head dim
    (1, 2, 700, 77, 128),     # cross-attention: fewer keys than queries
])
def test_cudnn_kernel_computes_the_recipe(rotate, shape):
    _skip_without_kernel()
    q, k, v = qkv(*shape)
    out = attention(q, k, v, "tensor", kernel="cudnn", rotate=rotate)
    assert out.dtype == torch.bfloat16 and out.shape == (*shape[:3], shape[4])
    emulated = attention(q, k, v, "tensor", kernel="emulate", rotate=rotate)
    expected = recipe_attention(q.cpu(), k.cpu(), v.cpu(), "tensor", rotate=rotate)
    exact = exact_attention(q.cpu(), k.cpu(), v.cpu())
    # cuDNN quantizes P against the running row max of its key tiles (the recipe: the
    # final max), so its P codes, and with them O's, round apart from the recipe's: as
    # accurate as the recipe, but not equal to it (measured: 3.5% apart at 6% each).
    recipe_error = rel_err(expected, exact)
    assert rel_err(out.cpu(), exact) < 1.25 * recipe_error + 4e-3
    assert rel_err(out.cpu(), expected) < recipe_error and rel_err(out, emulated) < recipe_error


class Attn(torch.nn.Module):
    def __init__(self, dim=512, heads=4):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v, self.to_out = (torch.nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        q, k, v = (f(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        return x + self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = Attn()

    def forward(self, x):
        return self.attn1(x)


TARGETS = ("to_q", "to_k", "to_v", "to_out")


def test_pass_picks_cudnn_and_the_compiled_block_stays_close_to_bf16():
    _skip_without_kernel()
    torch.manual_seed(0)
    block = Block().to(CUDA, torch.bfloat16).eval()
    x = torch.randn(1, 1000, 512, device=CUDA, dtype=torch.bfloat16)
    backend = make_fp8_backend(FP8Config(targets=TARGETS, attention=AttentionConfig()))
    with torch.no_grad():
        out = torch.compile(block, backend=backend)(x)
        ref = block(x)
    assert [(d.qualname, d.action) for d in backend.report.attention] == [("attn1", "cudnn")]
    assert "cuDNN FP8 SDPA" in backend.report.attention[0].reason
    # FP8 linears and attention against bf16 (the residual carries x through exactly)
    assert rel_err(out, ref) < 0.03


def test_unsupported_shapes_get_a_reason_not_an_error():
    _skip_without_kernel()
    q = torch.zeros(1, 2, 16, 24, device=CUDA, dtype=torch.float8_e4m3fn)  # head dim 24
    assert "head dims 24" in cudnn_attention.why_not(q, q, q, 0.2)
    q, k = (torch.zeros(1, 2, s, 128, device=CUDA, dtype=torch.float8_e4m3fn) for s in (1, 5))
    assert "cuDNN has no FP8 attention plan" in cudnn_attention.why_not(q, k, k, 0.1)  # one query: none on Hopper


def test_varying_sequence_lengths_keep_the_cudnn_kernel():
    """Dynamic shapes (a new resolution): the kernel builds a cuDNN graph per shape."""
    _skip_without_kernel()
    torch.manual_seed(0)
    block = Block().to(CUDA, torch.bfloat16).eval()
    backend = make_fp8_backend(FP8Config(targets=TARGETS, attention=AttentionConfig()))
    compiled = torch.compile(block, backend=backend, dynamic=True)
    with torch.no_grad():
        for tokens in (1000, 1536, 777):
            x = torch.randn(1, tokens, 512, device=CUDA, dtype=torch.bfloat16)
            assert rel_err(compiled(x), block(x)) < 0.03
    assert {d.action for d in backend.report.attention} == {"cudnn"}


def test_pass_picks_the_triton_kernel_for_smooth_int8(monkeypatch):
    """Recipe "smooth_int8" on sm89+: fp8_fx's Triton kernel, compiled and self-checked at
    compile time (kernels/triton_attention.py), in the compiled block; Inductor on the GPU
    hands it V with the tokens contiguous (its FP8 P @ V pipelines V only so)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    reason = triton_attention.why_not_device(torch.device(CUDA))
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    block = Block().to(CUDA, torch.bfloat16).eval()
    x = torch.randn(1, 1000, 512, device=CUDA, dtype=torch.bfloat16)
    backend = make_fp8_backend(FP8Config(targets=TARGETS, attention=AttentionConfig(recipe="smooth_int8")))
    v_strides, kernel = [], triton_attention.sdpa_smooth_int8
    monkeypatch.setattr(triton_attention, "sdpa_smooth_int8",
                        lambda *args, **kwargs: v_strides.append(args[4].stride()) or kernel(*args, **kwargs))
    with torch.no_grad():
        out = torch.compile(block, backend=backend)(x)
        ref = block(x)
    assert [(d.qualname, d.action) for d in backend.report.attention] == [("attn1", "triton")]
    assert rel_err(out, ref) < 0.03
    assert v_strides and v_strides[-1][2] == 1 and v_strides[-1][3] % 16 == 0  # (B, H, S, D): S contiguous

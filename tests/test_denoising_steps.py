"""The per-step attention policy: bf16 attention for the first/last denoising steps, FP8
for the rest, picked per call from the step the caller gives, with no recompile."""
import warnings

import pytest
import torch

from fp8_fx import AttentionConfig, FP8Config, make_fp8_backend
from attention_reference import exact_attention, recipe_attention
from reference import rel_err
from test_attention_pass import Block, inputs


def truth(block, x, ctx, fp8_attention: bool):
    """float64: attn1 through the recipe ("tensor", rotated: the default) or exactly; attn2 exact."""
    with torch.no_grad():
        q, k, v = block.attn1.qkv(x, x)
        attn = recipe_attention(q, k, v, "tensor", rotate=True) if fp8_attention else exact_attention(q, k, v)
        h = x.double() + attn.transpose(1, 2).flatten(2)
        q, k, v = block.attn2.qkv(h.float(), ctx)
        return h + exact_attention(q, k, v).transpose(1, 2).flatten(2)


def compiled_block(first, last):
    torch.manual_seed(0)
    block = Block().eval()
    # targets=(): no FP8 linears, so the only difference between steps is the attention.
    backend = make_fp8_backend(FP8Config(targets=(), fallback="emulate", attention=AttentionConfig(
        bf16_first_steps=first, bf16_last_steps=last)))
    return block, backend, torch.compile(block, backend=backend)


def test_first_and_last_steps_keep_bf16_attention_without_recompiling():
    block, backend, compiled = compiled_block(1, 1)
    x, ctx = inputs()
    torch._dynamo.utils.counters.clear()
    precisions = []
    with torch.no_grad():
        for step in range(5):
            backend.set_step(step, 5)
            out = compiled(x, ctx)
            fp8_err = rel_err(out, truth(block, x, ctx, fp8_attention=True))
            exact_err = rel_err(out, truth(block, x, ctx, fp8_attention=False))
            precisions.append("fp8" if fp8_err < 1e-4 < exact_err else "bf16" if exact_err < 1e-5 else "?")
    assert precisions == ["bf16", "fp8", "fp8", "fp8", "bf16"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph, compiled both ways once
    assert backend.steps.calls == {"fp8": 3, "bf16": 2}
    assert [d.action for d in backend.report.attention] == ["emulate", "skipped"]
    assert "as the model wrote it at the first 1 and last 1 denoising steps" in backend.report.attention[0].reason


class FakePipeline:
    num_timesteps = 3


def test_diffusers_step_callback_tells_the_steps_and_wraps_for_the_next_video():
    block, backend, compiled = compiled_block(2, 0)
    x, ctx = inputs()
    pipe, used = FakePipeline(), []
    callback = backend.step_callback  # what pipe(..., callback_on_step_end=...) gets: steps will come
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no denoising step")  # the callback will tell the steps
        for _video in range(2):
            for step in range(pipe.num_timesteps):  # what a diffusers pipeline does per step
                before = dict(backend.steps.calls)
                compiled(x, ctx)
                used.append("fp8" if backend.steps.calls["fp8"] > before["fp8"] else "bf16")
                assert callback(pipe, step, 999 - step, {"latents": 1}) == {"latents": 1}
    assert used == ["bf16", "bf16", "fp8"] * 2


def test_without_a_policy_one_graph_serves_every_step():
    block, backend, compiled = compiled_block(0, 0)
    x, ctx = inputs()
    with torch.no_grad():
        compiled(x, ctx)
    assert not backend.steps.active and backend.steps.calls == {"fp8": 0, "bf16": 0}


def test_a_policy_without_steps_warns_that_every_forward_is_step_0():
    block, backend, compiled = compiled_block(1, 0)
    x, ctx = inputs()
    with torch.no_grad(), pytest.warns(UserWarning, match="no denoising step was given"):
        compiled(x, ctx)
    assert backend.steps.calls == {"fp8": 0, "bf16": 1}


def test_bad_steps_are_named():
    _, backend, _ = compiled_block(0, 2)
    with pytest.raises(ValueError, match="needs num_steps"):
        backend.set_step(3)
    with pytest.raises(ValueError, match="num_steps must be a whole number > step"):
        backend.set_step(3, 3)
    with pytest.raises(ValueError, match="step must be a whole number >= 0"):
        backend.set_step(-1, 4)
    with pytest.raises(ValueError, match="bf16_first_steps must be a whole number"):
        AttentionConfig(bf16_first_steps=-1)
    with pytest.raises(ValueError, match="bf16_last_steps must be a whole number"):
        AttentionConfig(bf16_last_steps=1.5)

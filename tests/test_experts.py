"""fp8_fx.compile_experts: every transformer of a WanPipeline (Wan 2.2 A14B's two experts, or
Wan 2.1's one) compiled in one call, each with a backend of its own, one report naming the
expert of every record. End to end on CPU with tiny random pipelines, against the eager
bf16 pipeline.

Tolerance: each forward's output is compared with the eager bf16 one of the same call.
FP8 e4m3 (3 mantissa bits, `emulate` here) moves one tiny-Wan forward by ~1% (0.4-1.4%
in test_pipeline_demo / test_lora); each run follows its own trajectory, so later steps
add a little. 3% allows for that; a layer left unconverted, a stale FP8 copy (10-19% in
test_lora) or one expert running the other's weights (different random weights: ~100%)
is far outside it. That FP8 ran at all is shown by the graphs themselves: records that
say `emulate`, and call counters on exactly those graphs (bf16 compiled by Inductor is
itself 0.4-0.5% from eager here, so the error alone could not tell)."""
import warnings
from collections import Counter

import pytest
import torch

for _module, _extra in (("diffusers", "wan"), ("transformers", "pipeline"), ("tokenizers", "pipeline")):
    pytest.importorskip(_module, reason=f"{_module} is not installed: pip install -e '.[{_extra}]'")

import fp8_fx  # noqa: E402
from fp8_fx import pipeline_demo  # noqa: E402
from fp8_fx.wan import build_wan, cast_like_diffusers  # noqa: E402

EMULATE = fp8_fx.FP8Config(fallback="emulate")
STEPS = 3  # UniPC, shift 3: timesteps 999, 857, 600; boundary 0.9 -> transformer 1 step, transformer_2 2
BLOCKS = 2  # the tiny Wan's blocks: one regional graph call per block per forward
TOLERANCE = 0.03


def tiny_pipeline(experts: int = 2):
    """The tiny random WanPipeline (bf16 transformers, as diffusers loads them), with a
    second expert of other random weights for Wan 2.2's layout."""
    pipe = pipeline_demo.build_tiny_pipeline()
    if experts == 2:
        pipe.register_modules(transformer_2=build_wan("tiny", dtype=torch.float32, seed=1))
        pipe.register_to_config(boundary_ratio=0.9)
    for name in ("transformer", "transformer_2")[:experts]:
        cast_like_diffusers(getattr(pipe, name), torch.bfloat16)
    return pipe


class Velocities:
    """Forward hooks on the pipeline's transformers: (expert, output) of every call, in order."""

    def __init__(self, pipe):
        self.calls, self._handles = [], []
        for name in ("transformer", "transformer_2"):
            module = getattr(pipe, name, None)
            if module is not None:
                self._handles.append(module.register_forward_hook(
                    lambda m, a, out, name=name: self.calls.append((name, out[0].detach().float().clone()))))

    def remove(self):
        for h in self._handles:
            h.remove()


def run_pipe(pipe, steps: int = STEPS, **pipe_kwargs):
    """A few denoising steps from fixed text embeddings and noise (no text encoder, no VAE),
    guidance off: one forward per step. Returns [(expert, velocity)] per call."""
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 16, 64, generator=g).bfloat16()
    latents = torch.randn(1, 16, 1, 4, 4, generator=g)
    rec = Velocities(pipe)
    try:
        with torch.no_grad():
            pipe(prompt_embeds=embeds, latents=latents, num_frames=1, height=32, width=32,
                 num_inference_steps=steps, guidance_scale=1.0, output_type="latent", **pipe_kwargs)
    finally:
        rec.remove()
    return rec.calls


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


def assert_close_to_eager(calls, reference, experts):
    assert [n for n, _ in calls] == [n for n, _ in reference] == experts
    for (name, v), (_, ref) in zip(calls, reference):
        err = rel_err(v, ref)
        assert err < TOLERANCE, f"{name}: {err:.4f}"


# 1. two experts, one call


def test_one_call_compiles_both_experts_and_one_report_names_them():
    pipe = tiny_pipeline(2)
    reference = run_pipe(pipe)  # eager bf16
    experts = fp8_fx.compile_experts(pipe, EMULATE)
    assert experts.names == ("transformer", "transformer_2") and experts.regional
    assert experts.fullgraph == {"transformer": True, "transformer_2": True}
    assert experts.report.summary() == ("transformer: not compiled yet (at its first call)\n"
                                        "transformer_2: not compiled yet (at its first call)")

    calls = run_pipe(pipe)
    assert_close_to_eager(calls, reference, ["transformer", "transformer_2", "transformer_2"])
    # each expert's own graph ran, once per block per forward: 1 forward and 2
    assert experts.calls == {"transformer": 1 * BLOCKS, "transformer_2": 2 * BLOCKS}
    assert [len(b.graphs) for b in experts.backends.values()] == [1, 1]

    report = experts.report
    assert Counter(d.graph.model for d in report) == {"transformer": 10, "transformer_2": 10}
    assert {d.action for d in report} == {"emulate"} and len(report) == 20
    assert report[0].graph.model == "transformer" and report[-1].graph.model == "transformer_2"
    names = {e: [d.qualname for d in report.by_expert(e)] for e in ("transformer", "transformer_2")}
    assert names["transformer"] == names["transformer_2"] and names["transformer"][0] == "attn1.to_q"
    assert len(report.graphs) == 2
    text = str(report)
    assert "graph 0 (transformer: WanTransformerBlock, compile" in text
    assert "graph 0 (transformer_2: WanTransformerBlock, compile" in text
    assert "attn1.to_q      emulate" in text
    assert text.endswith("transformer: 1 graph with linears (10 emulate)\n"
                         "transformer_2: 1 graph with linears (10 emulate)")

    before = dict(experts.calls)
    run_pipe(pipe, steps=1)  # t=999: the high-noise expert alone; no recompile
    assert experts.calls == {"transformer": before["transformer"] + BLOCKS, "transformer_2": before["transformer_2"]}
    assert [len(b.graphs) for b in experts.backends.values()] == [1, 1]


def test_the_step_callback_tells_both_experts_from_step_0_on():
    # diffusers calls callback_on_step_end after each step: fetching experts.step_callback
    # must already say that steps will come, or step 0's forward warns "no denoising step".
    pipe = tiny_pipeline(2)
    config = fp8_fx.FP8Config(fallback="emulate", attention=fp8_fx.AttentionConfig(bf16_first_steps=1))
    experts = fp8_fx.compile_experts(pipe, config)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no denoising step")
        run_pipe(pipe, callback_on_step_end=experts.step_callback)
    # step 0 (transformer) keeps bf16 attention; steps 1 and 2 (transformer_2) run FP8 attention
    assert [b.steps.calls for b in experts.backends.values()] == [{"fp8": 0, "bf16": BLOCKS},
                                                                   {"fp8": 2 * BLOCKS, "bf16": 0}]


# 2. one transformer (Wan 2.1), FP8 weights at rest, a per-block exclude


def test_one_transformer_with_fp8_weights_at_rest_and_a_per_block_exclude():
    # convert_to_fp8 sees full paths, so blocks.0's FFN output stays bf16; the backends then
    # run the converted layers only (a per-block entry cannot reach a graph shared by blocks)
    pipe = tiny_pipeline(1)
    reference = run_pipe(pipe, steps=2)
    config = fp8_fx.FP8Config(fallback="emulate", exclude=("blocks.0.ffn.net.2",))
    experts = fp8_fx.compile_experts(pipe, config, fp8_at_rest=True)
    assert experts.names == ("transformer",) and experts.config.targets == ()
    assert Counter(d.action for d in experts.conversions["transformer"]) == {"weight_only": 19, "skipped": 7}
    assert isinstance(pipe.transformer.blocks[0].ffn.net[2], torch.nn.Linear)
    assert isinstance(pipe.transformer.blocks[1].ffn.net[2], fp8_fx.FP8Linear)
    assert fp8_fx.offload.runtime_quantized_weights(pipe.transformer, experts.config) == []

    calls = run_pipe(pipe, steps=2)
    assert_close_to_eager(calls, reference, ["transformer", "transformer"])
    # the two blocks differ, so each has a graph of its own, called once per forward
    assert [Counter(d.action for d in g) for g in experts.report.graphs] == [
        {"emulate": 9, "skipped": 1}, {"emulate": 10}]
    assert experts.backends["transformer"].graph_calls == [2, 2] and experts.calls == {"transformer": 4}
    assert all(d.graph.model == "transformer" for d in experts.report)
    assert "graph 1 (transformer: WanTransformerBlock, compile" in str(experts.report)


# 3. what a user can get wrong (nothing compiles)


def test_compile_experts_refuses_what_it_cannot_compile():
    with pytest.raises(TypeError, match="takes a pipeline"):
        fp8_fx.compile_experts(build_wan("tiny", dtype=torch.float32))

    class NoExperts:
        transformer = None

    with pytest.raises(ValueError, match="has none of"):
        fp8_fx.compile_experts(NoExperts())
    pipe = tiny_pipeline(1)
    with pytest.raises(TypeError, match="takes an FP8Config"):
        fp8_fx.compile_experts(pipe, {"granularity": "row"})
    with pytest.raises(ValueError, match="device= goes with fp8_at_rest=True"):
        fp8_fx.compile_experts(pipe, device="cpu")
    pipe.transformer = torch.compile(pipe.transformer)
    with pytest.raises(ValueError, match="torch.compile'd already"):
        fp8_fx.compile_experts(pipe)

"""Target presets for the diffusers DiTs: chosen from the model's class, each converts that
model's attention projections and feed-forward layers and nothing else, whole-model and
regionally compiled. Tiny random models on CPU, one forward each.

The expected layer sets below are written from diffusers 0.42.1's module trees, not from
fp8_fx/presets.py, so a preset that converts one layer too many or too few fails here.

Inductor is not what these tests check: the pass decides (and the report records) before
Inductor sees the graph, and Inductor's C++ build costs 10-30 s per model on a CPU. So
most tests hand the rewritten graph to the FX interpreter instead (`no_inductor`, the FP8
ops still run, emulated); test_flux_through_inductor keeps one model on the full path.
"""
import contextlib
import dataclasses
import unittest.mock
import warnings

import expecttest
import pytest
import torch

import fp8_fx
import fp8_fx.backend
from fp8_fx import FP8Config, make_fp8_backend, presets

diffusers = pytest.importorskip("diffusers")

# ---- tiny models: 2 heads x 16 = 32 wide, FFN 128 (multiples of 16: FP8 GEMM shapes) ----


def tiny(name):
    """(model, forward kwargs) for a preset's model, 1-2 blocks of each kind."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    t, text = torch.tensor([500.0]), r(1, 8, 32)
    heads = dict(num_attention_heads=2, attention_head_dim=16)
    if name == "flux":
        model = diffusers.FluxTransformer2DModel(in_channels=16, num_layers=1, num_single_layers=1,
                                                 joint_attention_dim=32, pooled_projection_dim=32,
                                                 axes_dims_rope=(4, 6, 6), **heads)
        kwargs = dict(hidden_states=r(1, 16, 16), encoder_hidden_states=text, pooled_projections=r(1, 32),
                      timestep=t / 1000, img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))
    elif name == "sd3":
        # Block 0 has SD3.5's second self-attention (attn2); the last block is context_pre_only.
        model = diffusers.SD3Transformer2DModel(sample_size=8, in_channels=4, out_channels=4, num_layers=2,
                                                joint_attention_dim=32, caption_projection_dim=32,
                                                pooled_projection_dim=32, pos_embed_max_size=8,
                                                dual_attention_layers=(0,), **heads)
        kwargs = dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=text, pooled_projections=r(1, 32),
                      timestep=t)
    elif name == "hunyuan_video":
        model = diffusers.HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_layers=1,
                                                         num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                                         text_embed_dim=32, pooled_projection_dim=32,
                                                         rope_axes_dim=(4, 6, 6), **heads)
        kwargs = dict(hidden_states=r(1, 4, 2, 4, 4), timestep=t, encoder_hidden_states=text,
                      encoder_attention_mask=torch.ones(1, 8), pooled_projections=r(1, 32),
                      guidance=torch.tensor([3.5]))
    elif name == "ltx_video":
        model = diffusers.LTXVideoTransformer3DModel(in_channels=16, out_channels=16, cross_attention_dim=32,
                                                     num_layers=1, caption_channels=32, **heads)
        kwargs = dict(hidden_states=r(1, 2 * 4 * 4, 16), encoder_hidden_states=text, timestep=t,
                      encoder_attention_mask=torch.ones(1, 8), num_frames=2, height=4, width=4)
    elif name == "cogvideox":
        model = diffusers.CogVideoXTransformer3DModel(in_channels=4, out_channels=4, time_embed_dim=32,
                                                      text_embed_dim=32, num_layers=1, sample_width=8,
                                                      sample_height=8, sample_frames=9, max_text_seq_length=8,
                                                      **heads)
        kwargs = dict(hidden_states=r(1, 3, 4, 8, 8), encoder_hidden_states=text, timestep=t)
    elif name == "qwenimage":
        model = diffusers.QwenImageTransformer2DModel(in_channels=16, out_channels=4, num_layers=1,
                                                      joint_attention_dim=32, axes_dims_rope=(4, 6, 6), **heads)
        kwargs = dict(hidden_states=r(1, 16, 16), encoder_hidden_states=text,
                      encoder_hidden_states_mask=torch.ones(1, 8), timestep=t / 1000, img_shapes=[(1, 4, 4)])
    else:
        raise KeyError(name)
    return model.eval(), {**kwargs, "return_dict": False}


# ---- what each model must convert (diffusers 0.42.1 names) ----------------------------------

ATTN = ("to_q", "to_k", "to_v", "to_out.0")
JOINT = ("add_q_proj", "add_k_proj", "add_v_proj")  # the text stream's q/k/v in joint attention
FFN = ("net.0.proj", "net.2")


def under(parent, names):
    return {f"{parent}.{n}" for n in names}


# Flux / HunyuanVideo double-stream block: joint attention, image FFN, text FFN.
DOUBLE = (under("attn", ATTN + JOINT + ("to_add_out",)) | under("ff", FFN) | under("ff_context", FFN))
# Single-stream block: q/k/v (no out projection), the MLP in (proj_mlp) and the shared out (proj_out).
SINGLE = under("attn", ("to_q", "to_k", "to_v")) | {"proj_mlp", "proj_out"}
SD3_FIRST = DOUBLE | under("attn2", ATTN)
SD3_LAST = under("attn", ATTN + JOINT) | under("ff", FFN)  # context_pre_only: no text out / FFN
LTX = under("attn1", ATTN) | under("attn2", ATTN) | under("ff", FFN)
COGVIDEOX = under("attn1", ATTN) | under("ff", FFN)
QWENIMAGE = under("attn", ATTN + JOINT + ("to_add_out",)) | under("img_mlp", FFN) | under("txt_mlp", FFN)

EXPECTED = {
    "flux": under("transformer_blocks.0", DOUBLE) | under("single_transformer_blocks.0", SINGLE),
    "sd3": under("transformer_blocks.0", SD3_FIRST) | under("transformer_blocks.1", SD3_LAST),
    "hunyuan_video": under("transformer_blocks.0", DOUBLE) | under("single_transformer_blocks.0", SINGLE),
    "ltx_video": under("transformer_blocks.0", LTX),
    "cogvideox": under("transformer_blocks.0", COGVIDEOX),
    "qwenimage": under("transformer_blocks.0", QWENIMAGE),
}
MODEL_CLASS = {
    "flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel",
    "hunyuan_video": "HunyuanVideoTransformer3DModel", "ltx_video": "LTXVideoTransformer3DModel",
    "cogvideox": "CogVideoXTransformer3DModel", "qwenimage": "QwenImageTransformer2DModel",
}
# Regional compilation: one graph per block kind, in forward order: (root class, converted).
# HunyuanVideo's compile_repeated_blocks also compiles its text token refiner (an
# embedder: nothing converted) and its patch embedder (a convolution: no linears, no records).
REGIONAL = {
    "flux": [("FluxTransformerBlock", DOUBLE), ("FluxSingleTransformerBlock", SINGLE)],
    "sd3": [("JointTransformerBlock", SD3_FIRST), ("JointTransformerBlock", SD3_LAST)],
    "hunyuan_video": [("HunyuanVideoTokenRefiner", set()), ("HunyuanVideoTransformerBlock", DOUBLE),
                      ("HunyuanVideoSingleTransformerBlock", SINGLE)],
    "ltx_video": [("LTXVideoTransformerBlock", LTX)],
    "cogvideox": [("CogVideoXBlock", COGVIDEOX)],
    "qwenimage": [("QwenImageTransformerBlock", QWENIMAGE)],
}


@contextlib.contextmanager
def no_inductor():
    """The backend hands its rewritten graph to the FX interpreter instead of Inductor."""
    with unittest.mock.patch.object(fp8_fx.backend, "compile_fx", lambda gm, inputs, config_patches=None: gm):
        yield


def run(name, config=None, regional=False, inductor=False):
    """Compile the tiny model with a backend of its own, run it once: (backend, output,
    fp8_fx's warnings)."""
    model, kwargs = tiny(name)
    backend = make_fp8_backend(config or FP8Config(fallback="emulate"))
    if regional and model._repeated_blocks:
        model.compile_repeated_blocks(backend=backend, fullgraph=True, dynamic=False)
    elif regional:  # SD3, CogVideoX have no _repeated_blocks: compile their blocks the same way
        for block in model.transformer_blocks:
            block.compile(backend=backend, fullgraph=True, dynamic=False)
    else:
        model = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    with warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        with contextlib.nullcontext() if inductor else no_inductor():
            out = model(**kwargs)[0]
    return backend, out, [str(w.message) for w in seen if str(w.message).startswith("fp8_fx")]


def converted(records):
    return {d.qualname for d in records if d.converted}


# ---- whole-model compile: the preset from the model's class, and the table --------------------

class TestPresetReports(expecttest.TestCase):
    def check(self, name):
        backend, out, fp8_warnings = run(name)
        (graph,) = backend.report.graphs
        info = graph[0].graph
        assert (info.preset, info.preset_why) == (name, f"from {MODEL_CLASS[name]}")
        assert converted(graph) == EXPECTED[name]
        assert not fp8_warnings and torch.isfinite(out).all()
        return str(backend.report)

    def test_flux(self):
        self.assertExpectedInline(self.check("flux"), """\
preset: flux (from FluxTransformer2DModel)
qualname                                    action   in   out  reason
x_embedder                                  skipped  16   32   not targeted
time_text_embed.timestep_embedder.linear_1  skipped  256  32   not targeted
time_text_embed.timestep_embedder.linear_2  skipped  32   32   not targeted
time_text_embed.text_embedder.linear_1      skipped  32   32   not targeted
time_text_embed.text_embedder.linear_2      skipped  32   32   not targeted
context_embedder                            skipped  32   32   not targeted
transformer_blocks.0.norm1.linear           skipped  32   192  not targeted
transformer_blocks.0.norm1_context.linear   skipped  32   192  not targeted
transformer_blocks.0.attn.to_q              emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.to_k              emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.to_v              emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.add_q_proj        emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.add_k_proj        emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.add_v_proj        emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.to_out.0          emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.to_add_out        emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.ff.net.0.proj          emulate  32   128  no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.ff.net.2               emulate  128  32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.ff_context.net.0.proj  emulate  32   128  no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.ff_context.net.2       emulate  128  32   no FP8 tensor cores on cpu: fallback='emulate'
single_transformer_blocks.0.norm.linear     skipped  32   96   not targeted
single_transformer_blocks.0.proj_mlp        emulate  32   128  no FP8 tensor cores on cpu: fallback='emulate'
single_transformer_blocks.0.attn.to_q       emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
single_transformer_blocks.0.attn.to_k       emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
single_transformer_blocks.0.attn.to_v       emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
single_transformer_blocks.0.proj_out        emulate  160  32   no FP8 tensor cores on cpu: fallback='emulate'
norm_out.linear                             skipped  32   64   not targeted
proj_out                                    skipped  32   16   not targeted
(28 linears: 11 skipped, 17 emulate)""")

    def test_sd3(self):
        self.assertExpectedInline(self.check("sd3"), """\
preset: sd3 (from SD3Transformer2DModel)
qualname                                    action   in   out  reason
time_text_embed.timestep_embedder.linear_1  skipped  256  32   not targeted
time_text_embed.timestep_embedder.linear_2  skipped  32   32   not targeted
time_text_embed.text_embedder.linear_1      skipped  32   32   not targeted
time_text_embed.text_embedder.linear_2      skipped  32   32   not targeted
context_embedder                            skipped  32   32   not targeted
transformer_blocks.0.norm1.linear           skipped  32   288  not targeted
transformer_blocks.0.norm1_context.linear   skipped  32   192  not targeted
transformer_blocks.0.attn.to_q              emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.to_k              emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.to_v              emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.add_q_proj        emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.add_k_proj        emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.add_v_proj        emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.to_add_out        emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.to_out.0          emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn2.to_q             emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn2.to_k             emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn2.to_v             emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn2.to_out.0         emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.ff.net.0.proj          emulate  32   128  no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.ff.net.2               emulate  128  32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.ff_context.net.0.proj  emulate  32   128  no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.ff_context.net.2       emulate  128  32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.1.norm1.linear           skipped  32   192  not targeted
transformer_blocks.1.norm1_context.linear   skipped  32   64   not targeted
transformer_blocks.1.attn.to_q              emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.1.attn.to_k              emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.1.attn.to_v              emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.1.attn.add_q_proj        emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.1.attn.add_k_proj        emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.1.attn.add_v_proj        emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.1.attn.to_out.0          emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.1.ff.net.0.proj          emulate  32   128  no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.1.ff.net.2               emulate  128  32   no FP8 tensor cores on cpu: fallback='emulate'
norm_out.linear                             skipped  32   64   not targeted
proj_out                                    skipped  32   16   not targeted
(36 linears: 11 skipped, 25 emulate)""")

    def test_hunyuan_video(self):
        self.assertExpectedInline(self.check("hunyuan_video"), """\
preset: hunyuan_video (from HunyuanVideoTransformer3DModel)
qualname                                                         action   in   out  reason
time_text_embed.timestep_embedder.linear_1                       skipped  256  32   not targeted
time_text_embed.timestep_embedder.linear_2                       skipped  32   32   not targeted
time_text_embed.text_embedder.linear_1                           skipped  32   32   not targeted
time_text_embed.text_embedder.linear_2                           skipped  32   32   not targeted
time_text_embed.guidance_embedder.linear_1                       skipped  256  32   not targeted
time_text_embed.guidance_embedder.linear_2                       skipped  32   32   not targeted
context_embedder.time_text_embed.timestep_embedder.linear_1      skipped  256  32   not targeted
context_embedder.time_text_embed.timestep_embedder.linear_2      skipped  32   32   not targeted
context_embedder.time_text_embed.text_embedder.linear_1          skipped  32   32   not targeted
context_embedder.time_text_embed.text_embedder.linear_2          skipped  32   32   not targeted
context_embedder.proj_in                                         skipped  32   32   not targeted
context_embedder.token_refiner.refiner_blocks.0.attn.to_q        skipped  32   32   not targeted
context_embedder.token_refiner.refiner_blocks.0.attn.to_k        skipped  32   32   not targeted
context_embedder.token_refiner.refiner_blocks.0.attn.to_v        skipped  32   32   not targeted
context_embedder.token_refiner.refiner_blocks.0.attn.to_out.0    skipped  32   32   not targeted
context_embedder.token_refiner.refiner_blocks.0.norm_out.linear  skipped  32   64   not targeted
context_embedder.token_refiner.refiner_blocks.0.ff.net.0.proj    skipped  32   128  not targeted
context_embedder.token_refiner.refiner_blocks.0.ff.net.2         skipped  128  32   not targeted
transformer_blocks.0.norm1.linear                                skipped  32   192  not targeted
transformer_blocks.0.norm1_context.linear                        skipped  32   192  not targeted
transformer_blocks.0.attn.to_q                                   emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.to_k                                   emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.to_v                                   emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.add_q_proj                             emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.add_k_proj                             emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.add_v_proj                             emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.to_out.0                               emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.to_add_out                             emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.ff.net.0.proj                               emulate  32   128  no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.ff.net.2                                    emulate  128  32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.ff_context.net.0.proj                       emulate  32   128  no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.ff_context.net.2                            emulate  128  32   no FP8 tensor cores on cpu: fallback='emulate'
single_transformer_blocks.0.norm.linear                          skipped  32   96   not targeted
single_transformer_blocks.0.proj_mlp                             emulate  32   128  no FP8 tensor cores on cpu: fallback='emulate'
single_transformer_blocks.0.attn.to_q                            emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
single_transformer_blocks.0.attn.to_k                            emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
single_transformer_blocks.0.attn.to_v                            emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
single_transformer_blocks.0.proj_out                             emulate  160  32   no FP8 tensor cores on cpu: fallback='emulate'
norm_out.linear                                                  skipped  32   64   not targeted
proj_out                                                         skipped  32   4    not targeted
(40 linears: 23 skipped, 17 emulate)""")

    def test_ltx_video(self):
        self.assertExpectedInline(self.check("ltx_video"), """\
preset: ltx_video (from LTXVideoTransformer3DModel)
qualname                                   action   in   out  reason
proj_in                                    skipped  16   32   not targeted
time_embed.emb.timestep_embedder.linear_1  skipped  256  32   not targeted
time_embed.emb.timestep_embedder.linear_2  skipped  32   32   not targeted
time_embed.linear                          skipped  32   192  not targeted
caption_projection.linear_1                skipped  32   32   not targeted
caption_projection.linear_2                skipped  32   32   not targeted
transformer_blocks.0.attn1.to_q            emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn1.to_k            emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn1.to_v            emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn1.to_out.0        emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn2.to_q            emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn2.to_k            emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn2.to_v            emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn2.to_out.0        emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.ff.net.0.proj         emulate  32   128  no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.ff.net.2              emulate  128  32   no FP8 tensor cores on cpu: fallback='emulate'
proj_out                                   skipped  32   16   not targeted
(17 linears: 7 skipped, 10 emulate)""")

    def test_cogvideox(self):
        self.assertExpectedInline(self.check("cogvideox"), """\
preset: cogvideox (from CogVideoXTransformer3DModel)
qualname                             action   in   out  reason
time_embedding.linear_1              skipped  32   32   not targeted
time_embedding.linear_2              skipped  32   32   not targeted
patch_embed.text_proj                skipped  32   32   not targeted
transformer_blocks.0.norm1.linear    skipped  32   192  not targeted
transformer_blocks.0.attn1.to_q      emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn1.to_k      emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn1.to_v      emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn1.to_out.0  emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.norm2.linear    skipped  32   192  not targeted
transformer_blocks.0.ff.net.0.proj   emulate  32   128  no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.ff.net.2        emulate  128  32   no FP8 tensor cores on cpu: fallback='emulate'
norm_out.linear                      skipped  32   64   not targeted
proj_out                             skipped  32   16   not targeted
(13 linears: 7 skipped, 6 emulate)""")

    def test_qwenimage(self):
        self.assertExpectedInline(self.check("qwenimage"), """\
preset: qwenimage (from QwenImageTransformer2DModel)
qualname                                    action   in   out  reason
img_in                                      skipped  16   32   not targeted
txt_in                                      skipped  32   32   not targeted
time_text_embed.timestep_embedder.linear_1  skipped  256  32   not targeted
time_text_embed.timestep_embedder.linear_2  skipped  32   32   not targeted
transformer_blocks.0.img_mod.1              skipped  32   192  not targeted
transformer_blocks.0.txt_mod.1              skipped  32   192  not targeted
transformer_blocks.0.attn.to_q              emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.to_k              emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.to_v              emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.add_q_proj        emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.add_k_proj        emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.add_v_proj        emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.to_out.0          emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.attn.to_add_out        emulate  32   32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.img_mlp.net.0.proj     emulate  32   128  no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.img_mlp.net.2          emulate  128  32   no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.txt_mlp.net.0.proj     emulate  32   128  no FP8 tensor cores on cpu: fallback='emulate'
transformer_blocks.0.txt_mlp.net.2          emulate  128  32   no FP8 tensor cores on cpu: fallback='emulate'
norm_out.linear                             skipped  32   64   not targeted
proj_out                                    skipped  32   16   not targeted
(20 linears: 8 skipped, 12 emulate)""")


# ---- regional compilation: the preset from the block's class, in-block names ------------------

@pytest.mark.parametrize("name", list(REGIONAL))
def test_regional_compilation_converts_the_same_layers(name):
    backend, _, fp8_warnings = run(name, regional=True)
    graphs = [g for g in backend.report.graphs if g]  # a graph without linears has no records
    assert [(g[0].graph.root, converted(g)) for g in graphs] == REGIONAL[name]
    assert {(g[0].graph.preset, g[0].graph.preset_why) for g in graphs} == {
        (name, f"from {root}") for root, _ in REGIONAL[name]}
    assert not fp8_warnings  # the token refiner's graph converts nothing, by the preset: no warning


# ---- choosing: explicit names, fallback, the config ---------------------------------------------

def test_a_named_preset_wins_over_the_class():
    """preset="wan" on Flux: Wan's bare FastVideo names catch q/k/v and nothing else (the
    half-conversion auto avoids)."""
    backend, _, _ = run("flux", FP8Config(fallback="emulate", preset="wan"))
    (graph,) = backend.report.graphs
    assert (graph[0].graph.preset, graph[0].graph.preset_why) == ("wan", "FP8Config(preset='wan')")
    assert converted(graph) == (under("transformer_blocks.0.attn", ("to_q", "to_k", "to_v"))
                                | under("single_transformer_blocks.0.attn", ("to_q", "to_k", "to_v")))


def test_targets_of_your_own_extend_a_preset():
    config = FP8Config(targets=(*presets.get("flux").targets, "x_embedder"), fallback="emulate")
    backend, _, fp8_warnings = run("flux", config)
    assert converted(backend.report) == EXPECTED["flux"] | {"x_embedder"}
    assert backend.report[0].graph.preset == "" and "preset:" not in str(backend.report)
    assert not fp8_warnings  # the preset's fused to_qkv entries match nothing here: not typos


def test_fused_qkv_projections_are_attention_projections():
    model, kwargs = tiny("flux")
    model.fuse_qkv_projections()
    backend = make_fp8_backend(FP8Config(fallback="emulate"))
    with torch.no_grad(), no_inductor():
        torch.compile(model, backend=backend, fullgraph=True)(**kwargs)
    fused = {"transformer_blocks.0.attn.to_qkv", "transformer_blocks.0.attn.to_added_qkv",
             "single_transformer_blocks.0.attn.to_qkv"}
    unfused = under("transformer_blocks.0.attn", ("to_q", "to_k", "to_v", *JOINT)) | under(
        "single_transformer_blocks.0.attn", ("to_q", "to_k", "to_v"))
    assert converted(backend.report) == (EXPECTED["flux"] - unfused) | fused


class Mystery(torch.nn.Module):
    """A DiT no preset knows, with diffusers-style attention names."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.Module()
        self.attn.to_q = torch.nn.Linear(32, 32)
        self.attn.to_out = torch.nn.ModuleList([torch.nn.Linear(32, 32)])
        self.proj_out = torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.proj_out(self.attn.to_out[0](self.attn.to_q(x)))


def test_unknown_classes_fall_back_to_wan_and_warn_once():
    backend = make_fp8_backend(FP8Config(fallback="emulate"))
    x = torch.randn(2, 32)
    with pytest.warns(UserWarning, match=r"no target preset knows this graph's classes \(Mystery\); using the Wan "
                                         r"preset.*FP8Config\(preset=\.\.\.\) \(one of wan, flux, sd3"):
        with torch.no_grad(), no_inductor():
            torch.compile(Mystery().eval(), backend=backend)(x)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same classes again: said once
        with torch.no_grad(), no_inductor():
            torch.compile(Mystery().eval(), backend=backend)(x)
    first = backend.report.graphs[0]
    assert (first[0].graph.preset, first[0].graph.preset_why) == ("wan", "fallback: no preset for Mystery")
    assert converted(first) == {"attn.to_q"}  # FastVideo's bare `to_q`: why it warns
    assert "preset:" not in str(backend.report)  # the Wan preset's tables read as before


def test_config_preset_field():
    auto = FP8Config()
    assert (auto.preset, auto.targets) == ("auto", fp8_fx.WAN_TARGETS)  # no model at hand: Wan's
    assert dataclasses.replace(auto, granularity="row").preset == "auto"
    flux = FP8Config(preset="flux")
    assert flux.targets == presets.get("flux").targets and "single_transformer_blocks.*.proj_out" in flux.targets
    assert "proj_out" not in flux.targets  # the model's final projection is not a block's
    assert dataclasses.replace(flux, fallback="emulate").preset == "flux"
    assert FP8Config(targets=("attn1.to_q",)).preset is None  # your targets: no preset
    with pytest.raises(ValueError, match=r"unknown preset 'flx'; known: 'auto'.*'wan', 'flux', 'sd3', "
                                         r"'hunyuan_video', 'ltx_video', 'cogvideox', 'qwenimage'"):
        FP8Config(preset="flx")
    with pytest.raises(ValueError, match=r"pass preset='flux' or targets=\.\.\., not both"):
        FP8Config(preset="flux", targets=("attn.to_q",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        flux.preset = "sd3"
    # A subclass gets its base class's preset; a block, the block's own names.
    model = type("MyFlux", (diffusers.FluxTransformer2DModel,), {})(
        num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, in_channels=16, axes_dims_rope=(4, 6, 6))
    assert str(presets.for_model(model)) == "flux (from MyFlux, a FluxTransformer2DModel)"
    block = presets.for_model(model.single_transformer_blocks[0])
    assert block.preset.name == "flux" and set(block.targets) == SINGLE | {"attn.to_qkv"}  # fused, if fused


def test_flux_through_inductor():
    """The full path once: Dynamo, the pass, Inductor, one forward close to eager."""
    model, kwargs = tiny("flux")
    with torch.no_grad():
        eager = model(**kwargs)[0]
    backend, out, fp8_warnings = run("flux", inductor=True)
    assert converted(backend.report) == EXPECTED["flux"] and not fp8_warnings
    assert (out - eager).norm() / eager.norm() < 0.05


@pytest.mark.parametrize("name", ["flux", "qwenimage"])
def test_convert_to_fp8_and_calibration_choose_the_preset_as_the_backend_does(name):
    """No graph there: the model's class chooses, as for a whole-model compile."""
    model, kwargs = tiny(name)
    amax = fp8_fx.calibrate_input_amax(model, lambda: model(**kwargs))
    decisions = fp8_fx.convert_to_fp8(model)
    assert converted(decisions) == EXPECTED[name] == set(amax)


@pytest.mark.parametrize("name, modules", [("flux", {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"}),
                                           ("cogvideox", {"transformer_blocks.0.attn1"})])
def test_fp8_attention_targets_the_presets_attention_by_default(name, modules):
    """AttentionConfig() on another DiT: its preset's self/joint attention, not Wan's attn1."""
    backend, _, messages = run(name, FP8Config(fallback="emulate", attention=fp8_fx.AttentionConfig()))
    assert {d.qualname for d in backend.report.attention if d.converted} == modules
    assert not [m for m in messages if "matched no attention call" in m]

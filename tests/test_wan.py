"""The real Wan DiT (diffusers' WanTransformer3DModel, tiny config) end to end on CPU:
compile, decisions, fidelity, the denoising demo, checkpoints and the inspect CLI."""
import json

import pytest
import torch

pytest.importorskip("diffusers")

from fp8_fx import FP8Config, make_fp8_backend  # noqa: E402
from fp8_fx.demo import denoise, main as demo_main  # noqa: E402
from fp8_fx.inspect_graph import capture_graph, main as inspect_main  # noqa: E402
from fp8_fx.passes.linear import rewrite_linears  # noqa: E402
from fp8_fx.wan import CheckpointError, build_wan, load_wan  # noqa: E402
from reference import rel_err  # noqa: E402
from wan_checkpoints import save_diffusers_file, save_original_wan_file  # noqa: E402

BLOCK_LINEARS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                 "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"]
EXPECTED = [f"blocks.{i}.{name}" for i in range(2) for name in BLOCK_LINEARS]


def inputs(dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 3, 16, 16, generator=g).to(dtype), torch.tensor([700]),
            torch.randn(1, 16, 64, generator=g).to(dtype))


def forward(model, x, t, text):
    with torch.no_grad():
        return model(x, t, text, return_dict=False)[0]


def test_tiny_wan_converts_exactly_the_block_linears_and_stays_close():
    model = build_wan("tiny", dtype=torch.float32)
    backend = make_fp8_backend(FP8Config(fallback="emulate"))
    x, t, text = inputs(torch.float32)
    y = forward(torch.compile(model, backend=backend, fullgraph=True), x, t, text)
    assert [d.qualname for d in backend.report if d.converted] == EXPECTED
    skipped = {d.qualname for d in backend.report if not d.converted}
    assert skipped == {"condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2",
                       "condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1",
                       "condition_embedder.text_embedder.linear_2", "proj_out"}
    ref = forward(model, x, t, text)
    err = rel_err(y, ref)
    # e4m3 keeps 3 mantissa bits: each operand carries up to 2^-4 relative rounding error
    # (RMS about 2%), which averages down over each dot product; through 2 blocks with
    # residuals we measure ~0.5-1%. 5% still catches a wrong scale (errors of order 1),
    # and > 1e-3 (fp32 model, fp32 reference) proves quantization really happened.
    assert 1e-3 < err < 5e-2
    cos = torch.nn.functional.cosine_similarity(y.flatten().double(), ref.flatten().double(), dim=0)
    assert cos > 0.999


def test_regional_compilation_compiles_one_graph_for_every_block():
    # diffusers' compile_repeated_blocks: one compiled block graph serves every block,
    # each with its own weights (fed per call): same output as compiling the whole DiT.
    import copy
    whole = build_wan("tiny", dtype=torch.float32)
    regional = copy.deepcopy(whole)
    x, t, text = inputs(torch.float32)
    y_whole = forward(torch.compile(whole, backend=make_fp8_backend(FP8Config(fallback="emulate")),
                                    fullgraph=True), x, t, text)
    torch._dynamo.reset()
    backend = make_fp8_backend(FP8Config(fallback="emulate"))
    regional.compile_repeated_blocks(backend=backend, fullgraph=True)
    y = forward(regional, x, t, text)
    assert len(backend.graphs) == 1
    assert [d.qualname for d in backend.report if d.converted] == [
        q[len("blocks.0."):] for q in EXPECTED if q.startswith("blocks.0.")]
    # Different Inductor fusions move a few fp8 roundings (~1e-3); block 1 running block
    # 0's weights would be off by order 1.
    assert rel_err(y, y_whole) < 5e-3
    assert rel_err(y, forward(whole, x, t, text)) < 5e-2


def test_three_step_denoising_loop_runs():
    model = build_wan("tiny")
    compiled = torch.compile(model, backend=make_fp8_backend())
    x, _, text = inputs()
    final, velocities, seconds = denoise(compiled, x.float(), text, steps=3, shift=5.0,
                                         dtype=torch.bfloat16, desc="test")
    assert final.shape == x.shape and torch.isfinite(final).all()
    assert len(velocities) == len(seconds) == 3
    assert not torch.equal(final, x.float())


def test_demo_json_has_every_field(tmp_path):
    out = tmp_path / "demo.json"
    plot = tmp_path / "err.png"
    code = demo_main(["--steps", "2", "--frames", "5", "--height", "64", "--width", "64", "--device", "cpu",
                      "--json", str(out), "--plot", str(plot)])
    assert code == 0
    r = json.loads(out.read_text())
    for key in ("model", "device", "dtype", "granularity", "frames", "height", "width", "steps", "seed",
                "tokens", "torch", "report", "report_table", "bf16", "fp8", "speedup", "fidelity"):
        assert key in r, key
    for run in ("bf16", "fp8"):
        assert {"step_ms", "compile_s", "first_step_s", "steps_s"} <= set(r[run])
    assert len(r["fidelity"]["per_step"]) == 2
    assert {"psnr_db", "ssim", "rel_err", "cosine"} == set(r["fidelity"]["final"])
    assert r["fidelity"]["final"]["cosine"] > 0.99
    assert sum(d["action"] == "emulate" for d in r["report"]) == 20
    assert plot.stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["--model", "7B"], "unknown --model"),
    (["--frames", "6"], "4k+1"),
    (["--height", "100"], "multiple of 16"),
    (["--checkpoint", "/nonexistent/wan"], "does not exist"),
    (["--steps", "0"], "at least 1"),
])
def test_demo_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        demo_main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_and_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    model = build_wan("tiny", seed=3)
    model.save_pretrained(root / "diffusers_folder")
    save_diffusers_file(model, root / "diffusers.safetensors")
    save_original_wan_file(model, root / "wan2.1.safetensors")
    return model, root


@pytest.mark.parametrize("name", ["diffusers_folder", "diffusers.safetensors", "wan2.1.safetensors"])
def test_local_checkpoints_load_exactly_and_compile(tiny_and_checkpoints, name):
    model, root = tiny_and_checkpoints
    loaded = load_wan(root / name)
    # tensors of their own, not views into the file's buffer (Inductor compiles CPU
    # kernels for aligned inputs: a misaligned weight compiled to other numerics)
    assert all(t.data_ptr() % 64 == 0 for t in [*loaded.parameters(), *loaded.buffers()])
    x, t, text = inputs(seed=1)
    assert torch.equal(forward(loaded, x, t, text), forward(model, x, t, text))
    backend = make_fp8_backend()
    y = forward(torch.compile(loaded, backend=backend), x, t, text)
    assert [d.qualname for d in backend.report if d.converted] == EXPECTED
    assert rel_err(y, forward(model, x, t, text)) < 5e-2


def test_bad_checkpoints_give_clear_errors(tmp_path):
    from safetensors.torch import save_file
    with pytest.raises(CheckpointError, match="not found"):
        load_wan(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_wan(tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_wan(tmp_path / "junk.safetensors")
    save_file({"some.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a Wan transformer"):
        load_wan(tmp_path / "other.safetensors")
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="expected a .safetensors"):
        load_wan(tmp_path / "model.bin")


def test_i2v_image_kv_projections_are_not_targeted_by_default():
    from diffusers import WanTransformer3DModel
    from fp8_fx.wan import WAN_CONFIGS
    torch.manual_seed(0)
    model = WanTransformer3DModel(**WAN_CONFIGS["tiny"], image_dim=32, added_kv_proj_dim=64).eval()
    x, t, text = inputs(torch.float32)
    gm = capture_graph(model, x, t, text, encoder_hidden_states_image=torch.randn(1, 4, 32),
                       return_dict=False)
    decisions = {d.qualname: d for d in rewrite_linears(gm, FP8Config()).decisions}
    assert decisions["blocks.0.attn2.add_k_proj"].reason == "not targeted"
    assert decisions["blocks.0.attn2.add_v_proj"].reason == "not targeted"
    assert decisions["blocks.0.attn2.to_k"].converted


def test_inspect_cli_prints_table_and_rewritten_block(capsys):
    assert inspect_main(["--gpu"]) == 0
    out = capsys.readouterr().out
    assert "blocks.0.attn1.to_q" in out and "scaled_mm" in out and "(26 linears: 6 skipped, 20 scaled_mm)" in out
    graph = out.split("Rewritten graph")[1]
    assert "torch.ops.fp8_fx.quantize.default" in graph and "torch.ops.fp8_fx.scaled_mm.default" in graph
    assert "blocks_1_" not in graph  # one block unless --full
    # The diffusers block's library-fed inputs (attention outputs through permute/flatten/
    # type_as, GELU through eval dropout) get fp8_fx's Triton kernels on the GPU path.
    assert "torch.ops.fp8_fx.triton_quantize.default(blocks_0_ffn_net_0_proj, 'tensor', 'gelu_tanh')" in graph
    assert graph.count("torch.ops.fp8_fx.triton_quantize.default(") == 4  # 2 attention outputs, context, GELU
    assert graph.count("torch.ops.fp8_fx.quantize.default(") == 3  # the three LayerNorm outputs

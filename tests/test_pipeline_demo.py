"""`python -m fp8_fx demo --pipeline PATH --prompt ...`: the whole WanPipeline (text encoder,
transformer, VAE) in bf16 and in FP8, end to end on the CPU on a tiny random pipeline saved
to a folder (tokenizer and umT5 encoder built offline); the side-by-side video decodes, the
numbers are sane; a folder that is not a Wan pipeline and missing packages are named."""
import json
import math
import shutil
import warnings
from collections import Counter

import pytest
import torch

for _module, _extra in (("diffusers", "wan"), ("skimage", "wan"), ("transformers", "pipeline"),
                        ("tokenizers", "pipeline"), ("av", "pipeline")):
    pytest.importorskip(_module, reason=f"{_module} is not installed: pip install -e '.[{_extra}]'")

import av  # noqa: E402
import numpy as np  # noqa: E402

from fp8_fx import pipeline_demo  # noqa: E402
from fp8_fx.demo import main as demo_main  # noqa: E402
from test_cli_messages import no_compile, rejected  # noqa: E402,F401 - the demo's own CLI test helpers

SIZES = ["--frames", "5", "--height", "32", "--width", "48", "--steps", "2"]
SMALL = [*SIZES, "--device", "cpu"]  # the CPU's behaviour (the emulation) on any machine


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    return pipeline_demo.save_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "tiny_wan")


def decode(path):
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


# 1. end to end


def test_pipeline_demo_end_to_end_on_a_tiny_random_pipeline(tiny_pipeline, tmp_path, capsys):
    video, out, png = tmp_path / "side_by_side.mp4", tmp_path / "result.json", tmp_path / "err.png"
    argv = ["--pipeline", str(tiny_pipeline), "--prompt", "a red fox runs through fresh snow", *SMALL,
            "--video", str(video), "--json", str(out), "--plot", str(png)]
    assert demo_main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {video}" in printed and "left: bf16, right: FP8" in printed
    assert "PSNR mean" in printed and "SSIM mean" in printed and "ms/step" in printed
    assert "these times measure the fp32 emulation" in printed  # CPU: no speed claim
    assert png.stat().st_size > 0

    # the video: browser-playable H.264, the frames asked for, two panels side by side
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
    frames = decode(video)
    assert frames.shape == (5, 32, 2 * 48, 3)
    left, right = frames[..., :48, :].astype(float), frames[..., 48:, :].astype(float)
    assert left.std() > 1  # a picture, not a blank
    assert np.abs(left - right).mean() < 10  # FP8 is close to bf16, through H.264 too

    r = json.loads(out.read_text())
    assert r["frames"] == 5 and r["steps"] == 2 and r["dtype"] == "bf16" and r["fallback"] == "emulate"
    assert r["video"]["path"] == str(video) and (r["video"]["width"], r["video"]["height"]) == (96, 32)
    assert r["report_counts"] == {"emulate": 20, "skipped": 6}
    steps = r["fidelity"]["per_step"]
    assert [s["step"] for s in steps] == [0, 1]
    for s in steps:  # FP8 vs bf16 velocity: finite, FP8-sized (e4m3: ~1%), same direction
        assert s["finite"] and 0 < s["rel_err"] < 0.1 and 0.99 < s["cosine"] <= 1
        assert s["baseline_s"] > 0 and s["fp8_s"] > 0
    f = r["fidelity"]["frames"]
    assert len(f["psnr_db"]) == len(f["ssim"]) == 5
    assert all(math.isfinite(p) and 20 < p < 120 for p in f["psnr_db"])  # differ, but a little
    assert all(0.9 < s <= 1 for s in f["ssim"])
    assert f["psnr_db_min"] == min(f["psnr_db"]) and f["ssim_mean"] == pytest.approx(np.mean(f["ssim"]))
    for run in ("bf16", "fp8"):
        assert len(r[run]["steps_s"]) == 2 and r[run]["step_ms"] > 0 and r[run]["pipeline_s"] > 0


@pytest.mark.gpu
def test_pipeline_demo_end_to_end_on_the_gpu(tiny_pipeline, tmp_path, capsys):
    """The same pipeline on a GPU with FP8 tensor cores: FP8 GEMMs (scaled_mm), a speed line,
    the video and the numbers as sane as on the CPU."""
    video, out = tmp_path / "side_by_side.mp4", tmp_path / "result.json"
    argv = ["--pipeline", str(tiny_pipeline), "--prompt", "a red fox runs through fresh snow", *SIZES,
            "--device", "cuda", "--video", str(video), "--json", str(out)]
    assert demo_main(argv) == 0
    printed = capsys.readouterr().out
    assert "speedup fp8 vs bf16 compiled" in printed and "emulation" not in printed
    r = json.loads(out.read_text())
    assert r["device"].startswith("cuda") and r["report_counts"] == {"scaled_mm": 20, "skipped": 6}
    for s in r["fidelity"]["per_step"]:
        assert s["finite"] and 0 < s["rel_err"] < 0.1 and 0.99 < s["cosine"] <= 1
    f = r["fidelity"]["frames"]
    assert all(math.isfinite(p) and 20 < p < 120 for p in f["psnr_db"]) and all(0.9 < s <= 1 for s in f["ssim"])
    assert decode(video).shape == (5, 32, 2 * 48, 3)


def test_two_experts_each_get_an_fp8_backend_of_their_own(tmp_path, capsys):
    # Wan 2.2 A14B's layout: transformer (high noise) and transformer_2 (low noise), split by
    # boundary_ratio. With shift 3 the timesteps are 999, 857, 600: 0.9 gives each expert steps.
    from fp8_fx.wan import build_wan
    pipe = pipeline_demo.build_tiny_pipeline()
    pipe.register_modules(transformer_2=build_wan("tiny", dtype=torch.float32, seed=1))
    pipe.register_to_config(boundary_ratio=0.9)
    pipe.save_pretrained(str(tmp_path / "a14b_like"))
    out = tmp_path / "r.json"
    argv = ["--pipeline", str(tmp_path / "a14b_like"), "--prompt", "two experts", "--frames", "1",
            "--height", "32", "--width", "32", "--steps", "3", "--guidance-scale", "1", "--baseline", "eager",
            "--video", str(tmp_path / "v.mp4"), "--json", str(out), "--attention", "tensor",
            "--attention-bf16-steps", "1,0"]
    with warnings.catch_warnings():  # the demo tells both experts the steps, from step 0 on
        warnings.filterwarnings("error", message=".*no denoising step")
        assert demo_main(argv) == 0
    assert "transformer, transformer_2" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["transformers"] == ["transformer", "transformer_2"] and r["shift"] == 3.0
    assert Counter(d["transformer"] for d in r["report"]) == {"transformer": 26, "transformer_2": 26}
    assert all(s["finite"] and s["rel_err"] < 0.1 for s in r["fidelity"]["per_step"])
    assert decode(tmp_path / "v.mp4").shape == (1, 32, 64, 3)


def test_shift_replaces_the_schedulers_only_when_given(tiny_pipeline):
    from fp8_fx.demo import build_parser
    base = ["--pipeline", str(tiny_pipeline), "--prompt", "x"]
    assert "shift" not in pipeline_demo.given_options(build_parser(), base)  # the demo's 5.0 is a default
    assert "shift" in pipeline_demo.given_options(build_parser(), [*base, "--shift", "7"])
    pipe = pipeline_demo.load_pipeline(tiny_pipeline, torch.bfloat16)
    assert pipe.scheduler.config.flow_shift == 3.0 and pipe.vae.dtype == torch.float32
    pipeline_demo._set_shift(pipe, 7.0)
    assert pipe.scheduler.config.flow_shift == 7.0


# 2. the pieces


def test_a_video_against_itself_is_identical():
    rng = np.random.default_rng(0)
    video = rng.random((3, 24, 32, 3)).astype(np.float32)
    same = pipeline_demo.video_metrics(video, video.copy())
    assert same["psnr_db"] == [math.inf] * 3 and same["ssim"] == pytest.approx([1.0] * 3)
    noisy = np.clip(video + rng.normal(0, 0.01, video.shape), 0, 1)
    other = pipeline_demo.video_metrics(noisy, video)
    assert all(35 < p < 45 for p in other["psnr_db"]) and all(s < 1 for s in other["ssim"])  # 0.01 rms: 40 dB


def test_side_by_side_video_round_trip(tmp_path):
    black, white = np.zeros((3, 16, 24, 3)), np.ones((3, 16, 24, 3))
    info = pipeline_demo.write_side_by_side(tmp_path / "v.mp4", black, white, fps=8)
    assert (info["frames"], info["width"], info["height"]) == (3, 48, 16)
    frames = decode(tmp_path / "v.mp4")
    assert frames.shape == (3, 16, 48, 3)
    assert frames[:, :, :20].max() < 20 and frames[:, :, 28:].min() > 235  # left black, right white


def test_save_tiny_pipeline_writes_a_loadable_wan_pipeline(tiny_pipeline):
    from diffusers import WanPipeline
    assert json.loads((tiny_pipeline / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    pipe = WanPipeline.from_pretrained(str(tiny_pipeline), local_files_only=True)
    assert pipe.text_encoder.config.d_model == pipe.transformer.config.text_dim
    ids = pipe.tokenizer(["ünïcode prompt, 🦊"], return_tensors="pt").input_ids
    assert ids[0, -1] == 1 and (ids != 2).all()  # ends with </s>; no <unk>: every byte has an id


# 3. what a user can get wrong


def test_pipeline_needs_a_prompt(tiny_pipeline, no_compile, capsys):
    err = rejected(["--pipeline", str(tiny_pipeline), *SMALL], capsys)
    assert "--pipeline needs --prompt" in err


def test_pipeline_rejects_a_folder_without_model_index(tmp_path, no_compile, capsys):
    err = rejected(["--pipeline", str(tmp_path), "--prompt", "x", *SMALL], capsys)
    assert "has no model_index.json: not a diffusers pipeline folder" in err and "save_tiny_pipeline" in err


def test_pipeline_points_a_transformer_folder_to_checkpoint(tmp_path, no_compile, capsys):
    (tmp_path / "config.json").write_text("{}")
    err = rejected(["--pipeline", str(tmp_path), "--prompt", "x", *SMALL], capsys)
    assert "single model folder" in err and "use --checkpoint PATH" in err


def test_pipeline_rejects_another_pipeline_class(tmp_path, no_compile, capsys):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline"}))
    err = rejected(["--pipeline", str(tmp_path), "--prompt", "x", *SMALL], capsys)
    assert "holds a WanImageToVideoPipeline, not a WanPipeline" in err


def test_pipeline_names_a_missing_component(tiny_pipeline, tmp_path, no_compile, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipeline, broken)
    shutil.rmtree(broken / "vae")
    err = rejected(["--pipeline", str(broken), "--prompt", "x", *SMALL], capsys)
    assert "the WanPipeline is missing vae" in err


def test_pipeline_reports_a_component_that_does_not_load(tiny_pipeline, tmp_path, no_compile, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipeline, broken)
    (broken / "text_encoder" / "model.safetensors").write_bytes(b"not safetensors")
    assert demo_main(["--pipeline", str(broken), "--prompt", "x", *SMALL]) == 2
    assert "error: could not load the WanPipeline from" in capsys.readouterr().err


def test_pipeline_checks_sizes_against_its_own_vae_and_patch(tmp_path, no_compile, capsys):
    from diffusers import WanTransformer3DModel
    from fp8_fx.wan import WAN_CONFIGS
    pipe = pipeline_demo.build_tiny_pipeline()
    pipe.register_modules(transformer=WanTransformer3DModel(**{**WAN_CONFIGS["tiny"], "patch_size": (1, 4, 4)}))
    pipe.save_pretrained(str(tmp_path / "patch4"))
    assert demo_main(["--pipeline", str(tmp_path / "patch4"), "--prompt", "x", *SMALL]) == 2  # 32 x 48
    assert "--width 48: this pipeline needs a multiple of 32 (VAE 8x x patch 4)" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--checkpoint", "x.safetensors"), ("--model", "1.3B"),
                                        ("--text-embeds", "t.pt")])
def test_pipeline_rejects_dit_only_options(flag, value, tiny_pipeline, no_compile, capsys):
    err = rejected(["--pipeline", str(tiny_pipeline), "--prompt", "x", flag, value, *SMALL], capsys)
    assert f"{flag} does not go with --pipeline" in err


def test_pipeline_names_missing_packages_and_the_extra(tiny_pipeline, monkeypatch, no_compile, capsys):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("av", "transformers")
                        else find_spec(name, *a))
    err = rejected(["--pipeline", str(tiny_pipeline), "--prompt", "x", *SMALL], capsys)
    assert "--pipeline needs transformers, av (not installed)" in err and "pip install -e '.[pipeline]'" in err


def test_pipeline_wants_an_mp4_in_an_existing_folder(tiny_pipeline, tmp_path, no_compile, capsys):
    base = ["--pipeline", str(tiny_pipeline), "--prompt", "x", *SMALL]
    assert "give a .mp4 path" in rejected([*base, "--video", str(tmp_path / "v.avi")], capsys)
    missing = tmp_path / "missing" / "v.mp4"
    assert f"the folder {missing.parent} does not exist" in rejected([*base, "--video", str(missing)], capsys)


def test_demo_help_lists_the_pipeline_options(capsys):
    from fp8_fx.__main__ import main as fp8_fx_main
    with pytest.raises(SystemExit) as e:
        fp8_fx_main(["demo", "--help"])
    assert e.value.code == 0
    shown = capsys.readouterr().out
    assert "--pipeline PATH" in shown and "--prompt" in shown and "--video" in shown
    assert fp8_fx_main([]) == 2 and "demo --pipeline PATH --prompt TEXT" in capsys.readouterr().err

"""The demo and inspect CLIs reject bad arguments with exit status 2 and a message that
names the problem and the fix, before building or compiling anything; the demo labels its
baseline by the dtype it ran in; both open fp8_fx's own FP8 checkpoints."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

import fp8_fx  # noqa: E402
from fp8_fx.demo import main as demo_main  # noqa: E402
from fp8_fx.inspect_graph import main as inspect_main  # noqa: E402
from fp8_fx.wan import build_wan, load_wan, load_wan_fp8  # noqa: E402

# --device cpu: these check the CPU's behaviour (the emulation, no speed claim) on any machine
TINY = ["--steps", "1", "--frames", "1", "--height", "16", "--width", "16", "--device", "cpu"]


@pytest.fixture
def no_compile(monkeypatch):
    """Fail loudly (and at once) if the demo gets as far as compiling."""
    def compile(*args, **kwargs):
        raise AssertionError("the demo compiled before rejecting its arguments")
    monkeypatch.setattr(torch, "compile", compile)


def rejected(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        demo_main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    model = build_wan("tiny")
    fp8_fx.convert_to_fp8(model)
    path = tmp_path_factory.mktemp("fp8") / "tiny_fp8.safetensors"
    fp8_fx.save_fp8_checkpoint(model, path)
    return path


# 1. --device


def test_demo_rejects_an_unknown_device(no_compile, capsys):
    err = rejected([*TINY, "--device", "cpux"], capsys)  # the last --device wins
    assert "--device 'cpux' is not a torch device" in err and "use cpu, cuda or cuda:N" in err


# 2. --text-embeds


def test_demo_rejects_text_embeds_of_the_wrong_shape_before_building(no_compile, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("fp8_fx.demo.build_wan", lambda *a, **k: pytest.fail("built the model first"))
    path = tmp_path / "text.pt"
    torch.save(torch.randn(1, 16, 32), path)  # tiny's text_dim is 64
    err = rejected(["--text-embeds", str(path), *TINY], capsys)
    assert "has shape (1, 16, 32)" in err and "(1, tokens, text_dim) = (1, tokens, 64)" in err
    torch.save(torch.randn(16, 64), path)  # no batch dimension
    assert "(1, tokens, 64)" in rejected(["--text-embeds", str(path), *TINY], capsys)


def test_demo_checks_text_embeds_against_a_checkpoints_text_dim_before_compiling(
        no_compile, fp8_checkpoint, tmp_path, capsys):
    path = tmp_path / "text.pt"
    torch.save(torch.randn(1, 16, 4096), path)  # a real Wan's width, for the tiny checkpoint
    assert demo_main(["--checkpoint", str(fp8_checkpoint), "--text-embeds", str(path), *TINY]) == 2
    assert "expects (1, tokens, text_dim) = (1, tokens, 64)" in capsys.readouterr().err


def test_demo_rejects_text_embeds_that_are_not_a_tensor_file(no_compile, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    err = rejected(["--text-embeds", str(junk), *TINY], capsys)
    assert "torch.load cannot read it" in err and "torch.save(tensor, path)" in err
    holder = tmp_path / "dict.pt"
    torch.save({"embeds": torch.randn(1, 16, 64)}, holder)
    err = rejected(["--text-embeds", str(holder), *TINY], capsys)
    assert "holds a dict, not a tensor" in err and "torch.save the (1, tokens, text_dim)" in err


# 3. --json / --plot


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_demo_rejects_an_output_in_a_missing_folder_before_running(flag, no_compile, tmp_path, capsys):
    out = tmp_path / "missing" / "out.file"
    err = rejected([flag, str(out), *TINY], capsys)
    assert f"the folder {out.parent} does not exist" in err and "mkdir -p" in err


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_demo_rejects_an_output_in_a_read_only_folder_before_running(flag, no_compile, monkeypatch, tmp_path,
                                                                     capsys):
    # chmod does not stop root (these tests may run as root): pretend the folder is read-only
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != tmp_path and access(p, mode, **k))
    err = rejected([flag, str(tmp_path / "out.file"), *TINY], capsys)
    assert f"the folder {tmp_path} is not writable" in err


def test_demo_rejects_an_output_path_that_is_a_folder(no_compile, tmp_path, capsys):
    err = rejected(["--json", str(tmp_path), *TINY], capsys)
    assert "is a folder; give a file path" in err


# 4. --shift


@pytest.mark.parametrize("shift", ["-1", "0"])
def test_demo_rejects_a_shift_that_is_not_positive(shift, no_compile, capsys):
    err = rejected(["--shift", shift, *TINY], capsys)
    assert "--shift must be > 0" in err and "Wan uses 5.0" in err


@pytest.mark.parametrize("steps", ["2", "a,b", "1,2,3"])
def test_demo_rejects_attention_bf16_steps_that_are_not_two_numbers(steps, no_compile, capsys):
    err = rejected(["--attention", "tensor", "--attention-bf16-steps", steps, *TINY], capsys)
    assert "--attention-bf16-steps takes FIRST,LAST" in err


# 5. the baseline's label


def test_demo_labels_the_baseline_by_its_dtype(monkeypatch, tmp_path, capsys):
    # Eager instead of compiled: this is about labels, and two compiles take a minute here.
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)
    out = tmp_path / "demo.json"
    assert demo_main(["--dtype", "fp32", "--json", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "  fp32 compiled" in printed and "speedup" not in printed  # on CPU: the emulation, no speed claim
    assert "Fidelity of FP8 against fp32" in printed and "bf16" not in printed.split("Time per step")[1]
    r = json.loads(out.read_text())
    assert r["baseline"] == r["baseline_dtype"] == "fp32" and r["fp8_weights_at_rest"] is False
    assert "step_ms" in r["bf16"]  # the old key still holds the baseline run


# 6. fp8_fx's own FP8 checkpoint


def test_load_wan_keeps_an_fp8_checkpoint_fp8(fp8_checkpoint):
    model = load_wan(fp8_checkpoint, dtype=torch.float16)
    linear = model.blocks[0].attn1.to_q
    assert isinstance(linear, fp8_fx.FP8Linear) and linear.weight.dtype == torch.float8_e4m3fn
    assert linear.weight_scale.dtype == torch.float32 and linear.bias.dtype == torch.float16
    assert model.proj_out.weight.dtype == torch.float16


def test_inspect_and_demo_open_an_fp8_checkpoint(fp8_checkpoint, tmp_path, capsys):
    assert inspect_main(["--checkpoint", str(fp8_checkpoint)]) == 0
    assert "(26 linears: 6 skipped, 20 weight_only)" in capsys.readouterr().out
    out = tmp_path / "demo.json"
    assert demo_main(["--checkpoint", str(fp8_checkpoint), "--dtype", "fp16", "--json", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "the baseline run (fp16+fp8w) is the weight-only FP8 model" in printed
    assert "  fp16+fp8w compiled" in printed
    r = json.loads(out.read_text())
    assert r["baseline_dtype"] == "fp16" and r["fp8_weights_at_rest"] is True
    assert r["fidelity"]["final"]["cosine"] > 0.99


# 7. inspect on the meta device


def test_inspect_on_meta_says_to_pass_gpu(capsys):
    assert inspect_main(["--model", "1.3B"]) == 0
    assert "pass --gpu" in capsys.readouterr().out


# 8. messages fixed elsewhere


def test_wan_is_reachable_from_the_package():
    code = "import fp8_fx; print(fp8_fx.wan.load_wan)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert "function load_wan" in done.stdout


def test_load_wan_fp8_says_a_folder_is_a_folder(tmp_path):
    with pytest.raises(fp8_fx.FP8CheckpointError, match="is a folder"):
        load_wan_fp8(tmp_path)


def test_save_fp8_checkpoint_names_a_missing_folder(tmp_path):
    model = build_wan("tiny")
    fp8_fx.convert_to_fp8(model)
    with pytest.raises(FileNotFoundError, match=re.escape(f"the folder {tmp_path / 'missing'} does not exist")):
        fp8_fx.save_fp8_checkpoint(model, tmp_path / "missing" / "x.safetensors")


def test_load_wan_fp8_points_a_bf16_file_to_load_wan(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "bf16.safetensors"
    save_file({k: v.contiguous() for k, v in build_wan("tiny").state_dict().items()}, str(path))
    with pytest.raises(fp8_fx.FP8CheckpointError, match=r"fp8_fx\.wan\.load_wan"):
        load_wan_fp8(path)

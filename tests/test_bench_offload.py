"""benchmarks/bench_offload.py's logic, dry-run on the CPU with tiny experts, so a GPU
session does not spend its minutes on a script error (a mode once fell through to
`ValueError(mode)`). Memory and time are the GPU's: here only that each mode builds,
compiles, offloads, runs both experts and writes its row."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_offload  # noqa: E402


@pytest.mark.parametrize("mode", [m for m in bench_offload.MODES if m != "group_fp8"])  # group_fp8: CUDA streams
def test_each_mode_runs_both_experts_and_writes_its_row(mode, tmp_path):
    out = tmp_path / "offload.json"
    args = ["--mode", mode, "--model", "tiny", "--device", "cpu", "--frames", "1",
            "--height", "32", "--width", "32", "--steps", "6", "--json", str(out),
            "--disk", str(tmp_path / "disk")]
    assert bench_offload.main(args) == 0
    import json
    (row,) = json.loads(out.read_text())
    assert row["mode"] == mode and row["device"] == "cpu (dry run)" and row["peak_gib"] is None
    ran = [s["expert"] for s in row["steps_detail"]]
    assert ran == ["transformer"] * 4 + ["transformer_2"] * 2  # shift 12, boundary 0.875: the switch at step 4
    assert row["switch_s"] is not None and all(row["step_s"][n] > 0 for n in ran)  # each expert has a median
    if mode in bench_offload.FP8_AT_REST_MODES:
        assert "transformer:" in row["report"] and "transformer_2:" in row["report"]


def test_what_cannot_run_here_is_named(capsys):
    with pytest.raises(SystemExit):
        bench_offload.main(["--mode", "group_fp8", "--model", "tiny", "--device", "cpu"])
    assert "on the CPU use group_fp8_sync" in capsys.readouterr().err


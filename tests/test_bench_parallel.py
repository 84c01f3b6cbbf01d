"""benchmarks/bench_parallel.py (issue 16's multi-GPU run) dry-run on 2 CPU processes
(gloo, the tiny Wan in fp32, FP8 emulated): every variant runs and its row says what the
GPU run will report. The speeds are the GPU's; here the logic and the numbers that do not
depend on the device: errors, wire bytes, the report."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from distributed import run_ranks  # noqa: E402

VARIANTS = "bf16_1gpu,fp8_fx_1gpu,fp8_fx_attn_1gpu,bf16_cp,fp8_fx_cp,fp8_fx_attn_cp,fp8_fx_cp_fp8wire"


def _bench_rank(rank, world):
    import bench_parallel
    return bench_parallel.main(["--model", "tiny", "--device", "cpu", "--repeats", "1", "--iters", "1",
                                "--variants", VARIANTS])


def test_every_variant_runs_on_one_and_two_ranks_with_its_row():
    rank0, rank1 = run_ranks(_bench_rank, 2)
    assert rank1 == []  # rank 0 reports
    rows = {r["variant"]: r for r in rank0}
    assert list(rows) == VARIANTS.split(",")
    for name, row in rows.items():
        assert row["ranks"] == (2 if name.endswith(("_cp", "_fp8wire")) else 1)
        assert row["ms"] > 0 and row["vs_bf16_1gpu"] > 0 and row["device"] == "cpu (dry run)"
    # Ulysses moves whole heads: in fp32 the two-rank bf16 model is the one-rank model
    assert rows["bf16_cp"]["rel_err_vs_bf16_1gpu"] < 1e-5
    for name in ("fp8_fx_1gpu", "fp8_fx_cp", "fp8_fx_attn_1gpu", "fp8_fx_attn_cp", "fp8_fx_cp_fp8wire"):
        assert 1e-3 < rows[name]["rel_err_vs_bf16_1gpu"] < 2e-2, name  # FP8's error, not a broken run
    # per rank per forward: 2 blocks x (Q, K, V, output) x 16 tokens x 4 heads x 16 values x 4 bytes (fp32),
    # and on the FP8 wire 16 + 4 bytes per row
    assert rows["fp8_fx_cp"]["all_to_all_bytes"] == 2 * 4 * 16 * 4 * 16 * 4
    assert rows["fp8_fx_cp_fp8wire"]["all_to_all_bytes"] == 2 * 4 * 16 * 4 * (16 + 4)
    assert rows["fp8_fx_cp"]["scaling_efficiency"] > 0
    assert rows["fp8_fx_cp"]["report"]["linears"] == {"emulate": 30}  # 1 graph alone + 2 under CP (split hook)
    assert rows["fp8_fx_attn_cp"]["report"]["attention"]["emulate"] == 3  # FP8 attention after the all-to-all
    for name in ("fp8_fx_cp", "fp8_fx_attn_cp"):  # two ranks: the one-process error (tensor scales per slice)
        one = rows[name.replace("_cp", "_1gpu")]["rel_err_vs_bf16_1gpu"]
        assert rows[name]["rel_err_vs_bf16_1gpu"] < 1.5 * one
    assert rows["fp8_fx_attn_cp"]["report"]["attention_skipped"] == ["not targeted"]  # attn2

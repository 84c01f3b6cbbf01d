"""benchmarks/block_errors.py, the per-block fidelity that bench_wan.py --block-errors
reports on the GPU, checked on the tiny Wan DiT on CPU."""
import copy
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from block_errors import block_errors, fp32_outputs, record_block_io, summary  # noqa: E402
from fp8_fx import FP8Config, make_fp8_backend  # noqa: E402
from fp8_fx.wan import build_wan  # noqa: E402
from reference import rel_err  # noqa: E402


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 3, 16, 16, generator=g).to(torch.bfloat16), torch.tensor([700]),
            torch.randn(1, 16, 64, generator=g).to(torch.bfloat16))


def run(net, x, t, text):
    return lambda: net(x, t, text, return_dict=False)


def test_teacher_forced_block_errors_against_independent_routes():
    ref = build_wan("tiny", seed=3)  # bf16, as bench_wan's reference
    x, t, text = inputs(seed=11)
    io = record_block_io(ref, run(ref, x, t, text))
    assert len(io.inputs) == len(io.outputs) == len(ref.blocks) == 2
    assert torch.equal(io.outputs[0], io.inputs[1])  # Wan chains its blocks
    fp8 = copy.deepcopy(ref)
    fp8.compile_repeated_blocks(backend=make_fp8_backend(FP8Config(fallback="emulate")), fullgraph=True)
    errs = block_errors({"same": ref, "fp8": fp8}, io, reference_blocks=ref.blocks)

    # The eager net fed its own recorded inputs gives its own outputs, bit for bit.
    assert errs["same"]["vs_bf16"] == [0.0, 0.0]
    # Block 0 of a full fp8 forward gets the reference's input (the patch embedding is
    # not converted), so its output error, recorded by hooks on that forward, is the
    # teacher-forced error of block 0.
    fp8_io = record_block_io(fp8, run(fp8, x, t, text))
    assert torch.equal(fp8_io.inputs[0], io.inputs[0])
    assert errs["fp8"]["vs_bf16"][0] == pytest.approx(rel_err(fp8_io.outputs[0], io.outputs[0]), rel=1e-9)
    # vs_fp32 against float64 blocks built here (upcast weights and inputs).
    for i in range(2):
        block64 = copy.deepcopy(ref.blocks[i]).double()
        rest = [r.double() if r.is_floating_point() else r for r in io.rest[:2]]
        rope = tuple(r.double() for r in io.rest[2]) if isinstance(io.rest[2], tuple) else io.rest[2].double()
        with torch.no_grad():
            y64 = block64(io.inputs[i].double(), *rest, rope)
        assert errs["bf16_eager"]["vs_fp32"][i] == pytest.approx(rel_err(io.outputs[i], y64), rel=1e-3)
        # bf16 rounding is well above fp32's, and FP8 error (e4m3: 3 mantissa bits) above bf16's.
        assert 1e-4 < errs["bf16_eager"]["vs_fp32"][i] < 2e-2
        assert 1.5 * errs["bf16_eager"]["vs_fp32"][i] < errs["fp8"]["vs_fp32"][i] < 0.1
    row = summary(errs["fp8"])
    assert row["block_rel_err"] == pytest.approx(sum(errs["fp8"]["vs_bf16"]) / 2)
    assert row["block_rel_errs_fp32"] == errs["fp8"]["vs_fp32"]


def test_record_block_io_says_when_the_run_misses_blocks():
    ref = build_wan("tiny")
    with pytest.raises(RuntimeError, match="recorded 0 block calls for 2 blocks"):
        record_block_io(ref, lambda: None)


def test_fp32_outputs_is_the_full_forward_upcast():
    ref = build_wan("tiny", seed=5)
    draws = [inputs(seed=21), inputs(seed=22)]
    dtypes = [p.dtype for p in ref.parameters()]
    outs = fp32_outputs(ref, draws, {"return_dict": False}, "cpu")
    net64 = copy.deepcopy(ref).double()
    for (x, t, text), out in zip(draws, outs):
        with torch.no_grad():
            y64 = net64(x.double(), t, text.double(), return_dict=False)[0]
            y16 = ref(x, t, text, return_dict=False)[0]
        assert out.dtype == torch.float32 and out.device.type == "cpu"
        # fp32 rounding is orders of magnitude below the bf16 model's error
        assert rel_err(out, y64) < 1e-5
        assert rel_err(y16, y64) > 1e-3
    assert torch.bfloat16 in dtypes and [p.dtype for p in ref.parameters()] == dtypes  # ref left as it was

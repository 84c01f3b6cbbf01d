"""Offloading with fp8_fx-compiled experts (fp8_fx/offload.py), on CPU.

What a CPU can run: group offloading with onload = offload = cpu (nothing moves) and to
disk (the weights are reloaded from safetensors files at every onload: new tensors, as on
a GPU); model CPU offload through `pipe.enable_model_cpu_offload(device="cpu")`, whose
'cpu:0' makes accelerate copy the whole model at every call (new tensors, as a GPU onload
does). Sequential CPU offload and leaf-level group offloading are refused before anything
runs. What only a GPU can show (peak memory, time per step, the switch between experts)
is benchmarks/bench_offload.py's.

Tolerance: as tests/test_experts.py (3% per forward against the eager bf16 pipeline;
FP8 moves a forward by ~1%, a wrong or stale weight by 10-100%).
"""
import re
import warnings

import pytest
import torch

for _module, _extra in (("diffusers", "wan"), ("transformers", "pipeline"), ("tokenizers", "pipeline"),
                        ("accelerate", "pipeline")):
    pytest.importorskip(_module, reason=f"{_module} is not installed: pip install -e '.[{_extra}]'")

from test_experts import BLOCKS, EMULATE, assert_close_to_eager, run_pipe, tiny_pipeline  # noqa: E402

import fp8_fx  # noqa: E402
from fp8_fx import offload, ops, weight_cache  # noqa: E402
from fp8_fx.offload import OffloadError  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture
def quantizations(monkeypatch):
    """How many weights get quantized (the weight cache and convert_to_fp8 both call
    ops.quantize_weight)."""
    count = [0]
    quantize = ops.quantize_weight

    def counting(*args, **kwargs):
        count[0] += 1
        return quantize(*args, **kwargs)

    monkeypatch.setattr(ops, "quantize_weight", counting)
    return count


def group_offload(module, **kwargs):
    module.enable_group_offload(onload_device=CPU, offload_device=CPU, offload_type="block_level",
                                num_blocks_per_group=1, **kwargs)


# 1. what works: FP8 weights at rest, offloaded


def test_group_offloading_of_fp8_weights_at_rest_in_memory_and_on_disk(tmp_path, quantizations):
    pipe = tiny_pipeline(2)
    reference = run_pipe(pipe)
    experts = fp8_fx.compile_experts(pipe, EMULATE, fp8_at_rest=True)
    group_offload(pipe.transformer)  # onload = offload = cpu: nothing moves
    group_offload(pipe.transformer_2, offload_to_disk_path=str(tmp_path / "transformer_2"))  # reloaded per onload
    assert experts.fullgraph == {"transformer": True, "transformer_2": True}  # until the first forward sees the hooks
    quantizations[0] = 0

    calls = run_pipe(pipe)
    assert_close_to_eager(calls, reference, ["transformer", "transformer_2", "transformer_2"])
    assert quantizations[0] == 0  # FP8 at rest: nothing quantized at run time
    # the hooks break each block's graph at onload/offload: compiled again without fullgraph,
    # and still one graph of FP8 linears per expert, run once per block (no recompile per block)
    assert experts.fullgraph == {"transformer": False, "transformer_2": False}
    assert experts.calls == {"transformer": 1 * BLOCKS, "transformer_2": 2 * BLOCKS}
    for backend in experts.backends.values():
        assert [len(g) for g in backend.report.graphs if g] == [10]
    assert {d.graph.model for d in experts.report} == {"transformer", "transformer_2"}
    (found,) = experts.offloading()["transformer_2"]
    assert found.kind == offload.GROUP and found.moves_weights and found.disk_path == str(tmp_path / "transformer_2")

    # the disk holds FP8 bytes: half of bf16's for every converted weight
    from safetensors.torch import load_file
    stored = [t for f in (tmp_path / "transformer_2").glob("*.safetensors") for t in load_file(str(f)).values()]
    fp8 = [t for t in stored if t.dtype == torch.float8_e4m3fn]
    assert len(fp8) == 20 and sum(t.numel() for t in fp8) == sum(
        m.weight.numel() for m in pipe.transformer_2.modules() if isinstance(m, fp8_fx.FP8Linear))


def test_model_cpu_offload_of_fp8_weights_at_rest_whole_model_compiled(quantizations):
    pipe = tiny_pipeline(1)
    reference = run_pipe(pipe, steps=2)
    experts = fp8_fx.compile_experts(pipe, EMULATE, fp8_at_rest=True, regional=False)
    pipe.enable_model_cpu_offload(device="cpu")  # accelerate's CpuOffload hook on the compiled module
    (found,) = offload.find_offloading(pipe.transformer)
    assert found.kind == offload.MODEL and found.moves_weights  # 'cpu:0': accelerate copies the model per call
    weight = pipe.transformer._orig_mod.blocks[0].attn1.to_q.weight
    before = weight.data_ptr()
    quantizations[0] = 0

    calls = run_pipe(pipe, steps=2)
    assert weight.data_ptr() != before  # the FP8 weights were moved (copied), as to and from a GPU
    assert weight.dtype == torch.float8_e4m3fn
    assert_close_to_eager(calls, reference, ["transformer", "transformer"])
    assert quantizations[0] == 0
    assert experts.calls == {"transformer": 2}


# 2. bf16 weights that offloading moves: the problem, and the refusal


def test_moved_bf16_weights_are_quantized_again_at_every_onload(quantizations, monkeypatch):
    # What compile_experts refuses, shown with a bare backend: the FP8 copies of bf16
    # weights are made again whenever offloading hands the layers new tensors, and stay on
    # the parameters (on a GPU: on the GPU) while the weights sit offloaded.
    pipe = tiny_pipeline(1)
    # Under regional compilation the backend sees the blocks only, not the hook on the
    # transformer: the weight cache notices the new storage at every call and warns.
    monkeypatch.setattr(weight_cache, "_warned_requantized", False)
    pipe.transformer.compile_repeated_blocks(backend=fp8_fx.make_fp8_backend(EMULATE), fullgraph=True)
    pipe.enable_model_cpu_offload(device="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_pipe(pipe, steps=2)  # the compile's copy, then two calls with new storage: not yet
        quantizations[0] = 0
        run_pipe(pipe, steps=2)
    assert quantizations[0] == 2 * BLOCKS * 10  # every forward: all 20 block linears again
    said = [str(w.message) for w in caught if "new storage" in str(w.message)]
    assert len(said) == 1  # once, not once per weight
    assert re.search(r"new storage at 3 calls in a row .* made again at every call: offloading .*convert_to_fp8",
                     said[0])
    pipe.maybe_free_model_hooks()  # the pipeline's end-of-call offload
    assert weight_cache.fp8_copies(pipe.transformer) == 20


def test_a_hand_built_backend_checks_the_offloading_of_what_it_compiles(tmp_path):
    # torch.compile with make_fp8_backend (no compile_experts): the backend checks the module
    # it traced when it compiles (the first forward, after offloading was set up).
    pipe = tiny_pipeline(1)
    pipe.transformer.enable_group_offload(onload_device=CPU, offload_type="leaf_level")
    pipe.transformer.compile_repeated_blocks(backend=fp8_fx.make_fp8_backend(EMULATE))
    with pytest.raises(Exception, match=r"the compiled WanTransformerBlock uses leaf-level group offloading"):
        run_pipe(pipe)
    # Block level to disk: the group hook breaks the block's graph, and the linears are traced
    # in the hook's resumed frame, whose argument is the block: found there, and refused.
    for compile_whole in (False, True):
        pipe = tiny_pipeline(1)
        group_offload(pipe.transformer, offload_to_disk_path=str(tmp_path / f"whole{compile_whole}"))
        if compile_whole:
            pipe.transformer = torch.compile(pipe.transformer, backend=fp8_fx.make_fp8_backend(EMULATE))
        else:
            pipe.transformer.compile_repeated_blocks(backend=fp8_fx.make_fp8_backend(EMULATE))
        with pytest.raises(Exception, match=r"the compiled WanTransformerBlock has 10 bf16 linears .* reloads "
                                            r"them from safetensors files at every onload"):
            run_pipe(pipe)


def test_bf16_weights_that_offloading_moves_are_refused_in_either_order(tmp_path):
    pipe = tiny_pipeline(1)
    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(OffloadError, match=r"20 bf16 linears .* quantizes at run time.*model CPU offload"
                                           r".*fp8_at_rest=True") as e:
        fp8_fx.compile_experts(pipe, EMULATE)
    assert "(0.1 MiB that offloading was meant to free)" in str(e.value)

    pipe = tiny_pipeline(1)
    experts = fp8_fx.compile_experts(pipe, EMULATE)
    group_offload(pipe.transformer, offload_to_disk_path=str(tmp_path / "t"))  # after compiling
    with pytest.raises(OffloadError, match=r"reloads them from safetensors files at every onload"):
        run_pipe(pipe)  # refused before the first forward: nothing compiled
    assert experts.backends["transformer"].graphs == []

    pipe = tiny_pipeline(1)
    group_offload(pipe.transformer)  # onload = offload: nothing moves, bf16 weights are fine
    experts = fp8_fx.compile_experts(pipe, EMULATE)
    assert experts.fullgraph == {"transformer": False}  # the group hooks break the block graphs
    with pytest.raises(OffloadError, match="fullgraph=True cannot compile that"):
        fp8_fx.compile_experts(tiny_pipeline_with(group_offload), EMULATE, fullgraph=True)


def tiny_pipeline_with(setup):
    pipe = tiny_pipeline(1)
    setup(pipe.transformer)
    return pipe


# 3. modes that cannot run in FP8 when compiled


def test_sequential_cpu_offload_is_refused():
    pipe = tiny_pipeline(2)
    pipe.enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(OffloadError, match=r"transformer runs under sequential CPU offload.*silently not run "
                                           r"in FP8.*offload_type='block_level'"):
        fp8_fx.compile_experts(pipe, EMULATE)
    with pytest.raises(OffloadError, match=r"sequential CPU offload") as refused:  # converting first would not help
        fp8_fx.compile_experts(pipe, EMULATE, fp8_at_rest=True)
    assert "Convert first" not in str(refused.value)

    from accelerate import cpu_offload
    pipe = tiny_pipeline(1)
    experts = fp8_fx.compile_experts(pipe, EMULATE, fp8_at_rest=True)
    cpu_offload(pipe.transformer, CPU)  # what enable_sequential_cpu_offload installs, after compiling
    with pytest.raises(OffloadError, match="sequential CPU offload"):
        run_pipe(pipe)
    assert experts.backends["transformer"].graphs == []


def test_leaf_level_group_offloading_is_refused():
    def leaf(module):
        module.enable_group_offload(onload_device=CPU, offload_type="leaf_level")

    with pytest.raises(OffloadError, match=r"leaf-level group offloading.*one graph per layer"):
        fp8_fx.compile_experts(tiny_pipeline_with(leaf), EMULATE)
    pipe = tiny_pipeline(1)
    fp8_fx.compile_experts(pipe, EMULATE, fp8_at_rest=True)
    leaf(pipe.transformer)
    with pytest.raises(OffloadError, match="leaf-level"):
        run_pipe(pipe)


def test_two_experts_offloaded_to_one_disk_folder_are_refused(tmp_path):
    # diffusers alone, eagerly: one folder for both experts (what pipe.enable_group_offload does)
    # makes the second expert load the first one's files
    pipe = tiny_pipeline(2)
    reference = run_pipe(pipe)
    pipe.enable_group_offload(onload_device=CPU, offload_type="block_level", num_blocks_per_group=1,
                              offload_to_disk_path=str(tmp_path / "eager"))
    wrong = run_pipe(pipe)
    assert float((wrong[-1][1] - reference[-1][1]).norm() / reference[-1][1].norm()) > 0.3

    pipe = tiny_pipeline(2)
    fp8_fx.compile_experts(pipe, EMULATE, fp8_at_rest=True)
    pipe.enable_group_offload(onload_device=CPU, offload_type="block_level", num_blocks_per_group=1,
                              offload_to_disk_path=str(tmp_path / "shared"))
    with pytest.raises(OffloadError, match=r"transformer and transformer_2 are group-offloaded to the same disk "
                                           r"folder.*load the other's weights.*folder of its own"):
        run_pipe(pipe)


def test_fp8_at_rest_needs_offloading_enabled_after_converting():
    pipe = tiny_pipeline(1)
    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(OffloadError, match=r"Convert first, then offload"):
        fp8_fx.compile_experts(pipe, EMULATE, fp8_at_rest=True)
    assert not any(isinstance(m, fp8_fx.FP8Linear) for m in pipe.transformer.modules())


def test_cuda_graphs_with_moving_offload_warn():
    pipe = tiny_pipeline(1)
    experts = fp8_fx.compile_experts(pipe, EMULATE, fp8_at_rest=True, mode="reduce-overhead")
    experts.check_offloading()  # no offloading: nothing to say
    pipe.enable_model_cpu_offload(device="cpu")
    with pytest.warns(UserWarning, match="CUDA graphs record the weights' addresses"):
        experts.check_offloading()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        experts.check_offloading()  # once


def test_offloading_found_and_what_moves():
    model = tiny_pipeline(1).transformer
    assert offload.find_offloading(model) == [] and offload.check(model) == []
    group_offload(model)
    (found,) = offload.check(model, EMULATE)  # bf16, nothing moves: fine
    assert str(found) == "group offloading (cpu <-> cpu, block_level)" and not found.moves_weights
    assert offload.Offloading(offload.MODEL, "cpu:0", "cpu").moves_weights  # .to('cpu:0') copies
    assert not offload.Offloading(offload.MODEL, "cpu", "cpu").moves_weights
    assert offload.Offloading(offload.SEQUENTIAL, "cpu", "cpu").moves_weights  # meta in between
    assert len(offload.runtime_quantized_weights(model, EMULATE)) == 20
    assert offload.runtime_quantized_weights(model, fp8_fx.FP8Config(targets=())) == []

"""Sharded loading: each gloo rank reads only its FSDP2 shards of an FP8 checkpoint."""
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("torch.distributed.fsdp")

import fp8_fx  # noqa: E402
from distributed import run_ranks  # noqa: E402
from fp8_fx.distributed.sharded_loading import fp8_skeleton, load_fp8_checkpoint_sharded  # noqa: E402
from wan_like import WanLikeModel  # noqa: E402


def _wan_inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(1, 16, 3, 16, 16, generator=g).bfloat16(), torch.tensor([600]),
            torch.randn(1, 16, 64, generator=g).bfloat16())


@pytest.fixture(scope="module")
def tiny_fp8_file(tmp_path_factory):
    torch.manual_seed(0)
    model = fp8_fx.wan.build_wan("tiny")
    fp8_fx.convert_to_fp8(model)
    path = tmp_path_factory.mktemp("fp8") / "tiny_wan_fp8.safetensors"
    fp8_fx.save_fp8_checkpoint(model, path)
    return path


def _rows_of_rank(t, rank, world_size):
    """FSDP2's dim-0 split: ceil(n / world_size) rows per rank, the last ranks may get fewer or none."""
    per_rank = -(-t.shape[0] // world_size)
    return t[rank * per_rank:(rank + 1) * per_rank]


def _load_sharded(rank, world_size, path):
    from torch.distributed.device_mesh import init_device_mesh

    from fp8_fx import fp8_weight_bytes as local_bytes
    from fp8_fx.distributed.fsdp import fully_shard_fp8
    mesh = init_device_mesh("cpu", (world_size,))
    model = fp8_skeleton(path)  # from the recorded config: meta parameters, no weights read
    assert all(p.is_meta for p in model.parameters())
    for block in model.blocks:
        fully_shard_fp8(block, mesh=mesh)
    fully_shard_fp8(model, mesh=mesh)
    stats = load_fp8_checkpoint_sharded(path, model)
    held = local_bytes(model)
    # Each shard holds exactly this rank's rows of the file's tensor (torch.chunk's split,
    # FSDP2's). Compared locally: gloo cannot all-gather float8 (full_tensor() fails).
    whole = fp8_fx.load_fp8_checkpoint(path)
    expected = whole.state_dict()
    for key, value in model.state_dict().items():
        if hasattr(value, "to_local"):
            value, want = value.to_local(), _rows_of_rank(expected[key], rank, world_size)
        else:
            want = expected[key]
        assert value.dtype == want.dtype and torch.equal(value.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), key
    with torch.no_grad():
        y = model(*_wan_inputs(), return_dict=False)[0]
        y_whole = whole(*_wan_inputs(), return_dict=False)[0]
    return stats, held, torch.equal(y, y_whole)


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_rank_reads_only_its_shards(tiny_fp8_file, world_size):
    for stats, held, same_output in run_ranks(_load_sharded, world_size, str(tiny_fp8_file)):
        assert same_output  # the sharded-loaded model computes what the whole-loaded one does
        assert stats.whole == 20  # the FP8 scales (buffers, whole-weight scales) only
        # what a rank reads: its 1/world_size of the sharded tensors plus the scales
        assert stats.bytes_read < stats.bytes_in_file / world_size * 1.1 + 20 * 4
        assert held["fp8"] < 1.1 * (stats.bytes_in_file - 0) / world_size


def test_single_process_sharded_loader_matches_the_whole_loader(tiny_fp8_file):
    """Without FSDP every tensor is read whole: the same model as load_fp8_checkpoint."""
    model = fp8_skeleton(tiny_fp8_file)
    stats = load_fp8_checkpoint_sharded(tiny_fp8_file, model)
    assert stats.sliced == 0 and stats.bytes_read == stats.bytes_in_file
    whole = fp8_fx.load_fp8_checkpoint(tiny_fp8_file)
    with torch.no_grad():
        assert torch.equal(model(*_wan_inputs(), return_dict=False)[0], whole(*_wan_inputs(), return_dict=False)[0])


def test_unsupported_files_and_models_raise_clear_errors(tiny_fp8_file, tmp_path):
    from safetensors.torch import save_file
    comfy = tmp_path / "comfy.safetensors"
    save_file({"x.weight": torch.zeros(16, 16).to(torch.float8_e4m3fn), "x.scale_weight": torch.ones(())}, comfy)
    with pytest.raises(fp8_fx.FP8CheckpointError, match="not an fp8_fx checkpoint"):
        fp8_skeleton(comfy)
    # a plain (unconverted) model: FSDP2 would manage nn.Linear parameters, not FP8Linear ones
    plain = fp8_fx.wan.build_wan("tiny")
    with pytest.raises(fp8_fx.FP8CheckpointError, match="not FP8Linear in the model.*fp8_skeleton"):
        load_fp8_checkpoint_sharded(tiny_fp8_file, plain)
    # a model of another tree (the same block paths, other top-level modules)
    with torch.device("meta"):
        other = WanLikeModel("diffusers", dim=64, ffn_dim=128, heads=4)
    other = fp8_skeleton(tiny_fp8_file, other)
    with pytest.raises(fp8_fx.FP8CheckpointError, match="does not match the model: missing"):
        load_fp8_checkpoint_sharded(tiny_fp8_file, other)

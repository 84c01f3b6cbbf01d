import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no graph or guard left over from another test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    from fp8_fx.ops import has_fp8_tensor_cores
    if torch.cuda.is_available() and has_fp8_tensor_cores(torch.device("cuda")):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with FP8 tensor cores (sm89+)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

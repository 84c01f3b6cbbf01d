import os

import pytest
import torch

if not torch.cuda.is_available():
    # No GPU: Triton kernels run on CPU tensors in Triton's interpreter (if Triton is
    # installed: the `interpret` extra). Read when Triton is imported, so before fp8_fx is.
    os.environ.setdefault("TRITON_INTERPRET", "1")


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

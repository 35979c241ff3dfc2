"""Shared test setup: Triton on the CPU through its interpreter, and GPU tests skipped with a reason."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    # Kernels run on CPU tensors under Triton's interpreter (FACTS §7). It must be set before
    # triton is first imported, which is why it lives here and not in a test module.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: run bench/gpu_check.sh on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(params=["triton", "fallback"])
def path(request, monkeypatch):
    """Run a kernel test through Triton (CUDA or the interpreter) and through the PyTorch fallback."""
    from kernels import _backend

    if request.param == "fallback":
        monkeypatch.setattr(_backend, "HAS_TRITON", False)
    elif not _backend.HAS_TRITON:
        pytest.skip(reason="triton is not importable here, so only the PyTorch fallback can run")
    return request.param

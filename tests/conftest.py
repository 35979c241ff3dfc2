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

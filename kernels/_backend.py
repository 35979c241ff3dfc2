"""Where each op runs: the Triton kernel (CUDA tensors, or any tensor under TRITON_INTERPRET=1) or
the plain PyTorch fallback with the same semantics. Importing this never requires triton."""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS or a CPU-only wheel: every op takes its PyTorch fallback
    triton = None

    class tl:  # noqa: N801 - stands in for triton.language, so kernel signatures still parse
        constexpr = None

    def _jit(fn):
        return fn

    class _TritonMissing:
        jit = staticmethod(_jit)

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

    triton = _TritonMissing()
    HAS_TRITON = False
else:
    HAS_TRITON = True

# Read once, like triton itself: the interpreter must be chosen before triton is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """True when t's op should run its Triton kernel, False for the PyTorch fallback."""
    return HAS_TRITON and (t.is_cuda or INTERPRET)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for bf16/fp16/fp32, fp64 for fp64 (so gradcheck can run the kernels)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def next_power_of_2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def program_count(t: torch.Tensor, per_sm: int) -> int:
    """Programs for a persistent kernel: a few per SM on a GPU; few under the interpreter, where
    each program runs serially and a loop inside a program costs no more than another program."""
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count * per_sm
    return 4

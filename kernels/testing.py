"""The accuracy criterion the kernel tests use: a fused kernel may be at most twice as far from a
float64 reference as PyTorch's own implementation in the same dtype, plus one ulp of that dtype
(fp32 -> bf16 rounding differs by up to an ulp between Triton, its interpreter and PyTorch)."""

import torch
from torch import Tensor


def ulp(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The spacing of `dtype` numbers at |x| (x in float64)."""
    exponent = torch.floor(torch.log2(x.abs().clamp(min=torch.finfo(dtype).tiny)))
    return torch.finfo(dtype).eps * torch.exp2(exponent)


def max_error(actual: Tensor, reference: Tensor) -> float:
    return (actual.double() - reference.double()).abs().max().item() if actual.numel() else 0.0


def assert_close_to_reference(
    actual: Tensor, torch_same_dtype: Tensor, reference: Tensor, what: str = "", dtype: torch.dtype | None = None
) -> None:
    """|actual - reference|_max <= 2 |torch_same_dtype - reference|_max + ulp(|reference|_max), the ulp
    of `dtype`: the inputs' dtype (default: actual's; an fp32 loss of bf16 logits passes bf16)."""
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if reference.numel() == 0:
        return
    ours = max_error(actual, reference)
    theirs = max_error(torch_same_dtype, reference)
    allowed = 2 * theirs + ulp(reference.double().abs().max(), dtype or actual.dtype).item()
    assert ours <= allowed, f"{what}: max error {ours:.3g} > allowed {allowed:.3g} (PyTorch {actual.dtype}: {theirs:.3g})"

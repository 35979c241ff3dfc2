"""nn.Module wrappers with torch-like constructors, for models that swap them in."""

from typing import Optional

import torch
from torch import Tensor, nn

from kernels.cross_entropy import check_reduction, cross_entropy
from kernels.layer_norm import add_layer_norm, layer_norm
from kernels.linear_cross_entropy import linear_cross_entropy


class LayerNorm(nn.Module):
    """nanoGPT's LayerNorm (optional bias) on the fused kernel; parameters `weight` and `bias`."""

    def __init__(self, ndim: int, bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        """layer_norm(x), or with a residual (layer_norm(x + residual), x + residual)."""
        if residual is None:
            return layer_norm(x, self.weight, self.bias, self.eps)
        return add_layer_norm(x, residual, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, bias={self.bias is not None}, eps={self.eps}"


class CrossEntropyLoss(nn.Module):
    def __init__(self, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        check_reduction(reduction)
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return cross_entropy(logits, targets, self.ignore_index, self.reduction)


class LinearCrossEntropyLoss(nn.Module):
    """Loss of a linear head whose weight lives elsewhere (e.g. tied to the token embedding)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", chunk_size: Optional[int] = None):
        super().__init__()
        check_reduction(reduction)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.chunk_size = chunk_size

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return linear_cross_entropy(
            hidden, weight, targets, bias, self.ignore_index, self.reduction, self.chunk_size
        )

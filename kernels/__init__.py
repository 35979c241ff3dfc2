"""Fused Triton kernels for GPT training on a small card: LayerNorm (with the residual add fused in),
cross-entropy, and a chunked linear + cross-entropy that never holds all B·T·V logits.

Each op runs its Triton kernel on CUDA tensors (or on any tensor under TRITON_INTERPRET=1) and a
PyTorch fallback with the same semantics elsewhere; importing this package never needs triton.
Each is a `torch.library` op, so it runs inside `torch.compile(fullgraph=True)` without a break.
"""

from kernels._backend import HAS_TRITON
from kernels.cross_entropy import cross_entropy
from kernels.layer_norm import add_layer_norm, layer_norm
from kernels.linear_cross_entropy import linear_cross_entropy
from kernels.modules import CrossEntropyLoss, LayerNorm, LinearCrossEntropyLoss

__all__ = [
    "HAS_TRITON",
    "layer_norm",
    "add_layer_norm",
    "cross_entropy",
    "linear_cross_entropy",
    "LayerNorm",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
]

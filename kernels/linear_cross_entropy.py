"""Linear layer + cross-entropy (the GPT head and its loss) without ever holding all N·V logits.

`linear_cross_entropy(hidden, weight, targets, bias)` equals
`F.cross_entropy(hidden @ weight.T + bias, targets)` (semantics and deliberate differences as in
`kernels.cross_entropy`), but walks the N tokens in chunks: per chunk it forms the chunk's logits,
runs the cross-entropy kernel, which overwrites those logits with their gradient (this op owns the
buffer), and turns that into the chunk's d(hidden) and its share of d(weight) and d(bias). So at most
`chunk × V` logits exist at once, and the forward pass leaves behind only the gradients, which the
backward scales by grad_output. With reduction="none" the per-row grad_output is not known in the
forward, so the forward keeps no gradient and the backward walks the chunks again.

Precision: logits and the GEMMs run in the compute dtype (autocast's dtype under autocast, else
hidden's); d(weight) and d(bias) are accumulated across chunks in fp32 (bf16 accumulation over many
chunks drifts), and returned in weight's dtype.

Chunk size: the largest power of two whose chunk of logits fits `CHUNK_BYTES` (256 MiB: 2048 rows
at V = 50304 in bf16), and at most N. Bigger chunks make the three GEMMs less skinny (V/H is ~65 to
~130 for GPT-2 sizes); 256 MiB is small beside the ~14·N·V bytes of the eager loss.
"""

from typing import Optional

import torch
from torch import Tensor

from kernels import _backend
from kernels.cross_entropy import (
    check_reduction,
    cross_entropy_rows,
    prepare_targets,
    reduce_loss,
    reduction_scale,
)

CHUNK_BYTES = 256 * 2**20
# torch.mm(a, b, out_dtype=torch.float32) for bf16/fp16 inputs: CUDA only, torch >= 2.8.
_MM_FP32_OUT = hasattr(torch.ops.aten.mm, "dtype")


def _mm_acc(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in the accumulation dtype (fp32 for bf16 inputs), so a sum over chunks is rounded once
    at the end: cuBLAS accumulates in fp32 and writes fp32 (CPU: upcast first, bf16 GEMMs are
    slow there anyway). Only a CUDA torch older than 2.8 rounds each chunk's product to bf16."""
    acc = _backend.acc_dtype(a.dtype)
    if a.dtype == acc:
        return a @ b
    if not a.is_cuda:
        return a.to(acc) @ b.to(acc)
    if _MM_FP32_OUT:
        return torch.mm(a, b, out_dtype=acc)
    return (a @ b).to(acc)


def default_chunk_size(n_rows: int, vocab: int, dtype: torch.dtype) -> int:
    """The chunk-size rule of the module docstring."""
    rows = max(1, CHUNK_BYTES // (vocab * torch.finfo(dtype).bits // 8))
    return max(1, min(n_rows, 1 << (rows.bit_length() - 1)))


def _chunked(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, ignore_index: int,
    row_scale: Optional[Tensor], chunk_size: int, compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row losses, and with row_scale (0-d or (N,)) the gradients of sum(row_scale * loss):
    (loss, d_hidden, d_weight, d_bias), all in fp32 (fp64 for fp64 inputs) so each is rounded to
    its parameter's dtype once; gradients are empty tensors when row_scale is None."""
    n_rows = hidden.shape[0]
    h = hidden.to(compute_dtype)
    w = weight.to(compute_dtype)
    b = bias.to(compute_dtype) if bias is not None else None
    grads = row_scale is not None
    loss = torch.empty(n_rows, dtype=_backend.acc_dtype(compute_dtype), device=hidden.device)
    d_hidden = torch.empty(hidden.shape, dtype=loss.dtype, device=hidden.device) if grads else hidden.new_empty(0)
    d_weight = torch.zeros(weight.shape, dtype=_backend.acc_dtype(weight.dtype), device=weight.device) if grads else weight.new_empty(0)
    d_bias = (
        torch.zeros(bias.shape, dtype=d_weight.dtype, device=bias.device) if grads and bias is not None else weight.new_empty(0)
    )
    for start in range(0, n_rows, chunk_size):
        end = min(start + chunk_size, n_rows)
        h_c = h[start:end]
        logits = torch.addmm(b, h_c, w.t()) if b is not None else h_c @ w.t()
        scale = None
        if grads:
            scale = row_scale[start:end] if row_scale.dim() == 1 else row_scale
        loss[start:end] = cross_entropy_rows(logits, targets[start:end], ignore_index, scale, logits if grads else None)
        if grads:
            # logits now hold d(loss)/d(logits) of this chunk.
            d_hidden[start:end] = _mm_acc(logits, w)
            d_weight += _mm_acc(logits.t(), h_c)
            if bias is not None:
                d_bias += logits.sum(0, dtype=d_bias.dtype)
    return loss, d_hidden, d_weight, d_bias


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def linear_cross_entropy_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, ignore_index: int,
    reduction: str, chunk_size: int, compute_dtype: torch.dtype, compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, d_hidden, d_weight, d_bias) for grad_output = 1, still in fp32 so the backward's
    scaling rounds once; the gradients are empty tensors when not compute_grad or
    for reduction="none" (its backward recomputes them)."""
    scale = reduction_scale(targets, ignore_index, reduction, _backend.acc_dtype(compute_dtype))
    with torch.autocast(hidden.device.type, enabled=False):
        loss, d_hidden, d_weight, d_bias = _chunked(
            hidden, weight, bias, targets, ignore_index,
            scale if compute_grad and reduction != "none" else None, chunk_size, compute_dtype,
        )
    return reduce_loss(loss, scale, reduction), d_hidden, d_weight, d_bias


def linear_cross_entropy_backward_none(
    grad_output: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
    ignore_index: int, chunk_size: int, compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for reduction="none": a second walk over the chunks with per-row grad_output."""
    with torch.autocast(hidden.device.type, enabled=False):
        _, d_hidden, d_weight, d_bias = _chunked(
            hidden, weight, bias, targets, ignore_index, grad_output.to(_backend.acc_dtype(compute_dtype)),
            chunk_size, compute_dtype,
        )
    return d_hidden, d_weight, d_bias


# --- torch.library: opaque to torch.compile; the chunk loop runs eagerly inside ---


@torch.library.custom_op("finegpt::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, ignore_index: int,
    reduction: str, chunk_size: int, compute_dtype: torch.dtype, compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return linear_cross_entropy_forward(
        hidden, weight, bias, targets, ignore_index, reduction, chunk_size, compute_dtype, compute_grad
    )


@_lce_fwd_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, reduction, chunk_size, compute_dtype, compute_grad):
    loss = hidden.new_empty(hidden.shape[0] if reduction == "none" else (), dtype=_backend.acc_dtype(compute_dtype))
    grads = compute_grad and reduction != "none"
    acc = _backend.acc_dtype(weight.dtype)
    return (
        loss,
        hidden.new_empty(hidden.shape if grads else 0, dtype=_backend.acc_dtype(compute_dtype)),
        weight.new_empty(weight.shape if grads else 0, dtype=acc),
        weight.new_empty(bias.shape if grads and bias is not None else 0, dtype=acc),
    )


@torch.library.custom_op("finegpt::linear_cross_entropy_bwd_none", mutates_args=())
def _lce_bwd_none_op(
    grad_output: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
    ignore_index: int, chunk_size: int, compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    return linear_cross_entropy_backward_none(
        grad_output, hidden, weight, bias, targets, ignore_index, chunk_size, compute_dtype
    )


@_lce_bwd_none_op.register_fake
def _(grad_output, hidden, weight, bias, targets, ignore_index, chunk_size, compute_dtype):
    return (
        hidden.new_empty(hidden.shape),
        weight.new_empty(weight.shape),
        weight.new_empty(bias.shape if bias is not None else 0),
    )


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, ignore_index, reduction, chunk_size, compute_dtype):
        compute_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        loss, d_hidden, d_weight, d_bias = torch.ops.finegpt.linear_cross_entropy_fwd(
            hidden, weight, bias, targets, ignore_index, reduction, chunk_size, compute_dtype, compute_grad
        )
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, targets)
        else:
            ctx.save_for_backward(d_hidden, d_weight, d_bias)
        ctx.args = (ignore_index, reduction, chunk_size, compute_dtype, bias is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        ignore_index, reduction, chunk_size, compute_dtype, has_bias = ctx.args
        if reduction == "none":
            hidden, weight, bias, targets = ctx.saved_tensors
            d_hidden, d_weight, d_bias = torch.ops.finegpt.linear_cross_entropy_bwd_none(
                grad_output, hidden, weight, bias, targets, ignore_index, chunk_size, compute_dtype
            )
        else:
            # Scale in fp32, then round once to each parameter's dtype.
            d_hidden, d_weight, d_bias = ((g * grad_output).to(dt) for g, dt in zip(ctx.saved_tensors, ctx.dtypes))
        return d_hidden, d_weight, None, (d_bias if has_bias else None), None, None, None, None


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None, ignore_index: int = -100,
    reduction: str = "mean", chunk_size: Optional[int] = None,
) -> Tensor:
    """F.cross_entropy(hidden @ weight.T (+ bias), targets) for hidden (N, H), weight (V, H), computed
    chunk_size tokens at a time (default: `default_chunk_size`). Under autocast the GEMMs run in the
    autocast dtype, like the eager lm_head; the loss is fp32.

    hidden may also be (B, T, H) with targets (B, T): the tokens are flattened, and reduction="none"
    returns (B, T) losses."""
    if hidden.dim() > 2 and weight.dim() == 2 and targets.shape == hidden.shape[:-1]:
        loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), bias,
                                    ignore_index, reduction, chunk_size)
        return loss.view(targets.shape) if reduction == "none" else loss
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: need hidden (N, H) or (B, T, H) with targets of its leading shape, and "
            f"weight (V, H); got {tuple(hidden.shape)}, targets {tuple(targets.shape)} and weight {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear_cross_entropy: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_reduction(reduction)
    targets = prepare_targets(targets, hidden.shape[0], "linear_cross_entropy")
    compute_dtype = _compute_dtype(hidden)
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], weight.shape[0], compute_dtype)
    elif chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    return LinearCrossEntropyFunction.apply(
        hidden, weight, targets, bias, ignore_index, reduction, chunk_size, compute_dtype
    )

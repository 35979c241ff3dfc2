"""Cross-entropy over (N, V) logits whose one kernel computes the loss and the gradient.

Semantics are F.cross_entropy's for 2-D logits (`ignore_index`, reduction mean | sum | none), over
all V columns: with nanoGPT's padded vocab (V = 50304 for GPT-2's 50257 tokens) the padded columns
take part in the softmax exactly as in nanoGPT's eager loss, and they never appear as targets.
Differences, on purpose:
- the loss is float32 for bf16/fp16/fp32 logits (float64 for float64), as under autocast;
- when every target is ignored, reduction="mean" gives 0.0 (PyTorch gives NaN) and the gradient is
  zero: one empty micro-batch cannot poison a run;
- the gradient is computed in the forward pass (when one is needed) into its own buffer, which the
  backward scales in place by grad_output and hands on; a second backward through the same graph
  (retain_graph=True) recomputes it.

The kernel: one program per row, an online softmax (running max and sum) over V in blocks, fp32
arithmetic, int64 row offsets (B·T·V passes 2**31 at V = 50304 once B·T > 42,690). The true-class
gradient softmax - 1 is formed in fp32 before rounding, so confident predictions keep it.
"""

from typing import Optional

import torch
from torch import Tensor

from kernels import _backend
from kernels._backend import tl, triton

REDUCTIONS = ("mean", "sum", "none")
# Per-iteration block of the vocabulary on a GPU; the interpreter takes the whole row at once.
_BLOCK_V = 4096
_NUM_WARPS = 8


@triton.jit
def _cross_entropy_kernel(
    Logits, Targets, Loss, Grad, Scale,
    stride_logits, stride_targets, stride_grad, stride_scale,
    V, ignore_index,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits = Logits + row * stride_logits
    target = tl.load(Targets + row * stride_targets)
    valid = target != ignore_index

    m = tl.full([], float("-inf"), ACC)
    d = tl.zeros([], ACC)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits + cols, mask=cols < V, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    # An ignored row never reads its (arbitrary) target column.
    x_target = tl.load(logits + target, mask=valid, other=0.0).to(ACC)
    tl.store(Loss + row, tl.where(valid, (m - x_target) + tl.log(d), 0.0))

    if COMPUTE_GRAD:
        scale = tl.where(valid, tl.load(Scale + row * stride_scale).to(ACC), 0.0)
        # exp(x - m) / d, not exp(x - lse): lse's own rounding (|lse| ~ 10) would cost ~4 ulps in fp32.
        inv_d = 1.0 / d
        grad = Grad + row * stride_grad
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(logits + cols, mask=cols < V, other=float("-inf")).to(ACC)
            p = tl.exp(x - m) * inv_d
            g = tl.where(cols == target, p - 1.0, p) * scale
            tl.store(grad + cols, g.to(Grad.dtype.element_ty), mask=cols < V)


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")


def reduction_scale(targets: Tensor, ignore_index: int, reduction: str, dtype: torch.dtype) -> Tensor:
    """The factor d(loss)/d(row loss) of every valid row, as a 0-d device tensor (no host sync):
    1 / (number of valid rows) for mean, clamped so all-ignored gives 0 instead of 0/0; 1 otherwise."""
    if reduction != "mean":
        return torch.ones((), dtype=dtype, device=targets.device)
    return 1.0 / (targets != ignore_index).sum().clamp(min=1).to(dtype)


def cross_entropy_rows(
    logits: Tensor, targets: Tensor, ignore_index: int, scale: Optional[Tensor], grad: Optional[Tensor]
) -> Tensor:
    """The shared core: per-row losses (fp32) of logits (N, V) with unit column stride, and, when
    `grad` is given, its rows set to scale * (softmax - onehot), zero on ignored rows. `scale` is a
    0-d or (N,) tensor. `grad` may be `logits` itself (the chunked linear+CE owns its logits)."""
    n_rows, V = logits.shape
    acc = _backend.acc_dtype(logits.dtype)
    if not _backend.use_triton(logits):
        valid = targets != ignore_index
        x = logits.to(acc)
        lse = torch.logsumexp(x, dim=1)
        safe_targets = torch.where(valid, targets, 0)
        x_target = x.gather(1, safe_targets[:, None])[:, 0]
        loss = torch.where(valid, lse - x_target, 0.0)
        if grad is not None:
            row_scale = torch.where(valid, scale.to(acc).expand(n_rows), 0.0)
            g = torch.softmax(x, dim=1)
            g[torch.arange(n_rows, device=x.device), safe_targets] -= 1.0
            grad.copy_(g * row_scale[:, None])
        return loss
    loss = torch.empty(n_rows, dtype=acc, device=logits.device)
    if n_rows == 0:
        return loss
    block_v = _backend.next_power_of_2(V) if not logits.is_cuda else min(_BLOCK_V, _backend.next_power_of_2(V))
    _cross_entropy_kernel[(n_rows,)](
        logits, targets, loss,
        grad if grad is not None else logits, scale if scale is not None else loss,
        logits.stride(0), targets.stride(0), grad.stride(0) if grad is not None else 0,
        scale.stride(0) if scale is not None and scale.dim() == 1 else 0,
        V, ignore_index,
        COMPUTE_GRAD=grad is not None, BLOCK_V=block_v, ACC=_backend.tl_dtype(logits.dtype),
        num_warps=_NUM_WARPS,
    )
    return loss


def reduce_loss(loss: Tensor, scale: Tensor, reduction: str) -> Tensor:
    """Per-row losses -> the reduction's loss; scale is reduction_scale's (1 / valid rows for mean)."""
    if reduction == "none":
        return loss
    return loss.sum() * scale if reduction == "mean" else loss.sum()


def cross_entropy_forward(
    logits: Tensor, targets: Tensor, ignore_index: int, reduction: str, compute_grad: bool
) -> tuple[Tensor, Tensor]:
    """(loss, grad): grad = d(loss)/d(logits) for grad_output = 1 (empty when not compute_grad)."""
    scale = reduction_scale(targets, ignore_index, reduction, _backend.acc_dtype(logits.dtype))
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if compute_grad else logits.new_empty(0)
    loss = cross_entropy_rows(logits, targets, ignore_index, scale, grad if compute_grad else None)
    return reduce_loss(loss, scale, reduction), grad


def cross_entropy_backward(grad: Tensor, grad_output: Tensor) -> Tensor:
    """Scale the forward's gradient by grad_output (0-d, or (N,) for reduction="none") in place:
    this op allocated it, and nothing else holds it."""
    return grad.mul_(grad_output[:, None] if grad_output.dim() == 1 else grad_output)


# --- torch.library: opaque to torch.compile; Triton or fallback is chosen when it runs ---


@torch.library.custom_op("finegpt::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd_op(
    logits: Tensor, targets: Tensor, ignore_index: int, reduction: str, compute_grad: bool
) -> tuple[Tensor, Tensor]:
    return cross_entropy_forward(logits, targets, ignore_index, reduction, compute_grad)


@_cross_entropy_fwd_op.register_fake
def _(logits, targets, ignore_index, reduction, compute_grad):
    acc = _backend.acc_dtype(logits.dtype)
    loss = logits.new_empty(logits.shape[0] if reduction == "none" else (), dtype=acc)
    return loss, logits.new_empty(logits.shape if compute_grad else 0)


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction):
        loss, grad = torch.ops.finegpt.cross_entropy_fwd(
            logits, targets, ignore_index, reduction, ctx.needs_input_grad[0]
        )
        ctx.save_for_backward(logits, targets)
        # Held outside save_for_backward: the backward scales it in place and drops it.
        ctx.grad = grad
        ctx.ignore_index, ctx.reduction = ignore_index, reduction
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad, ctx.grad = ctx.grad, None
        if grad is None:  # a second backward through the same graph (retain_graph=True): recompute
            logits, targets = ctx.saved_tensors
            _, grad = torch.ops.finegpt.cross_entropy_fwd(logits, targets, ctx.ignore_index, ctx.reduction, True)
        return cross_entropy_backward(grad, grad_output), None, None, None


def prepare_targets(targets: Tensor, n_rows: int, name: str) -> Tensor:
    """Targets of any shape with n_rows elements (e.g. the view tokens[:, 1:]) as a 1-D int64 tensor;
    a strided 1-D view is passed through, the kernel reads it with its stride."""
    if targets.numel() != n_rows:
        raise ValueError(f"{name}: {targets.numel()} targets for {n_rows} rows; pass one target per row")
    if targets.dtype != torch.int64:
        targets = targets.long()
    return targets.reshape(-1)


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """F.cross_entropy(logits, targets, ignore_index=..., reduction=...) for logits (N, V); see the
    module docstring for the few deliberate differences (fp32 loss, 0 when every target is ignored)."""
    if logits.dim() != 2:
        raise ValueError(f"cross_entropy: logits must be 2-D (N, V), got shape {tuple(logits.shape)}; "
                         "flatten with logits.view(-1, logits.size(-1))")
    check_reduction(reduction)
    targets = prepare_targets(targets, logits.shape[0], "cross_entropy")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return CrossEntropyFunction.apply(logits, targets, ignore_index, reduction)

"""LayerNorm over the last dimension, and the transformer block's residual add fused into it.

Layers, as in Liger-Kernel: the Triton kernels, the host functions `layer_norm_forward` /
`layer_norm_backward` (Triton or the PyTorch fallback), their `torch.library` registration (opaque
to torch.compile, so no graph break), a thin `torch.autograd.Function`, and the functional API.

Numerics: statistics (mean, 1/std) are computed and saved in fp32 whatever the input dtype (fp64
for fp64 input, so gradcheck can run the kernels). The backward is deterministic: each program
sums dW/dB over its rows in fp32 into its own row of a partials buffer, and one `sum(0)` adds them.
"""

from typing import Optional

import torch
from torch import Tensor

from kernels import _backend
from kernels._backend import tl, triton

# A program handles BLOCK_R rows x BLOCK_C columns per step, 8 warps. Sized by registers (ptxas
# for sm_90, C = 768): the forward at 2048 elements takes 40 registers a thread, the backward,
# which holds more live tiles, 48 at 1024 elements (159 at 4096: one program per SM). Few
# registers leave room for many resident warps, which is what hides memory latency here.
_TILE_FWD = 2048
_TILE_BWD = 1024
_NUM_WARPS = 8
# Backward programs per SM: all resident at once (48 registers x 256 threads allow 5), so no
# second wave runs alone at the end; the fp32 partials (programs x C) stay small.
_BWD_PROGRAMS_PER_SM = 4


@triton.jit
def _layer_norm_fwd_kernel(
    X, R, Y, S, W, B, Mean, Rstd,
    stride_x, stride_r, stride_y, stride_s,
    n_rows, C, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < C)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(ACC)
        # Round the sum to the stream's dtype first: the block normalises exactly the tensor it returns.
        s = (x + r).to(S.dtype.element_ty)
        tl.store(S + rows[:, None] * stride_s + cols[None, :], s, mask=mask)
        x = s.to(ACC)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / C
    # 1/sqrt, not rsqrt: libdevice is unavailable under the interpreter (FACTS §7).
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=cols < C, other=0.0).to(ACC)
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cols < C, other=0.0).to(ACC)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_bwd_kernel(
    X, W, DY, DS, DX, Mean, Rstd, DW_partial, DB_partial,
    stride_x, stride_dy, stride_ds, stride_dx,
    n_rows, C,
    HAS_BIAS: tl.constexpr, HAS_DS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    # Persistent: program p takes row blocks p, p + P, p + 2P, ... and keeps its dW/dB in registers.
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    db = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    for block in range(pid, tl.cdiv(n_rows, BLOCK_R), n_programs):
        rows = (block * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / C
        c2 = tl.sum(wdy, axis=1) / C
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS:
            # add_layer_norm: the sum x + residual is also an output, so its gradient adds here.
            dx += tl.load(DS + rows[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(ACC)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
    tl.store(DW_partial + pid * C + cols, tl.sum(dw, axis=0), mask=col_mask)
    if HAS_BIAS:
        tl.store(DB_partial + pid * C + cols, tl.sum(db, axis=0), mask=col_mask)


def _tile(C: int, tile: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): a whole row per program step, and as many rows as fit the tile."""
    block_c = _backend.next_power_of_2(C)
    return max(1, tile // block_c), block_c


def _out_dtype(x: Tensor, residual: Optional[Tensor]) -> torch.dtype:
    return torch.result_type(x, residual) if residual is not None else x.dtype


def _as_rows(t: Tensor) -> Tensor:
    """(..., C) -> (N, C) with unit column stride, copying only when a view cannot do it."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def layer_norm_forward(
    x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x, residual: (N, C) rows. Returns (y, s, mean, rstd); s = x + residual, or empty without one.
    y and s take the dtype of x + residual (a bf16 branch added to an fp32 stream stays fp32)."""
    n_rows, C = x.shape
    out_dtype = _out_dtype(x, residual)
    stat_dtype = _backend.acc_dtype(out_dtype)
    if not _backend.use_triton(x):
        s = x + residual if residual is not None else x.new_empty(0)
        xf = (s if residual is not None else x).to(stat_dtype)
        mean = xf.mean(dim=1)
        rstd = torch.rsqrt(xf.var(dim=1, unbiased=False) + eps)
        y = (xf - mean[:, None]) * rstd[:, None] * weight.to(stat_dtype)
        if bias is not None:
            y = y + bias.to(stat_dtype)
        return y.to(out_dtype), s, mean, rstd
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    s = torch.empty_like(y) if residual is not None else x.new_empty(0)
    mean = torch.empty(n_rows, dtype=stat_dtype, device=x.device)
    rstd = torch.empty_like(mean)
    block_r, block_c = _tile(C, _TILE_FWD)
    r = residual if residual is not None else x
    _layer_norm_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
        x, r, y, s if residual is not None else y, weight, bias if bias is not None else weight,
        mean, rstd,
        x.stride(0), r.stride(0), y.stride(0), C, n_rows, C, eps,
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        BLOCK_R=block_r, BLOCK_C=block_c, ACC=_backend.tl_dtype(out_dtype), num_warps=_NUM_WARPS,
    )
    return y, s, mean, rstd


def layer_norm_backward(
    dy: Tensor, ds: Optional[Tensor], x: Tensor, weight: Tensor, has_bias: bool, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dx, dweight, dbias) from the saved normalised input x (or x + residual), mean, rstd.
    ds is the gradient of the x + residual output of add_layer_norm (None for plain LayerNorm).
    dbias is empty when there is no bias."""
    n_rows, C = x.shape
    acc = mean.dtype
    if not _backend.use_triton(x):
        xhat = (x.to(acc) - mean[:, None]) * rstd[:, None]
        dyf = dy.to(acc)
        wdy = dyf * weight.to(acc)
        dx = (wdy - xhat * (xhat * wdy).mean(1, keepdim=True) - wdy.mean(1, keepdim=True)) * rstd[:, None]
        if ds is not None:
            dx = dx + ds.to(acc)
        dw = (dyf * xhat).sum(0).to(weight.dtype)
        db = dyf.sum(0).to(weight.dtype) if has_bias else weight.new_empty(0)
        return dx.to(x.dtype), dw, db
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    block_r, block_c = _tile(C, _TILE_BWD)
    n_programs = min(triton.cdiv(n_rows, block_r), _backend.program_count(x, per_sm=_BWD_PROGRAMS_PER_SM))
    dw_partial = torch.empty(n_programs, C, dtype=acc, device=x.device)
    db_partial = torch.empty_like(dw_partial) if has_bias else dw_partial
    _layer_norm_bwd_kernel[(n_programs,)](
        x, weight, dy, ds if ds is not None else dy, dx, mean, rstd, dw_partial, db_partial,
        x.stride(0), dy.stride(0), ds.stride(0) if ds is not None else 0, dx.stride(0),
        n_rows, C,
        HAS_BIAS=has_bias, HAS_DS=ds is not None,
        BLOCK_R=block_r, BLOCK_C=block_c, ACC=_backend.tl_dtype(x.dtype), num_warps=_NUM_WARPS,
    )
    dw = dw_partial.sum(0).to(weight.dtype)
    db = db_partial.sum(0).to(weight.dtype) if has_bias else weight.new_empty(0)
    return dx, dw, db


# --- torch.library: opaque ops for torch.compile; Triton or fallback is chosen when they run ---


@torch.library.custom_op("finegpt::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(
    x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return layer_norm_forward(x, residual, weight, bias, eps)


@_layer_norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps):
    out_dtype = _out_dtype(x, residual)
    stats = x.new_empty(x.shape[0], dtype=_backend.acc_dtype(out_dtype))
    s = x.new_empty(x.shape, dtype=out_dtype) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape, dtype=out_dtype), s, stats, torch.empty_like(stats)


@torch.library.custom_op("finegpt::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(
    dy: Tensor, ds: Optional[Tensor], x: Tensor, weight: Tensor, has_bias: bool, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    return layer_norm_backward(dy, ds, x, weight, has_bias, mean, rstd)


@_layer_norm_bwd_op.register_fake
def _(dy, ds, x, weight, has_bias, mean, rstd):
    return x.new_empty(x.shape), torch.empty_like(weight), weight.new_empty(weight.shape if has_bias else 0)


class LayerNormFunction(torch.autograd.Function):
    """(x, residual or None, weight, bias or None, eps) -> y, or (y, x + residual) with a residual."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        shape = x.shape
        x_rows = _as_rows(x)
        r_rows = _as_rows(residual) if residual is not None else None
        y, s, mean, rstd = torch.ops.finegpt.layer_norm_fwd(x_rows, r_rows, weight, bias, eps)
        # The residual path saves the sum it returns anyway: no extra activation memory.
        ctx.save_for_backward(s if residual is not None else x_rows, weight, mean, rstd)
        ctx.has_residual = residual is not None
        ctx.has_bias = bias is not None
        ctx.input_dtypes = (x.dtype, residual.dtype if residual is not None else None)
        if residual is None:
            return y.view(shape)
        return y.view(shape), s.view(shape)

    @staticmethod
    def backward(ctx, dy, ds=None):
        x_rows, weight, mean, rstd = ctx.saved_tensors
        dy_rows = _as_rows(dy)
        ds_rows = _as_rows(ds) if ds is not None else None
        dx, dw, db = torch.ops.finegpt.layer_norm_bwd(dy_rows, ds_rows, x_rows, weight, ctx.has_bias, mean, rstd)
        dx = dx.view(dy.shape)
        x_dtype, residual_dtype = ctx.input_dtypes
        dresidual = dx.to(residual_dtype) if ctx.has_residual else None
        return dx.to(x_dtype), dresidual, dw, (db if ctx.has_bias else None), None


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor] = None) -> None:
    C = x.shape[-1]
    if weight.shape != (C,) or (bias is not None and bias.shape != (C,)):
        raise ValueError(f"layer_norm: weight and bias must have shape ({C},) to match x's last dimension")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"add_layer_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")


def _ones_if_none(weight: Optional[Tensor], x: Tensor) -> Tensor:
    # F.layer_norm takes weight=None as no scaling; the kernels always read a weight.
    return x.new_ones(x.shape[-1]) if weight is None else weight


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5) -> Tensor:
    """F.layer_norm(x, (C,), weight, bias, eps) over the last dimension of x (any leading shape)."""
    weight = _ones_if_none(weight, x)
    _check(x, weight, bias)
    return LayerNormFunction.apply(x, None, weight, bias, eps)


def add_layer_norm(
    x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """(layer_norm(x + residual), x + residual) in one pass over memory."""
    weight = _ones_if_none(weight, x)
    _check(x, weight, bias, residual)
    return LayerNormFunction.apply(x, residual, weight, bias, eps)

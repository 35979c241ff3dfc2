"""kernels.layer_norm / add_layer_norm against a float64 F.layer_norm, on fresh random inputs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import _backend, add_layer_norm, layer_norm
from kernels.testing import assert_close_to_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(fn, *tensors, dtype):
    """Outputs and input gradients of fn on copies of tensors cast to dtype, for the same grad_outputs."""
    copies = [t.detach().to(dtype).requires_grad_(t.requires_grad) if t is not None else None for t in tensors]
    return copies, fn(*copies)


def _check_ln(x, residual, weight, bias, eps=1e-5):
    """Forward and backward of (add_)layer_norm vs float64, tolerance from PyTorch in x's dtype."""
    C = x.shape[-1]

    def fused(x, r, w, b):
        return add_layer_norm(x, r, w, b, eps) if r is not None else (layer_norm(x, w, b, eps),)

    def eager(x, r, w, b):
        s = x + r if r is not None else x
        y = F.layer_norm(s, (C,), w, b, eps)
        return (y, s) if r is not None else (y,)

    inputs = [x, residual, weight, bias]
    for t in inputs:
        if t is not None:
            t.grad = None
    outs = fused(*inputs)
    grads_out = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grads_out)
    results = {}
    for name, dtype in (("same", x.dtype), ("ref", torch.float64)):
        copies, ref_outs = _reference(eager, *inputs, dtype=dtype)
        torch.autograd.backward(ref_outs, [g.to(dtype) for g in grads_out])
        results[name] = (ref_outs, copies)
    for i, out in enumerate(outs):
        assert out.dtype == x.dtype
        assert_close_to_reference(out, results["same"][0][i], results["ref"][0][i], f"output {i}")
    for name, t, same, ref in zip(("x", "residual", "weight", "bias"), inputs, results["same"][1], results["ref"][1]):
        if t is not None and t.requires_grad:
            assert t.grad.dtype == t.dtype
            assert_close_to_reference(t.grad, same.grad, ref.grad, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [384, 640, 672, 1023])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_matches_float64(dtype, C, bias):
    x = (torch.randn(3, 5, C, device=DEVICE) * 2 + 0.5).to(dtype).requires_grad_()
    w = (torch.randn(C, device=DEVICE) * 0.5 + 1).to(dtype).requires_grad_()
    b = torch.randn(C, device=DEVICE).to(dtype).requires_grad_() if bias else None
    _check_ln(x, None, w, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [384, 1023])
def test_add_layer_norm_matches_float64(dtype, C):
    x = torch.randn(2, 7, C, device=DEVICE).to(dtype).requires_grad_()
    r = (torch.randn(2, 7, C, device=DEVICE) * 3).to(dtype).requires_grad_()
    w = torch.randn(C, device=DEVICE).to(dtype).requires_grad_()
    b = torch.randn(C, device=DEVICE).to(dtype).requires_grad_()
    _check_ln(x, r, w, b)


def test_add_layer_norm_returns_the_sum_it_normalised():
    x, r = torch.randn(2, 4, 640, device=DEVICE, dtype=torch.bfloat16).unbind(0)
    w, b = torch.ones(640, device=DEVICE), torch.zeros(640, device=DEVICE)
    y, s = add_layer_norm(x, r, w, b)
    # Triton's fp32 -> bf16 rounding may differ from PyTorch's by an ulp (interpreter truncates).
    torch.testing.assert_close(s, x + r, atol=0, rtol=2**-7)
    torch.testing.assert_close(y, layer_norm(s, w, b), atol=0, rtol=0)


def test_add_layer_norm_promotes_like_x_plus_residual(path):
    """A bf16 branch added to an fp32 residual stream (autocast) keeps the stream in fp32."""
    x = torch.randn(4, 96, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(4, 96, device=DEVICE, requires_grad=True)
    w, b = torch.randn(96, device=DEVICE), torch.randn(96, device=DEVICE)
    y, s = add_layer_norm(x, r, w, b)
    assert y.dtype == s.dtype == torch.float32
    dy, ds = torch.randn_like(y), torch.randn_like(s)
    torch.autograd.backward((y, s), (dy, ds))
    xr, rr = x.detach().requires_grad_(), r.detach().requires_grad_()
    s_ref = xr + rr
    y_ref = F.layer_norm(s_ref, (96,), w, b)
    torch.autograd.backward((y_ref, s_ref), (dy, ds))
    torch.testing.assert_close((y, s, r.grad), (y_ref, s_ref, rr.grad))
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad, xr.grad)


def test_non_contiguous_input_and_grad():
    C = 672
    base = torch.randn(6, C, 4, device=DEVICE)
    x = base.transpose(1, 2)[:, 1:3, :].detach().requires_grad_()
    assert not x.is_contiguous()
    w, b = torch.randn(C, device=DEVICE, requires_grad=True), torch.randn(C, device=DEVICE, requires_grad=True)
    _check_ln(x, None, w, b)
    r = torch.randn(C, 6, 2, device=DEVICE).permute(1, 2, 0).requires_grad_()
    _check_ln(x, r, w, b)


def test_gradcheck_float64(path):
    x = torch.randn(2, 3, 7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    r = torch.randn(2, 3, 7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, r, w, b: add_layer_norm(x, r, w, b), (x, r, w, b), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x, w: layer_norm(x, w, None), (x, w), fast_mode=True)
    # fp64 forward against PyTorch at fp64 precision: catches what fp32 tolerances could hide (eps).
    y, s = add_layer_norm(x, r, w, b, eps=1e-3)
    torch.testing.assert_close((y, s), (F.layer_norm(x + r, (7,), w, b, eps=1e-3), x + r), rtol=1e-12, atol=1e-12)


def test_bitwise_deterministic():
    C = 640
    x = torch.randn(37, C, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(C, device=DEVICE, requires_grad=True)
    b = torch.randn(C, device=DEVICE, requires_grad=True)
    dy = torch.randn_like(x)
    runs = []
    for _ in range(2):
        x.grad = w.grad = b.grad = None
        y = layer_norm(x, w, b)
        y.backward(dy)
        runs.append([y, x.grad, w.grad, b.grad])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_fallback_matches_float64(path):
    x = torch.randn(5, 96, requires_grad=True)
    r = torch.randn(5, 96, requires_grad=True)
    w, b = torch.randn(96, requires_grad=True), torch.randn(96, requires_grad=True)
    _check_ln(x, r, w, b)
    _check_ln(x, None, w, None)


def test_compiles_without_graph_break(monkeypatch):
    # The fallback path keeps this fast on a CPU; the op boundary torch.compile sees is the same.
    monkeypatch.setattr(_backend, "HAS_TRITON", torch.cuda.is_available())
    ln = kernels.LayerNorm(48).to(DEVICE)

    def block(x, r):
        y, s = ln(x, r)
        return ln(y).sum() + s.sum()

    x = torch.randn(2, 3, 48, device=DEVICE, requires_grad=True)
    r = torch.randn(2, 3, 48, device=DEVICE)
    compiled = torch.compile(block, fullgraph=True)
    loss = compiled(x, r)
    loss.backward()
    dx = x.grad.clone()
    x.grad = None
    block(x, r).backward()
    torch.testing.assert_close(loss, block(x, r))
    torch.testing.assert_close(dx, x.grad)


def test_module_matches_nanogpt_layer_norm():
    ln = kernels.LayerNorm(64, bias=False)
    assert [n for n, _ in ln.named_parameters()] == ["weight"]
    ln = kernels.LayerNorm(64)
    assert [n for n, _ in ln.named_parameters()] == ["weight", "bias"]
    x = torch.randn(3, 64)
    torch.testing.assert_close(ln(x), F.layer_norm(x, (64,), ln.weight, ln.bias, 1e-5))


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="triton is not importable here")
def test_kernels_compile_for_h100():
    """Compiled, not interpreted: what the interpreter forgives (types, dtype mixes) fails here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "kernels.testing", "layer_norm"], check=True, env=env, cwd=Path(__file__).parents[1])


def test_no_weight_means_no_scaling_like_f_layer_norm(path):
    x, residual = torch.randn(6, 40, device=DEVICE), torch.randn(6, 40, device=DEVICE)
    bias = torch.randn(40, device=DEVICE)
    torch.testing.assert_close(layer_norm(x, None, None), F.layer_norm(x, (40,)))
    normed, total = add_layer_norm(x, residual, None, bias)
    torch.testing.assert_close(normed, F.layer_norm(x + residual, (40,), None, bias))
    torch.testing.assert_close(total, x + residual)


def test_rejects_mismatched_weight():
    with pytest.raises(ValueError, match=r"\(64,\)"):
        layer_norm(torch.randn(2, 64), torch.ones(32), None)
    with pytest.raises(ValueError, match="residual shape"):
        add_layer_norm(torch.randn(2, 64), torch.randn(3, 64), torch.ones(64), None)


@pytest.mark.gpu
@pytest.mark.parametrize("C", [768, 1023])
def test_gpu_realistic_shape(C):
    x = torch.randn(8, 1024, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    w = torch.randn(C, device="cuda", requires_grad=True)
    b = torch.randn(C, device="cuda", requires_grad=True)
    _check_ln(x, r, w, b)
    _check_ln(x, None, w, b)


def test_package_works_without_triton():
    """Where triton cannot be imported, every op takes the PyTorch fallback."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, torch.nn.functional as F, kernels\n"
        "assert not kernels.HAS_TRITON\n"
        "x = torch.randn(4, 8, requires_grad=True); w = torch.randn(8)\n"
        "torch.testing.assert_close(kernels.layer_norm(x, w, None), F.layer_norm(x, (8,), w))\n"
        "t = torch.tensor([1, 2, -100, 3])\n"
        "torch.testing.assert_close(kernels.cross_entropy(x, t), F.cross_entropy(x, t))\n"
        "torch.testing.assert_close(kernels.linear_cross_entropy(x, torch.randn(5, 8), t.clamp(max=4), chunk_size=3)"
        ".isfinite(), torch.tensor(True))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])

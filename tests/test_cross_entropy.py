"""kernels.cross_entropy against a float64 F.cross_entropy, on fresh random inputs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import _backend, cross_entropy
from kernels.testing import assert_close_to_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100


def _inputs(n, V, dtype, n_ignored=1, scale=3.0):
    logits = (torch.randn(n, V, device=DEVICE) * scale).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (n,), device=DEVICE)
    targets[torch.randperm(n, device=DEVICE)[:n_ignored]] = IGNORE
    return logits, targets


def _check_ce(logits, targets, reduction, grad_output=None):
    """Loss and d(logits) vs float64, for a random grad_output (never 1) unless one is given;
    the tolerance comes from F.cross_entropy in the logits' dtype."""
    logits.grad = None
    loss = cross_entropy(logits, targets, ignore_index=IGNORE, reduction=reduction)
    assert loss.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    if grad_output is None:
        grad_output = torch.rand_like(loss) * 4 - 2
    loss.backward(grad_output)
    refs = {}
    for name, dtype in (("same", logits.dtype), ("ref", torch.float64)):
        x = logits.detach().to(dtype).requires_grad_()
        ref = F.cross_entropy(x, targets.reshape(-1), ignore_index=IGNORE, reduction=reduction)
        ref.backward(grad_output.to(dtype))
        refs[name] = (ref, x.grad)
    assert_close_to_reference(loss, refs["same"][0], refs["ref"][0], "loss", dtype=logits.dtype)
    assert logits.grad.dtype == logits.dtype
    assert_close_to_reference(logits.grad, refs["same"][1], refs["ref"][1], "dlogits")
    return loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [50257, 50304, 97])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64(dtype, V, reduction):
    # Few rows at GPT-2's vocab: the interpreter pays per row.
    logits, targets = _inputs(4 if V > 1000 else 33, V, dtype)
    _check_ce(logits, targets, reduction)


def test_grad_output_one_and_sum_of_none_agree():
    logits, targets = _inputs(9, 101, torch.float32)
    _check_ce(logits, targets, "mean", grad_output=torch.tensor(1.0, device=DEVICE))
    per_row = cross_entropy(logits, targets, IGNORE, "none")
    torch.testing.assert_close(per_row.sum() / (targets != IGNORE).sum(), cross_entropy(logits, targets))
    assert (per_row[targets == IGNORE] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored_gives_zero_loss_and_zero_grad(path, reduction):
    logits, _ = _inputs(6, 50304 if path == "triton" else 131, torch.bfloat16)
    targets = torch.full((6,), IGNORE, device=DEVICE)
    loss = cross_entropy(logits, targets, IGNORE, reduction)
    loss.backward(torch.full_like(loss, 3.0))
    # PyTorch's mean over zero targets is 0/0 = NaN; ours is 0 so one empty micro-batch is harmless.
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_confident_bf16_true_class_gradient():
    """softmax(x_y) >= 0.999: the true-class gradient p - 1 must survive bf16 (it is formed in fp32)."""
    n, V = 4, 50304
    logits = torch.randn(n, V, device=DEVICE)
    targets = torch.randint(0, V, (n,), device=DEVICE)
    logits[torch.arange(n), targets] = 20.0
    logits = logits.to(torch.bfloat16).requires_grad_()
    p_true = torch.softmax(logits.double(), dim=1)[torch.arange(n), targets]
    assert (p_true >= 0.999).all()
    _check_ce(logits, targets, "mean")
    ref = (p_true - 1) * 0.7 / n
    ours = cross_entropy(logits, targets)
    logits.grad = None
    ours.backward(torch.tensor(0.7, device=DEVICE))
    got = logits.grad[torch.arange(n), targets].double()
    # Two bf16 roundings (forward, then the grad_output scaling): within 1% of the exact value.
    assert ((got - ref).abs() / ref.abs()).max() < 0.01, (got, ref)


def test_non_contiguous_logits_and_shifted_token_targets():
    B, T, V = 3, 5, 131
    tokens = torch.randint(0, V, (B, T + 1), device=DEVICE)
    wide = torch.randn(B * T, V + 7, device=DEVICE)
    logits = wide[:, 3 : 3 + V].detach().requires_grad_()  # row stride V + 7
    assert not logits.is_contiguous()
    _check_ce(logits, tokens[:, 1:], "mean")  # 2-D strided view
    flat = torch.randint(0, V, (B * T + 1,), device=DEVICE)
    _check_ce(logits, flat[1:], "none")  # 1-D view at an 8-byte (not 16-byte) aligned address
    transposed = torch.randn(V, B * T, device=DEVICE).t().requires_grad_()  # column stride != 1
    _check_ce(transposed, flat[1:], "sum")


def test_gradcheck_float64(path):
    logits = torch.randn(4, 7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    targets = torch.tensor([1, IGNORE, 3, 6], device=DEVICE)
    for reduction in ("mean", "sum", "none"):
        fn = lambda x: cross_entropy(x, targets, IGNORE, reduction)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (logits,), fast_mode=True)
        expected = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction=reduction)
        torch.testing.assert_close(fn(logits), expected, rtol=1e-12, atol=1e-12)


def test_bitwise_deterministic():
    logits, targets = _inputs(6, 50304, torch.bfloat16, n_ignored=2)
    runs = []
    for _ in range(2):
        logits.grad = None
        loss = cross_entropy(logits, targets)
        loss.backward()
        runs.append((loss, logits.grad))
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])


def test_fallback_matches_float64(path):
    for reduction in ("mean", "none"):
        logits, targets = _inputs(7, 257, torch.bfloat16, n_ignored=2)
        _check_ce(logits, targets, reduction)


def test_retain_graph_second_backward_recomputes():
    logits, targets = _inputs(5, 97, torch.float32)
    loss = cross_entropy(logits, targets)
    loss.backward(retain_graph=True)
    first = logits.grad.clone()
    logits.grad = None
    loss.backward(torch.tensor(2.0, device=DEVICE))
    torch.testing.assert_close(logits.grad, 2 * first)


def test_compiles_without_graph_break(monkeypatch):
    # The fallback path keeps this fast on a CPU; the op boundary torch.compile sees is the same.
    monkeypatch.setattr(_backend, "HAS_TRITON", torch.cuda.is_available())
    loss_fn = kernels.CrossEntropyLoss()

    def head(h, w, t):
        return loss_fn(h @ w.t(), t)

    h = torch.randn(6, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(53, 8, device=DEVICE)
    t = torch.randint(0, 53, (6,), device=DEVICE)
    loss = torch.compile(head, fullgraph=True)(h, w, t)
    loss.backward()
    dh = h.grad.clone()
    h.grad = None
    expected = F.cross_entropy(h @ w.t(), t)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(dh, h.grad)


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="triton is not importable here")
def test_kernels_compile_for_h100():
    """Compiled, not interpreted: what the interpreter forgives (types, dtype mixes) fails here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "kernels.testing", "cross_entropy"], check=True, env=env, cwd=Path(__file__).parents[1])


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="2-D"):
        cross_entropy(torch.randn(2, 3, 5), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="one target per row"):
        cross_entropy(torch.randn(2, 5), torch.zeros(3, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_realistic_shape(reduction):
    logits, targets = _inputs(8192, 50304, torch.bfloat16, n_ignored=100)
    _check_ce(logits, targets, reduction)


@pytest.mark.gpu
def test_gpu_int64_offsets_past_2_31():
    """B·T·V > 2**31 elements: row offsets must not overflow int32 (FACTS §8)."""
    n, V = 42_700, 50304
    logits = torch.randn(n, V, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, V, (n,), device=DEVICE)
    loss = cross_entropy(logits, targets, reduction="none")
    loss[-4:].sum().backward()
    tail = logits.detach()[-4:].float().requires_grad_()
    expected = F.cross_entropy(tail, targets[-4:], reduction="none")
    expected.sum().backward()
    torch.testing.assert_close(loss[-4:], expected, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(logits.grad[-4:].float(), tail.grad, atol=2**-9, rtol=2**-7)
    assert torch.equal(logits.grad[:-4].abs().amax(), torch.zeros((), device=DEVICE, dtype=torch.bfloat16))

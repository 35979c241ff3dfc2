"""kernels.linear_cross_entropy against a float64 F.cross_entropy(F.linear(...)), fresh random inputs."""

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import _backend, linear_cross_entropy
from kernels.linear_cross_entropy import default_chunk_size
from kernels.testing import assert_close_to_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100


def _inputs(n, H, V, dtype, bias=True, n_ignored=1):
    hidden = torch.randn(n, H, device=DEVICE).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=DEVICE) * H**-0.5 * 2).to(dtype).requires_grad_()
    b = torch.randn(V, device=DEVICE).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, V, (n,), device=DEVICE)
    targets[torch.randperm(n, device=DEVICE)[:n_ignored]] = IGNORE
    return hidden, weight, b, targets


def _eager(hidden, weight, targets, bias, reduction):
    return F.cross_entropy(F.linear(hidden, weight, bias), targets.reshape(-1), ignore_index=IGNORE, reduction=reduction)


def _check_lce(hidden, weight, bias, targets, reduction, chunk_size):
    """Loss and gradients vs float64 for a random grad_output; tolerance from eager in the same dtype."""
    params = [t for t in (hidden, weight, bias) if t is not None]
    for t in params:
        t.grad = None
    loss = linear_cross_entropy(hidden, weight, targets, bias, IGNORE, reduction, chunk_size)
    grad_output = torch.rand_like(loss) * 4 - 2
    loss.backward(grad_output)
    refs = {}
    for name, dtype in (("same", hidden.dtype), ("ref", torch.float64)):
        copies = [t.detach().to(dtype).requires_grad_() for t in params]
        h, w, b = copies if bias is not None else (*copies, None)
        ref = _eager(h, w, targets, b, reduction)
        ref.backward(grad_output.to(dtype))
        refs[name] = (ref, copies)
    assert_close_to_reference(loss, refs["same"][0], refs["ref"][0], "loss", dtype=hidden.dtype)
    for i, t in enumerate(params):
        assert t.grad.dtype == t.dtype
        assert_close_to_reference(t.grad, refs["same"][1][i].grad, refs["ref"][1][i].grad, f"grad {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64(dtype, reduction, bias):
    # chunk 4 over 11 rows: three chunks, the last one short.
    _check_lce(*_inputs(11, 40, 131, dtype, bias), reduction, chunk_size=4)


@pytest.mark.parametrize("V", [50257, 50304])
def test_gpt2_vocab_sizes(V):
    _check_lce(*_inputs(5, 32, V, torch.bfloat16, bias=False), "mean", chunk_size=2)


def test_chunk_size_does_not_change_the_result():
    hidden, weight, bias, targets = _inputs(13, 24, 97, torch.float32, n_ignored=3)
    losses, grads = [], []
    for chunk in (1, 5, 13, 64):
        hidden.grad = weight.grad = bias.grad = None
        loss = linear_cross_entropy(hidden, weight, targets, bias, IGNORE, chunk_size=chunk)
        loss.backward()
        losses.append(loss)
        grads.append((hidden.grad, weight.grad, bias.grad))
    for loss, g in zip(losses[1:], grads[1:]):
        torch.testing.assert_close(loss, losses[0])
        for a, b in zip(g, grads[0]):
            torch.testing.assert_close(a, b)


def test_default_chunk_size_rule():
    # 256 MiB of bf16 logits at V = 50304 is 2668 rows -> the power of two below: 2048.
    assert default_chunk_size(32768, 50304, torch.bfloat16) == 2048
    assert default_chunk_size(32768, 50304, torch.float32) == 1024
    assert default_chunk_size(100, 50304, torch.bfloat16) == 100


def test_autocast_bf16_matches_eager_autocast():
    hidden, weight, bias, targets = _inputs(9, 48, 211, torch.float32, n_ignored=2)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, bias, chunk_size=4)
    loss.backward()
    assert loss.dtype == torch.float32 and weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    fused = (loss, hidden.grad, weight.grad, bias.grad)
    for t in (hidden, weight, bias):
        t.grad = None
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        eager = _eager(hidden, weight, targets, bias, "mean")
    eager.backward()
    # Both run the GEMMs in bf16; fused keeps the softmax and the weight-gradient sum in fp32.
    for got, want in zip(fused, (eager, hidden.grad, weight.grad, bias.grad)):
        torch.testing.assert_close(got, want.float(), atol=2e-2, rtol=2e-2)


def test_all_targets_ignored_gives_zero_loss_and_zero_grads(path):
    hidden, weight, bias, _ = _inputs(6, 16, 67, torch.bfloat16)
    targets = torch.full((6,), IGNORE, device=DEVICE)
    loss = linear_cross_entropy(hidden, weight, targets, bias, chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0
    for t in (hidden, weight, bias):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_shifted_token_targets():
    B, T, H, V = 2, 4, 16, 53
    tokens = torch.randint(0, V, (B, T + 1), device=DEVICE)
    hidden, weight, bias, _ = _inputs(B * T, H, V, torch.float32)
    _check_lce(hidden, weight, bias, tokens[:, 1:], "mean", chunk_size=3)


def test_gradcheck_float64(path):
    hidden, weight, bias, targets = _inputs(5, 4, 7, torch.float64)
    for reduction in ("mean", "none"):
        fn = lambda h, w, b: linear_cross_entropy(h, w, targets, b, IGNORE, reduction, chunk_size=2)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (hidden, weight, bias), fast_mode=True)
        expected = _eager(hidden, weight, targets, bias, reduction)
        torch.testing.assert_close(fn(hidden, weight, bias), expected, rtol=1e-12, atol=1e-12)


def test_bitwise_deterministic():
    hidden, weight, bias, targets = _inputs(10, 32, 301, torch.bfloat16, n_ignored=2)
    runs = []
    for _ in range(2):
        hidden.grad = weight.grad = bias.grad = None
        loss = linear_cross_entropy(hidden, weight, targets, bias, chunk_size=3)
        loss.backward()
        runs.append((loss, hidden.grad, weight.grad, bias.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_fallback_matches_float64(path):
    _check_lce(*_inputs(7, 24, 89, torch.bfloat16), "mean", chunk_size=3)
    _check_lce(*_inputs(7, 24, 89, torch.float32, bias=False), "none", chunk_size=3)


def test_compiles_without_graph_break(monkeypatch):
    # The fallback path keeps this fast on a CPU; the op boundary torch.compile sees is the same.
    monkeypatch.setattr(_backend, "HAS_TRITON", torch.cuda.is_available())
    ln = kernels.LayerNorm(16).to(DEVICE)
    loss_fn = kernels.LinearCrossEntropyLoss(chunk_size=4)

    def head(x, r, w, t):
        y, _ = ln(x, r)
        return loss_fn(y.view(-1, 16), w, t)

    x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    r = torch.randn(2, 5, 16, device=DEVICE)
    w = torch.randn(37, 16, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 37, (2, 6), device=DEVICE)[:, 1:]
    loss = torch.compile(head, fullgraph=True)(x, r, w, t)
    loss.backward()
    compiled_grads = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    expected = head(x, r, w, t)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(compiled_grads, (x.grad, w.grad))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_batched_hidden_equals_flattened(path, reduction):
    """hidden (B, T, H) with targets (B, T), as a GPT head hands them over."""
    hidden, weight, _, targets = _inputs(12, 16, 37, torch.float32)
    flat = linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE, reduction=reduction)
    batched = linear_cross_entropy(hidden.view(3, 4, 16), weight, targets.view(3, 4), ignore_index=IGNORE,
                                   reduction=reduction)
    assert batched.shape == ((3, 4) if reduction == "none" else ())
    torch.testing.assert_close(batched.reshape(flat.shape), flat, rtol=0, atol=0)


def test_rejects_bad_arguments():
    h, w = torch.randn(4, 8), torch.randn(11, 8)
    t = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"weight \(V, H\)"):
        linear_cross_entropy(h, torch.randn(11, 9), t)
    with pytest.raises(ValueError, match="bias"):
        linear_cross_entropy(h, w, t, bias=torch.zeros(10))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="batchmean")


@pytest.mark.gpu
def test_gpu_realistic_shape_and_memory():
    """B·T = 8192, C = 768, V = 50304 under bf16 autocast: matches eager within bf16 tolerance and
    needs far less memory than the B·T·V logits eager keeps."""
    n, H, V = 8192, 768, 50304
    hidden, weight, _, targets = _inputs(n, H, V, torch.float32, bias=False, n_ignored=50)
    hidden = hidden.detach().to(torch.bfloat16).requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    fused_peak = torch.cuda.max_memory_allocated() - base
    fused = (loss.detach(), hidden.grad, weight.grad)
    hidden.grad = weight.grad = None
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = _eager(hidden, weight, targets, None, "mean")
    eager.backward()
    eager_peak = torch.cuda.max_memory_allocated() - base
    torch.testing.assert_close(fused[0], eager.float(), atol=1e-2, rtol=1e-3)
    # Gradients are ~1/N small: tolerances relative to each tensor's largest entry (bf16 GEMMs).
    for got, want in ((fused[1], hidden.grad), (fused[2], weight.grad)):
        scale = want.float().abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), atol=0.02 * scale, rtol=0.02)
    assert fused_peak < eager_peak / 4, (fused_peak, eager_peak)

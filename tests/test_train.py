"""Training: it learns, resumes exactly, stops cleanly on Ctrl-C and NaN, and refuses bad input clearly."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from finegpt import checkpoint
from finegpt.cli import main
from finegpt.data import read_shard, write_shard
from finegpt.errors import FinegptError
from finegpt.prepare import prepare_shards
from finegpt.train import Trainer, config_from_preset, lr_at, oom_advice, shard_files, train

REPO = Path(__file__).resolve().parents[1]

# A tiny model on GPT-2's vocabulary: the head dominates its cost, so keep tokens per step small.
TINY = dict(
    n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4, grad_accum=2, lr=1e-2, min_lr=1e-3,
    warmup_iters=0, eval_interval=1000, eval_tokens=512, log_interval=1, device="cpu", fused=False,
)  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A small slice of the builtin corpus (Python's docs): 40k tokens, a tenth held out for val."""
    out = tmp_path_factory.mktemp("builtin")
    prepare_shards("builtin", out, max_tokens=40_000, progress=False)
    return out


def tiny(data, out, **overrides):
    return config_from_preset("cpu", **{**TINY, "data": str(data), "out": str(out), **overrides})


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = config_from_preset("cpu", lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 11)
    assert lr_at(9, cfg) == pytest.approx(1e-3 * 10 / 11)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)  # halfway down the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(i, cfg) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_weight_decay_only_on_matrices(shards, tmp_path):
    trainer = Trainer(tiny(shards, tmp_path, max_iters=1, weight_decay=0.1))
    try:
        decay, no_decay = trainer.optimizer.param_groups
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
        assert len(decay["params"]) + len(no_decay["params"]) == len(list(trainer.raw_model.parameters()))
        assert trainer.tokens_per_step == 4 * 2 * 32
    finally:
        trainer.close()


@pytest.mark.slow
def test_training_goes_well_below_unigram_entropy(shards, tmp_path):
    """A model that learned only token frequencies scores the unigram entropy of the data; one that uses
    its context goes well below it. Trained on a 1,100-token slice of the builtin corpus, then scored
    on all of that slice (the val shard here holds the same tokens), so the figure is not batch noise."""
    tokens = read_shard(shard_files(shards, "train")[0])[:1100]
    data = tmp_path / "slice"
    data.mkdir()
    write_shard(data / "slice_val_000000.bin", tokens)
    write_shard(data / "slice_train_000001.bin", tokens)
    counts = np.bincount(tokens).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log(p)).sum())  # nats per token, like the loss

    cfg = tiny(data, tmp_path, n_layer=2, n_embd=64, block_size=64, batch_size=2, grad_accum=1, lr=2e-2,
               min_lr=2e-3, warmup_iters=5, max_iters=200, eval_tokens=4096)  # fmt: skip
    trainer = Trainer(cfg)
    try:
        before = trainer.evaluate()
        for _ in range(cfg.max_iters):
            trainer.train_step()
        after = trainer.evaluate()
    finally:
        trainer.close()
    assert before > math.log(50257) - 1  # starts near uniform over the vocabulary
    assert after < entropy - 1.0, (after, entropy)


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(shards, tmp_path):
    cfg = tiny(shards, tmp_path / "straight", max_iters=6)
    straight = Trainer(cfg)
    losses = [straight.train_step() for _ in range(6)]
    final = {k: v.clone() for k, v in straight.raw_model.state_dict().items()}
    straight.close()

    first = Trainer(cfg)
    resumed_losses = [first.train_step() for _ in range(3)]
    checkpoint.save_atomic(first.state_dict(), tmp_path / "ckpt.pt")
    first.close()
    torch.manual_seed(999)  # the checkpoint, not the process, must decide what comes next
    second = Trainer(cfg)
    second.load_state_dict(checkpoint.load(tmp_path / "ckpt.pt"))
    resumed_losses += [second.train_step() for _ in range(3)]
    assert resumed_losses == losses
    for k, v in second.raw_model.state_dict().items():
        assert torch.equal(v, final[k]), k
    second.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_steps(dtype, shards, tmp_path):
    """bf16 autocast, and fp16 with its grad scaler, also run on a CPU (where the CI can check them)."""
    trainer = Trainer(tiny(shards, tmp_path, max_iters=2, dtype=dtype))
    try:
        assert trainer.scaler.is_enabled() == (dtype == "float16")
        losses = [trainer.train_step(), trainer.train_step()]
        assert all(math.isfinite(x) for x in losses)
        assert all(p.dtype == torch.float32 for p in trainer.raw_model.parameters())  # fp32 master weights
    finally:
        trainer.close()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save_atomic({"iter_num": 1}, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        checkpoint.save_atomic({"iter_num": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["iter_num"] == 1  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # and the partial file is gone


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_ctrl_c_writes_checkpoint_and_resume_continues_exactly(shards, tmp_path):
    """SIGINT a real `finegpt train`: it checkpoints and exits 0 without a traceback; `--resume` then
    reproduces, step for step, the losses of a run never interrupted. Warmup spans the whole test, so
    the learning rate does not depend on max_iters and the three runs can differ in it."""
    flags = dict(max_iters=12, warmup_iters=100_000, lr=1e-3)
    reference = train(tiny(shards, tmp_path / "ref", **flags), echo=lambda *a: None)
    assert reference["iter"] == 12
    ref_losses = {r["iter"]: r["loss"] for r in read_metrics(tmp_path / "ref") if "loss" in r}

    out = tmp_path / "run"
    args = [sys.executable, "-m", "finegpt", "train", "--vram", "cpu", "--data", str(shards), "--out", str(out),
            "--max-iters", "100000", "--warmup-iters", "100000", "--lr", "1e-3"]  # fmt: skip
    for key in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "min_lr",
                "eval_interval", "eval_tokens", "log_interval", "device"):  # fmt: skip
        args += [f"--{key.replace('_', '-')}", str(TINY[key])]
    proc = subprocess.Popen(args + ["--eager"], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and any(r.get("iter", 0) >= 3 and "loss" in r for r in read_metrics(out)):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "Interrupted at iter" in stdout
    stopped_at = checkpoint.load(out / "ckpt.pt")["iter_num"]
    assert 3 <= stopped_at < 12

    cfg = replace(tiny(shards, out, **flags), resume=True)
    train(cfg, echo=lambda *a: None)
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["iter"] for r in rows] == list(range(1, 13))  # appended, no duplicate rows
    assert {r["iter"]: r["loss"] for r in rows} == ref_losses
    assert checkpoint.load(out / "ckpt.pt")["iter_num"] == 12
    ref_model = checkpoint.load(tmp_path / "ref" / "ckpt.pt")["model"]
    for k, v in checkpoint.load(out / "ckpt.pt")["model"].items():
        assert torch.equal(v, ref_model[k]), k


def test_nan_loss_stops_and_keeps_last_good_checkpoint(shards, tmp_path):
    out = tmp_path / "nan"
    result = CliRunner().invoke(main, [
        "train", "--vram", "cpu", "--data", str(shards), "--out", str(out), "--eager", "--device", "cpu",
        "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
        "--grad-accum", "1", "--lr", "1e30", "--min-lr", "1e30", "--warmup-iters", "0", "--max-iters", "50",
        "--eval-interval", "1", "--eval-tokens", "128",
    ])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "loss is" in result.output and "last good checkpoint" in result.output
    kept = checkpoint.load(out / "ckpt.pt")
    diverged_at = int(result.output.split("at iteration ")[1].split(":")[0])
    assert kept["iter_num"] == diverged_at - 1  # the checkpoint of the last finite step survives


def test_cli_end_to_end_writes_metrics_curve_checkpoint_and_samples(shards, tmp_path):
    out = tmp_path / "e2e"
    base = ["train", "--vram", "cpu", "--data", str(shards), "--out", str(out), "--device", "cpu", "--eager",
            "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
            "--grad-accum", "1", "--max-iters", "4", "--warmup-iters", "1", "--eval-interval", "2",
            "--eval-tokens", "256", "--log-interval", "1"]  # fmt: skip
    result = CliRunner().invoke(main, base)
    assert result.exit_code == 0, result.output
    assert "MFU n/a" in result.output and "tok/s" in result.output and "ETA" in result.output
    rows = read_metrics(out)
    assert [r["iter"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 2, 4]
    assert all({"iter", "loss", "lr", "tokens_per_s"} <= r.keys() for r in rows if "loss" in r)
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert checkpoint.load(out / "ckpt.pt")["iter_num"] == 4

    sample = CliRunner().invoke(main, ["sample", "--ckpt", str(out), "--prompt", "The", "--max-new-tokens", "8", "--seed", "1"])
    assert sample.exit_code == 0, sample.output
    assert sample.output.startswith("The")
    again = CliRunner().invoke(main, ["sample", "--ckpt", str(out / "ckpt.pt"), "--prompt", "The", "--max-new-tokens", "8", "--seed", "1"])
    assert again.output == sample.output

    # The same --out again without --resume would overwrite the run: refused.
    result = CliRunner().invoke(main, base)
    assert result.exit_code == 1 and "--resume" in result.output
    # Resuming with a different model is refused, naming what differs.
    result = CliRunner().invoke(main, ["train", "--resume", "--out", str(out), "--n-embd", "64"])
    assert result.exit_code == 1 and "n_embd" in result.output and "Traceback" not in result.output
    # Resuming with a longer run is allowed and continues from iteration 4.
    result = CliRunner().invoke(main, ["train", "--resume", "--out", str(out), "--max-iters", "5"])
    assert result.exit_code == 0, result.output
    assert [r["iter"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vram", "99"], "Invalid value for '--vram'"),
        (["--n-embd", "100", "--n-head", "3"], "--n-embd 100 must be a multiple of --n-head 3"),
        (["--batch-size", "0"], "Invalid value for '--batch-size'"),
        (["--lr", "1e-3", "--min-lr", "1e-2"], "--min-lr"),
        (["--data", "{tmp}/nowhere"], "no training shards"),
        (["--resume", "--out", "{tmp}/nothing"], "no checkpoint at"),
        (["--device", "tpu9"], "--device"),
    ],
)
def test_bad_flags_give_a_message_not_a_traceback(args, message, tmp_path, monkeypatch):
    # In an empty directory: the default --out (./out) may hold a real run where the tests are started.
    monkeypatch.chdir(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(main, ["train", "--vram", "cpu", *args] if args[0] != "--vram" else ["train", *args])
    assert result.exit_code in (1, 2), result.output
    assert message in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the note printed when a GPU tier runs on the CPU")
def test_gpu_tier_on_the_cpu_says_so(shards, tmp_path):
    result = CliRunner().invoke(main, [
        "train", "--vram", "16", "--data", str(shards), "--out", str(tmp_path / "r"), "--device", "cpu",
        "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "2",
        "--grad-accum", "1", "--max-iters", "1", "--warmup-iters", "0", "--eval-interval", "1", "--eval-tokens", "64",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "tier 16 is sized for a 16 GB GPU" in result.output and "--vram cpu" in result.output


def test_cuda_device_without_cuda_is_a_clear_error(shards, tmp_path):
    with pytest.raises(FinegptError, match="no CUDA GPU"):
        Trainer(tiny(shards, tmp_path, device="cuda", max_iters=1))


def test_out_of_memory_names_a_smaller_micro_batch_or_tier(shards, tmp_path, monkeypatch):
    cfg = config_from_preset("24", data=str(shards), out=str(tmp_path), fused=False)
    message = oom_advice(cfg)
    assert "--batch-size 16 --grad-accum 32" in message and "--vram 16" in message

    def oom(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "train_step", oom)
    with pytest.raises(FinegptError, match="--batch-size 2 --grad-accum 4"):
        train(tiny(shards, tmp_path / "oom", max_iters=2), echo=lambda *a: None)

    # Out of memory already while the model and optimizer are built: the same advice.
    def oom_at_build(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Trainer, "__init__", oom_at_build)
    with pytest.raises(FinegptError, match="--batch-size 2 --grad-accum 4"):
        train(tiny(shards, tmp_path / "oom_build", max_iters=2), echo=lambda *a: None)


def test_wandb_without_the_package_is_a_clear_error(shards, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(FinegptError, match="pip install 'finegpt\\[wandb\\]'"):
        train(tiny(shards, tmp_path, max_iters=1, wandb=True), echo=lambda *a: None)
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before any work


@pytest.mark.gpu
def test_fused_steps_on_cuda(shards, tmp_path):
    cfg = config_from_preset("cpu", data=str(shards), out=str(tmp_path), device="cuda", fused=True, compile=False, max_iters=5)
    trainer = Trainer(cfg)
    try:
        losses = [trainer.train_step() for _ in range(5)]
        assert trainer.dtype in ("bfloat16", "float16")
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
        assert trainer.evaluate() is not None
    finally:
        trainer.close()

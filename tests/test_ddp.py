"""Two processes (gloo, CPU) train exactly like one process with the same global batch."""

import os
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from finegpt.train import Trainer, TrainConfig, config_from_preset

STEPS = 3
GLOBAL_MICRO_BATCHES = 2  # grad_accum: one micro-batch per process with two processes


def _config(fsdp: bool = False) -> TrainConfig:
    return config_from_preset(
        "cpu", n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=256, batch_size=4,
        grad_accum=GLOBAL_MICRO_BATCHES, lr=1e-2, min_lr=1e-3, warmup_iters=1, max_iters=STEPS,
        device="cpu", fused=False, compile=False, fsdp=fsdp,
    )  # fmt: skip


def _micro_batches():
    """batches[step][micro] = (x, y): the same global batches for both runs."""
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (STEPS, GLOBAL_MICRO_BATCHES, 4, 17), generator=g)
    return [[(data[s, m, :, :-1], data[s, m, :, 1:]) for m in range(GLOBAL_MICRO_BATCHES)] for s in range(STEPS)]


def _worker(rank, world, port, cfg_dict, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    batches = [step[rank] for step in _micro_batches()]  # this process's share of each step
    trainer = Trainer(TrainConfig(**cfg_dict), loader=batches)
    assert trainer.micro_steps == GLOBAL_MICRO_BATCHES // world
    losses = [trainer.train_step() for _ in range(STEPS)]
    state = trainer.state_dict()  # collective: every process takes part
    if rank == 0:
        torch.save({"losses": losses, "model": state["model"]}, result_path)
    trainer.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_same_global_batch(fsdp, tmp_path):
    single = Trainer(_config(), loader=[mb for step in _micro_batches() for mb in step])
    losses = [single.train_step() for _ in range(STEPS)]
    expected = single.raw_model.state_dict()

    result_path = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, _free_port(), asdict(_config(fsdp)), str(result_path)), nprocs=2, join=True)
    result = torch.load(result_path, weights_only=True)
    assert result["losses"] == pytest.approx(losses, rel=1e-6)
    assert result["model"].keys() == expected.keys()
    # Weights agree to ~1e-7, except the key bias (a third of c_attn.bias): its true gradient is 0
    # (softmax ignores a shift shared by all keys), so Adam scales summation-order noise up to ~lr·1e-4.
    for name, value in expected.items():
        torch.testing.assert_close(result["model"][name], value, rtol=1e-5, atol=1e-5, msg=name)
    single.close()


@pytest.mark.slow
def test_torchrun_cli_trains_checkpoints_and_resumes(tmp_path):
    """`torchrun -m finegpt train` end to end on 2 CPU processes: each rank reads its own share of the
    shards, rank 0 writes one checkpoint holding both ranks' loader states, and --resume continues."""
    from finegpt import checkpoint
    from finegpt.data import write_shard

    data = tmp_path / "shards"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    write_shard(data / "t_val_000000.bin", torch.randint(0, 50257, (2_000,), generator=g).numpy())
    write_shard(data / "t_train_000001.bin", torch.randint(0, 50257, (20_000,), generator=g).numpy())
    out = tmp_path / "out"
    common = ["--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "finegpt", "train"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    first = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *common, "--vram", "cpu", "--data", str(data),
         "--out", str(out), "--device", "cpu", "--eager", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
         "--block-size", "32", "--batch-size", "4", "--grad-accum", "2", "--max-iters", "2",
         "--eval-interval", "2", "--eval-tokens", "256", "--log-interval", "1"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    state = checkpoint.load(out / "ckpt.pt")
    assert state["world_size"] == 2 and state["iter_num"] == 2
    assert [s["rank"] for s in state["loader"]] == [0, 1] and all(s["batches_consumed"] == 2 for s in state["loader"])
    common[3] = str(_free_port())
    second = subprocess.run([sys.executable, "-m", "torch.distributed.run", *common, "--resume", "--out", str(out),
                             "--max-iters", "3"], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert "Traceback" not in second.stderr
    assert checkpoint.load(out / "ckpt.pt")["iter_num"] == 3

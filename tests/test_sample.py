"""`finegpt sample`: a checkpoint (directory or file) in, GPT-2 text out."""

import pytest
import torch
from click.testing import CliRunner

from finegpt import checkpoint
from finegpt.cli import main
from finegpt.sample import generate_text, load_model
from finegpt.train import Trainer, config_from_preset


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training --out directory with a checkpoint of a tiny model after two steps."""
    out = tmp_path_factory.mktemp("run")
    cfg = config_from_preset("cpu", n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=2, grad_accum=1,
                             device="cpu", fused=False, out=str(out))  # fmt: skip
    batches = [(torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16))) for _ in range(2)]
    trainer = Trainer(cfg, loader=batches)
    trainer.train_step()
    trainer.train_step()
    checkpoint.save_atomic(trainer.state_dict(), out / checkpoint.CKPT_NAME)
    trainer.close()
    return out


def test_load_model_from_directory_or_file(run_dir):
    a, b = load_model(run_dir), load_model(run_dir / "ckpt.pt")
    assert not a.training and a.config.n_embd == 32
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_generate_text_continues_the_prompt_reproducibly(run_dir):
    model = load_model(run_dir)
    text = generate_text(model, "Hello world", max_new_tokens=20, temperature=1.0, top_k=None, seed=3)
    assert text.startswith("Hello world") and len(text) > len("Hello world")
    assert text == generate_text(model, "Hello world", max_new_tokens=20, temperature=1.0, top_k=None, seed=3)
    greedy = generate_text(model, "Hello", max_new_tokens=5, temperature=0)
    assert greedy == generate_text(model, "Hello", max_new_tokens=5, temperature=0, seed=99)


def test_sample_command(run_dir):
    result = CliRunner().invoke(main, ["sample", "--ckpt", str(run_dir), "--prompt", "Once", "--max-new-tokens", "5", "--num-samples", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.count("Once") >= 2


def test_sample_command_errors_are_messages(tmp_path):
    result = CliRunner().invoke(main, ["sample", "--ckpt", str(tmp_path), "--prompt", "x"])
    assert result.exit_code == 1 and "no checkpoint at" in result.output
    assert "Traceback" not in result.output
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(main, ["sample", "--ckpt", str(tmp_path), "--prompt", "x"])
    assert result.exit_code == 1 and "cannot read checkpoint" in result.output
    result = CliRunner().invoke(main, ["sample", "--ckpt", str(tmp_path), "--temperature", "-1"])
    assert result.exit_code == 2 and "--temperature" in result.output

"""`finegpt sample`: text from a trained checkpoint, decoded with GPT-2's tokenizer."""

import click
import torch

from finegpt import checkpoint
from finegpt.errors import FinegptError
from finegpt.model import GPT, GPTConfig


def load_model(path, device: str = "cpu") -> GPT:
    """The model of a checkpoint (a training --out directory or its ckpt.pt), in eval mode, eager path:
    sampling needs only the last position's logits, which both paths compute the same way."""
    state = checkpoint.load(checkpoint.find_checkpoint(path))
    config = GPTConfig(**{**state["model_config"], "fused": False})
    model = GPT(config)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def generate_text(model: GPT, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = 200, seed: int | None = None) -> str:  # fmt: skip
    """prompt plus max_new_tokens sampled tokens, as text."""
    from finegpt.tokenizer import gpt2_encoding

    enc = gpt2_encoding()
    device = next(model.parameters()).device
    ids = enc.encode_ordinary(prompt) or [enc.eot_token]  # an empty prompt starts a new document
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, vocab_limit=enc.n_vocab, generator=generator)
    model.train(was_training)
    return enc.decode(out[0].tolist())


@click.command("sample")
@click.option("--ckpt", "ckpt", required=True, type=click.Path(exists=True),
              help="A training --out directory, or a checkpoint file in it.")
@click.option("--prompt", default="\n", show_default=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.8, show_default=True,
              help="Softmax temperature; 0 picks the most likely token every time.")
@click.option("--top-k", type=click.IntRange(min=1), default=200, show_default=True,
              help="Sample only among the k most likely tokens.")
@click.option("--seed", type=int, default=1337, show_default=True)
@click.option("--num-samples", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def sample_command(ckpt, prompt, max_new_tokens, temperature, top_k, seed, num_samples, device):
    """Generate text from a trained checkpoint."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise FinegptError(f"--device {device}: this machine has no CUDA GPU (use --device cpu)")
    model = load_model(ckpt, device)
    for i in range(num_samples):
        if i:
            click.echo("\n" + "-" * 40)
        click.echo(generate_text(model, prompt, max_new_tokens, temperature, top_k, seed + i))

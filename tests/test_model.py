"""The GPT: nanoGPT's names and init, the fused path against the eager one, the FLOP formula, sampling."""

import math

import pytest
import torch

from finegpt.model import GPT, GPTConfig, flops_per_token, meta_model

# Small enough for Triton's interpreter on CPU (FACTS §7), big enough to have every piece.
TINY = dict(block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=32)


def nanogpt_shapes(c: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes nanoGPT's model.py produces for config c (biases on, flash on)."""
    C = c.n_embd
    shapes = {
        "transformer.wte.weight": (c.vocab_size, C),
        "transformer.wpe.weight": (c.block_size, C),
        "transformer.ln_f.weight": (C,),
        "transformer.ln_f.bias": (C,),
        "lm_head.weight": (c.vocab_size, C),
    }
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        shapes |= {
            p + "ln_1.weight": (C,), p + "ln_1.bias": (C,),
            p + "attn.c_attn.weight": (3 * C, C), p + "attn.c_attn.bias": (3 * C,),
            p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
            p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
            p + "mlp.c_fc.weight": (4 * C, C), p + "mlp.c_fc.bias": (4 * C,),
            p + "mlp.c_proj.weight": (C, 4 * C), p + "mlp.c_proj.bias": (C,),
        }  # fmt: skip
    return shapes


def test_state_dict_has_nanogpt_names_and_shapes():
    config = GPTConfig(**TINY)
    sd = GPT(config).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == nanogpt_shapes(config)


def test_head_is_tied_to_token_embedding():
    model = GPT(GPTConfig(**TINY))
    assert model.lm_head.weight is model.transformer.wte.weight
    c = model.config
    # Counted once: V·C + T·C + L·(12C² + 13C) + 2C for a nanoGPT with biases.
    expected = c.vocab_size * c.n_embd + c.block_size * c.n_embd + c.n_layer * (12 * c.n_embd**2 + 13 * c.n_embd) + 2 * c.n_embd
    assert model.num_params() == expected
    assert model.num_params(non_embedding=True) == expected - (c.vocab_size + c.block_size) * c.n_embd


def test_nanogpt_state_dict_round_trip():
    """A nanoGPT checkpoint (with the causal-mask buffer nanoGPT keeps without flash attention, and the
    `_orig_mod.` prefix of a compiled model) loads strictly, and ours loads into nanoGPT's names."""
    config = GPTConfig(**TINY)
    src = GPT(config)
    theirs = {"_orig_mod." + k: v.clone() for k, v in src.state_dict().items()}
    for i in range(config.n_layer):
        mask = torch.tril(torch.ones(config.block_size, config.block_size)).view(1, 1, config.block_size, config.block_size)
        theirs[f"_orig_mod.transformer.h.{i}.attn.bias"] = mask
    dst = GPT(config)
    dst.load_state_dict(theirs)  # strict
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    idx = torch.randint(0, config.vocab_size, (2, 8))
    assert torch.equal(dst(idx)[0], src(idx)[0])


def test_nanogpt_init():
    config = GPTConfig(block_size=64, vocab_size=512, n_layer=4, n_head=4, n_embd=256)
    torch.manual_seed(0)
    model = GPT(config)
    block = model.transformer.h[0]
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * config.n_layer), rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * config.n_layer), rel=0.05)
    assert torch.all(block.attn.c_attn.bias == 0)
    assert torch.all(block.ln_1.weight == 1) and torch.all(block.ln_1.bias == 0)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_matches_eager_loss_and_gradients(bias):
    torch.manual_seed(0)
    eager = GPT(GPTConfig(**TINY, bias=bias, fused=False))
    fused = GPT(GPTConfig(**TINY, bias=bias, fused=True))
    fused.load_state_dict(eager.state_dict())
    idx = torch.randint(0, TINY["vocab_size"], (2, TINY["block_size"]))
    targets = torch.randint(0, TINY["vocab_size"], (2, TINY["block_size"]))
    targets[0, :3] = -1  # ignored positions, nanoGPT's convention

    logits_e, loss_e = eager(idx, targets)
    logits_f, loss_f = fused(idx, targets)
    assert logits_e.shape == (2, TINY["block_size"], TINY["vocab_size"])
    assert logits_f is None  # the fused path never materialises B·T·V logits
    torch.testing.assert_close(loss_f, loss_e, rtol=1e-5, atol=1e-5)

    loss_e.backward()
    loss_f.backward()
    grads_f = dict(fused.named_parameters())
    for name, p in eager.named_parameters():
        torch.testing.assert_close(grads_f[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)

    # Without targets both give the last position's logits.
    torch.testing.assert_close(fused(idx)[0], eager(idx)[0], rtol=1e-5, atol=1e-5)


def test_rejects_sequence_longer_than_block():
    model = GPT(GPTConfig(**TINY, fused=False))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, TINY["block_size"] + 1, dtype=torch.long))


def test_flops_per_token_is_6n_plus_attention():
    config = GPTConfig()  # GPT-2 124M
    n = meta_model(config).num_params()
    assert n == 124_475_904  # V·C + T·C + L·(12C² + 13C) + 2C with V=50304, T=1024, L=12, C=768
    # wpe is a lookup, not a matmul; the tied wte is the head's matmul and counts.
    assert flops_per_token(config) == 6 * (n - 1024 * 768) + 12 * 12 * 768 * 1024


def test_generate_respects_vocab_limit_and_is_seeded():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, fused=False)).eval()
    prompt = torch.zeros(1, 3, dtype=torch.long)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return model.generate(prompt, 16, temperature=1.5, top_k=50, vocab_limit=100, generator=g)

    out = run(1)
    assert out.shape == (1, 19) and torch.equal(out[:, :3], prompt)
    assert int(out.max()) < 100
    assert torch.equal(out, run(1))
    greedy = model.generate(prompt, 5, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, 5, temperature=0))

"""The GPT: nanoGPT's architecture and parameter names, with a fused path through finegpt's kernels.

Parameter names match nanoGPT's model.py exactly, so a nanoGPT checkpoint loads here and finegpt weights
load into nanoGPT. One switch, `GPTConfig.fused`, picks how the same weights are run:
- eager: F.layer_norm everywhere, full B·T·V logits, F.cross_entropy (what nanoGPT does);
- fused: kernels.add_layer_norm joins each residual add to the next LayerNorm, and
  kernels.linear_cross_entropy computes the loss in token chunks, never holding B·T·V logits (FACTS §2:
  the logits are the biggest single item of a small model's training memory).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from kernels import add_layer_norm, layer_norm, linear_cross_entropy

# Targets equal to this are not scored (nanoGPT's convention).
IGNORE_INDEX = -1


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64: the head GEMM runs ~25% faster
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, like GPT-2
    fused: bool = True  # Triton kernels for LayerNorm and the loss; False: plain PyTorch


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot drop only the bias)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        # nanoGPT without flash attention saves a causal-mask buffer named `attn.bias`; SDPA's is_causal
        # needs none, so such a buffer in a loaded state dict is dropped rather than reported unexpected.
        self._register_load_state_dict_pre_hook(_drop_causal_mask)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def _drop_causal_mask(state_dict, prefix, *args):
    state_dict.pop(prefix + "bias", None)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x

    def forward_fused(self, h, x, next_ln):
        """Fused pre-norm block. h is ln_1(x), already normalised by the previous kernel; returns
        (next_ln(x_out), x_out), so each residual add shares one kernel with the LayerNorm after it."""
        h, x = add_layer_norm(self.attn(h), x, self.ln_2.weight, self.ln_2.bias)
        return add_layer_norm(self.mlp(h), x, next_ln.weight, next_ln.bias)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config

        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2

        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections into the residual stream: one per sublayer, 2 per block.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        # A checkpoint of a torch.compile'd nanoGPT model prefixes every key with `_orig_mod.`.
        self._register_load_state_dict_pre_hook(_strip_compile_prefix)

    def num_params(self, non_embedding=False):
        """Parameters, the tied wte/lm_head counted once. non_embedding also leaves out wte and wpe
        (FACTS §1's "non-embedding" column)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        """Returns (logits, loss). With targets, the eager path returns all B·T·V logits and the fused
        path returns None for them (never materialised). Without targets, logits of the last position."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        if self.config.fused:
            return self._forward_fused(x, targets)

        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        return logits, loss

    def _forward_fused(self, x, targets):
        blocks = self.transformer.h
        ln_f = self.transformer.ln_f
        h = layer_norm(x, blocks[0].ln_1.weight, blocks[0].ln_1.bias)
        for i, block in enumerate(blocks):
            next_ln = blocks[i + 1].ln_1 if i + 1 < len(blocks) else ln_f
            h, x = block.forward_fused(h, x, next_ln)
        # h is now ln_f(x).
        if targets is None:
            return self.lm_head(h[:, [-1], :]), None
        # Under autocast the kernel runs its GEMMs in the autocast dtype, as autocast would lm_head.
        loss = linear_cross_entropy(
            h.reshape(-1, h.size(-1)), self.lm_head.weight, targets.reshape(-1), ignore_index=IGNORE_INDEX
        )
        return None, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, vocab_limit=None, generator=None):
        """Extend idx (B, T) by max_new_tokens sampled tokens. vocab_limit: sample only ids below it
        (the tokenizer's real vocabulary; the padded ids decode to nothing)."""
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size :]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float()
            if vocab_limit is not None:
                logits[:, vocab_limit:] = -float("inf")
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def _strip_compile_prefix(state_dict, prefix, *args):
    for key in [k for k in state_dict if k.startswith(prefix + "_orig_mod.")]:
        state_dict[prefix + key[len(prefix) + len("_orig_mod.") :]] = state_dict.pop(key)


def meta_model(config: GPTConfig) -> GPT:
    """The model built on the meta device: real shapes and parameter counts, no memory, no init time."""
    with torch.device("meta"):
        return GPT(config)


def flops_per_token(config: GPTConfig) -> float:
    """Training FLOPs per token (forward + backward), PaLM's estimate: 6·N + 12·L·C·T.

    N counts every weight that takes part in a matmul, including the tied wte used as the head, but not
    wpe (a lookup). 12·L·C·T is attention's QK^T and AV at full (non-causal) context, as nanoGPT counts.
    """
    model = meta_model(config)
    n = model.num_params() - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * config.n_layer * config.n_embd * config.block_size

"""One table of configs per GPU memory tier, and the one estimate of how much memory a config needs.

The GPU tiers are the guide's (FACTS §1): its layer/head/width and micro-batch × grad-accum per card,
block 1024. Their learning rates follow the guide's rule by real size (`guide_lr`), min_lr = lr/10,
2000 warmup steps, weight decay 0.1, beta2 0.99. Every GPU tier trains on TRAIN_TOKENS tokens, so
max_iters is derived from the tokens per step.

`finegpt presets` prints the table with parameter counts computed from the model itself and the
memory estimate of both paths, flagging tiers whose eager step would not fit the card.
"""

from dataclasses import dataclass, fields, replace

import click

from finegpt.console import format_table, human_bytes, human_count
from finegpt.errors import FinegptError

GIB = 2**30

# One pass over FineWeb sample-10BT, the budget of llm.c's GPT-2 124M run (FACTS §3, §4).
TRAIN_TOKENS = 10_000_000_000

# Memory beyond the tensors FACTS §2 counts: allocator fragmentation and workspaces (+10%), and the
# CUDA context with its kernels (~1 GiB).
ALLOCATOR_OVERHEAD = 0.10
CUDA_CONTEXT_BYTES = 1 * GIB


@dataclass(frozen=True)
class Preset:
    name: str
    vram_gb: int | None  # the card this tier is for; None for the CPU tier
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int  # micro-batch (sequences per forward)
    grad_accum: int
    lr: float
    min_lr: float
    warmup_iters: int
    max_iters: int
    max_time: float | None = None  # seconds; bounds the CPU demo on any machine
    weight_decay: float = 0.1
    beta2: float = 0.99
    dropout: float = 0.0
    eval_interval: int = 250
    eval_tokens: int = 10_485_760  # the common FineWeb validation convention (FACTS §3)
    log_interval: int = 10

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.block_size

    def model_config(self, fused: bool = True):
        from finegpt.model import GPTConfig

        return GPTConfig(
            block_size=self.block_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            dropout=self.dropout,
            fused=fused,
        )


def guide_lr(n_params: int) -> float:
    """The guide's learning rate by model size: ~770M 3e-4, ~350M 5e-4 to 6e-4, ~100M 6e-4 to 8e-4.

    GPT-2 small (124M) takes nanoGPT's 6e-4; the smaller tiers the top of the ~100M range, 8e-4."""
    if n_params >= 600e6:
        return 3e-4
    if n_params >= 110e6:
        return 6e-4
    return 8e-4


def _gpu_tier(name, vram_gb, n_layer, n_head, n_embd, batch_size, grad_accum, block_size=1024):
    from finegpt.model import GPTConfig, meta_model

    config = GPTConfig(block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    lr = guide_lr(meta_model(config).num_params())
    return Preset(
        name=name,
        vram_gb=vram_gb,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        block_size=block_size,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        min_lr=lr / 10,
        warmup_iters=2000,
        max_iters=round(TRAIN_TOKENS / (batch_size * grad_accum * block_size)),
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _gpu_tier("80", 80, 12, 12, 768, batch_size=64, grad_accum=8),
        _gpu_tier("48", 48, 12, 12, 672, batch_size=32, grad_accum=16),
        _gpu_tier("24", 24, 10, 10, 640, batch_size=32, grad_accum=16),
        _gpu_tier("16", 16, 8, 8, 512, batch_size=32, grad_accum=12),
        # The guide gives a range (16-32 × 16-24, block 512-1024) for cards under 16 GB. Block 1024 keeps
        # the context of every other tier; micro-batch 16 × 24 steps keeps the 16 GB tier's 393k tokens
        # per step at half its activation memory.
        _gpu_tier("12", 12, 6, 6, 384, batch_size=16, grad_accum=24),
        # A machine without a GPU: small enough that `finegpt train` with no arguments learns visibly
        # in under two minutes on 2 cores; max_time stops it there on a slower or busy machine. GPT-2's
        # vocabulary makes the head most of the work, so the stack stays small and the context short;
        # the higher lr suits a model this small.
        Preset(
            name="cpu",
            vram_gb=None,
            n_layer=2,
            n_head=4,
            n_embd=128,
            block_size=64,
            batch_size=8,
            grad_accum=1,
            lr=3e-3,
            min_lr=3e-4,
            warmup_iters=20,
            max_iters=300,
            max_time=100,
            eval_interval=100,
            eval_tokens=8_192,
            log_interval=10,
        ),
    )
}

TIER_NAMES = ("80", "48", "24", "16", "12", "cpu", "auto")


def auto_tier(memory_bytes: int | None) -> str:
    """The largest GPU tier that fits a card with memory_bytes; "cpu" without a GPU.

    Cards report a little less than their label (an "80GB" H100 has 79.2 GiB, a 4090 23.99 GiB), so a
    tier fits a card with at least its size minus 1 GiB. Cards below 12 GB get the smallest tier."""
    if memory_bytes is None:
        return "cpu"
    gpu = [p for p in PRESETS.values() if p.vram_gb is not None]
    for p in sorted(gpu, key=lambda p: p.vram_gb, reverse=True):
        if memory_bytes >= (p.vram_gb - 1) * GIB:
            return p.name
    return min(gpu, key=lambda p: p.vram_gb).name


def get_preset(vram: str) -> Preset:
    """The preset for a tier name ("80", "48", "24", "16", "12", "cpu") or "auto" (this machine's GPU)."""
    vram = str(vram).lower().removesuffix("gb")
    if vram == "auto":
        from finegpt.device import device_memory_bytes

        vram = auto_tier(device_memory_bytes())
    if vram not in PRESETS:
        raise FinegptError(f"--vram {vram!r} is not a tier; choose one of {', '.join(TIER_NAMES)}")
    return PRESETS[vram]


def estimate_peak_memory(preset_or_config, batch_size: int | None = None, block_size: int | None = None,
                         fused: bool = False, overhead: bool = True) -> int:
    """Estimated peak GPU memory in bytes of one training step (bf16 autocast, flash attention, AdamW).

    batch_size and block_size default to the preset's (block_size: the config's). overhead=False gives
    the bare formula, without the allocator's share and the CUDA context.

    FACTS §2, fitted to PyTorch's memory tracker: 12·N (fp32 weights, grads, two Adam states) +
    38·C·L·B·T (the layers' saved activations) + 14·B·T·V (logits: bf16 kept, fp32 log-softmax saved,
    fp32 gradient temporaries). The fused path never holds the B·T·V logits. Its chunked head
    (kernels.linear_cross_entropy) holds instead: one chunk of bf16 logits, overwritten by their
    gradient (at most CHUNK_BYTES); the fp32 gradients of the head weight and of the hidden states it
    computes in the forward and keeps for the backward (4·V·C + 4·B·T·C); and the bf16 copies of both
    inputs that its GEMMs read (2·V·C + 2·B·T·C). Then allocator overhead and the CUDA context.
    """
    from finegpt.model import meta_model

    is_preset = isinstance(preset_or_config, Preset)
    config = preset_or_config.model_config() if is_preset else preset_or_config
    if batch_size is None:
        if not is_preset:
            raise TypeError("estimate_peak_memory: pass batch_size with a model config")
        batch_size = preset_or_config.batch_size
    block_size = config.block_size if block_size is None else block_size
    n = meta_model(config).num_params()
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    tokens = batch_size * block_size
    total = 12 * n + 38 * C * L * tokens
    if fused:
        from kernels.linear_cross_entropy import CHUNK_BYTES

        total += min(CHUNK_BYTES, 2 * tokens * V) + 6 * V * C + 6 * tokens * C
    else:
        total += 14 * tokens * V
    if not overhead:
        return int(total)
    return int(total * (1 + ALLOCATOR_OVERHEAD) + CUDA_CONTEXT_BYTES)


def apply_overrides(preset: Preset, **overrides) -> Preset:
    """The preset with some fields replaced (None means: keep the preset's value)."""
    names = {f.name for f in fields(Preset)}
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"not preset fields: {sorted(unknown)}")
    return replace(preset, **{k: v for k, v in overrides.items() if v is not None})


@click.command("presets")
def presets_command():
    """Show the config of each VRAM tier with its real size, schedule and estimated peak memory.

    Memory is an estimate (12·N + 38·C·L·B·T + 14·B·T·V bytes on the eager path; not a measurement) for the tier's micro-batch; "!" marks a tier
    whose eager (unfused) step would not fit its card.
    """
    from finegpt.device import device_memory_bytes, device_name
    from finegpt.model import meta_model

    here = auto_tier(device_memory_bytes())
    rows = []
    for p in PRESETS.values():
        model = meta_model(p.model_config())
        eager = estimate_peak_memory(p, p.batch_size, p.block_size, fused=False)
        fused = estimate_peak_memory(p, p.batch_size, p.block_size, fused=True)
        card = p.vram_gb * GIB if p.vram_gb else None
        rows.append(
            (
                p.name + (" *" if p.name == here else ""),
                f"{p.vram_gb} GB" if p.vram_gb else "none",
                f"{p.n_layer}/{p.n_head}/{p.n_embd}",
                human_count(model.num_params()),
                human_count(model.num_params(non_embedding=True)),
                f"{p.batch_size} × {p.grad_accum}",
                p.block_size,
                human_count(p.tokens_per_step),
                f"{p.lr:.0e} → {p.min_lr:.0e}, warmup {p.warmup_iters}",
                f"{p.max_iters:,}",
                human_bytes(eager) + (" !" if card and eager > card else ""),
                human_bytes(fused) + (" !" if card and fused > card else ""),
            )
        )
    headers = (
        "tier", "card", "layers/heads/embd", "params", "non-emb", "micro × accum", "block",
        "tokens/step", "lr schedule", "iters", "eager mem", "fused mem",
    )  # fmt: skip
    click.echo(format_table(rows, headers))
    click.echo(
        f"\n* = the tier `--vram auto` picks here ({device_name()}). "
        "! = estimated peak exceeds the card. Memory: 12·N + 38·C·L·B·T + 14·B·T·V bytes on the eager path "
        "(the last term is the logits; the fused head holds one chunk of them instead), + 10% + 1 GiB CUDA context."
    )

"""The preset table: the guide's tiers with their real sizes, the memory formula, and auto-detection."""

import pytest
from click.testing import CliRunner

from finegpt.cli import main
from finegpt.errors import FinegptError
from finegpt.model import meta_model
from finegpt.presets import (
    ALLOCATOR_OVERHEAD, CUDA_CONTEXT_BYTES, GIB, PRESETS, auto_tier, estimate_peak_memory, get_preset, guide_lr,
)  # fmt: skip

# FACTS §1: the guide's tiers with totals counted from nanoGPT's model on the meta device, and FACTS §2's
# eager estimates (bare formula, GiB) for the guide's micro-batch.
GUIDE = {
    "80": ((12, 12, 768), (64, 8), 124.5, 85.1, 65.8),
    "48": ((12, 12, 672), (32, 16), 99.6, 65.1, 32.0),
    "24": ((10, 10, 640), (32, 16), 82.1, 49.2, 29.8),
    "16": ((8, 8, 512), (32, 12), 51.5, 25.2, 26.8),
    "12": ((6, 6, 384), None, 30.4, 10.6, None),
}


@pytest.mark.parametrize("tier", list(GUIDE))
def test_gpu_tiers_are_the_guides_with_their_real_sizes(tier):
    dims, batch, total_m, non_emb_m, eager_gib = GUIDE[tier]
    p = PRESETS[tier]
    assert (p.n_layer, p.n_head, p.n_embd) == dims and p.block_size == 1024 and p.vram_gb == int(tier)
    if batch:
        assert (p.batch_size, p.grad_accum) == batch
    else:  # the guide gives a range for cards under 16 GB
        assert 16 <= p.batch_size <= 32 and 16 <= p.grad_accum <= 24
    model = meta_model(p.model_config())
    assert round(model.num_params() / 1e6, 1) == total_m
    assert round(model.num_params(non_embedding=True) / 1e6, 1) == non_emb_m
    if eager_gib:
        bare = estimate_peak_memory(p, overhead=False)  # the preset's micro-batch and block, eager
        assert round(bare / GIB, 1) == eager_gib
        with_overhead = estimate_peak_memory(p, p.batch_size, p.block_size, fused=False)
        assert with_overhead == pytest.approx(bare * (1 + ALLOCATOR_OVERHEAD) + CUDA_CONTEXT_BYTES, abs=2)


@pytest.mark.parametrize("tier", list(GUIDE))
def test_schedule_follows_the_guides_rules(tier):
    p = PRESETS[tier]
    assert p.min_lr == pytest.approx(p.lr / 10) and p.warmup_iters == 2000
    assert p.weight_decay == 0.1 and p.beta2 == 0.99 and p.dropout == 0.0
    assert 6e-4 <= p.lr <= 8e-4  # the guide's range for ~100M models (all tiers are 30M-125M)
    assert p.lr == guide_lr(meta_model(p.model_config()).num_params())
    assert guide_lr(354.9e6) == 6e-4 and guide_lr(774e6) == 3e-4


def test_fused_fits_every_card_and_eager_does_not_fit_the_small_ones():
    for name, p in PRESETS.items():
        if p.vram_gb is None:
            continue
        card = p.vram_gb * GIB
        eager = estimate_peak_memory(p, p.batch_size, p.block_size, fused=False)
        fused = estimate_peak_memory(p, p.batch_size, p.block_size, fused=True)
        assert fused < card, name
        assert fused < eager, name
        assert (eager > card) == (name in ("24", "16", "12")), name


def test_estimate_grows_with_the_batch_and_drops_the_logits_when_fused():
    p = PRESETS["24"]
    small, big = (estimate_peak_memory(p, b, 1024, fused=False) for b in (8, 16))
    # Doubling B·T adds one more copy of the activation and logits terms, scaled by the overhead.
    per_token = (38 * 640 * 10 + 14 * 50304) * (1 + ALLOCATOR_OVERHEAD)
    assert big - small == pytest.approx(8 * 1024 * per_token, rel=1e-6)
    fused_small, fused_big = (estimate_peak_memory(p, b, 1024, fused=True) for b in (8, 16))
    assert fused_big - fused_small < (big - small) / 2


@pytest.mark.parametrize(
    "gib, tier",
    [(None, "cpu"), (79.2, "80"), (139.8, "80"), (47.5, "48"), (39.4, "24"), (23.99, "24"), (15.8, "16"),
     (14.6, "12"), (11.7, "12"), (7.8, "12")],
)  # fmt: skip
def test_auto_picks_the_largest_tier_that_fits(gib, tier):
    assert auto_tier(None if gib is None else int(gib * GIB)) == tier


def test_get_preset_names_and_errors():
    assert get_preset("24") is PRESETS["24"] and get_preset("24GB") is PRESETS["24"]
    assert get_preset("CPU") is PRESETS["cpu"]
    with pytest.raises(FinegptError, match="--vram '7' is not a tier"):
        get_preset("7")


def test_cpu_tier_is_small_enough_for_two_cores():
    p = PRESETS["cpu"]
    assert p.vram_gb is None and meta_model(p.model_config()).num_params() < 10e6
    assert p.tokens_per_step * p.max_iters <= 500_000  # a few minutes of CPU at most
    assert p.max_time <= 150  # and stopped after two and a half minutes on any machine
    assert all(q.max_time is None for q in PRESETS.values() if q.vram_gb)


def test_presets_command_prints_every_tier_and_flags_eager_overflows():
    result = CliRunner().invoke(main, ["presets"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name, p in PRESETS.items():
        row = next(line for line in lines if line.split()[:1] == [name])
        assert f"{p.n_layer}/{p.n_head}/{p.n_embd}" in row and f"{p.batch_size} × {p.grad_accum}" in row
        assert (" !" in row) == (name in ("24", "16", "12"))
    assert "124.5M" in result.output and "6e-04 → 6e-05, warmup 2000" in result.output

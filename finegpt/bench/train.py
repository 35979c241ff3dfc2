"""The end-to-end section: real training steps of each path (eager, fused, each with and without
torch.compile) on the same synthetic shards and seed, timed after a burn-in.

Per path: ms per optimizer step, tokens/s, MFU, peak memory, and the loss after the timed steps
(which must agree across paths run at the same micro-batch). A path that runs out of memory on the
(emulated) card is a row that says so, with the memory it needed; where eager does not fit, eager is
also measured at the largest micro-batch that fits (halving), so the fused-vs-eager speed-up is
still a like-for-like figure on that card.

Each path runs one micro-step per optimizer step (grad_accum = 1): accumulation repeats the same
micro-step, so it changes neither tokens/s nor the peak, and one micro-step keeps the big tiers fast.
"""

import functools
import gc
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finegpt.bench.result import Chart, SectionResult
from finegpt.errors import FinegptError

GIB = 2**30
GPU_TIERS = ("80", "48", "24", "16", "12")
# Under --all-tiers the compile paths run on the 24 GB tier only: each compile costs tens of seconds,
# and the 24 GB tier is the one the targets are set on.
ALL_TIERS_COMPILE = ("24",)
HEADLINE_TIER = "24"
# Order of the tiers under --all-tiers: the headline tier first (see the plan in run()).
MEASURE_ORDER = ("24", "16", "12", "48", "80")


@dataclass(frozen=True)
class TrainPath:
    """One way of running the same model: the kernels or plain PyTorch, with or without torch.compile."""

    name: str
    fused: bool
    compile: bool


PATHS = (
    TrainPath("eager", False, False),
    TrainPath("fused", True, False),
    # fused first: if a time budget runs out between the two compiles, the fused figure is kept
    TrainPath("fused+compile", True, True),
    TrainPath("eager+compile", False, True),
)

# --quick: a smoke test of every path in seconds, not figures of the tier's real micro-batch.
QUICK_MICRO_BATCH = 4


def micro_batch(preset, quick: bool) -> int:
    return min(preset.batch_size, QUICK_MICRO_BATCH) if quick else preset.batch_size


# Losses after the timed steps of paths at the same micro-batch must agree within this fraction of
# the eager loss: bf16 autocast and different reduction orders make them differ in the last digits.
LOSS_RTOL = 0.01

COLUMNS = [
    ("tier", "tier"),
    ("path", "path"),
    ("batch", "micro-batch B×T"),
    ("card_gib", "card (GiB)"),
    ("status", "status"),
    ("ms_per_iter", "ms/iter"),
    ("tokens_per_s", "tokens/s"),
    ("mfu_pct", "MFU (%)"),
    ("peak_gib", "peak (GiB)"),
    ("estimate_gib", "estimate (GiB)"),
    ("loss", "loss"),
    ("loss_agrees", "loss agrees"),
    ("fits", "fits card"),
    ("vs_eager", "tokens/s vs eager (x)"),
]


def _is_oom(err: BaseException) -> bool:
    # torch.compile can wrap an allocator failure in its own exception types; the message survives.
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _tried_bytes(message: str) -> int:
    """The allocation the caching allocator failed on ("Tried to allocate 2.00 GiB"), in bytes."""
    match = re.search(r"Tried to allocate ([\d.]+) (B|KiB|MiB|GiB|TiB)", message)
    if not match:
        return 0
    scale = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}[match.group(2)]
    return int(float(match.group(1)) * scale)


def _free(cuda: bool) -> None:
    """Return everything the last path held, so the next path starts from an empty card."""
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()  # compiled graphs hold their own buffers and guards


def measure(make_trainer, steps: int, burn_in: int, cuda: bool) -> dict:
    """Build a trainer, run burn_in untimed then `steps` timed optimizer steps (median step time).

    Returns {"status": "ok", ms_per_iter, tokens_per_s, peak_bytes, loss, tokens_per_step} or, when
    the card runs out of memory, {"status": "OOM", needed_bytes: what was held at the failure plus
    the allocation that failed (a lower bound)}. Frees the trainer either way.
    """
    trainer = None
    try:
        if cuda:  # the last path was freed when it ended (a full gc.collect is slow: once per path)
            torch.cuda.reset_peak_memory_stats()
        trainer = make_trainer()
        for _ in range(burn_in):
            trainer.train_step()
        times = []
        for _ in range(steps):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss = trainer.train_step()  # returns a float: the step has finished on the device
            times.append(time.perf_counter() - start)
        # The median step: one step slowed by another process (a shared machine) does not move it.
        step_s = float(np.median(times))
        outcome = {
            "status": "ok",
            "ms_per_iter": 1000 * step_s,
            "tokens_per_s": trainer.tokens_per_step / step_s,
            "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "loss": float(loss),
            "tokens_per_step": trainer.tokens_per_step,
        }
    except Exception as err:
        if not _is_oom(err):
            raise
        needed = None
        if cuda:
            needed = max(torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated() + _tried_bytes(str(err)))
        outcome = {"status": "OOM", "needed_bytes": needed, "message": str(err).splitlines()[0][:200]}
    finally:
        if trainer is not None:
            trainer.close()
        del trainer
        _free(cuda)
    return outcome


def write_synthetic_shards(directory: Path, tokens: int, seed: int = 0) -> None:
    """A train shard of random GPT-2 token ids, big enough for every path's steps (no evaluation here)."""
    from finegpt.data import write_shard

    rng = np.random.default_rng(seed)
    write_shard(directory / "bench_train_000001.bin", rng.integers(0, 50257, tokens, dtype=np.uint16))


def _trainer_factory(preset, path: TrainPath, batch_size: int, data_dir: Path, out_dir: Path, device: str, warmup: int):
    from finegpt.train import Trainer, config_from_preset

    def make():
        cfg = config_from_preset(
            preset,
            data=str(data_dir),
            out=str(out_dir),
            device=device,
            fused=path.fused,
            compile=path.compile,
            batch_size=batch_size,
            grad_accum=1,
            warmup_iters=warmup,
            seed=1337,
        )
        return Trainer(cfg)

    return make


@functools.lru_cache(maxsize=None)
def _estimate(preset, batch_size: int, fused: bool) -> int:
    """finegpt.presets.estimate_peak_memory, once per case: it builds the model on the meta device."""
    from finegpt.presets import estimate_peak_memory

    return estimate_peak_memory(preset, batch_size, preset.block_size, fused=fused)


def _gib(n: int | None) -> float | None:
    return None if n is None else n / GIB


class _Clock:
    """When to stop starting paths: a time budget, or an interrupt (Ctrl-C, a time limit's SIGINT)."""

    def __init__(self, budget_s: float | None):
        self.deadline = None if budget_s is None else time.monotonic() + budget_s
        self.budget_s = budget_s
        self.interrupted = False

    def stop_reason(self) -> str | None:
        if self.interrupted:
            return "interrupted"
        if self.deadline is not None and time.monotonic() > self.deadline:
            return f"time budget {self.budget_s:.0f} s spent"
        return None


def _cap_memory(gib: float | None, total: int) -> float | None:
    """Cap this process's share of the card to `gib` GiB; returns the cap in effect (None = whole card)."""
    fraction = 1.0 if gib is None else min(1.0, gib * GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    return None if gib is None else fraction * total / GIB


def _tier_label(preset) -> str:
    return f"{preset.name} GB" if preset.vram_gb else preset.name


def _reference(rows: list[dict], compiled: bool) -> dict | None:
    """The eager row that fused (compiled or not) is compared with: eager at the tier's micro-batch
    if it fit the card, else eager at the largest micro-batch that fit; for eager+compile, which is
    not re-measured at smaller micro-batches, its run without the cap at the same micro-batch."""
    name = "eager+compile" if compiled else "eager"
    ok = [r for r in rows if r["path"].split(" ")[0] == name and r["status"] == "ok"]
    fitting = [r for r in ok if r["fits"] is not False]
    if fitting:
        return max(fitting, key=lambda r: r["_b"])
    return next((r for r in ok if compiled), None)


def _finish_tier(rows: list[dict], batch_size: int) -> None:
    """Fill in the loss agreement and the tokens/s ratios of one tier's rows."""
    full = [r for r in rows if r["status"] == "ok" and r["_b"] == batch_size]
    base = next((r for r in full if r["path"] == "eager"), full[0] if full else None)
    for r in full:
        r["loss_agrees"] = abs(r["loss"] - base["loss"]) <= LOSS_RTOL * abs(base["loss"])
    for r in rows:
        ref = _reference(rows, compiled="compile" in r["path"])
        if r["status"] == "ok" and ref is not None:
            r["vs_eager"] = r["tokens_per_s"] / ref["tokens_per_s"]


def _headline(rows: list[dict], tier_label: str, gpu_tiers: list[str], emulated: bool) -> dict:
    tier = [r for r in rows if r["tier"] == tier_label]
    head: dict = {"headline_tier": tier_label}
    # The targets (issue 6) are set on the 24 GB tier's config; other tiers get the ratios only.
    targets = tier_label == f"{HEADLINE_TIER} GB"

    def full(path):
        return next((r for r in tier if r["path"] == path), None)

    fused, fused_c = full("fused"), full("fused+compile")
    eager_ref, eager_c_ref = _reference(tier, False), _reference(tier, True)
    if fused and fused["status"] == "ok" and eager_ref:
        head["fused_vs_eager_tokens_per_s"] = fused["tokens_per_s"] / eager_ref["tokens_per_s"]
        head["eager_micro_batch_compared"] = eager_ref["_b"]
        if targets:
            head["target_fused_ge_1.1x_eager"] = head["fused_vs_eager_tokens_per_s"] >= 1.1
    if fused_c and fused_c["status"] == "ok" and eager_c_ref:
        head["fused_compile_vs_eager_compile_tokens_per_s"] = fused_c["tokens_per_s"] / eager_c_ref["tokens_per_s"]
        head["eager_compile_fit_card"] = eager_c_ref["fits"] is not False
        if targets:
            head["target_fused_compile_ge_eager_compile"] = head["fused_compile_vs_eager_compile_tokens_per_s"] >= 1.0
    # Peak memory at the same micro-batch: eager's comes from its capped run or, when it did not fit,
    # from the uncapped run of the same batch.
    eager_peaks = [r["peak_gib"] for r in tier if r["path"] in ("eager", "eager (uncapped)") and r["peak_gib"]]
    if fused and fused.get("peak_gib") and eager_peaks:
        head["fused_peak_vs_eager_peak"] = fused["peak_gib"] / max(eager_peaks)
        if targets:
            head["target_fused_peak_le_0.4x_eager"] = head["fused_peak_vs_eager_peak"] <= 0.4
    agree = [r["loss_agrees"] for r in rows if r["loss_agrees"] is not None]
    head["losses_agree"] = all(agree) if agree else None
    if emulated:
        fits = {}
        for label in gpu_tiers:
            r = next((r for r in rows if r["tier"] == label and r["path"] == "fused"), None)
            fits[label] = bool(r and r["status"] == "ok" and r["fits"])
            head[f"fused_fits_{label.replace(' ', '_')}_card"] = fits[label]
        head["target_every_tier_fits_fused"] = all(fits.values())
    return head


@dataclass
class _Setup:
    """What every tier's measurement shares."""

    cuda: bool
    device: str
    total: int | None  # the card's memory in bytes
    peak_flops: float | None
    steps: int
    burn_in: int
    quick: bool
    all_tiers: bool
    emulate_vram: float | None
    compile_paths: bool | None
    clock: _Clock
    data_dir: Path


def _measure_paths(preset, paths, setup: _Setup, rows: list[dict]) -> None:
    """Append a row per path (and per OOM fallback) of one tier to `rows`, as each is measured."""
    from finegpt.model import flops_per_token

    cuda, total, clock = setup.cuda, setup.total, setup.clock
    label = _tier_label(preset)
    card = float(preset.vram_gb) if setup.all_tiers else setup.emulate_vram
    cap = _cap_memory(card, total) if cuda else None
    want_compile = (not setup.quick) if setup.compile_paths is None else setup.compile_paths
    if setup.all_tiers and setup.compile_paths is None:
        want_compile = preset.name in ALL_TIERS_COMPILE
    fpt = flops_per_token(preset.model_config())
    card_gib = cap if cap is not None else (total / GIB if cuda else None)

    def row(path_name, b, status, result=None, fits=None, card_gib=card_gib):
        result = result or {}
        tps = result.get("tokens_per_s")
        r = {
            "tier": label, "path": path_name, "batch": f"{b}×{preset.block_size}", "card_gib": card_gib,
            "status": status, "ms_per_iter": result.get("ms_per_iter"), "tokens_per_s": tps,
            "mfu_pct": 100 * tps * fpt / setup.peak_flops if tps and setup.peak_flops else None,
            "peak_gib": _gib(result.get("peak_bytes")),
            "estimate_gib": _gib(_estimate(preset, b, fused="fused" in path_name)),
            "loss": result.get("loss"), "loss_agrees": None, "fits": fits, "vs_eager": None, "_b": b,
        }  # fmt: skip
        rows.append(r)
        return r

    def attempt(path, b):
        make = _trainer_factory(preset, path, b, setup.data_dir, setup.data_dir / "out", setup.device, max(1, setup.burn_in))
        # A compiled path compiles in its first step, which must not be timed.
        burn_in = max(1, setup.burn_in) if path.compile else setup.burn_in
        try:
            return measure(make, setup.steps, burn_in, cuda)
        except KeyboardInterrupt:
            clock.interrupted = True
            return {"status": "interrupted"}
        except Exception as err:  # one broken path must not cost the others' figures
            first_line = str(err).splitlines()[0][:160] if str(err) else ""
            return {"status": f"error: {type(err).__name__}: {first_line}"}

    for path in paths:
        b = micro_batch(preset, setup.quick)
        if path.compile and not want_compile:
            why = "--quick" if setup.quick else ("only the 24 GB tier under --all-tiers" if setup.all_tiers else "--no-compile")
            row(path.name, b, f"skipped ({why})")
            continue
        if clock.stop_reason():
            row(path.name, b, f"skipped ({clock.stop_reason()})")
            continue
        result = attempt(path, b)
        if result["status"] != "OOM":
            row(path.name, b, result["status"], result, fits=(True if cuda else None) if result["status"] == "ok" else None)
            continue
        needed = result.get("needed_bytes")
        oom = row(path.name, b, f"OOM: needs ≥ {needed / GIB:.1f} GiB" if needed else "OOM", fits=False)
        # What it really needs: the same run without the cap, when the card is bigger (a compiled path's
        # second compile mostly hits Inductor's cache).
        if cap is not None and total / GIB > cap and not clock.stop_reason():
            _cap_memory(None, total)
            free = attempt(path, b)
            _cap_memory(card, total)
            if free["status"] == "ok":
                oom["status"] = f"OOM: needs {free['peak_bytes'] / GIB:.1f} GiB"
                row(f"{path.name} (uncapped)", b, "ok", free, fits=False, card_gib=total / GIB)
        # The largest micro-batch that fits the card, so the speed-up is measured like for like. Not for
        # compiled paths: each new micro-batch is a new compile of tens of seconds.
        while b > 1 and not path.compile and not clock.stop_reason():
            b //= 2
            result = attempt(path, b)
            if result["status"] != "OOM":
                row(f"{path.name} @B={b}", b, result["status"], result, fits=True if result["status"] == "ok" else None)
                break


def run(
    vram: str | None = None,
    all_tiers: bool = False,
    emulate_vram: float | None = None,
    quick: bool = False,
    steps: int | None = None,
    burn_in: int | None = None,
    compile_paths: bool | None = None,
    time_budget: float | None = None,
) -> SectionResult:
    """Measure each training path on the chosen tier(s); see the module docstring.

    vram: tier name (default: the tier this machine's GPU gets, "cpu" without one); all_tiers: every
    GPU tier, each on its emulated card; emulate_vram: cap the GPU to this many GiB; compile_paths:
    measure the torch.compile paths (default: yes, except in quick mode and, under all_tiers, except
    on tiers other than 24 GB); time_budget: seconds after which paths not yet started are skipped.
    Ctrl-C (or SIGINT from a time limit) ends the measurement early with the rows measured so far.
    """
    from finegpt.device import device_memory_bytes, device_name, gpu_peak_flops
    from finegpt.presets import get_preset

    cuda = torch.cuda.is_available()
    if not cuda and (all_tiers or emulate_vram):
        raise FinegptError("--all-tiers and --emulate-vram cap a CUDA GPU's memory and this machine has none: drop them")
    if all_tiers and (vram or emulate_vram):
        raise FinegptError("--all-tiers measures every tier on its own emulated card: drop --vram / --emulate-vram")
    if emulate_vram is not None and emulate_vram <= 0:
        raise FinegptError(f"--emulate-vram {emulate_vram}: give the card's size in GiB, e.g. 24")
    presets = [get_preset(t) for t in MEASURE_ORDER] if all_tiers else [get_preset(vram or "auto")]
    steps = steps or (2 if quick else 5)
    burn_in = (1 if quick else 3) if burn_in is None else burn_in
    device = "cuda" if cuda else "cpu"
    name = device_name(device)
    peak_flops = gpu_peak_flops(name) if cuda else None
    notes = []

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="finegpt-bench-") as tmp:
        setup = _Setup(
            cuda=cuda, device=device, total=device_memory_bytes(device), peak_flops=peak_flops, steps=steps,
            burn_in=burn_in, quick=quick, all_tiers=all_tiers, emulate_vram=emulate_vram,
            compile_paths=compile_paths, clock=_Clock(time_budget), data_dir=Path(tmp),
        )  # fmt: skip
        need = max((burn_in + steps + 2) * micro_batch(p, quick) * (p.block_size + 1) for p in presets)
        write_synthetic_shards(setup.data_dir, need)
        # The figures the targets need first, so a spent budget or time limit costs the extras: the
        # headline tier's plain paths, every other tier's fused path (does it fit its card?), the
        # headline tier's compiled paths, then the rest.
        by_name = {p.name: p for p in PATHS}
        plain, compiled = [by_name["eager"], by_name["fused"]], [by_name["fused+compile"], by_name["eager+compile"]]
        head, rest = presets[:1], presets[1:]
        plan = [(head, plain), (rest, [by_name["fused"]]), (head, compiled), (rest, [by_name["eager"]]), (rest, compiled)]
        tier_rows: dict[str, list[dict]] = {p.name: [] for p in presets}
        try:
            for tiers, paths in plan:
                for preset in tiers:
                    _measure_paths(preset, paths, setup, tier_rows[preset.name])
        except KeyboardInterrupt:
            notes.append("Interrupted: the paths not listed were not measured.")
        finally:
            if cuda:
                _cap_memory(None, setup.total)
        for preset in presets:
            _finish_tier(tier_rows[preset.name], micro_batch(preset, quick))
            rows += tier_rows[preset.name]

    tier_order = {t: i for i, t in enumerate(GPU_TIERS + ("cpu",))}
    path_order = {p.name: i for i, p in enumerate(PATHS)}
    # By tier, then path; stable, so a path's fallback rows stay right after it.
    rows.sort(key=lambda r: (tier_order.get(r["tier"].split(" ")[0], 99), path_order[r["path"].split(" ")[0]]))
    labels = [_tier_label(p) for p in presets]
    headline_label = f"{HEADLINE_TIER} GB" if f"{HEADLINE_TIER} GB" in labels else labels[0]
    headline = _headline(rows, headline_label, labels, emulated=cuda and (all_tiers or emulate_vram is not None))
    for r in rows:
        del r["_b"]

    notes += [
        f"Each path: {burn_in} untimed step(s), then {steps} timed optimizer step(s) of one micro-batch "
        "(grad_accum = 1) on the same synthetic random-token shards, seed 1337; ms/iter is the median step.",
        "MFU = tokens/s × FLOPs per token / peak; FLOPs per token = 6·N + 12·L·C·T "
        "(finegpt.model.flops_per_token, N = weights in matmuls)"
        + (f"; peak {peak_flops / 1e12:.0f} TFLOP/s bf16 dense for {name} (finegpt.device.gpu_peak_flops)." if peak_flops
           else f"; no peak known for {name}, so no MFU."),
        f"Losses of paths at the tier's micro-batch must agree within {LOSS_RTOL:.0%} of eager's; "
        "'vs eager' compares with eager in the same compile mode at the largest micro-batch that fit the card "
        "(eager+compile is not re-compiled at smaller micro-batches: where it does not fit, its run without the "
        "cap at the tier's micro-batch is the reference).",
        "estimate = finegpt.presets.estimate_peak_memory (12·N + 38·C·L·B·T + 14·B·T·V bytes for a bf16 eager step; the fused head holds one logits chunk).",
    ]
    if cuda:
        notes.append(
            "peak = torch.cuda.max_memory_allocated over the whole path (model, optimizer, steps). The card is "
            "emulated with torch.cuda.set_per_process_memory_fraction(GiB·2^30 / total), which caps PyTorch's "
            "allocator only: a real card also loses ~0.5-1 GiB to the CUDA context."
        )
    else:
        notes.append(
            "CPU figures: no GPU here. The fused path runs the kernels' PyTorch fallback (chunked linear + "
            "cross-entropy), not Triton; peak memory is a CUDA allocator reading and is not measured on CPU. "
            "CPU step times move with whatever else the machine runs: compare paths within one run only."
        )
    charts = [
        Chart("Time per optimizer step", "tier", "ms_per_iter", "ms per step", "path"),
        Chart("Throughput", "tier", "tokens_per_s", "tokens/s", "path"),
    ]
    if cuda:
        charts.append(Chart("Peak memory", "tier", "peak_gib", "GiB (max_memory_allocated)", "path"))
    return SectionResult(
        name="train",
        device=name if cuda else "cpu (CPU figures, no GPU)",
        rows=rows,
        columns=COLUMNS,
        headline=headline,
        notes=notes,
        charts=charts,
    )

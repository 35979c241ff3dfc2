"""`finegpt bench loader`: TokenLoader against the loaders it replaces, on one big shard.

Three loaders deliver the same kind of batch (random windows, int64 x and y of (B, T) on the
device): TokenLoader; nanoGPT's `get_batch` (np.memmap re-created per call, one slice per row,
torch.stack); and a vectorized numpy gather over one memmap. For each: tokens/s streaming
back-to-back, next() latency when the loader is warm (the caller pauses between batches, as a
training step would, so a prefetching loader has its batch ready), and the GIL check: how fast a
pure-Python counting thread runs while the main thread streams batches, against the counter alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from finegpt.bench.result import Chart, SectionResult
from finegpt.data import HEADER_BYTES, ShardError, TokenLoader, read_shard, write_shard

B, T = 32, 1024
FULL_TOKENS = 100_000_000  # one FineWeb shard (FACTS §3): far bigger than any CPU cache
QUICK_TOKENS = 10_000_000
DEFAULT_DIR = Path.home() / ".cache" / "finegpt" / "bench"
# A training step is milliseconds; a short pause between timed calls is enough for a prefetching
# loader to be ready, which is the state next() latency is quoted in ("warm").
WARM_PAUSE_S = 0.0005

Batch = tuple[torch.Tensor, torch.Tensor]


def bench_shard(tokens: int, path: Path | None = None) -> Path:
    """A shard of at least `tokens` random GPT-2 ids, written once and reused (the default is cached)."""
    path = path or DEFAULT_DIR / f"loader_{tokens // 1_000_000}M.bin"
    try:
        if len(read_shard(path)) >= tokens:
            return path
    except ShardError:  # absent or unreadable: (re)write it
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    write_shard(path, rng.integers(0, 50257, tokens, dtype=np.uint16))
    return path


def nanogpt_get_batch(path: Path, device: torch.device, gen: torch.Generator) -> Batch:
    """nanoGPT's train.py get_batch, as written there."""
    data = np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES)
    ix = torch.randint(len(data) - T, (B,), generator=gen)
    x = torch.stack([torch.from_numpy(data[i : i + T].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + T].astype(np.int64)) for i in ix])
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


class NumpyGather:
    """One memmap, one fancy-indexing gather of all B windows, then the same hand-off as nanoGPT."""

    def __init__(self, path: Path, device: torch.device) -> None:
        self.data = read_shard(path)
        self.device = device
        self.rng = np.random.default_rng(0)
        self.offsets = np.arange(T + 1)

    def __call__(self) -> Batch:
        ix = self.rng.integers(0, len(self.data) - T - 1, B)
        windows = self.data[ix[:, None] + self.offsets].astype(np.int64)
        x, y = torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(loaders: dict[str, Callable[[], Batch]], rounds: int, window_s: float, device: torch.device) -> dict[str, float]:
    """Tokens/s of each loader streaming back-to-back, counted until the batches are on the device.

    The loaders take turns in short windows and each one's median counts, so load from other
    processes on a shared machine falls on all of them alike.
    """
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(rounds):
        for name, next_batch in loaders.items():
            _sync(device)
            calls, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < window_s:
                next_batch()
                calls += 1
            _sync(device)
            rates[name].append(calls * B * T / (time.perf_counter() - t0))
    return {name: float(np.median(r)) for name, r in rates.items()}


def warm_latencies_us(next_batch: Callable[[], Batch], seconds: float, max_calls: int) -> np.ndarray:
    """Host time of each next() call with a short pause before it (the loader is warm)."""
    out: list[float] = []
    t_end = time.perf_counter() + seconds
    while len(out) < max_calls and time.perf_counter() < t_end:
        time.sleep(WARM_PAUSE_S)
        t0 = time.perf_counter_ns()
        next_batch()
        out.append((time.perf_counter_ns() - t0) / 1000)
    return np.array(out)


def counter_rate(seconds: float, stream: Callable[[], Batch] | None = None) -> float:
    """Steps/s of a pure-Python counting thread while the main thread sleeps or calls `stream`."""
    stop = threading.Event()
    counted = [0]

    def count() -> None:
        n = 0
        while not stop.is_set():
            n += 1
        counted[0] = n

    thread = threading.Thread(target=count, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    if stream is None:
        time.sleep(seconds)
    else:
        while time.perf_counter() - t0 < seconds:
            stream()
    stop.set()
    thread.join()
    return counted[0] / (time.perf_counter() - t0)


def gil_kept_pct(stream: Callable[[], Batch], rounds: int, window_s: float) -> tuple[float, float]:
    """Counter rate while streaming as a % of the counter alone, and the alone rate (steps/s).

    Each streaming window sits between two alone windows and is compared with their mean; the
    median of those ratios counts, so load from other processes on a shared machine, which drifts
    over seconds, falls on both sides of each ratio alike.
    """
    alone = [counter_rate(window_s)]
    ratios = []
    for _ in range(rounds):
        streaming = counter_rate(window_s, stream)
        alone.append(counter_rate(window_s))
        ratios.append(streaming / ((alone[-2] + alone[-1]) / 2))
    return 100 * float(np.median(ratios)), float(np.median(alone))


def gpu_step_overhead_us(next_batch: Callable[[], Batch], device: torch.device, steps: int) -> float:
    """Extra time per training-like step (~1 ms of matmuls that read the batch) that the loader adds.

    Near zero when the host work and the copy hide behind the GPU's queued compute.
    """
    a = torch.randn(2048, 2048, device=device)
    acc = torch.zeros((), device=device)

    def step(batch: Batch | None) -> None:
        nonlocal acc
        for _ in range(4):
            torch.mm(a, a)
        if batch is not None:
            acc = acc + batch[0][0, 0] + batch[1][-1, -1]

    times = []
    for use_loader in (False, True, False, True):
        step(None)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step(next_batch() if use_loader else None)
        _sync(device)
        times.append((time.perf_counter() - t0) / steps)
    alone, with_loader = min(times[0::2]), min(times[1::2])
    return (with_loader - alone) * 1e6


def run(quick: bool = False, device: str | None = "cpu", shard_path: Path | None = None) -> SectionResult:
    """Measure TokenLoader against both baselines; `device=None` picks CUDA when present."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        return SectionResult(name="loader", device=str(dev), skipped="no CUDA GPU")
    want = QUICK_TOKENS if quick else FULL_TOKENS
    path = bench_shard(want, Path(shard_path) if shard_path else None)
    ntok = len(read_shard(path))

    gen = torch.Generator().manual_seed(0)
    gather = NumpyGather(path, dev)
    loader = TokenLoader(path, B, T, seed=0, device=dev)
    loaders: dict[str, Callable[[], Batch]] = {
        "nanoGPT get_batch": lambda: nanogpt_get_batch(path, dev, gen),
        "numpy gather": gather,
        "TokenLoader": lambda: next(loader),
    }
    rounds, window_s = (4, 0.1) if quick else (8, 0.15)
    rows, alone, overhead, empty_loop_kept = [], [], None, float("nan")
    try:
        for next_batch in loaders.values():
            for _ in range(20):  # warm-up: page cache, allocator, the loader's ring
                next_batch()
        rates = throughput(loaders, rounds, window_s, dev)
        for name, next_batch in loaders.items():
            lat = warm_latencies_us(next_batch, seconds=rounds * window_s / 2, max_calls=1000)
            kept, alone_rate = gil_kept_pct(next_batch, 3 * rounds, window_s / 4)
            alone.append(alone_rate)
            rows.append(
                {
                    "loader": name,
                    "tokens_per_s": rates[name],
                    "p50_us": float(np.percentile(lat, 50)),
                    "p99_us": float(np.percentile(lat, 99)),
                    "gil_kept_pct": kept,
                }
            )
        # The floor for any Python consumer: a main thread calling an empty function flat out.
        empty_loop_kept, _ = gil_kept_pct(lambda: None, 3 * rounds, window_s / 4)
        if dev.type == "cuda":
            overhead = gpu_step_overhead_us(loaders["TokenLoader"], dev, steps=20 if quick else 100)
    finally:
        loader.close()
    base = {r["loader"]: r["tokens_per_s"] for r in rows}
    for row in rows:
        row["vs_nanogpt"] = row["tokens_per_s"] / base["nanoGPT get_batch"]
    ours = rows[-1]
    notes = [
        f"B={B}, T={T}, random windows of a {ntok / 1e6:.0f}M-token shard ({path}); "
        f"TokenLoader with its defaults (prefetch 4, threads min(4, CPUs)).",
        f"next() latency: host time with a {WARM_PAUSE_S * 1e3:.1f} ms pause before each call (warm); "
        f"tokens/s: back-to-back calls, median of {rounds} alternating {window_s} s windows per loader"
        + (", until the batches are on the GPU." if dev.type == "cuda" else "."),
        f"GIL: a pure-Python counting thread ran {np.median(alone) / 1e6:.1f}M steps/s alone; 'counter kept' "
        "is its rate while the main thread streams batches back-to-back, against the counter alone just "
        f"before and after (median over windows). A main thread calling an empty Python function flat out "
        f"leaves it {empty_loop_kept:.0f}%: the share any Python consumer loop takes.",
    ]
    headline = {
        "speedup_vs_nanogpt": ours["vs_nanogpt"],
        "speedup_vs_numpy_gather": ours["tokens_per_s"] / base["numpy gather"],
        "tokens_per_s": ours["tokens_per_s"],
        "p50_us": ours["p50_us"],
        "p99_us": ours["p99_us"],
        "gil_kept_pct": ours["gil_kept_pct"],
        "gil_kept_pct_empty_loop": empty_loop_kept,
    }
    if dev.type == "cuda":
        headline["gpu_step_overhead_us"] = overhead
        notes.append(
            "gpu_step_overhead_us: time TokenLoader adds to a step of ~1 ms of queued matmuls that read "
            "the batch (pinned int32 ring, one async copy and one widening kernel per batch)."
        )
    if ntok < FULL_TOKENS:
        notes.append(f"quick mode: a {ntok / 1e6:.0f}M-token shard instead of 100M, {rounds} rounds of {window_s} s.")
    return SectionResult(
        name="loader",
        device=str(dev),
        rows=rows,
        columns=[
            ("loader", "loader"),
            ("tokens_per_s", "tokens/s"),
            ("vs_nanogpt", "vs nanoGPT (x)"),
            ("p50_us", "next() p50 (us)"),
            ("p99_us", "next() p99 (us)"),
            ("gil_kept_pct", "counter kept (%)"),
        ],
        headline=headline,
        notes=notes,
        charts=[Chart(title=f"Loader throughput (B={B}, T={T})", label_key="loader", value_key="tokens_per_s", unit="tokens/s")],
    )

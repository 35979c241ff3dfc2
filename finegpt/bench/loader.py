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


def throughput(next_batch: Callable[[], Batch], seconds: float, device: torch.device) -> float:
    """Tokens/s streaming back-to-back, counted until the batches are on the device."""
    _sync(device)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next_batch()
        calls += 1
    _sync(device)
    return calls * B * T / (time.perf_counter() - t0)


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


def run(quick: bool = False, device: str | None = "cpu", shard_path: Path | None = None) -> SectionResult:
    """Measure TokenLoader against both baselines; `device=None` picks CUDA when present."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        return SectionResult(name="loader", device=str(dev), skipped="no CUDA GPU")
    want = QUICK_TOKENS if quick else FULL_TOKENS
    path = bench_shard(want, Path(shard_path) if shard_path else None)
    ntok = len(read_shard(path))
    phase_s = 0.5 if quick else 2.0

    gen = torch.Generator().manual_seed(0)
    gather = NumpyGather(path, dev)
    loader = TokenLoader(path, B, T, seed=0, device=dev)
    loaders: dict[str, Callable[[], Batch]] = {
        "nanoGPT get_batch": lambda: nanogpt_get_batch(path, dev, gen),
        "numpy gather": gather,
        "TokenLoader": lambda: next(loader),
    }
    rows = []
    try:
        alone = counter_rate(phase_s)
        for name, next_batch in loaders.items():
            for _ in range(20):  # warm-up: page cache, allocator, the loader's ring
                next_batch()
            lat = warm_latencies_us(next_batch, seconds=phase_s, max_calls=2000)
            rows.append(
                {
                    "loader": name,
                    "tokens_per_s": throughput(next_batch, phase_s, dev),
                    "p50_us": float(np.percentile(lat, 50)),
                    "p99_us": float(np.percentile(lat, 99)),
                    "gil_kept_pct": 100 * counter_rate(phase_s, next_batch) / alone,
                }
            )
    finally:
        loader.close()
    base = {r["loader"]: r["tokens_per_s"] for r in rows}
    for row in rows:
        row["vs_nanogpt"] = row["tokens_per_s"] / base["nanoGPT get_batch"]
    ours = rows[-1]
    notes = [
        f"B={B}, T={T}, random windows of a {ntok / 1e6:.0f}M-token shard ({path}); "
        f"TokenLoader with its defaults (prefetch 4, threads = CPUs - 1, at most 4).",
        f"next() latency: host time with a {WARM_PAUSE_S * 1e3:.1f} ms pause before each call (warm); "
        "tokens/s: back-to-back calls" + (", until the batches are on the GPU." if dev.type == "cuda" else "."),
        f"GIL: a pure-Python counting thread ran {alone / 1e6:.1f}M steps/s alone; 'counter kept' is its "
        "rate while the main thread streams batches back-to-back.",
    ]
    if ntok < FULL_TOKENS:
        notes.append(f"quick mode: a {ntok / 1e6:.0f}M-token shard instead of 100M, {phase_s} s per phase.")
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
        headline={
            "speedup_vs_nanogpt": ours["vs_nanogpt"],
            "speedup_vs_numpy_gather": ours["tokens_per_s"] / base["numpy gather"],
            "tokens_per_s": ours["tokens_per_s"],
            "p50_us": ours["p50_us"],
            "p99_us": ours["p99_us"],
            "gil_kept_pct": ours["gil_kept_pct"],
        },
        notes=notes,
        charts=[Chart(title=f"Loader throughput (B={B}, T={T})", label_key="loader", value_key="tokens_per_s", unit="tokens/s")],
    )

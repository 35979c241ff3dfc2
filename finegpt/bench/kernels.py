"""`finegpt bench kernels`: each fused kernel against the eager PyTorch it replaces and against
torch.compile of that eager code, forward + backward, on one GPU.

Per case and path: the median time of forward + backward (`triton.testing.do_bench`), the bandwidth
that implies for the least traffic the op needs (LayerNorm: read x twice, write y, read dy, write dx;
cross-entropy: read the logits, write their gradient), as a share of this GPU's own measured
device-to-device copy bandwidth, and the peak memory of one forward + backward: `peak` counts
everything allocated (inputs included), `extra` only what the op adds above its inputs. Memory
ratios use `extra`. Inputs are bf16; the cross-entropy and linear + cross-entropy baselines are
what nanoGPT runs under bf16 autocast: bf16 logits, upcast to fp32 for F.cross_entropy.

The GPU lease that runs this is short, so the section keeps a time budget: headline cases run
first, torch.compile paths are dropped (and said so) when the budget runs low, and one failing
case records an error row and the section goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from finegpt.bench.result import Chart, SectionResult
from finegpt.model import GPTConfig
from finegpt.presets import PRESETS

LN_ROWS = (32768, 16384)
LN_WIDTHS = (768, 384, 512, 640, 672, 1024)
CE_ROWS = (16384, 8192)
VOCAB = GPTConfig.vocab_size  # GPT-2's vocabulary padded as the model pads it
HEADLINE_TIER = "24"
# do_bench windows (ms): short, the section must fit a few minutes of GPU time.
WARMUP_MS, REP_MS = 10, 50
# bench/gpu_check.sh gives this section 75 s in all, start-up included.
BUDGET_S = {False: 60.0, True: 30.0}
# No new torch.compile path starts with less than this left: a first compile takes 10-30 s.
COMPILE_RESERVE_S = 25.0
MIB = 2**20


@dataclass
class Case:
    op: str
    shape: str
    make: Callable[[], dict]  # -> {"paths": {name: fwd+bwd fn}, "params": [tensors with .grad]}
    bytes: float | None = None  # least traffic of fwd+bwd, for GB/s
    flops: float | None = None  # for TFLOP/s (GEMM-bound linear + cross-entropy)
    headline: bool = False
    paths: tuple[str, ...] = ("fused", "eager", "compile")
    rows: list[dict] = field(default_factory=list)


def _tiers() -> dict[str, tuple[int, int]]:
    """{tier: (B·T, n_embd)} at each VRAM tier's micro-batch, from the one preset table."""
    return {p.name: (p.batch_size * p.block_size, p.n_embd) for p in PRESETS.values() if p.vram_gb is not None}


def _layer_norm_case(n: int, c: int, headline: bool) -> Case:
    import kernels

    def make():
        x = torch.randn(n, c, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(c, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        b = torch.randn(c, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)

        def eager():
            return F.layer_norm(x, (c,), w, b, 1e-5)

        compiled = torch.compile(eager)
        paths = {
            "fused": lambda: kernels.layer_norm(x, w, b).backward(dy),
            "eager": lambda: eager().backward(dy),
            "compile": lambda: compiled().backward(dy),
        }
        return {"paths": paths, "params": [x, w, b]}

    return Case("layer_norm", f"{n}x{c}", make, bytes=5 * n * c * 2, headline=headline)


def _cross_entropy_case(n: int, headline: bool) -> Case:
    import kernels

    def make():
        logits = torch.randn(n, VOCAB, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        targets = torch.randint(0, VOCAB, (n,), device="cuda")

        def eager():
            return F.cross_entropy(logits.float(), targets)

        compiled = torch.compile(eager)
        paths = {
            "fused": lambda: kernels.cross_entropy(logits, targets).backward(),
            "eager": lambda: eager().backward(),
            "compile": lambda: compiled().backward(),
        }
        return {"paths": paths, "params": [logits]}

    return Case("cross_entropy", f"{n}x{VOCAB}", make, bytes=2 * n * VOCAB * 2, headline=headline)


def _linear_cross_entropy_case(tier: str, n: int, h: int, headline: bool) -> Case:
    import kernels

    def make():
        hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        weight = (torch.randn(VOCAB, h, device="cuda") * h**-0.5).requires_grad_()
        targets = torch.randint(0, VOCAB, (n,), device="cuda")

        def eager():
            return F.cross_entropy(F.linear(hidden, weight), targets)

        compiled = torch.compile(eager)

        def under_autocast(fn):
            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = fn()
                loss.backward()

            return step

        paths = {
            "fused": under_autocast(lambda: kernels.linear_cross_entropy(hidden, weight, targets)),
            "eager": under_autocast(eager),
            "compile": under_autocast(compiled),
        }
        return {"paths": paths, "params": [hidden, weight]}

    return Case(f"linear_cross_entropy ({tier} GB tier)", f"{n}x{h}x{VOCAB}", make, flops=6 * n * h * VOCAB, headline=headline)


def _cases(quick: bool) -> list[Case]:
    """Headline cases first, so a spent budget costs only the grid around them."""
    tiers = _tiers()
    n24, h24 = tiers[HEADLINE_TIER]
    cases = [
        _layer_norm_case(32768, 768, headline=True),
        _cross_entropy_case(16384, headline=True),
        _linear_cross_entropy_case(HEADLINE_TIER, n24, h24, headline=True),
    ]
    if quick:
        for case in cases:
            case.paths = ("fused", "eager")
        return cases
    cases.append(_cross_entropy_case(8192, headline=False))
    cases += [_linear_cross_entropy_case(t, n, h, False) for t, (n, h) in tiers.items() if t != HEADLINE_TIER]
    cases += [_layer_norm_case(n, c, False) for n in LN_ROWS for c in LN_WIDTHS if (n, c) != (32768, 768)]
    return cases


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB: bytes read + bytes written per second."""
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
    return 2 * 2**30 / (ms * 1e-3) / 1e9


def _measure(fn: Callable[[], None], params: list[torch.Tensor]) -> tuple[float, float, float]:
    """(median ms, peak MiB, extra MiB above what was allocated before) of one fwd+bwd."""
    from triton.testing import do_bench

    fn()  # compile, autotune and warm the allocator outside the measurements
    for p in params:
        p.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    ms = do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, grad_to_none=params, return_mode="median")
    return ms, peak / MIB, (peak - base) / MIB


def _run_case(case: Case, copy_gbs: float, deadline: float, notes: list[str]) -> None:
    try:
        setup = case.make()
    except Exception as err:  # e.g. out of memory for the inputs themselves
        case.rows.append({"op": case.op, "shape": case.shape, "path": "-", "error": f"{type(err).__name__}: {err}"[:200]})
        return
    for path in case.paths:
        row = {"op": case.op, "shape": case.shape, "path": path, "case": f"{case.op} {case.shape}"}
        left = deadline - time.monotonic()
        if left <= 0 or (path == "compile" and left < COMPILE_RESERVE_S):
            row["error"] = "not run: time budget"
            case.rows.append(row)
            continue
        try:
            ms, peak, extra = _measure(setup["paths"][path], setup["params"])
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
        except Exception as err:  # one failing path must not lose the others' figures
            row["error"] = f"{type(err).__name__}: {err}"[:200]
        else:
            row.update(ms=ms, peak_mib=peak, extra_mib=extra)
            if case.bytes:
                row["gbs"] = case.bytes / (ms * 1e-3) / 1e9
                row["copy_pct"] = 100 * row["gbs"] / copy_gbs
            if case.flops:
                row["tflops"] = case.flops / (ms * 1e-3) / 1e12
        for p in setup["params"]:
            p.grad = None
        case.rows.append(row)
    del setup
    torch.cuda.empty_cache()
    eager = next((r for r in case.rows if r["path"] == "eager" and "ms" in r), None)
    for row in case.rows:
        if eager and "ms" in row:
            row["speedup"] = eager["ms"] / row["ms"]
            row["mem_ratio"] = row["extra_mib"] / eager["extra_mib"] if eager["extra_mib"] > 0 else None
    skipped = [r["path"] for r in case.rows if r.get("error") == "not run: time budget"]
    if skipped:
        notes.append(f"{case.op} {case.shape}: {', '.join(skipped)} not run (time budget)")


def _headline(cases: list[Case], copy_gbs: float) -> dict:
    def fused(op_prefix: str) -> dict:
        for case in cases:
            if case.headline and case.op.startswith(op_prefix):
                return next((r for r in case.rows if r["path"] == "fused"), {})
        return {}

    ln, ce, lce = fused("layer_norm"), fused("cross_entropy"), fused("linear_cross_entropy")
    lce_time_ratio = 1 / lce["speedup"] if lce.get("speedup") else None
    head = {
        "copy_bandwidth_gbs": copy_gbs,
        "ce_speedup_vs_eager": ce.get("speedup"),
        "ce_peak_memory_ratio": ce.get("mem_ratio"),
        "ln_speedup_vs_eager": ln.get("speedup"),
        "ln_copy_bandwidth_pct": ln.get("copy_pct"),
        "lce_memory_ratio": lce.get("mem_ratio"),
        "lce_time_ratio": lce_time_ratio,
    }
    # The targets (issue 4), so a reader sees at once which hold on this GPU.
    head["ce_targets_met"] = _holds((ce.get("speedup"), 2.0, 1), (ce.get("mem_ratio"), 0.25, -1))
    head["ln_targets_met"] = _holds((ln.get("speedup"), 1.0, 1), (ln.get("copy_pct"), 70.0, 1))
    head["lce_targets_met"] = _holds((lce.get("mem_ratio"), 1 / 8, -1), (lce_time_ratio, 1.2, -1))
    return head


def _holds(*checks: tuple[float | None, float, int]) -> bool | None:
    """All (value, bound, sign) hold: sign 1 means value >= bound, -1 value <= bound; None if unmeasured."""
    if any(value is None for value, _, _ in checks):
        return None
    return all(sign * (value - bound) >= 0 for value, bound, sign in checks)


def run(quick: bool = False) -> SectionResult:
    if not torch.cuda.is_available():
        return SectionResult(
            name="kernels",
            device="cpu",
            skipped="no CUDA GPU: the kernels are timed on a GPU (run bench/gpu_check.sh on one); "
            "their correctness on the CPU is covered by the tests under TRITON_INTERPRET=1",
        )
    import triton

    from finegpt.device import device_name

    start = time.monotonic()
    deadline = start + BUDGET_S[quick]
    notes = [
        f"torch {torch.__version__}, triton {triton.__version__}; do_bench median, warmup {WARMUP_MS} ms, rep {REP_MS} ms",
        "peak = max_memory_allocated over one fwd+bwd (inputs included); extra = peak minus what was allocated "
        "before (inputs); memory ratios are extra(path) / extra(eager)",
        "GB/s counts the least traffic of fwd+bwd (LayerNorm 5·N·C·2 bytes, cross-entropy 2·N·V·2 bytes)",
    ]
    if quick:
        notes.append("quick: headline cases only, without torch.compile")
    cases = _cases(quick)
    copy_gbs = copy_bandwidth_gbs()
    try:
        for case in cases:
            _run_case(case, copy_gbs, deadline, notes)
    except KeyboardInterrupt:  # a time limit's SIGINT: keep what was measured
        notes.append("interrupted: the cases after the last row were not run")
    rows = [row for case in cases for row in case.rows]
    not_started = [f"{c.op} {c.shape}" for c in cases if not c.rows]
    if not_started:
        notes.append(f"not run (time budget): {'; '.join(not_started)}")
    notes.append(f"section time {time.monotonic() - start:.0f} s")
    return SectionResult(
        name="kernels",
        device=device_name(),
        rows=rows,
        columns=[
            ("op", "op"),
            ("shape", "shape"),
            ("path", "path"),
            ("ms", "fwd+bwd (ms)"),
            ("speedup", "vs eager (x)"),
            ("gbs", "GB/s"),
            ("copy_pct", "of copy BW (%)"),
            ("tflops", "TFLOP/s"),
            ("peak_mib", "peak (MiB)"),
            ("extra_mib", "extra (MiB)"),
            ("mem_ratio", "extra vs eager (x)"),
            ("error", "error"),
        ],
        headline=_headline(cases, copy_gbs),
        notes=notes,
        charts=[Chart(title="Fused kernels, forward + backward (bf16)", label_key="case", value_key="ms",
                      unit="ms (fwd+bwd)", series_key="path"),
                Chart(title="Memory above the inputs, forward + backward (bf16)", label_key="case",
                      value_key="extra_mib", unit="MiB", series_key="path")],
    )

"""finegpt bench: the reduced end-to-end run (JSON against its schema, Markdown, charts), merging of
sections, README regeneration, and the train section's handling of paths that run out of memory."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from finegpt.bench import report
from finegpt.bench import train as bench_train
from finegpt.bench.result import Chart, SectionResult
from finegpt.cli import main

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`finegpt bench --quick` once (about 20 s on 2 cores), in a subprocess as a user would run it."""
    out = tmp_path_factory.mktemp("bench") / "results"
    env = dict(os.environ)
    # conftest sets the Triton interpreter for the kernel tests; the bench must use what a user gets
    # on a CPU machine: the kernels' PyTorch fallback.
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "finegpt", "bench", "--quick", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


@pytest.mark.slow
def test_quick_run_writes_valid_results(quick_run):
    out, stdout = quick_run
    data = json.loads((out / "results.json").read_text())
    report.validate_results(data)
    assert list(data["sections"]) == ["loader", "kernels", "train"]
    env = data["environment"]
    assert env["torch"] == torch.__version__ and env["cpu_count"] == os.cpu_count()
    for section in data["sections"].values():
        assert section["quick"] is True and section["command"].startswith("finegpt bench ")
    # every section prints its table: the headers of its columns appear in the output
    for section in data["sections"].values():
        if not section["skipped"]:
            assert all(header in stdout for _, header in section["columns"])


@pytest.mark.slow
@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU labelling")
def test_quick_run_on_cpu_labels_cpu_figures_and_skips_kernels(quick_run):
    out, _ = quick_run
    sections = json.loads((out / "results.json").read_text())["sections"]
    assert sections["kernels"]["skipped"] and "GPU" in sections["kernels"]["skipped"].upper()
    train = sections["train"]
    assert "CPU" in train["device"]
    by_path = {row["path"]: row for row in train["rows"]}
    for path in ("eager", "fused"):
        row = by_path[path]
        assert row["status"] == "ok" and row["tier"] == "cpu"
        assert row["tokens_per_s"] > 0 and row["ms_per_iter"] > 0 and row["loss"] > 0
        assert row["loss_agrees"] is True
    for path in ("eager+compile", "fused+compile"):
        assert by_path[path]["status"].startswith("skipped (") and by_path[path]["tokens_per_s"] is None
    assert by_path["fused"]["vs_eager"] == pytest.approx(by_path["fused"]["tokens_per_s"] / by_path["eager"]["tokens_per_s"])
    assert train["headline"]["losses_agree"] is True


@pytest.mark.slow
def test_quick_run_markdown_has_every_section(quick_run):
    out, _ = quick_run
    data = json.loads((out / "results.json").read_text())
    text = (out / "report.md").read_text()
    assert data["environment"]["device"] in text
    for name, section in data["sections"].items():
        assert f"## {name}" in text
        if section["skipped"]:
            assert section["skipped"] in text
            continue
        header_line = "| " + " | ".join(h for _, h in section["columns"]) + " |"
        assert header_line in text
        assert len([line for line in text.splitlines() if line.startswith("| ")]) >= len(section["rows"])
        assert f"({section['chart_file']})" in text


@pytest.mark.slow
def test_quick_run_charts_open_and_show_the_results(quick_run):
    from PIL import Image

    out, _ = quick_run
    data = json.loads((out / "results.json").read_text())
    drawn = [s for s in data["sections"].values() if s["chart_file"]]
    assert {s["name"] for s in drawn} >= {"loader", "train"}
    for section in drawn:
        path = out / section["chart_file"]
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
        shown = report.read_chart_metadata(path)
        assert [c["title"] for c in shown] == [c["title"] for c in section["charts"]]
        for chart, meta in zip(section["charts"], shown):
            assert meta["series"] == json.loads(json.dumps(report.chart_series(chart, section["rows"])))
            assert any(v for series in meta["series"].values() for v in series.values())
    train_series = report.read_chart_metadata(out / "train.png")[0]["series"]
    assert {"eager", "fused"} <= set(train_series)


def _section(name, device="cpu", value=1.0, **kw):
    result = SectionResult(
        name=name, device=device, rows=[{"case": "a", "path": "fused", "ms": value}, {"case": "a", "path": "eager", "ms": 2 * value}],
        columns=[("case", "case"), ("path", "path"), ("ms", "time (ms)")], headline={"speedup": 2.0},
        charts=[Chart("Time", "case", "ms", "ms", "path")], **kw,
    )  # fmt: skip
    return report.section_record(result, command=f"finegpt bench {name}", quick=False)


def _env(device="CPU: test (2 cores)", date="2026-01-01T00:00:00+00:00"):
    env = report.environment()
    env.update(device=device, date=date)
    return env


def test_validator_names_what_is_wrong(tmp_path):
    good = report.write_results_dir(tmp_path, _env(), [_section("train")])
    report.validate_results(good)
    cases = [
        (lambda d: d["environment"].pop("torch"), "environment: missing key 'torch'"),
        (lambda d: d["sections"]["train"]["rows"][0].update(ms=[1]), "rows[0].ms: expected"),
        (lambda d: d["sections"]["train"]["columns"].append(["x"]), "expected 2 items"),
        (lambda d: d["sections"]["train"]["charts"][0].update(value_key="missing"), "charts[0]"),
        (lambda d: d.update(schema_version=99), "schema_version"),
    ]  # fmt: skip
    for breaks, message in cases:
        data = copy.deepcopy(good)
        breaks(data)
        with pytest.raises(report.ResultsError, match=message.replace("[", r"\[").replace("]", r"\]")):
            report.validate_results(data)


def test_sections_run_separately_merge_into_one_results_dir(tmp_path):
    report.write_results_dir(tmp_path, _env(), [_section("train", value=1.0)])
    report.write_results_dir(tmp_path, _env(), [_section("loader", value=3.0)])
    data = report.write_results_dir(tmp_path, _env(), [_section("train", value=5.0)])
    assert list(data["sections"]) == ["loader", "train"]
    assert data["sections"]["train"]["rows"][0]["ms"] == 5.0  # replaced by the newer run
    assert data["sections"]["loader"]["rows"][0]["ms"] == 3.0  # kept
    assert json.loads((tmp_path / "results.json").read_text()) == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loader.png", "report.md", "results.json", "train.png"]
    with pytest.raises(report.ResultsError, match="another --out"):
        report.write_results_dir(tmp_path, _env(device="NVIDIA H100 80GB HBM3"), [_section("train")])


def test_readme_shows_the_latest_result_per_device(tmp_path):
    root = tmp_path / "results"
    report.write_results_dir(root / "a-old", _env(date="2026-01-01T00:00:00+00:00"), [_section("train", value=1.0)])
    new = _section("train", value=7.0)
    new["headline"] = {"speedup": 3.5}
    report.write_results_dir(root / "a-new", _env(date="2026-02-01T00:00:00+00:00"), [new])
    report.write_results_dir(root / "gpu", _env(device="NVIDIA H100 80GB HBM3"), [_section("kernels")])
    readme = tmp_path / "README.md"
    readme.write_text(f"# Bench\n\nHow to run.\n\n{report.README_BEGIN}\nstale\n{report.README_END}\n\nFooter.\n")
    result = CliRunner().invoke(main, ["bench", "report", str(root), "--readme", str(readme)])
    assert result.exit_code == 0, result.output
    text = readme.read_text()
    assert text.startswith("# Bench\n\nHow to run.") and text.rstrip().endswith("Footer.") and "stale" not in text
    block = text.split(report.README_BEGIN)[1].split(report.README_END)[0]
    assert block.count("### ") == 2 and "### NVIDIA H100 80GB HBM3" in block and "### CPU: test (2 cores)" in block
    cpu_part, gpu_part = block.split("### NVIDIA")[0], block.split("### NVIDIA")[1]
    assert "| train | speedup | 3.50 |" in cpu_part and "| kernels | speedup | 2.00 |" in gpu_part
    assert "results/a-new/report.md" in block and "a-old" not in block
    assert "Reproduce: `finegpt bench train`." in cpu_part


def test_report_of_missing_directory_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["bench", "report", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "no such directory" in result.output


class FakeTrainer:
    """Stands in for finegpt.train.Trainer: runs out of memory above a micro-batch, like a small card."""

    def __init__(self, batch_size, max_batch, loss):
        if batch_size > max_batch:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has ...")
        self.tokens_per_step = batch_size * 8
        self.loss = loss
        self.closed = False

    def train_step(self):
        return self.loss

    def close(self):
        self.closed = True


def test_measure_reports_out_of_memory_instead_of_raising():
    assert bench_train._tried_bytes("Tried to allocate 3.00 GiB. GPU 0") == 3 * 2**30
    assert bench_train._tried_bytes("Tried to allocate 512.00 MiB") == 512 * 2**20
    made = []

    def make():
        made.append(FakeTrainer(4, max_batch=8, loss=2.5))
        return made[-1]

    ok = bench_train.measure(make, steps=3, burn_in=1, cuda=False)
    assert ok["status"] == "ok" and ok["loss"] == 2.5 and ok["tokens_per_step"] == 32 and made[0].closed
    oom = bench_train.measure(lambda: FakeTrainer(16, max_batch=8, loss=2.5), steps=3, burn_in=1, cuda=False)
    assert oom["status"] == "OOM" and "Tried to allocate" in oom["message"]

    def broken():
        raise ValueError("a bug, not a full card")

    with pytest.raises(ValueError):
        bench_train.measure(broken, steps=1, burn_in=0, cuda=False)


def test_train_section_falls_back_to_the_largest_micro_batch_that_fits(monkeypatch):
    """Eager runs out of memory at the tier's micro-batch: the row says so, eager is measured at the
    largest halved micro-batch that fits, and fused is compared with that."""
    from finegpt.presets import get_preset

    preset = get_preset("cpu")
    fits_eager = preset.batch_size // 4

    def factory(preset_, path, batch_size, *args):
        max_batch = 10**6 if path.fused else fits_eager
        return lambda: FakeTrainer(batch_size, max_batch, loss=3.0 if path.fused else 3.001)

    monkeypatch.setattr(bench_train, "_trainer_factory", factory)
    monkeypatch.setattr(bench_train, "write_synthetic_shards", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = bench_train.run(vram="cpu", steps=2, burn_in=0, compile_paths=False)
    rows = {r["path"]: r for r in result.rows}
    assert rows["eager"]["status"] == "OOM" and rows["eager"]["fits"] is False and rows["eager"]["tokens_per_s"] is None
    fallback = rows[f"eager @B={fits_eager}"]
    assert fallback["status"] == "ok" and fallback["batch"] == f"{fits_eager}×{preset.block_size}"
    assert f"eager @B={fits_eager * 2}" not in rows  # it stopped halving at the first fit
    assert rows["fused"]["loss_agrees"] is True  # only paths at the tier's micro-batch are compared
    assert rows["fused"]["vs_eager"] == pytest.approx(rows["fused"]["tokens_per_s"] / fallback["tokens_per_s"])
    assert result.headline["eager_micro_batch_compared"] == fits_eager
    assert rows["eager+compile"]["status"] == "skipped (--no-compile)"
    assert any("6·N + 12·L·C·T" in note for note in result.notes)


@pytest.mark.skipif(HAS_CUDA, reason="checks the message given on a machine without a GPU")
def test_gpu_only_flags_are_refused_on_cpu():
    for flags in (["--all-tiers"], ["--emulate-vram", "24"]):
        result = CliRunner().invoke(main, ["bench", "train", *flags])
        assert result.exit_code == 1 and "Error:" in result.output and flags[0] in result.output
        assert "Traceback" not in result.output


def test_headline_compares_like_for_like_on_an_emulated_card():
    """24 GB tier where eager and eager+compile do not fit: fused is compared with eager at the largest
    micro-batch that fit, its memory with eager's uncapped peak at the same micro-batch, and
    fused+compile with eager+compile's uncapped run."""

    def r(tier, path, b, status="ok", tps=None, peak=None, fits=True):
        return {"tier": tier, "path": path, "_b": b, "status": status, "tokens_per_s": tps, "peak_gib": peak,
                "fits": fits, "loss": 10.8 if status == "ok" else None, "loss_agrees": None, "vs_eager": None}  # fmt: skip

    tier24 = [
        r("24 GB", "eager", 32, status="OOM: needs 30.1 GiB", fits=False),
        r("24 GB", "eager (uncapped)", 32, tps=100_000, peak=30.0, fits=False),
        r("24 GB", "eager @B=16", 16, tps=80_000, peak=15.5),
        r("24 GB", "fused", 32, tps=120_000, peak=9.0),
        r("24 GB", "fused+compile", 32, tps=150_000, peak=8.0),
        r("24 GB", "eager+compile", 32, status="OOM", fits=False),
        r("24 GB", "eager+compile (uncapped)", 32, tps=140_000, peak=26.0, fits=False),
    ]
    tier16 = [r("16 GB", "eager", 32, tps=50_000, peak=12.0), r("16 GB", "fused", 32, status="OOM", fits=False)]
    bench_train._finish_tier(tier24, 32)
    bench_train._finish_tier(tier16, 32)
    head = bench_train._headline(tier24 + tier16, "24 GB", ["24 GB", "16 GB"], emulated=True)
    assert head["fused_vs_eager_tokens_per_s"] == pytest.approx(120_000 / 80_000)
    assert head["eager_micro_batch_compared"] == 16 and head["target_fused_ge_1.1x_eager"] is True
    assert head["fused_compile_vs_eager_compile_tokens_per_s"] == pytest.approx(150_000 / 140_000)
    assert head["eager_compile_fit_card"] is False and head["target_fused_compile_ge_eager_compile"] is True
    assert head["fused_peak_vs_eager_peak"] == pytest.approx(9.0 / 30.0)
    assert head["target_fused_peak_le_0.4x_eager"] is True
    assert head["fused_fits_24_GB_card"] is True and head["fused_fits_16_GB_card"] is False
    assert head["target_every_tier_fits_fused"] is False
    rows = {x["path"]: x for x in tier24}
    assert rows["fused"]["vs_eager"] == pytest.approx(1.5) and rows["eager @B=16"]["loss_agrees"] is None
    assert rows["eager (uncapped)"]["loss_agrees"] is True  # same micro-batch as fused: compared


@pytest.fixture
def simulated_gpu(monkeypatch):
    """An 80 GiB GPU without a GPU: torch.cuda's memory calls are faked, and a trainer runs out of
    memory wherever the FACTS §2 estimate exceeds the emulated card. Yields the state (cap, trainers)."""
    import finegpt.device
    from finegpt.presets import estimate_peak_memory

    total = 80 * 2**30
    state = {"total": total, "fraction": 1.0, "peak": 0, "fractions": [], "built": []}

    def set_fraction(fraction, *args):
        state["fraction"] = fraction
        state["fractions"].append(round(fraction * total / 2**30, 3))

    for name, fake in {
        "is_available": lambda: True, "synchronize": lambda *a: None, "empty_cache": lambda: None,
        "reset_peak_memory_stats": lambda *a: state.update(peak=0), "max_memory_allocated": lambda *a: state["peak"],
        "memory_allocated": lambda *a: 0, "set_per_process_memory_fraction": set_fraction,
    }.items():  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, fake)
    monkeypatch.setattr(finegpt.device, "device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(finegpt.device, "device_memory_bytes", lambda *a: total)
    monkeypatch.setattr(bench_train, "write_synthetic_shards", lambda *a, **k: None)
    monkeypatch.setattr(bench_train.gc, "collect", lambda *a: 0)  # nothing to free here; 0.3 s a call

    class SimulatedTrainer(FakeTrainer):
        def __init__(self, preset, path, batch_size):
            state["built"].append((preset.name, path.name, batch_size))
            need = estimate_peak_memory(preset, batch_size, preset.block_size, fused=path.fused)
            if need > state["fraction"] * total:
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {need / 2**30:.2f} GiB.")
            state["peak"] = need
            self.tokens_per_step = batch_size * preset.block_size
            self.loss = 10.8

    monkeypatch.setattr(bench_train, "_trainer_factory", lambda preset, path, b, *a: lambda: SimulatedTrainer(preset, path, b))
    return state


def test_all_tiers_on_a_simulated_gpu(simulated_gpu):
    """Each tier is capped to its card, eager is re-measured uncapped and at a halved micro-batch where
    it does not fit, compiled paths run on the 24 GB tier only, and the cap is lifted at the end."""
    state = simulated_gpu
    result = bench_train.run(all_tiers=True, steps=2, burn_in=0)

    assert state["fraction"] == 1.0  # the card is whole again for whatever runs next
    assert {24.0, 16.0, 12.0, 48.0} <= set(state["fractions"])
    tiers = list(dict.fromkeys(r["tier"] for r in result.rows))
    assert tiers == ["80 GB", "48 GB", "24 GB", "16 GB", "12 GB"]
    rows = {(r["tier"], r["path"]): r for r in result.rows}
    eager24 = rows[("24 GB", "eager")]
    assert eager24["status"].startswith("OOM: needs ") and eager24["fits"] is False and eager24["card_gib"] == 24
    uncapped = rows[("24 GB", "eager (uncapped)")]
    assert uncapped["status"] == "ok" and uncapped["peak_gib"] > 24 and uncapped["card_gib"] == 80
    assert rows[("24 GB", "eager @B=16")]["fits"] is True
    assert rows[("24 GB", "fused")]["status"] == "ok" and rows[("24 GB", "fused")]["mfu_pct"] > 0
    assert rows[("24 GB", "fused+compile")]["status"] == "ok"
    assert rows[("24 GB", "eager+compile")]["fits"] is False and ("24 GB", "eager+compile (uncapped)") in rows
    assert not any(t == "24 GB" and "compile @B=" in p for t, p in rows)  # compiled paths are not halved
    for tier in ("80 GB", "48 GB", "16 GB", "12 GB"):
        assert rows[(tier, "fused+compile")]["status"].startswith("skipped (only the 24 GB tier")
        assert rows[(tier, "fused")]["fits"] is True
    head = result.headline
    assert head["headline_tier"] == "24 GB" and head["eager_micro_batch_compared"] == 16
    assert head["target_every_tier_fits_fused"] is True and head["eager_compile_fit_card"] is False
    assert head["fused_peak_vs_eager_peak"] == pytest.approx(rows[("24 GB", "fused")]["peak_gib"] / uncapped["peak_gib"])
    assert any("989 TFLOP/s" in note for note in result.notes)


def test_a_spent_time_budget_keeps_the_target_figures(simulated_gpu, monkeypatch):
    """With time for five trainers only: the 24 GB tier's eager (and its fallbacks) and fused come
    first, then the other tiers' fused path; everything later is a 'skipped (time budget)' row."""
    state = simulated_gpu
    monkeypatch.setattr(bench_train._Clock, "stop_reason", lambda self: "time budget 1 s spent" if len(state["built"]) >= 5 else None)
    result = bench_train.run(all_tiers=True, steps=1, burn_in=0)
    assert state["built"][:4] == [("24", "eager", 32), ("24", "eager", 32), ("24", "eager", 16), ("24", "fused", 32)]
    assert state["built"][4] == ("16", "fused", 32)
    rows = {(r["tier"], r["path"]): r for r in result.rows}
    assert rows[("12 GB", "fused")]["status"] == "skipped (time budget 1 s spent)"
    assert rows[("24 GB", "fused+compile")]["status"] == "skipped (time budget 1 s spent)"
    assert len(result.rows) == 5 * 4 + 2  # every tier's four paths, and 24 GB's two eager fallbacks
    assert result.headline["fused_vs_eager_tokens_per_s"] > 0 and result.headline["target_every_tier_fits_fused"] is False

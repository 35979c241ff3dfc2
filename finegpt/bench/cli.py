"""`finegpt bench [loader|kernels|train|report]`: run the benchmark sections and record them.

`finegpt bench` runs every section; `finegpt bench <section>` runs one. Each section's figures are
printed as a table and merged into `--out` (results.json, report.md, one PNG per section) as soon as
the section ends, so an interrupted run keeps what it measured.
"""

import signal
import threading
import traceback
from pathlib import Path

import click

from finegpt.bench import report
from finegpt.bench.result import SectionResult
from finegpt.errors import FinegptError

SECTIONS = ("loader", "kernels", "train")


def _run_loader(quick: bool, device: str | None) -> SectionResult:
    from finegpt.bench import loader

    return loader.run(device=device, quick=quick)


def _run_kernels(quick: bool) -> SectionResult:
    from finegpt.bench import kernels

    return kernels.run(quick=quick)


def _run_train(quick: bool, **options) -> SectionResult:
    from finegpt.bench import train

    return train.run(quick=quick, **options)


def _command(section: str | None, options: dict) -> str:
    """The command line that reproduces a section (options left at their defaults omitted)."""
    words = ["finegpt", "bench"] + ([section] if section else [])
    for name, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return " ".join(words)


def run_sections(names, out: Path | None, quick: bool, loader_options: dict, train_options: dict) -> None:
    # A time limit's SIGTERM or SIGINT becomes KeyboardInterrupt, which the train section turns into a
    # partial result; Python leaves SIGINT ignored when started in the background, so set it here.
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.default_int_handler)
    env = report.environment()
    out_dir = out or report.default_out_dir(env)
    failed = []
    for name in names:
        options = {"loader": loader_options, "train": train_options}.get(name, {})
        runner = {"loader": _run_loader, "kernels": _run_kernels, "train": _run_train}[name]
        command = _command(name, {"quick": quick, **options})
        click.echo(f"\n[bench {name}] {command}", err=True)
        try:
            result = runner(quick, **options)
        except FinegptError:
            raise
        except Exception as err:  # a bug in one section must not lose the others' figures
            traceback.print_exc()
            failed.append(name)
            result = SectionResult(name=name, device=env["device"], skipped=f"failed: {type(err).__name__}: {err}")
        record = report.section_record(result, command=command, quick=quick)
        report.write_results_dir(out_dir, env, [record])
        report.print_section(record)
    click.echo(f"\nresults: {out_dir / report.RESULTS_FILE}, {out_dir / report.REPORT_FILE}")
    if failed:
        raise click.ClickException(f"section(s) {', '.join(failed)} failed (traceback above); the others were recorded")


def _out_option(f):
    return click.option(
        "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="Results directory [default: bench/results/<device>-<date>/]; sections already there are kept.",
    )(f)


def _quick_option(f):
    return click.option("--quick", is_flag=True, default=None, help="Reduced sizes (seconds, for tests and CI).")(f)


def _loader_options(f):
    return click.option("--device", default=None, help="Device the loader delivers to (cpu, cuda) [default: cuda if present].")(f)


def _train_options(f):
    for option in reversed([
        click.option("--vram", default=None, help="Tier to measure (80, 48, 24, 16, 12, cpu) [default: auto-detected]."),
        click.option("--all-tiers", is_flag=True, default=None, help="Measure every GPU tier, each on its emulated card."),
        click.option("--emulate-vram", type=float, default=None, metavar="GB",
                     help="Cap this GPU's memory to GB GiB (torch.cuda.set_per_process_memory_fraction)."),
        click.option("--steps", type=click.IntRange(min=1), default=None, help="Timed optimizer steps per path."),
        click.option("--burn-in", type=click.IntRange(min=0), default=None, help="Untimed steps before timing (warm-up, compile)."),
        click.option("--compile/--no-compile", "compile_paths", default=None,
                     help="Measure the torch.compile paths [default: yes; under --all-tiers only on the 24 GB tier]."),
        click.option("--time-budget", type=click.IntRange(min=0), default=None, metavar="SECONDS",
                     help="Start no new path after SECONDS; the rest are reported as skipped."),
    ]):
        f = option(f)
    return f


def _settings(ctx: click.Context, **given) -> dict:
    """A subcommand's options, falling back to those given to `finegpt bench` itself."""
    parent = ctx.find_object(dict) or {}
    return {k: (v if v is not None else parent.get(k)) for k, v in given.items()}


@click.group("bench", invoke_without_command=True)
@_out_option
@_quick_option
@_loader_options
@_train_options
@click.pass_context
def bench_command(ctx, out, quick, device, **train_options):
    """Measure fused against eager, and the loader against plain loading.

    Without a subcommand, runs every section (loader, kernels, train) into one report.
    """
    ctx.obj = {"out": out, "quick": quick, "device": device, **train_options}
    if ctx.invoked_subcommand is None:
        run_sections(SECTIONS, out, bool(quick), {"device": device}, train_options)


@bench_command.command("loader")
@_out_option
@_quick_option
@_loader_options
@click.pass_context
def loader_command(ctx, **given):
    """TokenLoader tokens/s and next() latency against a nanoGPT-style loader and a numpy gather."""
    s = _settings(ctx, **given)
    run_sections(["loader"], s["out"], bool(s["quick"]), {"device": s["device"]}, {})


@bench_command.command("kernels")
@_out_option
@_quick_option
@click.pass_context
def kernels_command(ctx, **given):
    """Fused Triton kernels against eager PyTorch and torch.compile: time, bandwidth, peak memory."""
    s = _settings(ctx, **given)
    run_sections(["kernels"], s["out"], bool(s["quick"]), {}, {})


@bench_command.command("train")
@_out_option
@_quick_option
@_train_options
@click.pass_context
def train_command(ctx, **given):
    """Training steps of each path (eager, fused, each with torch.compile): speed, MFU, memory, loss."""
    s = _settings(ctx, **given)
    out, quick = s.pop("out"), s.pop("quick")
    run_sections(["train"], out, bool(quick), {}, s)


bench_command.add_command(report.report_command)

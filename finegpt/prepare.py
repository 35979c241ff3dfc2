"""`finegpt prepare`: documents -> GPT-2 token shards (llm.c format), resumable; `finegpt shards`: check them.

A reader (finegpt.corpus) streams batches of documents to tokenizer worker processes; the parent
takes their results in document order and fills shards: the first `val_tokens` tokens go to
`<prefix>_val_000000.bin`, then `shard_tokens` per `<prefix>_train_000001.bin`, ... so the bytes do
not depend on the number of workers. After each finished shard the manifest records where the next
one starts (document number and token offset), which is all a re-run needs to resume.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from finegpt import __version__
from finegpt.console import format_table, human_bytes, human_count
from finegpt.corpus import Source, open_source
from finegpt.errors import FinegptError
from finegpt.tokenizer import encode_documents, file_sha256, gpt2_encoding, tokenizer_info, worker_initializer

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "finegpt-shards/1"
# The validation slice everyone reports (FACTS §3): the first 10,485,760 tokens of the val shard.
EVAL_TOKENS = 10_485_760
SHARD_NAME = re.compile(r"^(?P<prefix>.+)_(?P<split>val|train)_(?P<index>\d{6})\.bin$")
# What write_shard leaves behind when the process is killed mid-write: `.<name>.tmp-<pid>`.
SHARD_TMP = re.compile(r"^\..+_(val|train)_\d{6}\.bin\.tmp-\d+$")
TASKS_PER_WORKER = 4  # batches in flight per worker: keeps workers busy without reading ahead much


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}_{'val' if index == 0 else 'train'}_{index:06d}.bin"


def default_out(prefix: str) -> Path:
    return Path("data") / prefix


def default_val_tokens(source: Source, shard_tokens: int, max_tokens: int | None) -> int:
    """FineWeb: the whole first shard, as llm.c does (a tenth of max_tokens when that is less).
    Builtin and local data: a tenth of the (estimated) tokens, at most EVAL_TOKENS and one shard, so
    that training keeps most of a small corpus."""
    if "hub" in source.identity:
        return shard_tokens if max_tokens is None else min(shard_tokens, max(1, max_tokens // 10))
    total = source.estimated_tokens if max_tokens is None else min(source.estimated_tokens, max_tokens)
    return max(1, min(EVAL_TOKENS, shard_tokens, total // 10))


def _write_manifest(out: Path, manifest: dict) -> None:
    # Atomic: a reader (or a resumed run) sees the old manifest or the new one, never half of one.
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)


def _shard_files(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if SHARD_NAME.match(p.name))


def _describe_difference(old: dict, new: dict) -> str:
    diffs = []
    for section in ("source", "config", "tokenizer"):
        a, b = old.get(section) or {}, new[section]
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: {a.get(key)!r} there, {b.get(key)!r} now")
    return "; ".join(diffs[:4])


def _open_output(out: Path, fresh: dict, overwrite: bool) -> dict:
    """The manifest to continue from: the one in `out` when it describes the same work (its shards
    verified against their checksums), else a new one. Refuses to mix sources unless `overwrite`."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        if SHARD_TMP.match(stale.name):
            stale.unlink()
    path = out / MANIFEST
    old = None
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {}
    same = bool(old) and all(old.get(k) == fresh[k] for k in ("source", "config", "tokenizer"))
    if not same:
        existing = _shard_files(out)
        if (old is not None or existing) and not overwrite:
            if old:
                what = f"shards from a different source or settings ({_describe_difference(old, fresh)})"
            elif old == {}:
                what = f"an unreadable {MANIFEST}"
            else:
                what = f"{len(existing)} shard file(s) without a {MANIFEST}"
            raise FinegptError(f"--out {out} holds {what}. Refusing to mix them: pass --overwrite to "
                               "replace them, or choose another --out.")
        for shard in existing:
            shard.unlink()
        path.unlink(missing_ok=True)
        _write_manifest(out, fresh)
        return fresh

    kept = []
    for shard in old["shards"]:
        file = out / shard["name"]
        if not file.is_file() or file_sha256(file) != shard["sha256"]:
            click.echo(f"{file}: missing or changed since it was written; preparing again from there", err=True)
            old["complete"] = False
            break
        kept.append(shard)
    old["shards"] = kept
    return old


def _summarize(manifest: dict) -> None:
    shards = manifest["shards"]
    end = shards[-1]["end"] if shards else {"document": 0, "offset": 0}
    val = sum(s["tokens"] for s in shards if s["split"] == "val")
    train = sum(s["tokens"] for s in shards if s["split"] == "train")
    manifest["totals"] = {"tokens": val + train, "val_tokens": val, "train_tokens": train,
                          "documents": end["document"] + (1 if end["offset"] else 0), "shards": len(shards)}


def _tokenized(batches: Iterator, workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """encode_documents of each batch, in order; `workers` processes, or this one when 1."""
    if workers == 1:
        for batch in batches:
            yield encode_documents(batch)
        return
    # spawn, not fork: the parent may hold threads (Rust loader, tqdm, datasets) that fork would copy
    # mid-operation.
    initializer, initargs = worker_initializer()
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=initializer, initargs=initargs)
    pending = deque()
    try:
        for batch in batches:
            pending.append(pool.submit(encode_documents, batch))
            if len(pending) >= workers * TASKS_PER_WORKER:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool as err:
        raise FinegptError("a tokenizer worker died (out of memory, or killed); the finished shards are "
                           "kept: re-run the same command to resume") from err
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def prepare_shards(dataset: str = "fineweb", out: Path | str | None = None, *, name: str = "sample-10BT",
                   shard_tokens: int = 100_000_000, max_tokens: int | None = None, workers: int | None = None,
                   val_tokens: int | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Tokenize `dataset` into GPT-2 token shards in `out` (default `data/<prefix>`); returns the manifest.

    `dataset`: "fineweb" | "fineweb-edu" (streamed from the Hub, config `name`) | "builtin" | a path
    to parquet/jsonl/txt files or a directory of them. Stops after exactly `max_tokens` tokens when
    given. Re-running with the same arguments resumes an interrupted run, keeping verified shards.
    Raises HubUnreachableError (a FinegptError) when the Hub cannot be reached.

    With workers > 1 the tokenizers are spawned processes, which re-import the calling script:
    call this from under `if __name__ == "__main__":` (as with any multiprocessing code).
    """
    for flag, value, low in (("--shard-tokens", shard_tokens, 1), ("--max-tokens", max_tokens, 1),
                             ("--workers", workers, 1), ("--val-tokens", val_tokens, 0)):
        if value is not None and value < low:
            raise FinegptError(f"{flag} must be at least {low}, got {value}")
    if workers is None:  # the cores this process may use (sched_getaffinity does not exist on macOS)
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    source = open_source(dataset, name)
    out = Path(out) if out is not None else default_out(source.prefix)
    if val_tokens is None:
        val_tokens = default_val_tokens(source, shard_tokens, max_tokens)
    gpt2_encoding()  # fail now, not in a worker, if the tokenizer cannot load
    # Imported here: finegpt.data brings torch (for TokenLoader), seconds that listing or
    # preparing shards has no use for.
    from finegpt import data

    fresh = {"format": MANIFEST_FORMAT, "finegpt_version": __version__, "source": source.identity,
             "config": {"prefix": source.prefix, "shard_tokens": shard_tokens, "val_tokens": val_tokens,
                        "max_tokens": max_tokens},
             "tokenizer": tokenizer_info(), "shards": [], "complete": False}
    manifest = _open_output(out, fresh, overwrite)
    manifest["finegpt_version"] = __version__
    if manifest["complete"]:
        _summarize(manifest)
        return manifest

    shards = manifest["shards"]
    start = shards[-1]["end"] if shards else {"document": 0, "offset": 0}
    index = shards[-1]["index"] + 1 if shards else (0 if val_tokens else 1)
    written = sum(s["tokens"] for s in shards)
    limit = max_tokens if max_tokens is not None else float("inf")
    buf, fill = None, 0

    def finish(document: int, offset: int) -> None:
        nonlocal index, buf, fill
        path = out / shard_name(source.prefix, index)
        data.write_shard(path, buf[:fill])
        shards.append({"name": path.name, "index": index, "split": "val" if index == 0 else "train",
                       "tokens": fill, "sha256": file_sha256(path), "end": {"document": document, "offset": offset}})
        _summarize(manifest)
        _write_manifest(out, manifest)
        index, buf, fill = index + 1, None, 0

    total = max_tokens if max_tokens is not None else source.estimated_tokens
    bar = tqdm(total=total, initial=written, desc=source.prefix, unit="tok", unit_scale=True,
               disable=not progress, dynamic_ncols=True, smoothing=0.1)
    document, skip = start["document"], start["offset"]
    try:
        with closing(_tokenized(source.batches(document), workers)) as results:
            for tokens, lengths in results:
                ends = np.cumsum(lengths)
                pos, skip = skip, 0
                while pos < len(tokens) and written < limit:
                    if buf is None:
                        buf = np.empty(val_tokens if index == 0 else shard_tokens, dtype=np.uint16)
                    take = int(min(len(tokens) - pos, len(buf) - fill, limit - written))
                    buf[fill:fill + take] = tokens[pos:pos + take]
                    fill, pos, written = fill + take, pos + take, written + take
                    if fill == len(buf) or written == limit:
                        done = int(np.searchsorted(ends, pos, side="right"))
                        finish(document + done, pos - (int(ends[done - 1]) if done else 0))
                document += len(lengths)
                bar.update(written - bar.n)
                bar.set_postfix_str(f"{human_count(document)} docs", refresh=False)
                if written >= limit:
                    break
        if fill:
            finish(document, 0)
    finally:
        bar.close()
    if written == 0:
        raise FinegptError(f"--dataset {dataset}: found no documents to tokenize")
    manifest["complete"] = True
    _summarize(manifest)
    _write_manifest(out, manifest)
    return manifest


class TokenCount(click.ParamType):
    """An integer count that also reads 1e8, 100M, 10_485_760 or 2.5B."""

    name = "count"
    SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().replace("_", "").replace(",", "")
        scale = self.SUFFIXES.get(text[-1:].lower(), 1)
        try:
            number = float(text[:-1] if scale != 1 else text)
        except ValueError:
            self.fail(f"{value!r} is not a count (examples: 100000000, 1e8, 100M)", param, ctx)
        if number * scale != int(number * scale):
            self.fail(f"{value!r} is not a whole number of tokens", param, ctx)
        return int(number * scale)


@click.command("prepare")
@click.option("--dataset", default="fineweb", show_default=True,
              help="fineweb | fineweb-edu (streamed from the Hugging Face Hub) | builtin (Python's docs, "
                   "offline) | PATH to parquet/jsonl/txt files or a directory of them (the `text` column; "
                   "a .txt file is one document).")
@click.option("--name", default="sample-10BT", show_default=True, help="Hub config (fineweb/fineweb-edu only).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory [default: data/<prefix>, e.g. data/fineweb].")
@click.option("--shard-tokens", type=TokenCount(), default=100_000_000, show_default=True,
              help="Tokens per train shard (the last may be shorter).")
@click.option("--max-tokens", type=TokenCount(), default=None, help="Stop after exactly this many tokens.")
@click.option("--workers", type=int, default=None, help="Tokenizer processes [default: all cores].")
@click.option("--val-tokens", type=TokenCount(), default=None,
              help="Tokens in the validation shard [default: one whole shard for FineWeb, as llm.c, or a "
                   "tenth of --max-tokens if less; for builtin/local data a tenth of the estimated total, "
                   "at most 10,485,760; 0 for no validation shard].")
@click.option("--overwrite", is_flag=True, help="Replace shards in --out that came from another source or settings.")
def prepare_command(dataset, name, out, shard_tokens, max_tokens, workers, val_tokens, overwrite):
    """Tokenize FineWeb (or local text) into GPT-2 token shards, resumably.

    Each document becomes <|endoftext|> followed by its GPT-2 tokens; shards use the llm.c format, so
    TokenLoader, llm.c and modded-nanogpt read them. Re-run the same command to resume.
    """
    started = time.perf_counter()
    try:
        manifest = prepare_shards(dataset, out, name=name, shard_tokens=shard_tokens, max_tokens=max_tokens,
                                  workers=workers, val_tokens=val_tokens, overwrite=overwrite)
    except KeyboardInterrupt:
        click.echo("\nInterrupted. Finished shards are kept; re-run the same command to resume.", err=True)
        raise SystemExit(130) from None
    seconds = time.perf_counter() - started
    totals = manifest["totals"]
    out = out if out is not None else default_out(manifest["config"]["prefix"])
    click.echo(f"{out}: {totals['shards']} shards, {human_count(totals['tokens'])} tokens "
               f"({human_count(totals['val_tokens'])} val, {human_count(totals['train_tokens'])} train) "
               f"from {human_count(totals['documents'])} documents; {seconds:.1f} s")


@click.command("shards")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--decode", "decode", type=int, default=0, metavar="N",
              help="Also print the first N tokens of the first shard as text.")
def shards_command(path, decode):
    """List and validate the token shards in PATH (a directory or one .bin file).

    Checks every header and file size (llm.c / modded-nanogpt format), so downloaded shards can be
    trusted before training.
    """
    def stream_order(file: Path):  # val shard first, then train shards by number
        match = SHARD_NAME.match(file.name)
        return (int(match["index"]) if match else float("inf"), file.name)

    from finegpt.data import read_shard  # here, not at the top: see prepare_shards

    files = [path] if path.is_file() else sorted(path.glob("*.bin"), key=stream_order)
    if not files:
        raise FinegptError(f"{path}: no .bin shard files here")
    rows, bad, split_totals = [], [], {"val": 0, "train": 0, "other": 0}
    first, first_name = None, None
    for file in files:
        match = SHARD_NAME.match(file.name)
        split = match["split"] if match else "other"
        try:
            tokens = read_shard(file)
        except FinegptError as err:
            bad.append(file.name)
            rows.append((file.name, split, "-", human_bytes(file.stat().st_size), f"INVALID: {err}"))
            continue
        if first is None:
            first, first_name = tokens, file.name
        split_totals[split] += len(tokens)
        rows.append((file.name, split, f"{len(tokens):,}", human_bytes(file.stat().st_size), "ok"))
    click.echo(format_table(rows, ["file", "split", "tokens", "size", "header"]))
    total = sum(split_totals.values())
    click.echo(f"\n{len(files)} shards, {total:,} tokens ({human_count(total)}): "
               + ", ".join(f"{k} {v:,}" for k, v in split_totals.items() if v or k != "other"))
    if decode and first is not None:
        click.echo(f"\nFirst {min(decode, len(first)):,} tokens of {first_name}:")
        click.echo(gpt2_encoding().decode(first[:decode].tolist()))
    if bad:
        raise FinegptError(f"{len(bad)} of {len(files)} shard(s) failed validation: {', '.join(bad[:5])}")

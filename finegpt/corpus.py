"""Where `finegpt prepare` reads documents from: the Hugging Face Hub, local files, or the builtin
Python-documentation corpus.

Every source yields batches of documents (a list of str, or a pyarrow string array that the
tokenizer worker turns into str, so the reading process does not pay for it) in one fixed order,
and can start at any document index: that is how an interrupted `prepare` resumes.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import itertools
import json
import os
import re
import socket
import sys
import sysconfig
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from finegpt.errors import FinegptError

# The Hub datasets `--dataset` names, and the dataset each one streams.
HUB_DATASETS = {"fineweb": "HuggingFaceFW/fineweb", "fineweb-edu": "HuggingFaceFW/fineweb-edu"}
LOCAL_SUFFIXES = (".parquet", ".jsonl", ".txt")
# A batch handed to a tokenizer worker: at most this many documents or (for str lists) characters.
# ~100k tokens, tens of milliseconds of work: the per-task overhead (~0.2 ms) disappears, and even the
# small builtin corpus splits into enough batches to keep every worker busy.
BATCH_DOCS = 128
BATCH_CHARS = 1 << 18
BYTES_PER_TOKEN = 4  # GPT-2 on English prose; only for estimates (ETA, default validation size)


class HubUnreachableError(FinegptError, ConnectionError):
    """The Hugging Face Hub cannot be reached (no network, or HF_HUB_OFFLINE is set)."""


@dataclass
class Source:
    """A fixed, ordered stream of documents.

    `identity` is what the manifest records to tell this source apart from another; `prefix` names
    the shards; `estimated_tokens` (None when unknown) sizes the progress bar and default val split;
    `batches(start)` yields batches of documents beginning with document number `start` (0-based).
    """

    prefix: str
    identity: dict
    estimated_tokens: int | None
    batches: Callable[[int], Iterator]


# ---------------------------------------------------------------------------------------------
# The Hugging Face Hub


def _is_offline_error(err: BaseException) -> bool:
    """True when `err` (or what caused it) means the network or the Hub is unreachable."""
    # requests', urllib3's and httpx's network errors do not all derive from the builtin ones.
    offline_names = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError", "ConnectError",
                     "ConnectTimeout", "ReadTimeout", "Timeout", "NameResolutionError", "NewConnectionError",
                     "MaxRetryError", "ProxyError"}
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (ConnectionError, TimeoutError)) or type(err).__name__ in offline_names:
            return True
        err = err.__cause__ or err.__context__
    return False


def _hub_unreachable(path: str, err: BaseException) -> HubUnreachableError:
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
               if os.environ.get(v, "0").lower() not in ("0", "", "false", "no", "off")]
    why = f"{offline[0]} is set" if offline else f"{type(err).__name__}: {err}"
    return HubUnreachableError(
        f"cannot reach the Hugging Face Hub to stream {path} ({why}). Without a network, use "
        "`--dataset builtin` (the Python documentation corpus) or `--dataset PATH` with local "
        "parquet/jsonl/txt files."
    )


@contextlib.contextmanager
def _hub_errors(path: str):
    """Turn "cannot reach the Hub" (however datasets/huggingface_hub/requests spell it) into one error."""
    try:
        yield
    except FinegptError:
        raise
    except Exception as err:
        if _is_offline_error(err):
            raise _hub_unreachable(path, err) from err
        raise


def _hub_host_unreachable(timeout_s: float = 5.0) -> OSError | None:
    """Why the Hub's host cannot be reached (a 5 s TCP probe), or None when it answers.

    Skipped behind a proxy, where only the proxy knows whether the Hub is reachable."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
    except OSError as err:
        return err
    return None


@contextlib.contextmanager
def _offline_mode():
    """datasets and huggingface_hub in offline mode: on a dead network they retry for ~25 s before
    giving up, which `finegpt train`'s fallback to the builtin corpus would wait; offline, they fail
    at once (or serve what is cached)."""
    import datasets
    import huggingface_hub.constants

    with mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True), \
            mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True):
        yield


def hub_stream(path: str, name: str | None, *, data_files=None) -> Callable[[int], Iterator]:
    """Open the train split of a Hub dataset for streaming its `text` column; returns batches(start).

    Opening reads only metadata (it fails here, before any output is written, when the Hub is
    unreachable); batches stream BATCH_DOCS documents at a time, nothing is downloaded up front.
    `path="parquet", data_files=[...]` runs this same code on local files.
    """
    try:
        import datasets
    except ImportError as err:
        raise FinegptError("streaming from the Hub needs the `datasets` package: pip install datasets") from err
    unreachable = _hub_host_unreachable() if data_files is None else None
    try:
        with _hub_errors(path), (_offline_mode() if unreachable else contextlib.nullcontext()):
            ds = datasets.load_dataset(path, name=name, data_files=data_files, split="train",
                                       streaming=True, columns=["text"])
    except HubUnreachableError as err:
        # Say why the network is out, not that offline mode (which we chose) is on.
        raise (_hub_unreachable(path, unreachable) if unreachable else err) from err

    def batches(start: int) -> Iterator:
        with _hub_errors(path):
            # Arrow batches: the str conversion then happens in the tokenizer workers.
            for table in (ds.skip(start) if start else ds).with_format("arrow").iter(batch_size=BATCH_DOCS):
                yield table.column("text")

    return batches


def _hub_estimated_tokens(name: str) -> int | None:
    # FineWeb's samples are named by their size in GPT-2 tokens: sample-10BT, sample-100BT, ...
    match = re.fullmatch(r"sample-(\d+)BT", name or "")
    return int(match.group(1)) * 10**9 if match else None


def hub_source(dataset: str, name: str) -> Source:
    path = HUB_DATASETS[dataset]
    return Source(prefix=dataset, identity={"hub": path, "name": name},
                  estimated_tokens=_hub_estimated_tokens(name),
                  batches=hub_stream(path, name))


# ---------------------------------------------------------------------------------------------
# Local files


def _local_files(path: Path) -> list[Path]:
    if not path.exists():
        raise FinegptError(f"--dataset {path}: no such file or directory (expected fineweb, fineweb-edu, "
                           "builtin, or a local parquet/jsonl/txt file or directory of them)")
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise FinegptError(f"--dataset {path}: unsupported file type {path.suffix or '(none)'}; "
                               f"use {', '.join(LOCAL_SUFFIXES)} files")
        files = [path]
    else:
        files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise FinegptError(f"--dataset {path}: the directory holds no {', '.join(LOCAL_SUFFIXES)} files")
    empty = [str(p) for p in files if p.stat().st_size == 0]
    if empty:
        raise FinegptError(f"--dataset {path}: empty file(s): {', '.join(empty[:5])}")
    return files


def _parquet_text_size(file: Path) -> tuple[int, int]:
    """(rows, uncompressed bytes of the text column); raises FinegptError without a text column of strings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(file).metadata
    except Exception as err:
        raise FinegptError(f"{file}: not a readable parquet file ({err})") from err
    names = meta.schema.names
    if "text" not in names:
        raise FinegptError(f"{file}: no `text` column (columns: {', '.join(names)}); "
                           "finegpt prepare reads documents from a column named text")
    text_type = meta.schema.to_arrow_schema().field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise FinegptError(f"{file}: the `text` column holds {text_type}, not strings; "
                           "finegpt prepare tokenizes a text column of strings")
    col = names.index("text")
    nbytes = sum(meta.row_group(g).column(col).total_uncompressed_size for g in range(meta.num_row_groups))
    return meta.num_rows, nbytes


def _parquet_batches(file: Path, skip: int) -> Iterator:
    """The text column of one parquet file from row `skip`, skipping whole row groups by metadata."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(file)
    first = 0
    while first < pf.metadata.num_row_groups and skip >= pf.metadata.row_group(first).num_rows:
        skip -= pf.metadata.row_group(first).num_rows
        first += 1
    groups = list(range(first, pf.metadata.num_row_groups))
    if not groups:
        return
    for batch in pf.iter_batches(batch_size=BATCH_DOCS, row_groups=groups, columns=["text"]):
        texts = batch.column(0)
        if skip:
            drop = min(skip, len(texts))
            texts, skip = texts.slice(drop), skip - drop
        if len(texts):
            yield texts


def _jsonl_texts(file: Path) -> Iterator[str]:
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise FinegptError(f"{file}:{lineno}: not valid JSON ({err})") from err
            if not isinstance(record, dict) or "text" not in record:
                raise FinegptError(f"{file}:{lineno}: no `text` field; finegpt prepare reads each jsonl "
                                   "line's text field")
            text = record["text"]
            if text is not None and not isinstance(text, str):
                raise FinegptError(f"{file}:{lineno}: `text` is a {type(text).__name__}, not a string")
            yield text


def _txt_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise FinegptError(f"{file}: not UTF-8 text ({err})") from err


def _batched(texts: Iterator[str | None]) -> Iterator[list[str | None]]:
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text or "")
        if len(batch) == BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def local_source(path: str | Path) -> Source:
    """Documents from local files, in sorted path order: each parquet row's and each jsonl line's
    `text`, and each .txt file whole (one file, one document)."""
    root = Path(path).expanduser()
    files = _local_files(root)
    rows = {}
    est_bytes = 0
    for file in files:
        if file.suffix == ".parquet":
            rows[file], nbytes = _parquet_text_size(file)
            est_bytes += nbytes
        else:
            est_bytes += file.stat().st_size
        if file.suffix == ".jsonl":
            first = next(_jsonl_texts(file), None)  # fail before any work on a file without text
            if first is None:
                raise FinegptError(f"--dataset {root}: {file} holds no documents")

    def batches(start: int) -> Iterator:
        skip = start

        def documents(run):  # the jsonl/txt documents of consecutive files, after `skip` of them
            nonlocal skip
            for file in run:
                if file.suffix == ".txt":
                    if skip:
                        skip -= 1
                    else:
                        yield _txt_text(file)
                    continue
                for text in _jsonl_texts(file):
                    if skip:
                        skip -= 1
                    else:
                        yield text

        for is_parquet, run in itertools.groupby(files, key=lambda f: f.suffix == ".parquet"):
            if not is_parquet:
                yield from _batched(documents(run))
                continue
            for file in run:
                if skip >= rows[file]:  # skip whole files by their metadata, without reading them
                    skip -= rows[file]
                    continue
                yield from _parquet_batches(file, skip)
                skip = 0

    stem = root.stem if root.is_file() else root.resolve().name
    prefix = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._") or "data"
    identity = {"path": str(root.resolve()),
                "files": [[f.relative_to(root).as_posix() if root.is_dir() else f.name, f.stat().st_size]
                          for f in files]}
    return Source(prefix=prefix, identity=identity, estimated_tokens=est_bytes // BYTES_PER_TOKEN,
                  batches=batches)


# ---------------------------------------------------------------------------------------------
# The builtin corpus: Python's own documentation (FACTS §6), on every machine, no download.

# stdlib directories that hold tests, vendored packages or generated tables rather than prose.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
              "encodings", "pydoc_data", "lib2to3", "ensurepip", "turtledemo"}


def _docstrings(source: bytes) -> str:
    """A module's docstrings (the module's, then its classes' and functions' in source order), one text."""
    tree = ast.parse(source)
    defs = sorted((node for node in ast.walk(tree)
                   if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))),
                  key=lambda node: node.lineno)
    docs = (ast.get_docstring(node) for node in [tree, *defs])
    return "\n\n".join(doc for doc in docs if doc)


@functools.cache
def builtin_documents() -> tuple[str, ...]:
    """pydoc's topic pages (sorted by topic), then one document per stdlib module with docstrings.

    The stdlib is read with `ast`, never imported (imports have side effects). ~0.5M GPT-2 tokens.
    """
    from pydoc_data.topics import topics

    docs = [topics[key] for key in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    modules = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        modules += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    for module in sorted(modules, key=lambda p: p.relative_to(root).as_posix()):
        try:
            text = _docstrings(module.read_bytes())
        except (SyntaxError, ValueError, OSError):  # a file this interpreter cannot parse: skip it
            continue
        if text:
            docs.append(text)
    return tuple(docs)


def builtin_source() -> Source:
    docs = builtin_documents()

    def batches(start: int) -> Iterator[list[str]]:
        return _batched(itertools.islice(docs, start, None))

    # The corpus is whatever this Python ships, so its version is part of what identifies it.
    identity = {"builtin": "python-docs", "python": sys.version.split()[0], "documents": len(docs)}
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    return Source(prefix="builtin", identity=identity, estimated_tokens=nbytes // BYTES_PER_TOKEN,
                  batches=batches)


def open_source(dataset: str, name: str) -> Source:
    """The Source for a `--dataset` value: a Hub name, `builtin`, or a local path."""
    if dataset in HUB_DATASETS:
        return hub_source(dataset, name)
    if dataset == "builtin":
        return builtin_source()
    return local_source(dataset)

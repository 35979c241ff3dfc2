"""Token shards and the TokenLoader that streams (x, y) batches out of them.

The shard format (llm.c / modded-nanogpt `.bin`, FACTS §3) is defined once, in
`rust_loader/src/shard.rs`; this module is its Python face. `TokenLoader` wraps the Rust core:
worker threads that never touch Python fill a ring of batch slots ahead of the training loop, and
`next()` waits for one with the GIL released.

Sampling. A window is the T+1 tokens `[i*T, i*T+T]` of one shard; windows of all shards are
numbered in file order. Row `j` of rank `r`'s batch `k` is stream position `g = (k*W + r)*B + j`
(llm.c's layout). Sequential (`shuffle=False`): window `g`, one pass, the incomplete last global
batch dropped so every rank gets the same count. Shuffled: epoch `g // n_windows`, window
`perm_epoch(g % n_windows)`, where `perm_epoch` is a Feistel permutation keyed by (seed, epoch):
every window once per epoch across all ranks, ranks disjoint, a new order each epoch. A loader's
whole state is therefore the number of batches its caller consumed, and resuming is O(1).
"""

from __future__ import annotations

import glob
import os
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finegpt import _loader
from finegpt.errors import FinegptError

__all__ = ["MAGIC", "VERSION", "HEADER_BYTES", "ShardError", "ShardNotFoundError", "LoaderError", "write_shard", "read_shard", "shard_paths", "TokenLoader"]

# The format's constants live in rust_loader/src/shard.rs; these are re-exports.
MAGIC: int = _loader.MAGIC
VERSION: int = _loader.VERSION
HEADER_BYTES: int = _loader.HEADER_BYTES

STATE_FORMAT = "finegpt.TokenLoader"
STATE_VERSION = 1


class ShardError(FinegptError, ValueError):
    """A file that is not a valid token shard (magic, version, size), or a shard that cannot be written."""


class ShardNotFoundError(ShardError, FileNotFoundError):
    """A shard file, directory or glob pattern that names nothing."""


class LoaderError(FinegptError, ValueError):
    """A bad TokenLoader argument or state_dict, or a loader used when it cannot be (closed, forked)."""


# Incremented in every forked child, so a loader can tell it crossed a fork() without a syscall.
_forks_seen = 0


def _count_fork() -> None:
    global _forks_seen
    _forks_seen += 1


os.register_at_fork(after_in_child=_count_fork)


def _translate(err: Exception) -> Exception:
    """The finegpt exception for an error raised by the Rust core (the message already names the file)."""
    if isinstance(err, FileNotFoundError):
        return ShardNotFoundError(str(err))
    if isinstance(err, _loader.LoaderConfigError):
        return LoaderError(str(err))
    if isinstance(err, (_loader.ShardFormatError, OSError)):
        return ShardError(str(err))
    return err


def write_shard(path: str | os.PathLike[str], tokens: Any) -> None:
    """Write `tokens` (any 1-D integer array-like, values in [0, 65536)) as a shard, atomically.

    The file appears under its final name only once complete (temporary name, fsync, rename).
    """
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ShardError(f"{path}: tokens must be a 1-D sequence, got shape {arr.shape}")
    if arr.dtype != np.uint16:
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ShardError(f"{path}: tokens must be integers, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.uint16).max):
            bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
            raise ShardError(f"{path}: token {bad} does not fit in uint16 (shards hold GPT-2 ids < 65536)")
    if not path.parent.is_dir():
        raise ShardNotFoundError(f"{path}: directory {path.parent} does not exist")
    try:
        _loader.write_shard(path, np.ascontiguousarray(arr, dtype=np.uint16))
    except (OSError, ValueError) as err:
        raise _translate(err) from None


def read_shard(path: str | os.PathLike[str]) -> np.ndarray:
    """The tokens of a shard as a read-only uint16 array (memory-mapped), after validating it."""
    try:
        ntok = _loader.validate_shard(Path(path))
    except (OSError, ValueError) as err:
        raise _translate(err) from None
    if ntok == 0:  # numpy cannot map zero bytes
        empty = np.zeros(0, dtype=np.uint16)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(ntok,))


def shard_paths(files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Resolve a glob pattern, a directory (its `*.bin`, sorted) or a list of paths to shard paths."""
    if isinstance(files, (str, os.PathLike)):
        text = os.fspath(files)
        if Path(text).is_dir():
            found = sorted(Path(text).glob("*.bin"))
            if not found:
                raise ShardNotFoundError(f"{text}: directory holds no .bin shards (run `finegpt prepare` first?)")
            return found
        if any(c in text for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(text))
            if not found:
                raise ShardNotFoundError(f"no shard matches the pattern {text!r}")
            return found
        return [Path(text)]
    found = [Path(f) for f in files]
    if not found:
        raise LoaderError("files: the list of shards is empty")
    for path in found:
        if path.is_dir():
            raise ShardError(f"{path}: a directory inside the list of shards; pass the directory "
                             "alone (its *.bin are used) or list its shard files")
    return found


class TokenLoader:
    """Batches `(x, y)` of int64 `(batch_size, block_size)` tensors on `device`; `y` is `x` shifted by one.

    files: a glob pattern, a directory (all its `*.bin`) or a list of shard paths.
    shuffle=True: endless seeded epochs (training); shuffle=False: one deterministic pass in file
    order (validation), restarted by each `iter()`. `prefetch` batches are prepared ahead by
    `threads` Rust workers (default min(4, CPUs)). `state_dict()` records what the caller consumed.
    """

    def __init__(
        self,
        files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        batch_size: int,
        block_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        device: str | torch.device = "cpu",
        prefetch: int = 4,
        threads: int | None = None,
    ) -> None:
        self._core: Any = None  # set last, so close()/__del__ are safe if validation fails
        self._pid = os.getpid()
        self._forks = _forks_seen
        self._paths = shard_paths(files)
        if prefetch < 1:
            raise LoaderError(f"prefetch={prefetch}: must be at least 1")
        # Workers sleep once the ring is full, so they cost nothing while training is the slower
        # side; more than 4 never helped (one fills a B=32, T=1024 batch in ~30 us).
        threads = min(4, os.cpu_count() or 1) if threads is None else threads
        if threads < 1:
            raise LoaderError(f"threads={threads}: must be at least 1")
        self._device = torch.device(device)
        self._cuda = self._device.type == "cuda"
        if self._device.type not in ("cpu", "cuda"):
            raise LoaderError(f"device={device!r}: TokenLoader delivers to 'cpu' or 'cuda[:N]'")
        if self._cuda and not torch.cuda.is_available():
            raise LoaderError(f"device={device!r}: CUDA is not available here; use device='cpu'")
        self.batch_size, self.block_size = batch_size, block_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        try:
            self._core = _loader.Loader(
                [str(p) for p in self._paths],
                batch_size,
                block_size,
                seed % 2**64 if shuffle else None,
                rank,
                world_size,
                threads,
            )
        except (OSError, ValueError) as err:
            raise _translate(err) from None
        self._shard_tokens: list[int] = self._core.shard_tokens
        self._n_windows: int = self._core.n_windows
        self._batches: int | None = self._core.batches
        # Every slot holds x then y, (2, B, T). CPU: int64 numpy arrays the workers fill, handed
        # out as the batch while the slot gets a fresh array, so no copy happens on this thread.
        # CUDA: one pinned int32 ring (a true async DMA, half the bytes, FACTS §9) copied whole
        # and widened in one kernel on the GPU; two extra slots cover copies still in flight so
        # `prefetch` batches stay ready.
        self._slots: list[Any]
        if self._cuda:
            ring = torch.empty((prefetch + 2, 2, batch_size, block_size), dtype=torch.int32, pin_memory=True)
            self._slots = list(ring.unbind(0))
            self._events = [torch.cuda.Event() for _ in self._slots]  # recorded after each slot's copy
        else:
            self._slots = [self._new_split() for _ in range(prefetch)]
        self._pending: deque[int] = deque()  # slots whose device copy may still be running, in order
        self._consumed = 0
        self._keep_position = False
        self._start(0)

    def _new_split(self) -> np.ndarray:
        return np.empty((2, self.batch_size, self.block_size), dtype=np.int64)

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._check_usable()
        # A validation pass restarts from its first batch, unless a state was just loaded.
        if not self.shuffle and self._consumed and not self._keep_position:
            self._start(0)
        self._keep_position = False
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_usable()
        if self._cuda:
            return self._next_cuda()
        fresh = self._new_split()
        try:
            slot = self._core.take(fresh)
        except (OSError, ValueError) as err:
            raise _translate(err) from None
        if slot is None:
            raise StopIteration
        out, self._slots[slot] = self._slots[slot], fresh
        self._consumed += 1
        return torch.from_numpy(out[0]), torch.from_numpy(out[1])

    def _next_cuda(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Give the workers back the slots whose copy is done, oldest first. The batch we want
        # lands in slot `wanted`: if its previous copy is still pending, wait for it (a slot is
        # never refilled while the GPU may still read it).
        wanted = self._consumed % len(self._slots)
        while self._pending:
            head = self._events[self._pending[0]]
            if wanted in self._pending:
                head.synchronize()
            elif not head.query():
                break
            self._core.release(self._pending.popleft())
        try:
            slot = self._core.next_slot()
        except (OSError, ValueError) as err:
            raise _translate(err) from None
        if slot is None:
            raise StopIteration
        # Queued on the caller's stream like any input copy: the host never waits for it.
        xy = self._slots[slot].to(self._device, non_blocking=True).to(torch.int64)
        self._events[slot].record(torch.cuda.current_stream(self._device))
        self._pending.append(slot)
        self._consumed += 1
        return xy[0], xy[1]

    def __len__(self) -> int:
        """Batches in one sequential pass (per rank)."""
        if self.shuffle:
            raise TypeError("a shuffled TokenLoader is endless and has no len()")
        return int(self._batches)

    @property
    def n_windows(self) -> int:
        """Windows of block_size + 1 tokens in all shards together."""
        return self._n_windows

    @property
    def epoch(self) -> float:
        """Epochs consumed so far across all ranks (fractional)."""
        return self._consumed * self.batch_size * self.world_size / self.n_windows

    # -- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What the caller has consumed (not what the workers prefetched), plus what it depends on."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "batches_consumed": self._consumed,
            **self._identity(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after the batches `state` recorded; O(1), no replay."""
        self._check_usable()
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise LoaderError("load_state_dict: not a TokenLoader state_dict")
        if state.get("version") != STATE_VERSION:
            raise LoaderError(
                f"load_state_dict: state version {state.get('version')!r} is not the version "
                f"{STATE_VERSION} this finegpt reads"
            )
        mine = self._identity()
        diffs = [f"{key}: checkpoint has {state.get(key)!r}, this loader has {value!r}"
                 for key, value in mine.items() if state.get(key) != value]
        if diffs:
            raise LoaderError("cannot resume the loader, its setup differs from the checkpoint's: " + "; ".join(diffs))
        consumed = state.get("batches_consumed")
        limit = None if self.shuffle else len(self)
        if not isinstance(consumed, int) or consumed < 0 or (limit is not None and consumed > limit):
            raise LoaderError(f"load_state_dict: batches_consumed={consumed!r} is out of range")
        self._start(consumed)
        self._keep_position = True

    def _identity(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "block_size": self.block_size,
            "world_size": self.world_size,
            "rank": self.rank,
            "shards": [{"name": p.name, "tokens": n} for p, n in zip(self._paths, self._shard_tokens)],
        }

    # -- lifetime ----------------------------------------------------------------------------

    def _start(self, batch: int) -> None:
        """Restart the workers so the caller's next batch is `batch`."""
        self._wait_copies()
        try:
            self._core.start([t.numpy() if self._cuda else t for t in self._slots], not self._cuda, batch)
        except (OSError, ValueError) as err:
            raise _translate(err) from None
        self._consumed = batch

    def _wait_copies(self) -> None:
        # Ring memory may be rewritten or freed only once no device copy still reads it.
        for slot in self._pending:
            self._events[slot].synchronize()
        self._pending.clear()

    def _check_usable(self) -> None:
        if self._forks != _forks_seen:
            raise LoaderError(
                f"this TokenLoader was created in process {self._pid} and cannot be used after fork() "
                f"(this is process {os.getpid()}): its threads do not exist here. Create the loader "
                "in the child process instead."
            )
        if self._core is None:
            raise LoaderError("this TokenLoader is closed")

    def close(self) -> None:
        """Stop and join the worker threads (idempotent)."""
        core, self._core = self._core, None
        if core is None or self._forks != _forks_seen:
            return  # in a forked child the threads never existed; Rust leaks their state on drop
        self._wait_copies()
        core.stop()

    def __enter__(self) -> TokenLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to report to
            pass

"""TokenLoader against a numpy reference: window layout, epochs, resume, bad input, threads, fork, GIL."""

import gc
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from finegpt.data import LoaderError, ShardError, ShardNotFoundError, TokenLoader, write_shard
from finegpt.errors import FinegptError

T = 8


def make_shards(tmp_path, sizes, seed=0):
    """Shards of random tokens; returns their paths and every window (T+1 tokens) in file order."""
    rng = np.random.default_rng(seed)
    paths, windows = [], []
    for i, n in enumerate(sizes):
        tokens = rng.integers(0, 65536, n)
        path = tmp_path / f"shard_{i:03d}.bin"
        write_shard(path, tokens)
        paths.append(path)
        windows += [tokens[w * T : w * T + T + 1] for w in range((n - 1) // T)]
    return paths, np.stack(windows)


def window_ids(x, y, windows):
    """Which reference window each row of a batch is (and that y is x shifted by one)."""
    lookup = {w.tobytes(): i for i, w in enumerate(windows.astype(np.int64))}
    rows = torch.cat([x, y[:, -1:]], dim=1).numpy()
    assert torch.equal(x[:, 1:], y[:, :-1])
    return [lookup[r.tobytes()] for r in rows]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def loader_threads(expect=None):
    """Names of this process's Rust loader threads (Python's threading module cannot see them).

    A thread names itself once it runs, so wait briefly for `expect` of them.
    """
    deadline = time.monotonic() + 5
    while True:
        names = []
        for task in os.listdir("/proc/self/task"):
            try:
                names.append(Path(f"/proc/self/task/{task}/comm").read_text().strip())
            except FileNotFoundError:  # the thread just ended
                pass
        found = [n for n in names if n.startswith("finegpt-loader")]
        if expect is None or len(found) == expect or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


@pytest.fixture
def shards(tmp_path):
    return make_shards(tmp_path, [203, 97, 161])  # 25 + 12 + 20 = 57 windows


@pytest.mark.parametrize("world_size", [1, 3])
def test_sequential_windows_are_llmc_layout(shards, world_size):
    paths, windows = shards
    B = 4
    for rank in range(world_size):
        with TokenLoader(paths, B, T, shuffle=False, rank=rank, world_size=world_size, prefetch=2) as loader:
            batches = list(loader)
            assert len(batches) == len(loader) == len(windows) // (B * world_size)
            for k, (x, y) in enumerate(batches):
                assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (B, T)
                assert x.is_contiguous() and y.is_contiguous()
                want = windows[[k * B * world_size + rank * B + j for j in range(B)]]
                assert np.array_equal(x.numpy(), want[:, :-1]) and np.array_equal(y.numpy(), want[:, 1:])


def test_sequential_pass_is_the_same_every_time(shards):
    paths, _ = shards
    with TokenLoader(paths, 4, T, shuffle=False, threads=3) as loader:
        first = [x for x, _ in loader]
        take(iter(loader), 2)  # an abandoned partial pass
        again = [x for x, _ in loader]
    assert len(first) == 14 and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_shuffled_epochs_cover_every_window_once_and_ranks_are_disjoint(shards):
    paths, windows = shards
    n, B, W = len(windows), 3, 3
    epochs = 3
    per_rank = -(-epochs * n // (B * W))  # enough batches for every rank to reach epoch 3
    position = {}  # stream position g -> window id
    for rank in range(W):
        with TokenLoader(paths, B, T, seed=5, rank=rank, world_size=W) as loader:
            for k, (x, y) in enumerate(take(loader, per_rank)):
                for j, w in enumerate(window_ids(x, y, windows)):
                    position[(k * W + rank) * B + j] = w
    orders = [[position[g] for g in range(e * n, (e + 1) * n)] for e in range(epochs)]
    for order in orders:
        assert sorted(order) == list(range(n))  # every window exactly once per epoch
    assert orders[0] != orders[1] != orders[2] and orders[0] != list(range(n))
    # Within one global batch the ranks see different windows.
    for g in range(0, n, B * W):
        batch = [position[p] for p in range(g, g + B * W) if p < n]
        assert len(set(batch)) == len(batch)


def test_same_seed_same_stream_different_seed_different(shards):
    paths, _ = shards
    with TokenLoader(paths, 4, T, seed=1) as a, TokenLoader(paths, 4, T, seed=1, threads=1) as b:
        with TokenLoader(paths, 4, T, seed=2) as c:
            xa, xb, xc = ([x for x, _ in take(loader, 30)] for loader in (a, b, c))
    assert all(torch.equal(p, q) for p, q in zip(xa, xb))
    assert not all(torch.equal(p, q) for p, q in zip(xa, xc))


@pytest.mark.parametrize("cuts", [(5,), (13,), (6, 15), (13, 14, 20)], ids=["mid", "epoch-edge", "twice", "thrice"])
def test_resume_continues_the_identical_stream(shards, cuts):
    """57 windows / (4·2) per global batch: epochs end inside batches 7, 14, 21 of each rank."""
    paths, _ = shards
    args = dict(seed=3, rank=1, world_size=2, prefetch=3)
    with TokenLoader(paths, 4, T, **args) as loader:
        want = [x for x, _ in take(loader, 24)]
    got, state = [], None
    for stop in [*cuts, 24]:
        with TokenLoader(paths, 4, T, **args) as loader:
            if state is not None:
                loader.load_state_dict(state)
            got += [x for x, _ in take(loader, stop - len(got))]
            state = loader.state_dict()
            assert state["batches_consumed"] == stop  # consumed, not what the workers prefetched
    assert all(torch.equal(p, q) for p, q in zip(got, want, strict=True))


def test_resume_sequential_pass(shards):
    paths, _ = shards
    with TokenLoader(paths, 4, T, shuffle=False) as loader:
        want = [x for x, _ in loader]
        loader.load_state_dict({**loader.state_dict(), "batches_consumed": 5})
        rest = [x for x, _ in loader]  # the pass continues where the state says...
        again = [x for x, _ in loader]  # ...and the next pass starts from the top
    assert all(torch.equal(p, q) for p, q in zip(rest, want[5:], strict=True))
    assert len(again) == len(want)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(seed=4), "seed"),
        (dict(batch_size=2), "batch_size"),
        (dict(block_size=4), "block_size"),
        (dict(world_size=3, rank=1), "world_size"),
        (dict(world_size=2, rank=0), "rank"),
        (dict(shuffle=False), "shuffle"),
    ],
)
def test_load_state_dict_rejects_a_different_setup(shards, change, field):
    paths, _ = shards
    base = dict(files=paths, batch_size=4, block_size=T, seed=3, world_size=2, rank=1)
    with TokenLoader(**base) as loader:
        take(loader, 2)
        state = loader.state_dict()
    with TokenLoader(**{**base, **change}) as other:
        with pytest.raises(LoaderError, match=field):
            other.load_state_dict(state)


def test_load_state_dict_rejects_other_shards_and_bad_states(tmp_path, shards):
    paths, _ = shards
    with TokenLoader(paths, 4, T) as loader:
        state = loader.state_dict()
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    resized, _ = make_shards(other_dir, [203, 97, 169])  # same names, one shard longer
    with TokenLoader(resized, 4, T) as other:
        with pytest.raises(LoaderError, match="shards"):
            other.load_state_dict(state)
        with pytest.raises(LoaderError, match="version"):
            other.load_state_dict({**state, "version": 99})
        with pytest.raises(LoaderError, match="not a TokenLoader"):
            other.load_state_dict({"step": 3})
    with TokenLoader(paths[:2], 4, T) as fewer:
        with pytest.raises(LoaderError, match="shards"):
            fewer.load_state_dict(state)


def test_files_as_glob_directory_or_list(tmp_path, shards):
    paths, _ = shards
    (tmp_path / "notes.txt").write_text("not a shard")
    ways = [str(tmp_path / "shard_*.bin"), tmp_path, [str(p) for p in paths]]
    firsts = []
    for files in ways:
        with TokenLoader(files, 4, T, shuffle=False) as loader:
            firsts.append((len(loader), next(loader)[0]))
    assert all(n == 14 and torch.equal(x, firsts[0][1]) for n, x in firsts)


def bad_shard(tmp_path, header, body=b""):
    path = tmp_path / "bad.bin"
    path.write_bytes(np.array(header + [0] * (256 - len(header)), dtype="<i4").tobytes() + body)
    return path


@pytest.mark.parametrize(
    ("files", "kwargs", "error", "match"),
    [
        ("{d}/*.nothing", {}, ShardNotFoundError, r"no shard matches the pattern '.*\*\.nothing'"),
        ("{d}/missing.bin", {}, ShardNotFoundError, "missing.bin.*no such file"),
        ("{d}/empty_dir", {}, ShardNotFoundError, "empty_dir: directory holds no .bin shards"),
        ([], {}, LoaderError, "files"),
        (["{d}/empty_dir"], {}, ShardError, "empty_dir: a directory inside the list of shards"),
        ("magic", {}, ShardError, "bad.bin: wrong magic number 1234"),
        ("version", {}, ShardError, "bad.bin: unsupported shard version 2"),
        ("short", {}, ShardError, "bad.bin: .*shorter than its header says"),
        ("long", {}, ShardError, "bad.bin: .*longer than its header says"),
        ("tiny", {}, LoaderError, "bad.bin: holds 5 tokens, fewer than block_size \\+ 1 = 9"),
        ("good", {"batch_size": 0}, LoaderError, "batch_size=0"),
        ("good", {"block_size": -2}, LoaderError, "block_size=-2"),
        ("good", {"rank": 2, "world_size": 2}, LoaderError, "rank=2"),
        ("good", {"rank": -1}, LoaderError, "rank=-1"),
        ("good", {"prefetch": 0}, LoaderError, "prefetch=0"),
        ("good", {"threads": 0}, LoaderError, "threads=0"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, files, kwargs, error, match):
    (tmp_path / "empty_dir").mkdir()
    body = np.arange(10, dtype="<u2").tobytes()
    made = {
        "magic": lambda: bad_shard(tmp_path, [1234, 1, 10], body),
        "version": lambda: bad_shard(tmp_path, [20240520, 2, 10], body),
        "short": lambda: bad_shard(tmp_path, [20240520, 1, 11], body),
        "long": lambda: bad_shard(tmp_path, [20240520, 1, 9], body),
        "tiny": lambda: bad_shard(tmp_path, [20240520, 1, 5], body[:10]),
        "good": lambda: make_shards(tmp_path, [300])[0],
    }
    files = made[files]() if isinstance(files, str) and files in made else files
    if isinstance(files, str):
        files = files.format(d=tmp_path)
    elif isinstance(files, list):
        files = [f.format(d=tmp_path) if isinstance(f, str) else f for f in files]
    with pytest.raises(error, match=match) as info:
        TokenLoader(files, **{"batch_size": 2, "block_size": T, **kwargs})
    assert isinstance(info.value, FinegptError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_device_without_cuda(shards):
    with pytest.raises(LoaderError, match="CUDA is not available"):
        TokenLoader(shards[0], 2, T, device="cuda")


def test_sequential_pass_smaller_than_one_batch_is_empty(shards):
    with TokenLoader(shards[0], 20, T, shuffle=False, world_size=3) as loader:  # 57 windows < 60
        assert len(loader) == 0 and list(loader) == []


def test_unsupported_device(shards):
    with pytest.raises(LoaderError, match="device='meta'"):
        TokenLoader(shards[0], 2, T, device="meta")


def test_len_only_for_a_sequential_pass(shards):
    with TokenLoader(shards[0], 4, T) as loader, pytest.raises(TypeError, match="endless"):
        len(loader)


def test_close_and_context_manager_leave_no_threads(shards):
    paths, _ = shards
    assert loader_threads() == []
    loader = TokenLoader(paths, 4, T, threads=3)
    assert len(loader_threads(expect=3)) == 3
    next(loader)
    loader.close()
    assert loader_threads() == []
    loader.close()  # idempotent
    with pytest.raises(LoaderError, match="closed"):
        next(loader)
    with TokenLoader(paths, 4, T, threads=2) as loader:
        next(loader)
        assert len(loader_threads(expect=2)) == 2
    assert loader_threads() == []
    loader = TokenLoader(paths, 4, T, threads=2)
    del loader
    gc.collect()
    assert loader_threads() == []


def test_fork_child_gets_a_clear_error(shards):
    paths, _ = shards
    with TokenLoader(paths, 4, T) as loader:
        next(loader)
        pid = os.fork()
        if pid == 0:  # child: report through the exit code, never return into pytest
            code = 3
            try:
                next(loader)
            except LoaderError as err:
                code = 0 if "fork()" in str(err) else 4
            except BaseException:
                code = 5
            try:
                loader.close()
                del loader
                gc.collect()  # must not wait on threads that do not exist here
            except BaseException:
                code = 6
            os._exit(code)
        deadline = time.monotonic() + 30
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        assert os.waitstatus_to_exitcode(done[1]) == 0
        next(loader)  # the parent's loader still works


def test_next_releases_the_gil_while_it_waits(tmp_path):
    """A Python thread counts while the main thread blocks in next() on slow (big) batches."""
    path = tmp_path / "big.bin"
    write_shard(path, np.zeros(2_200_000, dtype=np.uint16))
    counter = [0]
    stop = threading.Event()

    def count():
        while not stop.is_set():
            counter[0] += 1
            if counter[0] % 1000 == 0:
                time.sleep(0)  # hand the GIL back promptly once next() returns

    old_interval = sys.getswitchinterval()
    # With a long switch interval a next() that held the GIL would starve the counter completely.
    sys.setswitchinterval(1.0)
    thread = threading.Thread(target=count)
    try:
        thread.start()
        time.sleep(0.05)
        solo_rate = counter[0] / 0.05  # roughly: the thread alone, while main sleeps
        with TokenLoader(path, 256, 8192, threads=1, prefetch=1) as loader:
            blocked, counted = 0.0, 0
            for _ in range(4):  # one slot: each next() waits for a whole 32 MB batch to be filled
                before, t0 = counter[0], time.perf_counter()
                next(loader)
                blocked += time.perf_counter() - t0
                counted += counter[0] - before
    finally:
        stop.set()
        sys.setswitchinterval(old_interval)
        thread.join()
    assert blocked > 0.01, "next() never waited: make the batches bigger"
    # Holding the GIL, next() would let the counter run only while torch allocates (~1000 steps
    # a call); released, it runs for most of the wait.
    expected = solo_rate * blocked
    assert counted > 0.25 * expected, f"counter made {counted} steps in {blocked * 1e3:.1f} ms of next(), alone {expected:.0f}"


@pytest.mark.gpu
@pytest.mark.parametrize("shuffle", [True, False])
def test_cuda_batches_match_cpu(shards, shuffle):
    paths, _ = shards
    args = dict(seed=7, shuffle=shuffle, prefetch=2)
    n = 12  # more batches than ring slots: every slot is reused after its copy completed
    with TokenLoader(paths, 3, T, **args) as cpu:
        want = take(cpu, n + 1)
    with TokenLoader(paths, 3, T, device="cuda", **args) as gpu:
        assert all(s.is_pinned() for s in gpu._slots)
        got = take(gpu, n)
        state = gpu.state_dict()
    for (xg, yg), (xc, yc) in zip(got, want):
        assert xg.is_cuda and xg.dtype == torch.int64 and xg.is_contiguous() and yg.is_contiguous()
        assert torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc)
    with TokenLoader(paths, 3, T, device="cuda", **args) as resumed:
        resumed.load_state_dict(state)
        assert torch.equal(next(resumed)[0].cpu(), want[n][0])

"""The shard format: write_shard / read_shard round trips, the exact llm.c layout, and every bad file."""

import numpy as np
import pytest
import torch

from finegpt.data import ShardError, ShardNotFoundError, read_shard, write_shard
from finegpt.errors import FinegptError

MAGIC, VERSION = 20240520, 1


def raw_shard(path, tokens, magic=MAGIC, version=VERSION, ntok=None, extra=b""):
    """A shard written by hand, byte by byte, the way llm.c's writer lays it out."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = [magic, version, len(tokens) if ntok is None else ntok]
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes() + extra)
    return path


def test_round_trip_and_exact_layout(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, 10_001)
    path = tmp_path / "a.bin"
    write_shard(path, tokens)

    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * len(tokens)
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert list(header[:3]) == [MAGIC, VERSION, len(tokens)] and not header[3:].any()
    assert np.array_equal(np.frombuffer(raw[1024:], dtype="<u2"), tokens)

    got = read_shard(path)
    assert got.dtype == np.uint16 and np.array_equal(got, tokens)
    with pytest.raises(ValueError):
        got[0] = 1  # read-only


def test_reads_llmc_shards(tmp_path):
    tokens = [50256, 15496, 11, 995]
    assert list(read_shard(raw_shard(tmp_path / "llmc.bin", tokens))) == tokens


@pytest.mark.parametrize(
    "tokens",
    [[1, 2, 3], np.arange(5, dtype=np.int64), torch.tensor([7, 65535]), np.array([], dtype=np.int32)],
    ids=["list", "int64", "torch", "empty"],
)
def test_accepts_integer_array_likes(tmp_path, tokens):
    write_shard(tmp_path / "t.bin", tokens)
    assert np.array_equal(read_shard(tmp_path / "t.bin"), np.asarray(tokens))


def test_write_is_atomic_and_replaces(tmp_path):
    path = tmp_path / "a.bin"
    write_shard(path, [1, 2, 3])
    write_shard(path, [4, 5])
    assert list(read_shard(path)) == [4, 5]
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # no temporary left behind


def test_failed_write_leaves_no_temporary(tmp_path):
    (tmp_path / "a.bin").mkdir()  # renaming a file onto a directory fails
    with pytest.raises(ShardError, match="a.bin"):
        write_shard(tmp_path / "a.bin", [1, 2, 3])
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


@pytest.mark.parametrize(
    ("tokens", "match"),
    [([70000], "70000"), ([-1], "-1"), (np.array([1.5]), "integers"), (np.zeros((2, 2), int), "1-D")],
)
def test_rejects_bad_tokens(tmp_path, tokens, match):
    with pytest.raises(ShardError, match=match):
        write_shard(tmp_path / "t.bin", tokens)
    assert not list(tmp_path.iterdir())


def test_missing_directory_and_file(tmp_path):
    with pytest.raises(ShardNotFoundError, match="nodir"):
        write_shard(tmp_path / "nodir" / "a.bin", [1])
    with pytest.raises(FileNotFoundError, match="missing.bin") as info:
        read_shard(tmp_path / "missing.bin")
    assert isinstance(info.value, FinegptError)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"magic": 20240801}, "wrong magic number 20240801"),
        ({"version": 7}, "unsupported shard version 7"),
        ({"ntok": 12}, "shorter than its header says"),
        ({"ntok": 8}, "longer than its header says"),
        ({"extra": b"\0"}, "longer than its header says"),
    ],
)
def test_rejects_bad_files(tmp_path, kwargs, match):
    path = raw_shard(tmp_path / "bad.bin", np.arange(10), **kwargs)
    with pytest.raises(ShardError, match=match) as info:
        read_shard(path)
    assert "bad.bin" in str(info.value) and isinstance(info.value, (FinegptError, ValueError))


def test_rejects_file_shorter_than_header(tmp_path):
    (tmp_path / "tiny.bin").write_bytes(b"abc")
    with pytest.raises(ShardError, match=r"tiny.bin.*shorter than the 1024-byte shard header"):
        read_shard(tmp_path / "tiny.bin")

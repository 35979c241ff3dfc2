"""finegpt prepare / shards: documents in, GPT-2 token shards out, resumable and independent of workers."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pydoc_data.topics import topics

# The GPU machine has neither (FACTS §10); there these tests skip with this reason.
pa = pytest.importorskip("pyarrow", reason="prepare's tests build parquet files with pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from finegpt import corpus, data, prepare
from finegpt.cli import main
from finegpt.corpus import HubUnreachableError
from finegpt.data import TokenLoader, read_shard, write_shard
from finegpt.errors import FinegptError
from finegpt.prepare import prepare_shards
from finegpt.tokenizer import EOT, gpt2_encoding

REPO = Path(__file__).resolve().parents[1]

BASE = [
    "The quick brown fox jumps over the lazy dog.",
    "Unicode: naïve café, Привет мир, 日本語のテキスト, emoji 🙂🚀 and ZWJ 👩‍👩‍👧.",
    "Numbers 0 7 42 1234567890 3.14159 and   whitespace\t\truns\n\n\n   here.",
    "Web text can contain the literal <|endoftext|> token, which must stay ordinary text.",
    "",
    "def f(x):\n    return [x ** 2 for _ in range(10)]\n",
    "A longer paragraph. " * 40,
]
# 60 documents of varied lengths; every one distinct so order mistakes show.
DOCS = [f"Document {i}. {BASE[i % len(BASE)]} " + "word " * (i * 7 % 53) for i in range(60)]


def fineweb_table(texts):
    """A table with FineWeb's schema (FACTS §4) holding our own texts."""
    n = len(texts)
    return pa.table({
        "text": texts,
        "id": [f"<urn:uuid:{i:08d}>" for i in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://example.com/{i}" for i in range(n)],
        "date": ["2024-02-20T00:00:00Z"] * n,
        "file_path": ["s3://commoncrawl/x.warc.gz"] * n,
        "language": ["en"] * n,
        "language_score": [0.9] * n,
        "token_count": [len(gpt2_encoding().encode_ordinary(t)) for t in texts],
    })


def write_parquet_dir(root: Path, texts) -> Path:
    """Two parquet files with several row groups each, so skipping crosses files and groups."""
    root.mkdir()
    half = len(texts) // 2
    pq.write_table(fineweb_table(texts[:half]), root / "part-000.parquet", row_group_size=7)
    pq.write_table(fineweb_table(texts[half:]), root / "part-001.parquet", row_group_size=7)
    return root


def write_jsonl(path: Path, texts) -> Path:
    rows = fineweb_table(texts).to_pylist()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def expected_tokens(texts) -> np.ndarray:
    enc = gpt2_encoding()
    return np.array([t for text in texts for t in [EOT] + enc.encode_ordinary(text)], dtype=np.uint16)


def shard_paths(out: Path) -> list[Path]:
    """Shards in stream order: the val shard, then train shards by number."""
    return sorted(out.glob("*.bin"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))


def all_tokens(out: Path) -> np.ndarray:
    return np.concatenate([read_shard(p) for p in shard_paths(out)])


def decoded_documents(tokens: np.ndarray) -> list[str]:
    assert tokens[0] == EOT
    starts = np.flatnonzero(tokens == EOT)
    ends = list(starts[1:]) + [len(tokens)]
    return [gpt2_encoding().decode(tokens[s + 1:e].tolist()) for s, e in zip(starts, ends)]


def file_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in shard_paths(out)}


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    return write_parquet_dir(tmp_path_factory.mktemp("src") / "web", DOCS)


def test_cli_parquet_round_trip(parquet_dir, tmp_path):
    out = tmp_path / "out"
    result = run_cli("prepare", "--dataset", parquet_dir, "--out", out, "--shard-tokens", 500,
                     "--val-tokens", 300, "--workers", 1)
    assert result.exit_code == 0, result.output
    files = shard_paths(out)
    names = [p.name for p in files]
    assert names[0] == "web_val_000000.bin"
    assert names[1:] == [f"web_train_{i:06d}.bin" for i in range(1, len(names))]
    sizes = [len(read_shard(p)) for p in files]
    expected = expected_tokens(DOCS)
    assert sizes[0] == 300
    assert all(s == 500 for s in sizes[1:-1]) and 0 < sizes[-1] <= 500
    assert sum(sizes) == len(expected)
    tokens = all_tokens(out)
    np.testing.assert_array_equal(tokens, expected)
    assert decoded_documents(tokens) == DOCS  # every document, in order, each after one EOT

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["totals"]["tokens"] == len(expected)
    assert manifest["totals"]["documents"] == len(DOCS)
    assert manifest["totals"]["val_tokens"] == 300
    assert manifest["tokenizer"]["name"] == "gpt2"
    assert [s["name"] for s in manifest["shards"]] == names
    assert all(s["sha256"] == hashlib.sha256((out / s["name"]).read_bytes()).hexdigest() for s in manifest["shards"])


def test_jsonl_and_txt_in_path_order(tmp_path):
    src = tmp_path / "mixed"
    src.mkdir()
    write_jsonl(src / "a.jsonl", DOCS[:20])
    (src / "b.txt").write_text(DOCS[20], encoding="utf-8")  # a .txt file is one document
    write_jsonl(src / "c.jsonl", DOCS[21:30])
    manifest = prepare_shards(src, tmp_path / "out", shard_tokens=1000, val_tokens=100, workers=1, progress=False)
    tokens = all_tokens(tmp_path / "out")
    assert decoded_documents(tokens) == DOCS[:30]
    assert manifest["totals"]["documents"] == 30


def test_single_jsonl_file_prefix_and_default_val(tmp_path):
    data = write_jsonl(tmp_path / "My Corpus!.jsonl", DOCS)
    manifest = prepare_shards(data, tmp_path / "out", shard_tokens=1_000_000, workers=1, progress=False)
    val, train = manifest["totals"]["val_tokens"], manifest["totals"]["train_tokens"]
    assert (tmp_path / "out" / "My-Corpus_val_000000.bin").exists()
    assert 0 < val < train  # a small corpus keeps most tokens for training


def test_byte_identical_for_one_and_two_workers(parquet_dir, tmp_path):
    for workers in (1, 2):
        prepare_shards(parquet_dir, tmp_path / f"w{workers}", shard_tokens=700, val_tokens=250,
                       workers=workers, progress=False)
    assert file_bytes(tmp_path / "w1") == file_bytes(tmp_path / "w2")
    assert len(file_bytes(tmp_path / "w1")) > 3


def test_max_tokens_stops_exactly(parquet_dir, tmp_path):
    manifest = prepare_shards(parquet_dir, tmp_path / "out", shard_tokens=400, val_tokens=300,
                              max_tokens=1234, workers=1, progress=False)
    sizes = [len(read_shard(p)) for p in shard_paths(tmp_path / "out")]
    assert sizes == [300, 400, 400, 134]
    np.testing.assert_array_equal(all_tokens(tmp_path / "out"), expected_tokens(DOCS)[:1234])
    assert manifest["totals"]["tokens"] == 1234 and manifest["complete"]


def test_interrupted_run_resumes_to_same_bytes(parquet_dir, tmp_path, monkeypatch):
    args = dict(shard_tokens=450, val_tokens=200, workers=1, progress=False)
    prepare_shards(parquet_dir, tmp_path / "whole", **args)

    real_write = data.write_shard
    calls = []

    def ctrl_c_on_third_shard(path, tokens):
        calls.append(path)
        if len(calls) == 3:  # the third shard is complete in memory but not written: mid-shard stop
            raise KeyboardInterrupt
        real_write(path, tokens)

    monkeypatch.setattr(data, "write_shard", ctrl_c_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(parquet_dir, tmp_path / "cut", **args)
    manifest = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 2
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == sorted(
        ["manifest.json"] + [s["name"] for s in manifest["shards"]])  # nothing half-written

    written = []
    monkeypatch.setattr(data, "write_shard", lambda p, t: (written.append(Path(p).name), real_write(p, t)))
    prepare_shards(parquet_dir, tmp_path / "cut", **args)
    assert file_bytes(tmp_path / "cut") == file_bytes(tmp_path / "whole")
    assert manifest["shards"][0]["name"] not in written  # finished shards were kept, not redone


def test_interrupted_while_reading_resumes(parquet_dir, tmp_path, monkeypatch):
    """Stopped by Ctrl-C between batches with a shard half full, in the 2-worker path."""
    args = dict(shard_tokens=600, val_tokens=350, workers=2, progress=False)
    prepare_shards(parquet_dir, tmp_path / "whole", **{**args, "workers": 1})
    # Small batches (the bytes must not depend on them), so the stop comes after some are written.
    monkeypatch.setattr(corpus, "BATCH_DOCS", 3)
    real_open = corpus.open_source

    def interrupting_source(dataset, name):
        source = real_open(dataset, name)
        batches = source.batches

        def stop_after_three(start):
            for i, batch in enumerate(batches(start)):
                if i == 14:
                    raise KeyboardInterrupt
                yield batch

        source.batches = stop_after_three
        return source

    monkeypatch.setattr(prepare, "open_source", interrupting_source)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(parquet_dir, tmp_path / "cut", **args)
    kept = json.loads((tmp_path / "cut" / "manifest.json").read_text())["shards"]
    assert 0 < len(kept) < len(file_bytes(tmp_path / "whole"))
    monkeypatch.setattr(prepare, "open_source", real_open)
    prepare_shards(parquet_dir, tmp_path / "cut", **args)
    assert file_bytes(tmp_path / "cut") == file_bytes(tmp_path / "whole")


class KillsItsWorker:
    """Unpickling this in a tokenizer worker ends that process at once, as the OOM killer would."""

    def __reduce__(self):
        return os._exit, (9,)


def test_killed_worker_resumes_to_same_bytes(parquet_dir, tmp_path, monkeypatch):
    args = dict(shard_tokens=600, val_tokens=350, workers=2, progress=False)
    prepare_shards(parquet_dir, tmp_path / "whole", **{**args, "workers": 1})
    monkeypatch.setattr(corpus, "BATCH_DOCS", 3)
    real_open = corpus.open_source

    def source_with_a_killer(dataset, name):
        source = real_open(dataset, name)
        batches = source.batches
        source.batches = lambda start: (KillsItsWorker() if i == 14 else b for i, b in enumerate(batches(start)))
        return source

    monkeypatch.setattr(prepare, "open_source", source_with_a_killer)
    with pytest.raises(FinegptError, match="worker died.*re-run the same command"):
        prepare_shards(parquet_dir, tmp_path / "cut", **args)
    assert 0 < len(json.loads((tmp_path / "cut" / "manifest.json").read_text())["shards"])
    monkeypatch.setattr(prepare, "open_source", real_open)
    prepare_shards(parquet_dir, tmp_path / "cut", **args)
    assert file_bytes(tmp_path / "cut") == file_bytes(tmp_path / "whole")


def test_changed_shard_is_prepared_again(parquet_dir, tmp_path):
    args = dict(shard_tokens=500, val_tokens=300, workers=1, progress=False)
    out = tmp_path / "out"
    prepare_shards(parquet_dir, out, **args)
    good = file_bytes(out)
    victim = shard_paths(out)[2]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    prepare_shards(parquet_dir, out, **args)
    assert file_bytes(out) == good


def big_jsonl(tmp_path: Path) -> Path:
    """~0.9M tokens: long enough to stop a real `finegpt prepare` process in the middle."""
    rng = np.random.default_rng(0)
    words = np.array("alpha beta gamma delta the of and to in is data model token shard train".split())
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(50, 400, size=4000)]
    return write_jsonl(tmp_path / "big.jsonl", texts)


def start_prepare(src: Path, out: Path, workers: int) -> tuple[subprocess.Popen, list[str]]:
    """`python -m finegpt prepare` in a subprocess, returned once it has written two shards."""
    cmd = [sys.executable, "-m", "finegpt", "prepare", "--dataset", str(src), "--shard-tokens", "20000",
           "--val-tokens", "5000", "--workers", str(workers), "--out", str(out)]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        if (out / "manifest.json").exists() and len(json.loads((out / "manifest.json").read_text())["shards"]) >= 2:
            break
        time.sleep(0.01)
    return proc, cmd


@pytest.mark.slow
def test_sigkilled_run_leaves_no_workers_and_resumes(tmp_path):
    src = big_jsonl(tmp_path)
    proc, cmd = start_prepare(src, tmp_path / "cut", workers=2)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    proc.kill()
    proc.communicate(timeout=60)
    assert not json.loads((tmp_path / "cut" / "manifest.json").read_text())["complete"]
    deadline = time.time() + 20
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "workers outlived their parent"

    subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, check=True, capture_output=True)
    prepare_shards(src, tmp_path / "whole", shard_tokens=20000, val_tokens=5000, workers=1, progress=False)
    assert file_bytes(tmp_path / "cut") == file_bytes(tmp_path / "whole")
    assert not [p for p in (tmp_path / "cut").iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.slow
def test_sigint_subprocess_resumes(tmp_path):
    """A real Ctrl-C to `finegpt prepare` mid-run: exit 130, then the same command finishes the job."""
    src = big_jsonl(tmp_path)
    proc, cmd = start_prepare(src, tmp_path / "cut", workers=1)
    manifest_path = tmp_path / "cut" / "manifest.json"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "re-run the same command to resume" in err and "Traceback" not in err
    assert not json.loads(manifest_path.read_text())["complete"]

    subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, check=True, capture_output=True)
    prepare_shards(src, tmp_path / "whole", shard_tokens=20000, val_tokens=5000, workers=1, progress=False)
    assert file_bytes(tmp_path / "cut") == file_bytes(tmp_path / "whole")


def test_hub_code_path_on_local_parquet(parquet_dir, tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    files = sorted(str(p) for p in parquet_dir.glob("*.parquet"))
    real = corpus.hub_stream
    batches = real("parquet", None, data_files=files)
    assert [t for b in batches(0) for t in b.to_pylist()] == DOCS
    assert [t for b in batches(17) for t in b.to_pylist()] == DOCS[17:]

    # The whole `--dataset fineweb` path, with `datasets` pointed at the local files.
    monkeypatch.setattr(corpus, "hub_stream", lambda path, name: real("parquet", None, data_files=files))
    manifest = prepare_shards("fineweb", tmp_path / "out", shard_tokens=800, workers=2, progress=False)
    assert manifest["source"] == {"hub": "HuggingFaceFW/fineweb", "name": "sample-10BT"}
    assert (tmp_path / "out" / "fineweb_val_000000.bin").exists()
    assert manifest["shards"][0]["tokens"] == 800  # FineWeb's default: the whole first shard is val
    np.testing.assert_array_equal(all_tokens(tmp_path / "out"), expected_tokens(DOCS))


def _requests_error():
    import requests
    return requests.exceptions.ConnectionError("Max retries exceeded: Name or service not known")


def _hub_offline_error():
    from huggingface_hub.errors import OfflineModeIsEnabled
    return OfflineModeIsEnabled("offline mode is enabled")


@pytest.mark.parametrize("make_error", [
    lambda: ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb' on the Hub (LocalEntryNotFoundError)"),
    _requests_error, _hub_offline_error])
def test_hub_unreachable_is_a_clear_error(tmp_path, monkeypatch, make_error):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(corpus, "_hub_host_unreachable", lambda: None)  # the host answers; datasets fails

    def offline(*args, **kwargs):
        raise make_error()

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(HubUnreachableError, match="--dataset builtin"):
        prepare_shards("fineweb", tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out").exists()  # failed before writing anything


@pytest.mark.slow
def test_other_hub_failures_are_not_called_offline(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(corpus, "_hub_host_unreachable", lambda: None)

    def broken(*args, **kwargs):
        raise ValueError("BuilderConfig has no key 'columns'")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(ValueError, match="columns") as info:
        prepare_shards("fineweb", tmp_path / "out", workers=1, progress=False)
    assert not isinstance(info.value, HubUnreachableError)


def _dead_network(monkeypatch):
    def no_route(address, timeout):
        raise OSError(101, "Network is unreachable")

    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(corpus.socket, "create_connection", no_route)


def test_dead_network_fails_fast_with_the_reason(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    _dead_network(monkeypatch)
    t0 = time.perf_counter()
    with pytest.raises(HubUnreachableError, match="Network is unreachable"):
        prepare_shards("fineweb", tmp_path / "out", workers=1, progress=False)
    assert time.perf_counter() - t0 < 5  # datasets alone retries a dead network for ~25 s
    assert not (tmp_path / "out").exists()


def test_load_dataset_pointed_at_local_parquet_runs_the_hub_path(parquet_dir, tmp_path, monkeypatch):
    """No network at all, `datasets.load_dataset` replaced by a local parquet stream: the Hub code
    path (streaming, text column, resume by skip) still runs and writes the same shards."""
    datasets = pytest.importorskip("datasets")
    _dead_network(monkeypatch)
    real_load = datasets.load_dataset
    files = sorted(str(p) for p in parquet_dir.glob("*.parquet"))
    calls = []

    def local(path, name=None, **kwargs):
        calls.append((path, name, kwargs.get("streaming")))
        return real_load("parquet", data_files=files, split="train", streaming=True, columns=["text"])

    monkeypatch.setattr(datasets, "load_dataset", local)
    args = dict(shard_tokens=600, val_tokens=350, workers=1, progress=False)
    manifest = prepare_shards("fineweb", tmp_path / "hub", **args)
    assert calls == [("HuggingFaceFW/fineweb", "sample-10BT", True)]
    assert manifest["source"] == {"hub": "HuggingFaceFW/fineweb", "name": "sample-10BT"}
    local_manifest = prepare_shards(parquet_dir, tmp_path / "local", **args)
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in local_manifest["shards"]]


def test_hf_hub_offline_cli_message(tmp_path):
    pytest.importorskip("datasets")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "finegpt", "prepare", "--out", str(tmp_path / "o")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Hugging Face Hub" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr
    assert "--dataset builtin" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_builtin_offline_feeds_token_loader(tmp_path):
    out = tmp_path / "builtin"
    result = run_cli("prepare", "--dataset", "builtin", "--out", out, "--shard-tokens", "200k")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    totals = manifest["totals"]
    assert totals["tokens"] > 300_000  # ~0.5M tokens of Python documentation
    assert 0 < totals["val_tokens"] < totals["train_tokens"] / 5
    train = sorted(str(p) for p in out.glob("builtin_train_*.bin"))
    assert len(train) == -(-totals["train_tokens"] // 200_000)
    with TokenLoader(train, 4, 64, seed=1) as loader:
        x, y = next(iter(loader))
    assert x.shape == y.shape == (4, 64)
    assert (x[:, 1:] == y[:, :-1]).all()
    assert decoded_documents(read_shard(out / "builtin_val_000000.bin"))[0].strip()


def test_refuses_other_source_unless_overwrite(parquet_dir, tmp_path):
    out = tmp_path / "out"
    prepare_shards(parquet_dir, out, shard_tokens=500, val_tokens=300, workers=1, progress=False)
    other = write_jsonl(tmp_path / "other.jsonl", DOCS[:5])
    result = run_cli("prepare", "--dataset", other, "--out", out)
    assert result.exit_code == 1 and "--overwrite" in result.output and "Traceback" not in result.output
    # Different settings for the same source are refused too.
    with pytest.raises(FinegptError, match="shard_tokens"):
        prepare_shards(parquet_dir, out, shard_tokens=600, val_tokens=300, workers=1, progress=False)
    prepare_shards(other, out, shard_tokens=500, val_tokens=10, workers=1, overwrite=True, progress=False)
    assert [p.name for p in shard_paths(out)] == ["other_val_000000.bin", "other_train_000001.bin"]
    assert decoded_documents(all_tokens(out)) == DOCS[:5]


def test_refuses_foreign_shards_without_manifest(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_shard(out / "fineweb_train_000001.bin", [1, 2, 3])
    data = write_jsonl(tmp_path / "d.jsonl", DOCS[:3])
    with pytest.raises(FinegptError, match="without a manifest"):
        prepare_shards(data, out, workers=1, progress=False)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(FinegptError, match="unreadable manifest.json"):
        prepare_shards(data, out, workers=1, progress=False)
    prepare_shards(data, out, workers=1, overwrite=True, progress=False)
    assert not (out / "fineweb_train_000001.bin").exists()
    assert decoded_documents(all_tokens(out)) == DOCS[:3]


def test_local_directory_named_fineweb_is_not_the_hub(tmp_path):
    src = tmp_path / "fineweb"
    src.mkdir()
    write_jsonl(src / "a.jsonl", DOCS)
    manifest = prepare_shards(src, tmp_path / "out", shard_tokens=10_000, workers=1, progress=False)
    assert manifest["source"]["path"] == str(src.resolve())
    assert manifest["config"]["val_tokens"] < 10_000  # a tenth of a small local corpus, not a whole shard


def test_user_mistakes_are_clear_errors(tmp_path):
    cases = []
    cases.append((tmp_path / "missing", "no such file or directory"))
    (tmp_path / "empty_dir").mkdir()
    cases.append((tmp_path / "empty_dir", "holds no"))
    (tmp_path / "empty.jsonl").write_text("")
    cases.append((tmp_path / "empty.jsonl", "empty"))
    no_text = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"content": ["a", "b"], "id": ["1", "2"]}), no_text)
    cases.append((no_text, "no `text` column"))
    int_text = tmp_path / "int_text.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), int_text)
    cases.append((int_text, "not strings"))
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    cases.append((bad_line, "bad.jsonl:2: no `text` field"))
    for dataset, message in cases:
        result = run_cli("prepare", "--dataset", dataset, "--out", tmp_path / "out", "--workers", 1)
        assert result.exit_code == 1, (dataset, result.output)
        assert "Error:" in result.output and message in result.output, result.output
        assert "Traceback" not in result.output
    result = run_cli("prepare", "--dataset", "builtin", "--shard-tokens", "0", "--out", tmp_path / "o")
    assert result.exit_code == 1 and "--shard-tokens" in result.output
    result = run_cli("prepare", "--dataset", "builtin", "--shard-tokens", "1.5x", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "not a count" in result.output


@pytest.mark.parametrize("text,value", [("100000000", 10**8), ("1e8", 10**8), ("100M", 10**8),
                                        ("10_485_760", 10_485_760), ("2.5k", 2500)])
def test_token_count_option(text, value):
    assert prepare.TokenCount().convert(text, None, None) == value


def test_shards_command_lists_validates_decodes(parquet_dir, tmp_path):
    out = tmp_path / "out"
    prepare_shards(parquet_dir, out, shard_tokens=1000, val_tokens=300, workers=1, progress=False)
    total = len(expected_tokens(DOCS))
    result = run_cli("shards", out, "--decode", 12)
    assert result.exit_code == 0, result.output
    assert "web_val_000000.bin" in result.output and "web_train_000001.bin" in result.output
    assert f"{total:,} tokens" in result.output and "val 300" in result.output
    assert f"train {total - 300:,}" in result.output
    assert "<|endoftext|>Document 0. The quick brown fox" in result.output

    broken = shard_paths(out)[1]
    broken.write_bytes(broken.read_bytes()[:-2])  # one token short of what the header says
    result = run_cli("shards", out)
    assert result.exit_code == 1 and "INVALID" in result.output and broken.name in result.output

    result = run_cli("shards", tmp_path / "src_none")
    assert result.exit_code == 2
    (tmp_path / "nothing").mkdir()
    result = run_cli("shards", tmp_path / "nothing")
    assert result.exit_code == 1 and "no .bin shard files" in result.output


def test_builtin_corpus_is_python_docs_read_without_imports():
    sys.modules.pop("antigravity", None)  # importing it would open a web browser
    docs = corpus.builtin_documents()  # usually cached by an earlier test
    assert docs == corpus.builtin_documents.__wrapped__()  # rebuilt: deterministic order
    assert list(docs[:len(topics)]) == [topics[k] for k in sorted(topics)]
    assert any(d.startswith(json.__doc__.strip()[:60]) for d in docs[len(topics):])
    assert "antigravity" not in sys.modules
    assert sum(len(d) for d in docs) > 1_500_000  # ~0.5M GPT-2 tokens of prose


def test_default_val_tokens():
    hub = corpus.Source("fineweb", {"hub": "HuggingFaceFW/fineweb", "name": "sample-10BT"}, 10**10, None)
    local = corpus.Source("mine", {"path": "/x"}, 600_000, None)
    assert prepare.default_val_tokens(hub, 10**8, None) == 10**8  # llm.c: the whole first shard
    assert prepare.default_val_tokens(hub, 10**8, 10**8) == 10**7  # a small run still gets train tokens
    assert prepare.default_val_tokens(local, 10**8, None) == 60_000
    assert prepare.default_val_tokens(local, 10_000, None) == 10_000
    big = corpus.Source("mine", {"path": "/x"}, 10**10, None)
    assert prepare.default_val_tokens(big, 10**8, None) == prepare.EVAL_TOKENS


def test_progress_bar_shows_tokens_documents_rate_and_eta(parquet_dir, tmp_path, capsys):
    prepare_shards(parquet_dir, tmp_path / "out", shard_tokens=500, max_tokens=2000, workers=1, progress=True)
    err = capsys.readouterr().err
    assert "2.00k/2.00k" in err  # --max-tokens gives the bar a total, hence a percentage and an ETA
    assert "100%" in err and "tok/s" in err and "docs" in err

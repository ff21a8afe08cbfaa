"""Corpora: prepare (package, local archives, HTTP), verification, atomicity, batches, CLI.

enwik8 and text8 cannot be downloaded here, so the tests generate small corpora
in their formats and pin the sha256 of what they wrote. Expected splits are the
90/5/5 (shakespeare: 90/10) slices of the raw bytes, computed here.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import io
import json
import lzma
import threading
import zipfile
from importlib import resources

import numpy as np
import pytest
import torch

from gradnoise.cli import main
from gradnoise.errors import UserError
from gradnoise.lm.data import batches, corpora, sources

SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
ENWIK8_SHA256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"
TEXT8_ALPHABET = " abcdefghijklmnopqrstuvwxyz"


def enwik8_like(size: int = 200_000) -> bytes:
    """Random bytes: every byte value, not valid UTF-8."""
    return np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()


def text8_like(size: int = 100_000, seed: int = 0) -> bytes:
    letters = np.frombuffer(TEXT8_ALPHABET.encode(), dtype=np.uint8)
    return np.random.default_rng(seed).choice(letters, size).tobytes()


def sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def compressed(raw: bytes, fmt: str, member: str = "corpus") -> bytes:
    if fmt == "zip":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(member, raw)
        return buffer.getvalue()
    if fmt == "gz":
        return gzip.compress(raw)
    if fmt == "xz":
        return lzma.compress(raw, format=lzma.FORMAT_XZ)
    return raw


def slices_90_5_5(raw: bytes) -> dict[str, bytes]:
    n = len(raw)
    assert n % 20 == 0  # so that the percentages are whole numbers of bytes
    train, val = n * 9 // 10, n // 20
    return {"train": raw[:train], "val": raw[train : train + val], "test": raw[train + val :]}


@pytest.fixture
def home(tmp_path):
    """A GRADNOISE_HOME that does not exist yet: a failed prepare must not create it."""
    return tmp_path / "home"


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """(directory, base URL) of an HTTP server on 127.0.0.1 serving that directory."""
    root = tmp_path / "www"
    root.mkdir()
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


# --- prepare -------------------------------------------------------------------


def test_shakespeare_prepared_from_the_package(home):
    packaged = resources.files("gradnoise.lm.data").joinpath("packaged", "shakespeare_char.txt")
    text_bytes = packaged.read_bytes()
    assert len(text_bytes) == 1_115_394
    assert sha256(text_bytes) == SHAKESPEARE_SHA256
    text = text_bytes.decode("ascii")

    directory = corpora.prepare("shakespeare_char", home=home, progress=False)
    corpus = corpora.load("shakespeare_char", home=home)

    assert directory == home / "shakespeare_char"
    assert corpus.vocab_size == 65
    assert corpus.meta["vocab"] == sorted(set(text))
    n_train = int(len(text) * 0.9)  # nanoGPT's rule
    assert (len(corpus.splits["train"]), len(corpus.splits["val"])) == (1_003_854, 111_540)
    assert corpus.decode(corpus.splits["train"]) == text[:n_train]
    assert corpus.decode(corpus.splits["val"]) == text[n_train:]
    assert not corpus.has_split("test") and corpus.has_split("val")
    assert corpus.splits["train"].dtype == np.uint8
    assert corpus.meta["source_sha256"] == SHAKESPEARE_SHA256
    assert corpus.decode(corpus.encode("First Citizen:\n")) == "First Citizen:\n"


def test_load_prepares_shakespeare_on_first_use_under_gradnoise_home(home, monkeypatch):
    monkeypatch.setenv("GRADNOISE_HOME", str(home))
    assert corpora.gradnoise_home() == home
    corpus = corpora.load("shakespeare_char")
    assert (home / "shakespeare_char" / "meta.json").is_file()
    assert corpus.decode(corpus.splits["train"][:14]) == "First Citizen:"
    assert [row["name"] for row in corpora.prepared()] == ["shakespeare_char"]


def test_enwik8_like_zip_is_split_90_5_5_as_bytes(home, tmp_path):
    raw = enwik8_like()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    source = tmp_path / "enwik8.zip"
    source.write_bytes(compressed(raw, "zip", member="enwik8"))

    corpora.prepare("enwik8", str(source), sha256(raw), home=home, progress=False)
    corpus = corpora.load("enwik8", home=home)

    assert corpus.vocab_size == 256 and corpus.meta["vocab"] == "bytes"
    for split, expected in slices_90_5_5(raw).items():
        tokens = corpus.splits[split]
        assert tokens.dtype == np.uint8
        assert tokens.tobytes() == expected, split
    assert corpus.meta["source_sha256"] == sha256(raw)
    assert corpus.meta["splits"] == {"train": 180_000, "val": 10_000, "test": 10_000}
    text = "<page> héllo ✓ 漢字 </page>\n"
    assert corpus.decode(corpus.encode(text)) == text
    assert corpus.encode("é").tolist() == [0xC3, 0xA9]
    assert corpus.decode(torch.tensor([0x61, 0xC3])) == "a\ufffd"  # a window cut mid-character


@pytest.mark.parametrize("fmt", ["plain", "gz", "xz", "zip"])
def test_text8_like_corpus_is_a_27_char_vocabulary_split_90_5_5(home, tmp_path, fmt):
    raw = text8_like()
    source = tmp_path / f"text8.{fmt}"
    source.write_bytes(compressed(raw, fmt, member="text8"))

    corpora.prepare("text8", str(source), sha256(raw), home=home, progress=False)
    corpus = corpora.load("text8", home=home)

    vocab = sorted(TEXT8_ALPHABET)
    assert corpus.meta["vocab"] == vocab and corpus.vocab_size == 27
    for split, expected in slices_90_5_5(raw).items():
        ids = [vocab.index(c) for c in expected.decode("ascii")[:1000]]
        assert corpus.splits[split][:1000].tolist() == ids, split
        assert corpus.decode(corpus.splits[split]) == expected.decode("ascii"), split
    assert corpus.decode(corpus.encode("the quick brown fox")) == "the quick brown fox"
    with pytest.raises(UserError, match="'Q' is not in the text8 vocabulary"):
        corpus.encode("Quick")


def test_download_from_a_local_http_server_says_so_without_a_bar_in_a_log(home, http_root, capsys):
    root, base_url = http_root
    raw = text8_like()
    archive = compressed(raw, "zip", member="text8")
    (root / "text8.zip").write_bytes(archive)

    argv = ["data", "prepare", "text8", "--source", f"{base_url}/text8.zip", "--sha256", sha256(raw)]
    assert main([*argv, "--home", str(home)]) == 0

    corpus = corpora.load("text8", home=home)
    assert corpus.decode(corpus.splits["test"]) == slices_90_5_5(raw)["test"].decode()
    assert corpus.meta["source"] == f"{base_url}/text8.zip"
    # stderr is not a terminal here: no carriage-return bar, one line instead.
    err = capsys.readouterr().err
    assert f"downloaded {len(archive):,} bytes from {base_url}/text8.zip" in err
    assert "\r" not in err and "download text8" not in err


def test_default_source_is_the_registry_url(home, http_root, monkeypatch):
    root, base_url = http_root
    raw = enwik8_like(20_000)
    (root / "enwik8.zip").write_bytes(compressed(raw, "zip", member="enwik8"))
    spec = dataclasses.replace(sources.CORPORA["enwik8"], url=f"{base_url}/enwik8.zip")
    monkeypatch.setitem(sources.CORPORA, "enwik8", spec)

    corpora.prepare("enwik8", sha256=sha256(raw), home=home, progress=False)

    assert corpora.load("enwik8", home=home).splits["val"].tobytes() == raw[18_000:19_000]


def test_missing_url_is_a_user_error(home, http_root):
    _, base_url = http_root
    with pytest.raises(UserError, match=r"cannot download .*/missing\.zip"):
        corpora.prepare("text8", f"{base_url}/missing.zip", home=home, progress=False)
    assert not home.exists()


def _two_member_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("text8", text8_like())
        archive.writestr("README", "extra")
    return buffer.getvalue()


def _empty_zip() -> bytes:
    buffer = io.BytesIO()
    zipfile.ZipFile(buffer, "w").close()
    return buffer.getvalue()


TEXT8_SHA = sha256(text8_like())
WRONG_ALPHABET = text8_like()[:1234] + b"A" + text8_like()[1235:]

REJECTED = {
    # id: (corpus, file contents, sha256 argument, message pattern)
    "enwik8 against its pinned checksum": (
        "enwik8",
        enwik8_like(),
        None,
        f"sha256 of enwik8 is {sha256(enwik8_like())}, expected {ENWIK8_SHA256}",
    ),
    "user-pinned checksum": (
        "text8",
        text8_like(seed=1),
        TEXT8_SHA,
        f"sha256 of text8 is {sha256(text8_like(seed=1))}, expected {TEXT8_SHA}",
    ),
    "text8 of the wrong size": (
        "text8",
        text8_like(),
        None,
        "size of text8 is 100,000 bytes, expected 100,000,000",
    ),
    "text8 with a capital letter": (
        "text8",
        WRONG_ALPHABET,
        sha256(WRONG_ALPHABET),
        r"only contain lowercase a-z and space; found 'A' \(byte 0x41\) at position 1,234",
    ),
    "shakespeare with a non-ASCII byte": (
        "shakespeare_char",
        b"To be \xc3\xa9",
        sha256(b"To be \xc3\xa9"),
        "only contain ASCII; found byte 0xc3 at position 6",
    ),
    "truncated zip": (
        "text8",
        compressed(text8_like(), "zip")[:-200],
        TEXT8_SHA,
        "truncated or corrupt archive",
    ),
    "truncated gzip": (
        "text8",
        compressed(text8_like(), "gz")[:-200],
        TEXT8_SHA,
        "truncated or corrupt archive",
    ),
    "corrupt xz": (
        "text8",
        compressed(text8_like(), "xz")[:40] + b"\0" * 64,
        TEXT8_SHA,
        "truncated or corrupt archive",
    ),
    "zip with an extra member": (
        "text8",
        _two_member_zip(),
        TEXT8_SHA,
        "exactly one file .*found 2: text8, README",
    ),
    "zip with no member": ("text8", _empty_zip(), TEXT8_SHA, "exactly one file .*found 0"),
    "corpus too small to split": ("text8", b"abc def", sha256(b"abc def"), "too few"),
    "malformed sha256": ("text8", text8_like(), "abc123", "64 hexadecimal digits, got 'abc123'"),
}


@pytest.mark.parametrize("case", REJECTED.values(), ids=list(REJECTED))
def test_bad_corpus_is_rejected_and_nothing_written(home, tmp_path, case):
    name, contents, pinned, message = case
    source = tmp_path / "source.bin"
    source.write_bytes(contents)
    with pytest.raises(UserError, match=message):
        corpora.prepare(name, str(source), pinned, home=home, progress=False)
    assert not home.exists()


def test_unknown_corpus_and_unreadable_source_are_user_errors(home, tmp_path):
    with pytest.raises(UserError, match="unknown corpus 'wiki103'; allowed: shakespeare_char"):
        corpora.prepare("wiki103", home=home)
    with pytest.raises(UserError, match=r"cannot read source .*nope\.zip"):
        corpora.prepare("text8", str(tmp_path / "nope.zip"), home=home)
    with pytest.raises(UserError, match="unknown corpus"):
        corpora.load("wiki103", home=home)
    assert not home.exists()


def test_unprepared_download_corpus_tells_how_to_prepare_it(home):
    with pytest.raises(UserError, match="gradnoise data prepare enwik8"):
        corpora.load("enwik8", home=home)


def test_interrupted_prepare_keeps_the_previous_directory_and_leaves_no_temp(home, tmp_path, monkeypatch):
    first, second = text8_like(seed=0), text8_like(seed=1)
    source = tmp_path / "text8"
    source.write_bytes(first)
    corpora.prepare("text8", str(source), sha256(first), home=home, progress=False)

    written = []

    def write_then_interrupt(path, tokens):
        if written:
            raise KeyboardInterrupt
        written.append(path)
        tokens.tofile(path)

    monkeypatch.setattr(corpora, "_write_split", write_then_interrupt)
    source.write_bytes(second)
    with pytest.raises(KeyboardInterrupt):
        corpora.prepare("text8", str(source), sha256(second), home=home, progress=False)

    assert written  # the interrupt came mid-way, after a split file was written
    assert [entry.name for entry in home.iterdir()] == ["text8"]
    corpus = corpora.load("text8", home=home)
    assert corpus.meta["source_sha256"] == sha256(first)
    assert corpus.splits["train"].size == 90_000


def test_interrupted_first_prepare_leaves_nothing(home, tmp_path, monkeypatch):
    raw = text8_like()
    source = tmp_path / "text8"
    source.write_bytes(raw)

    def interrupt(path, tokens):
        raise KeyboardInterrupt

    monkeypatch.setattr(corpora, "_write_split", interrupt)
    with pytest.raises(KeyboardInterrupt):
        corpora.prepare("text8", str(source), sha256(raw), home=home, progress=False)
    assert list(home.iterdir()) == []


def test_prepare_again_replaces_the_corpus(home, tmp_path):
    source = tmp_path / "text8"
    for seed in (0, 1):
        raw = text8_like(seed=seed)
        source.write_bytes(raw)
        corpora.prepare("text8", str(source), sha256(raw), home=home, progress=False)
    corpus = corpora.load("text8", home=home)
    assert corpus.decode(corpus.splits["val"]) == slices_90_5_5(raw)["val"].decode()
    assert [entry.name for entry in home.iterdir()] == ["text8"]
    assert corpora.prepared(home=home) == [
        {
            "name": "text8",
            "path": str(home / "text8"),
            "splits": {"train": 90_000, "val": 5_000, "test": 5_000},
            "vocab_size": 27,
            "source_sha256": sha256(raw),
        }
    ]


# --- batches -------------------------------------------------------------------


def test_get_batch_windows_are_consecutive_tokens_and_y_is_x_shifted():
    tokens = np.arange(1_000, dtype=np.uint16)  # token value == its position
    x, y = batches.get_batch(tokens, 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x, x[:, :1] + torch.arange(16))
    assert torch.equal(y, x + 1)
    assert int(x.min()) >= 0 and int(y.max()) <= 999


def test_get_batch_uses_every_valid_offset_and_only_those():
    tokens = np.arange(12, dtype=np.uint8)
    x, y = batches.get_batch(tokens, 2_000, 10, torch.Generator().manual_seed(0))
    # offsets 0 and 1 are the only windows of 10 + 1 tokens; each has probability 1/2
    starts = x[:, 0]
    assert set(starts.tolist()) == {0, 1}
    # binomial(2000, 1/2): 5 standard deviations = 5 * sqrt(2000) / 2 ≈ 112
    assert abs(int((starts == 0).sum()) - 1_000) < 112
    assert torch.equal(y[:, -1], starts + 10)


def test_get_batch_is_reproducible_for_a_seed_and_ignores_the_global_rng():
    tokens = np.random.default_rng(0).integers(0, 65, 10_000).astype(np.uint8)

    def draws(seed):
        generator = torch.Generator().manual_seed(seed)
        return [batches.get_batch(tokens, 4, 32, generator) for _ in range(3)]

    torch.manual_seed(1)
    first = draws(7)
    torch.manual_seed(2)
    again = draws(7)
    other = draws(8)
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, other, strict=True))
    assert not torch.equal(first[0][0], first[1][0])  # successive batches differ


def test_get_batch_rejects_a_split_shorter_than_a_block():
    with pytest.raises(UserError, match="block_size=16"):
        batches.get_batch(np.zeros(16, np.uint8), 2, 16, torch.Generator())


# --- CLI -----------------------------------------------------------------------


def test_cli_prepare_and_list(home, tmp_path, capsys):
    raw = text8_like()
    source = tmp_path / "text8.gz"
    source.write_bytes(compressed(raw, "gz"))
    argv = ["data", "prepare", "text8", "--source", str(source), "--sha256", sha256(raw)]
    assert main([*argv, "--home", str(home)]) == 0
    # A message, not a result: on stderr (through logging), so that -q silences it.
    assert "text8: vocab 27, train 90,000, val 5,000, test 5,000" in capsys.readouterr().err
    assert json.loads((home / "text8" / "meta.json").read_text())["splits"]["val"] == 5_000

    assert main(["data", "list", "--home", str(home)]) == 0
    listing = capsys.readouterr().out
    assert "text8" in listing and sha256(raw) in listing


@pytest.mark.parametrize(
    "args, message",
    [
        (["wiki103"], "unknown corpus 'wiki103'"),
        (["text8", "--source", "/nonexistent/text8.zip"], "cannot read source"),
        (["enwik8", "--source", "/nonexistent/e.zip", "--sha256", "xyz"], "64 hexadecimal"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(home, capsys, args, message):
    assert main(["data", "prepare", *args, "--home", str(home)]) == 2
    assert message in capsys.readouterr().err
    assert not home.exists()


def test_cli_list_when_nothing_is_prepared_shows_the_packaged_corpus(home, capsys):
    assert main(["data", "list", "--home", str(home)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("shakespeare_char   ships with gradnoise; not prepared under")
    assert lines[1:] == [
        "enwik8             not prepared: gradnoise data prepare enwik8",
        "text8              not prepared: gradnoise data prepare text8",
    ]
    corpora.load("shakespeare_char", home=home)  # prepared on first use
    assert main(["data", "list", "--home", str(home)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].startswith("shakespeare_char   vocab 65   train 1,003,854, val 111,540")
    assert listing[0].endswith("(ships with gradnoise)")

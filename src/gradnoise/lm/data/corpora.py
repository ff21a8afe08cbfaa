"""Corpora for the small-LM harness: download, verify, tokenize, split, batch.

Three corpora, each a registry entry in `CORPORA`:

    shakespeare_char  tiny Shakespeare, shipped inside the package (runs offline)
    enwik8            first 10^8 bytes of English Wikipedia, modelled as raw bytes
    text8             10^8 characters of lowercase a-z and space

`prepare(name)` turns a raw corpus into token files under
`$GRADNOISE_HOME/<name>/` (train.bin, val.bin[, test.bin], meta.json);
`load(name)` memory-maps them; `get_batch` draws (x, y) windows from a split
with a generator the run owns (seeded by `derive_seed`), so a seed fixes the
batches for every method; `substitute_characters` is the input augmentation.

The pipeline holds the raw corpus in memory (10^8 bytes at most) and writes
nothing until it is verified and tokenized; the output is built in a temporary
directory beside its destination and moved into place with `os.replace`, so a
failure or an interrupt leaves either the old directory or nothing. Reading and
decompressing stream and stop at the size the corpus may have (`size_limit`), so
a small archive that unpacks to gigabytes is refused after reading that much.

One file (about 600 lines) for one idea, a corpus from its source to a run's
batches: each corpus's registry entry, checksum, unpacking and tokenization are
read together, and split across files they would be read apart.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import logging
import lzma
import os
import re
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gradnoise.errors import UserError
from gradnoise.lm.storage import atomic, files

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "meta.json"
DOWNLOAD_CHUNK_BYTES = 1 << 20
# A checksum given on the command line may select another corpus than the canonical
# one: it may be this much larger (a fraction of the canonical size).
USER_CHECKSUM_MARGIN = 0.1
# What an archive may add to the size of what it holds (headers; incompressible data
# grows slightly under deflate and xz).
ARCHIVE_OVERHEAD = 0.01
# The compression methods Python's zipfile reads.
ZIP_METHODS = {
    zipfile.ZIP_STORED: "stored",
    zipfile.ZIP_DEFLATED: "deflate",
    zipfile.ZIP_BZIP2: "bzip2",
    zipfile.ZIP_LZMA: "lzma",
}


@dataclass(frozen=True)
class CorpusSpec:
    """How to obtain, verify, tokenize and split one corpus.

    tokenization: "chars" (vocabulary = sorted set of characters seen) or
        "bytes" (vocabulary = the 256 byte values, token = byte).
    alphabet: the bytes the raw corpus may contain (None: any byte).
    sha256: pinned checksum of the uncompressed corpus, or None.
    size: the canonical size of the uncompressed corpus in bytes; checked only
        when no sha256 is in effect (a checksum already fixes the size), and the
        most `prepare` unpacks (see size_limit).
    splits: (split, percent) in corpus order; boundaries are
        n·(cumulative percent) // 100, so 90/5/5 of 10^8 is exactly 90M/5M/5M.
    packaged: file under gradnoise/lm/data/packaged used when no source is given.
    """

    name: str
    url: str
    sha256: str | None
    size: int
    tokenization: str
    alphabet: bytes | None
    alphabet_description: str
    splits: tuple[tuple[str, int], ...]
    description: str
    packaged: str | None = None


CORPORA: dict[str, CorpusSpec] = {
    "shakespeare_char": CorpusSpec(
        name="shakespeare_char",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        size=1_115_394,
        tokenization="chars",
        alphabet=bytes(range(128)),
        alphabet_description="ASCII",
        splits=(("train", 90), ("val", 10)),  # as nanoGPT: no test split
        description="tiny Shakespeare (karpathy/char-rnn), 40,000 lines",
        packaged="shakespeare_char.txt",
    ),
    "enwik8": CorpusSpec(
        name="enwik8",
        url="https://mattmahoney.net/dc/enwik8.zip",
        sha256="2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8",
        size=100_000_000,
        tokenization="bytes",
        alphabet=None,
        alphabet_description="any byte",
        splits=(("train", 90), ("val", 5), ("test", 5)),
        description="first 10^8 bytes of the English Wikipedia dump of 2006-03-03 (Hutter Prize)",
    ),
    "text8": CorpusSpec(
        name="text8",
        url="https://mattmahoney.net/dc/text8.zip",
        sha256=None,  # no published checksum: size and alphabet are verified instead
        size=100_000_000,
        tokenization="chars",
        alphabet=b" abcdefghijklmnopqrstuvwxyz",
        alphabet_description="lowercase a-z and space",
        splits=(("train", 90), ("val", 5), ("test", 5)),
        description="10^8 characters of cleaned English Wikipedia (from enwik9)",
    ),
}


def vocabulary_size(vocab: list[str] | str) -> int:
    """Tokens in a vocabulary as meta.json records it: "bytes" (256) or a list of characters."""
    return 256 if vocab == "bytes" else len(vocab)


def gradnoise_home() -> Path:
    """Where prepared data lives: $GRADNOISE_HOME, or ~/.cache/gradnoise."""
    return Path(os.environ.get("GRADNOISE_HOME") or "~/.cache/gradnoise").expanduser()


class Corpus:
    """A prepared corpus: memory-mapped token splits and the vocabulary.

    splits maps "train", "val" (and "test" where the corpus has one) to 1-D
    np.memmap arrays of token ids, of the dtype meta.json records (uint8: every
    vocabulary here has at most 256 entries).
    """

    def __init__(self, meta: dict, splits: dict[str, np.ndarray]):
        self.name: str = meta["name"]
        self.vocab_size: int = meta["vocab_size"]
        self.meta = meta
        self.splits = splits
        self._chars: list[str] | None = None if meta["vocab"] == "bytes" else meta["vocab"]
        self._ids = None if self._chars is None else {c: i for i, c in enumerate(self._chars)}

    @classmethod
    def of_vocabulary(cls, vocab: list[str] | str) -> Corpus:
        """A corpus without splits, to encode and decode text in a saved model's vocabulary."""
        size = vocabulary_size(vocab)
        # Named so that messages read "not in the model's vocabulary".
        meta = {"name": "model's", "vocab": vocab, "vocab_size": size, "dtype": "uint8"}
        return cls(meta, splits={})

    def has_split(self, name: str) -> bool:
        return name in self.splits

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`: its UTF-8 bytes, or its characters' vocabulary indices."""
        if self._ids is None:
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()
        unknown = next((c for c in text if c not in self._ids), None)
        if unknown is not None:
            raise UserError(
                f"character {unknown!r} is not in the {self.name} vocabulary; "
                f"allowed: {''.join(self._chars)!r}"
            )
        return np.array([self._ids[c] for c in text], dtype=np.dtype(self.meta["dtype"]))

    def decode(self, ids) -> str:
        """Text of a 1-D sequence of token ids (list, np.ndarray or torch.Tensor).

        Byte vocabularies decode as UTF-8 with errors="replace": a window cut
        through a multi-byte character still decodes.
        """
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if self._chars is None:
            return bytes(ids).decode("utf-8", errors="replace")
        return "".join(self._chars[i] for i in ids)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{split}={len(tokens):,}" for split, tokens in self.splits.items())
        return f"Corpus({self.name!r}, vocab_size={self.vocab_size}, {sizes})"


def prepare(
    name: str,
    source: str | None = None,
    sha256: str | None = None,
    *,
    home: Path | None = None,
    progress: bool = True,
) -> Path:
    """Download or read, verify, tokenize and split a corpus; return its directory.

    source: a local file or an http(s) URL, holding the corpus as zip (one
        member), gzip, xz or plain bytes (detected by magic bytes). Default:
        the packaged copy for shakespeare_char, the canonical URL otherwise.
    sha256: checksum the uncompressed corpus must have; overrides the pinned one
        (and, for text8, replaces the size check; the alphabet is always checked).
    Writes <home>/<name>/{train,val[,test]}.bin and meta.json atomically,
    replacing an earlier preparation only once the new one is complete.
    """
    return _prepare(_spec(name), source, sha256, home=home, progress=progress, overwrite=True)


def load(name: str, *, home: Path | None = None) -> Corpus:
    """Memory-map a prepared corpus. shakespeare_char is prepared on first use."""
    spec = _spec(name)
    directory = _home(home) / name
    if not (directory / META_FILE).is_file():
        if spec.packaged is None:
            raise UserError(
                f"{name} is not prepared under {directory.parent}; run "
                f"`gradnoise data prepare {name}` (downloads {spec.url}) or "
                f"`gradnoise data prepare {name} --source FILE`"
            )
        _prepare(spec, None, None, home=home, progress=False, overwrite=False)
    meta = read_meta(directory)
    dtype = np.dtype(meta["dtype"])
    splits = {}
    for split, count in meta["splits"].items():
        path = directory / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != count * dtype.itemsize:
            raise UserError(
                f"{path} is missing or does not hold the {count:,} tokens meta.json records; "
                f"run `gradnoise data prepare {name}` again"
            )
        splits[split] = np.memmap(path, dtype=dtype, mode="r", shape=(count,))
    return Corpus(meta, splits)


def prepared(*, home: Path | None = None) -> list[dict]:
    """The prepared corpora under home: name, path, split sizes, vocab size, source sha256."""
    home = _home(home)
    if not home.is_dir():
        return []
    rows = []
    for directory in sorted(home.iterdir()):
        if directory.name.startswith(".") or not (directory / META_FILE).is_file():
            continue
        meta = read_meta(directory)
        rows.append(
            {
                "name": meta["name"],
                "path": str(directory),
                "splits": meta["splits"],
                "vocab_size": meta["vocab_size"],
                "source_sha256": meta["source_sha256"],
            }
        )
    return rows


# meta.json's entries and their types (the dtype is a numpy name: uint8 here).
_META_TYPES = {
    "name": str,
    "vocab": (list, str),
    "vocab_size": int,
    "dtype": str,
    "splits": dict,
    "source_sha256": str,
}


def read_meta(directory: Path) -> dict:
    """A prepared corpus's meta.json, checked; UserError naming it if it is damaged or old."""
    path = Path(directory) / META_FILE
    again = f"run `gradnoise data prepare {Path(directory).name}` again"
    try:
        meta = files.read_json(path, "corpus metadata")
    except UserError as error:
        raise UserError(f"{error}; {again}") from None
    if not isinstance(meta, dict):
        raise UserError(f"the corpus metadata {path} is damaged: not a JSON object; {again}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{directory} was prepared in format {meta.get('format_version')!r:.40}, this version "
            f"reads format {FORMAT_VERSION}; {again}"
        )
    wrong = [key for key, kind in _META_TYPES.items() if not isinstance(meta.get(key), kind)]
    if not wrong and meta["dtype"] not in ("uint8", "uint16"):
        wrong = ["dtype"]
    if not wrong and not all(isinstance(n, int) and n >= 0 for n in meta["splits"].values()):
        wrong = ["splits"]
    if wrong:
        raise UserError(f"the corpus metadata {path} is damaged ({', '.join(wrong)}); {again}")
    return meta


def get_batch(
    tokens: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size random windows of a split: x = tokens[i : i+T], y = tokens[i+1 : i+T+1].

    Offsets i ~ U{0, …, len(tokens) - T - 1} come from `generator` (a CPU
    torch.Generator owned by the run), never from the global RNG. Returns int64
    CPU tensors of shape (batch_size, block_size); the caller moves them.
    """
    if len(tokens) <= block_size:
        raise UserError(
            f"a split of {len(tokens):,} tokens is too short for block_size={block_size}; "
            f"it needs at least block_size + 1 = {block_size + 1} tokens"
        )
    offsets = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)
    windows = np.array(tokens[offsets.numpy()[:, None] + np.arange(block_size + 1)], np.int64)
    windows = torch.from_numpy(windows)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def substitute_characters(
    x: torch.Tensor, probability: float, vocab_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Replace each input token, independently with probability p, by one drawn uniformly
    from the vocabulary (which may be the same token). Targets are left untouched."""
    replace = torch.rand(x.shape, generator=generator) < probability
    random_tokens = torch.randint(vocab_size, x.shape, generator=generator)
    return torch.where(replace, random_tokens, x)


def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one purpose ("batches", "noise", an eval split, …): the first 8
    bytes of sha256("{seed}/{purpose}"), halved. Streams seeded this way are unrelated,
    so turning one on (augmentation, noise) does not shift another (the batches)."""
    digest = hashlib.sha256(f"{seed}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --- preparation --------------------------------------------------------------


def _home(home: Path | str | None) -> Path:
    return Path(home).expanduser() if home is not None else gradnoise_home()


def _spec(name: str) -> CorpusSpec:
    if name not in CORPORA:
        raise UserError(f"unknown corpus {name!r}; allowed: {', '.join(CORPORA)}")
    return CORPORA[name]


def _prepare(
    spec: CorpusSpec,
    source: str | None,
    sha256: str | None,
    *,
    home: Path | None,
    progress: bool,
    overwrite: bool,
) -> Path:
    expected_sha256 = _checked_sha256(sha256) if sha256 is not None else spec.sha256
    limit = size_limit(spec, sha256)
    data, origin = _read_source(spec, source, limit, progress)
    corpus = _unpack(data, origin, spec, limit)
    actual_sha256 = hashlib.sha256(corpus).hexdigest()
    _verify(spec, corpus, actual_sha256, expected_sha256, origin)
    vocab, tokens = _tokenize(spec, corpus)
    splits = _split(spec, tokens, origin)
    meta = {
        "format_version": FORMAT_VERSION,
        "name": spec.name,
        "vocab": vocab,
        "vocab_size": vocabulary_size(vocab),
        "dtype": tokens.dtype.name,
        "splits": {split: len(part) for split, part in splits.items()},
        "source": origin,
        "source_bytes": len(corpus),
        "source_sha256": actual_sha256,
    }

    home = _home(home)
    target = home / spec.name

    def write(built: Path) -> None:
        for split, part in splits.items():
            _write_split(built / f"{split}.bin", part)
        (built / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    # Without overwrite, a complete preparation made meanwhile by another process is kept.
    replace = overwrite or not (target / META_FILE).is_file()
    try:
        atomic.build_directory(target, write, replace=replace)
    except OSError as error:
        raise UserError(f"cannot write under {home}: {error.strerror or error}") from error
    return target


def _checked_sha256(value: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise UserError(f"sha256 must be 64 hexadecimal digits, got {value!r}")
    return value.lower()


def size_limit(spec: CorpusSpec, user_sha256: str | None) -> int:
    """The most bytes the uncompressed corpus may have: its canonical size (a pinned
    checksum or the size check fixes it), or USER_CHECKSUM_MARGIN more when a checksum
    given by the user may select another corpus."""
    if user_sha256 is None:
        return spec.size
    return spec.size + int(spec.size * USER_CHECKSUM_MARGIN)


def _read_source(spec: CorpusSpec, source: str | None, limit: int, progress: bool) -> tuple[bytes, str]:
    """The bytes of the (possibly compressed) corpus and a description of where they came from;
    no more than an archive of a corpus of `limit` bytes can be."""
    if source is None and spec.packaged is not None:
        packaged = resources.files("gradnoise.lm.data").joinpath("packaged", spec.packaged)
        return packaged.read_bytes(), f"packaged copy of {spec.url}"
    url = source or spec.url
    most = limit + int(limit * ARCHIVE_OVERHEAD) + (1 << 16)
    if url.startswith(("http://", "https://")):
        return _download(url, spec.name, most, progress), url
    path = Path(url).expanduser()
    try:
        with open(path, "rb") as file:
            data = file.read(most + 1)
    except OSError as error:
        raise UserError(f"cannot read source {url!r}: {error.strerror or error}") from error
    if len(data) > most:
        raise _too_large(spec, str(path.resolve()), most, "is")
    return data, str(path.resolve())


def _download(url: str, name: str, most: int, progress: bool) -> bytes:
    buffer = io.BytesIO()
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
            if total is not None and total > most:
                raise _too_large(CORPORA[name], url, most, "is")
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"download {name}",
                disable=None if progress else True,  # None: no bar where stderr is not a terminal
            ) as bar:
                while chunk := response.read(DOWNLOAD_CHUNK_BYTES):
                    buffer.write(chunk)
                    bar.update(len(chunk))
                    if buffer.tell() > most:
                        raise _too_large(CORPORA[name], url, most, "is")
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        if isinstance(error, UserError):
            raise
        reason = getattr(error, "reason", None) or error
        raise UserError(f"cannot download {url}: {reason}") from error
    if total is not None and buffer.tell() != total:
        raise UserError(
            f"download of {url} is truncated: got {buffer.tell():,} bytes, the server announced {total:,}"
        )
    log.info(f"downloaded {buffer.tell():,} bytes from {url}")
    return buffer.getvalue()


def _unpack(data: bytes, origin: str, spec: CorpusSpec, limit: int) -> bytes:
    """The uncompressed corpus: zip (exactly one member), gzip, xz, or plain bytes. Archives
    are read as streams and refused as soon as they give more than `limit` bytes."""
    try:
        if data.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                member = _zip_member(archive, origin)
                with archive.open(member) as stream:
                    return _read_at_most(stream, limit, spec, origin)
        if data.startswith(b"\x1f\x8b"):
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
                return _read_at_most(stream, limit, spec, origin)
        if data.startswith(b"\xfd7zXZ\x00"):
            with lzma.LZMAFile(io.BytesIO(data), format=lzma.FORMAT_XZ) as stream:
                return _read_at_most(stream, limit, spec, origin)
    except (zipfile.BadZipFile, gzip.BadGzipFile, zlib.error, lzma.LZMAError, EOFError) as error:
        raise UserError(f"{origin} is a truncated or corrupt archive: {error}") from error
    except (RuntimeError, NotImplementedError) as error:  # zipfile's "encrypted", "unsupported"
        raise UserError(f"zip archive {origin} cannot be read: {error}") from error
    if len(data) > limit:
        raise _too_large(spec, origin, limit, "is")
    return data


def _zip_member(archive: zipfile.ZipFile, origin: str) -> zipfile.ZipInfo:
    """The one file of a corpus zip, if zipfile can read it."""
    members = [info for info in archive.infolist() if not info.is_dir()]
    if len(members) != 1:
        names = ", ".join(info.filename for info in members) or "none"
        raise UserError(
            f"zip archive {origin} must hold exactly one file (the corpus); found {len(members)}: {names}"
        )
    member = members[0]
    if member.flag_bits & 0x1:
        raise UserError(f"zip archive {origin} is encrypted ({member.filename}); give the corpus unencrypted")
    if member.compress_type not in ZIP_METHODS:
        raise UserError(
            f"zip archive {origin} compresses {member.filename} with method {member.compress_type}, "
            f"which cannot be read here; allowed: {', '.join(ZIP_METHODS.values())}"
        )
    return member


def _read_at_most(stream, limit: int, spec: CorpusSpec, origin: str) -> bytes:
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise _too_large(spec, origin, limit, "unpacks to")
    return data


def _too_large(spec: CorpusSpec, origin: str, limit: int, verb: str) -> UserError:
    return UserError(
        f"{origin} {verb} more than {limit:,} bytes, more than {spec.name} can be "
        f"({spec.size:,} bytes); refusing it"
    )


def _verify(
    spec: CorpusSpec, corpus: bytes, actual_sha256: str, expected_sha256: str | None, origin: str
) -> None:
    if expected_sha256 is not None and actual_sha256 != expected_sha256:
        raise UserError(
            f"sha256 of {spec.name} is {actual_sha256}, expected {expected_sha256} "
            f"({len(corpus):,} bytes from {origin})"
        )
    if expected_sha256 is None and len(corpus) != spec.size:
        raise UserError(
            f"size of {spec.name} is {len(corpus):,} bytes, expected {spec.size:,} "
            f"(from {origin}); pin a sha256 to accept a different corpus"
        )
    if spec.alphabet is not None:
        allowed = np.zeros(256, dtype=bool)
        allowed[np.frombuffer(spec.alphabet, dtype=np.uint8)] = True
        forbidden = ~allowed[np.frombuffer(corpus, dtype=np.uint8)]
        if forbidden.any():
            position = int(forbidden.argmax())
            byte = corpus[position]
            shown = f"{chr(byte)!r} (byte 0x{byte:02x})" if byte < 128 else f"byte 0x{byte:02x}"
            raise UserError(
                f"{spec.name} may only contain {spec.alphabet_description}; "
                f"found {shown} at position {position:,} of {origin}"
            )


def _tokenize(spec: CorpusSpec, corpus: bytes) -> tuple[list[str] | str, np.ndarray]:
    """(vocabulary, token ids). Character vocabularies are over single-byte
    (ASCII) alphabets, so characters and bytes coincide, every vocabulary fits
    uint8, and a 256-entry lookup table maps the whole corpus at once."""
    raw = np.frombuffer(corpus, dtype=np.uint8)
    if spec.tokenization == "bytes":
        return "bytes", raw
    seen = np.flatnonzero(np.bincount(raw, minlength=256))
    lookup = np.zeros(256, dtype=np.uint8)
    lookup[seen] = np.arange(len(seen))
    return [chr(byte) for byte in seen], lookup[raw]


def _split(spec: CorpusSpec, tokens: np.ndarray, origin: str) -> dict[str, np.ndarray]:
    splits, start, cumulative = {}, 0, 0
    for split, percent in spec.splits:
        cumulative += percent
        stop = len(tokens) * cumulative // 100
        if stop == start:
            raise UserError(
                f"{spec.name} from {origin} has {len(tokens):,} tokens, too few for a "
                f"non-empty {split} split ({percent}% of the corpus)"
            )
        splits[split] = tokens[start:stop]
        start = stop
    return splits


def _write_split(path: Path, tokens: np.ndarray) -> None:
    tokens.tofile(path)

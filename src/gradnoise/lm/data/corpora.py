"""The corpora as a run reads them: preparing one (read its source, verify, tokenize, split) and
loading it (memory-mapped token splits and the vocabulary).

Three corpora, each a registry entry in `sources.CORPORA`:

    shakespeare_char  tiny Shakespeare, shipped inside the package (runs offline)
    enwik8            first 10^8 bytes of English Wikipedia, modelled as raw bytes
    text8             10^8 characters of lowercase a-z and space

`prepare(name)` turns a raw corpus into token files under
`$GRADNOISE_HOME/<name>/` (train.bin, val.bin[, test.bin], meta.json);
`load(name)` memory-maps them; `batches.get_batch` draws (x, y) windows from a split
with a generator the run owns (seeded by `seeding.derive_seed`), so a seed fixes the
batches for every method; `augment.substitute_characters` is the input augmentation.

The pipeline holds the raw corpus in memory (10^8 bytes at most) and writes
nothing until it is verified and tokenized; the output is built in a temporary
directory beside its destination and moved into place with `os.replace`, so a
failure or an interrupt leaves either the old directory or nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from gradnoise.errors import UserError
from gradnoise.lm.data.sources import (
    CORPORA,
    CorpusSpec,
    checked_sha256,
    read_source,
    size_limit,
    unpack,
    verify,
)
from gradnoise.lm.storage import atomic, files

FORMAT_VERSION = 1
META_FILE = "meta.json"


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
    expected_sha256 = checked_sha256(sha256) if sha256 is not None else spec.sha256
    limit = size_limit(spec, sha256)
    data, origin = read_source(spec, source, limit, progress)
    corpus = unpack(data, origin, spec, limit)
    actual_sha256 = hashlib.sha256(corpus).hexdigest()
    verify(spec, corpus, actual_sha256, expected_sha256, origin)
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

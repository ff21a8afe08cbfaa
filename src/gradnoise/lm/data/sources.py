"""Where each corpus comes from and how it is checked: the registry `CORPORA`, reading or
downloading a source, unpacking it, and verifying checksum, size and alphabet.

Reading and decompressing stream and stop at the size the corpus may have (`size_limit`), so a
small archive that unpacks to gigabytes is refused after reading that much.
"""

from __future__ import annotations

import gzip
import http.client
import io
import logging
import lzma
import re
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gradnoise.errors import UserError

log = logging.getLogger(__name__)

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


def checked_sha256(value: str) -> str:
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


def read_source(spec: CorpusSpec, source: str | None, limit: int, progress: bool) -> tuple[bytes, str]:
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


def unpack(data: bytes, origin: str, spec: CorpusSpec, limit: int) -> bytes:
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


def verify(
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

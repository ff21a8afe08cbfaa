"""Small MNIST look-alikes in the IDX format, and their checksums."""

import gzip
import hashlib

import numpy as np

from gradnoise.mnist import data


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    """An IDX file as its format says: magic, the sizes (big-endian int32), then the bytes."""
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(directory, train: int = 30, test: int = 12, seed: int = 0) -> dict:
    """The four .gz files of a small MNIST look-alike; returns {name: (images, labels) or md5}."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        (directory / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(2051, images)))
        (directory / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(2049, labels)))
        arrays[split] = (images.reshape(count, -1), labels)
    return arrays


def md5s(directory) -> dict:
    return {name: hashlib.md5((directory / name).read_bytes()).hexdigest() for name in data.PINNED_MD5}

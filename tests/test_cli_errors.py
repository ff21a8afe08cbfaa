"""Every bad input ends the same way: each case below runs the real `gradnoise` command in a
process of its own and must exit with status 2, print exactly one line, `gradnoise: error:`
naming what was wrong, no traceback, and leave every file under its directory (the run, the
export, the data home, the working directory) as it was: nothing created, changed or removed.

The cases are the bad inputs of issue 10 (values out of range, damaged archives, corpora,
weights, checkpoint states, configs and stores, destinations that are not directories).
They run two at a time in one fixture, since each process spends its time importing torch.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gradnoise.lm.config import resolve_config
from gradnoise.lm.training.trained import export
from gradnoise.lm.training.trainer import train
from helpers import configs

TINY = configs.tiny(max_iters=4, eval_interval=2, log_interval=2, checkpoint_interval=2)
OVERRIDES = [f"{k}={v}" for k, v in TINY.items()]
CHECKPOINT = Path("run/checkpoints/step_0000002")  # the run stops there, so it can resume
WTE = "transformer.wte.weight"


# --- how each case damages its copy of the run, the export and the data home ----------


def rewrite_weights(path: Path, change) -> None:
    weights = load_file(str(path))
    change(weights)
    save_file(weights, str(path))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def zip_of(raw: bytes, flag_bits: int = 0, method: int | None = None) -> bytes:
    """A stored zip of one member, its header fields patched: bit 0 of the flags means
    encrypted; method 99 is AES, which zipfile cannot read."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("text8", raw)
    data = bytearray(buffer.getvalue())
    central = data.index(b"PK\x01\x02")
    data[6] |= flag_bits  # local header: flags at 6, method at 8
    data[central + 8] |= flag_bits  # central directory: flags at 8, method at 10
    if method is not None:
        data[8:10] = method.to_bytes(2, "little")
        data[central + 10 : central + 12] = method.to_bytes(2, "little")
    return bytes(data)


def state_without(key: str):
    def damage(root: Path) -> None:
        path = root / CHECKPOINT / "state.pt"
        state = torch.load(path, weights_only=True)
        del state[key]
        torch.save(state, path)

    return damage


def spec_with_seeds(seeds) -> str:
    return json.dumps({"name": "bad", "datasets": ["shakespeare_char"], "seeds": seeds, "methods": {"b": {}}})


# id: (setup(root) or None, argv, what the error line must say)
CASES = {
    "seed beyond 2**63 - 1": (None, ["train", *OVERRIDES, "seed=99999999999999999999"], "seed=99999"),
    "negative seed": (None, ["train", "--run-dir", "new", *OVERRIDES, "seed=-1"], "[0, 2**63 - 1]"),
    "bad noise correlation": (
        None,
        ["train", "--run-dir", "new", *OVERRIDES, "noise_correlation=bogus"],
        "noise_correlation='bogus' is not allowed; allowed: independent, anticorrelated",
    ),
    "bad noise placement": (
        None,
        ["train", "--run-dir", "new", *OVERRIDES, "noise_placement=weights"],
        "allowed: after_clip, before_clip, update",
    ),
    "negative embedding noise": (
        None,
        ["train", "--run-dir", "new", *OVERRIDES, "embedding_noise_alpha=-1"],
        "embedding_noise_alpha=-1.0 is not allowed",
    ),
    "spec seed beyond 2**63 - 1": (
        lambda root: (root / "bad.yaml").write_text(spec_with_seeds([99999999999999999999])),
        ["study", "run", "bad.yaml"],
        "seeds=[99999999999999999999]",
    ),
    "spec seed count absurd": (
        lambda root: (root / "bad.yaml").write_text(spec_with_seeds(10**12)),
        ["study", "run", "bad.yaml"],
        "a count of seeds must be ≥ 1 and ≤ 10,000",
    ),
    "encrypted zip": (
        lambda root: (root / "enc.zip").write_bytes(zip_of(b"abc " * 1000, flag_bits=1)),
        ["data", "prepare", "text8", "--source", "enc.zip", "--sha256", "0" * 64],
        "is encrypted",
    ),
    "zip of an unsupported method": (
        lambda root: (root / "aes.zip").write_bytes(zip_of(b"abc " * 1000, method=99)),
        ["data", "prepare", "text8", "--source", "aes.zip", "--sha256", "0" * 64],
        "with method 99",
    ),
    "gzip bomb": (
        lambda root: (root / "bomb.gz").write_bytes(gzip.compress(b"\0" * 5_000_000)),
        ["data", "prepare", "shakespeare_char", "--source", "bomb.gz"],
        "unpacks to more than 1,115,394 bytes",
    ),
    "corrupt meta.json: data list": (
        lambda root: (root / "home/shakespeare_char/meta.json").write_bytes(b'{"name": "shakesp'),
        ["data", "list"],
        "meta.json is damaged",
    ),
    "corrupt meta.json: train": (
        lambda root: (root / "home/shakespeare_char/meta.json").write_text('{"format_version": 1}'),
        ["train", "--run-dir", "new", *OVERRIDES],
        "meta.json is damaged (name, vocab",
    ),
    "corrupt meta.json: train into a default run directory": (
        lambda root: (root / "home/shakespeare_char/meta.json").write_text("[]"),
        ["train", *OVERRIDES],
        "not a JSON object",
    ),
    "truncated model.safetensors: sample a run": (
        lambda root: truncate(root / CHECKPOINT / "model.safetensors"),
        ["sample", "run"],
        "model.safetensors is damaged",
    ),
    "truncated model.safetensors: sample an export": (
        lambda root: truncate(root / "export/model.safetensors"),
        ["sample", "export"],
        "model.safetensors is damaged",
    ),
    "truncated model.safetensors: resume": (
        lambda root: truncate(root / CHECKPOINT / "model.safetensors"),
        ["train", "--run-dir", "run", "--resume", *OVERRIDES],
        "model.safetensors is damaged",
    ),
    "tensor of the wrong shape: export": (
        lambda root: rewrite_weights(
            root / CHECKPOINT / "model.safetensors",
            lambda w: w.update({"transformer.h.0.mlp.c_fc.weight": torch.zeros(64, 8)}),
        ),
        ["export", "run", "out"],
        "transformer.h.0.mlp.c_fc.weight is (64, 8) torch.float32, the model needs (64, 16)",
    ),
    "unexpected tensor: export": (
        lambda root: rewrite_weights(
            root / CHECKPOINT / "model.safetensors", lambda w: w.update(x=w[WTE][:3].clone())
        ),
        ["export", "run", "out"],
        "unexpected ['x']",
    ),
    "tensor of the wrong shape: resume": (
        lambda root: rewrite_weights(
            root / CHECKPOINT / "model.safetensors", lambda w: w.update({WTE: w[WTE][:, :8].contiguous()})
        ),
        ["train", "--run-dir", "run", "--resume", *OVERRIDES],
        "transformer.wte.weight is (65, 8) torch.float32, the model needs (65, 16) torch.float32",
    ),
    "int64 weights: sample a run": (
        lambda root: rewrite_weights(
            root / CHECKPOINT / "model.safetensors", lambda w: w.update({WTE: w[WTE].long()})
        ),
        ["sample", "run"],
        "torch.int64, the model needs (65, 16) torch.float32",
    ),
    "int64 weights: sample an export": (
        lambda root: rewrite_weights(
            root / "export/model.safetensors", lambda w: w.update({WTE: w[WTE].long()})
        ),
        ["sample", "export"],
        "torch.int64",
    ),
    "missing tensor: export": (
        lambda root: rewrite_weights(root / CHECKPOINT / "model.safetensors", lambda w: w.pop(WTE)),
        ["export", "run", "out"],
        "missing ['transformer.wte.weight']",
    ),
    "state.pt without the optimizer: resume": (
        state_without("optimizer"),
        ["train", "--run-dir", "run", "--resume", *OVERRIDES],
        "its state has no entry 'optimizer'",
    ),
    "state.pt without the vocabulary: sample": (
        state_without("vocab"),
        ["sample", "run"],
        "no entry 'vocab'",
    ),
    "random bytes in state.pt": (
        lambda root: (root / CHECKPOINT / "state.pt").write_bytes(os.urandom(4096)),
        ["train", "--run-dir", "run", "--resume", *OVERRIDES],
        "state.pt is damaged: it is not a torch.save archive",
    ),
    "binary run config.json: sample": (
        lambda root: (root / "run/config.json").write_bytes(b"\xff\xfe\x00garbage"),
        ["sample", "run"],
        "config.json is damaged: not valid JSON",
    ),
    "truncated run config.json: export": (
        lambda root: (root / "run/config.json").write_text('{"dataset": "shakes'),
        ["export", "run", "out"],
        "config.json is damaged",
    ),
    "truncated run config.json: resume from it": (
        lambda root: (root / "run/config.json").write_text('{"dataset": "shakes'),
        ["train", "--config-file", "run/config.json", "--run-dir", "run", "--resume"],
        "config.json is damaged",
    ),
    "export config.json of the wrong type": (
        lambda root: (root / "export/config.json").write_text('{"n_layer": "one"}'),
        ["sample", "export"],
        "n_layer='one' is not allowed",
    ),
    "study status: not a database": (
        lambda root: (root / "study").mkdir() or (root / "study/study.sqlite").write_bytes(b"x" * 5000),
        ["study", "status", "study"],
        "file is not a database",
    ),
    "study report: not a database": (
        lambda root: (root / "study").mkdir() or (root / "study/study.sqlite").write_bytes(b"x" * 5000),
        ["study", "report", "study"],
        "file is not a database",
    ),
    "sample temperature nan": (None, ["sample", "run", "--temperature", "nan"], "temperature=nan"),
    "run directory is a file": (
        lambda root: (root / "taken").write_text("mine"),
        ["train", "--run-dir", "taken", *OVERRIDES],
        "taken exists and is not a directory",
    ),
    "run directory cannot be created": (
        lambda root: (root / "taken").write_text("mine"),
        ["train", "--run-dir", "taken/run", *OVERRIDES],
        "cannot create the run directory taken/run",
    ),
    "export into the run": (None, ["export", "run", "run"], "is the run directory itself"),
    "export into a non-empty directory": (
        lambda root: (root / "keep").mkdir() or (root / "keep/notes").write_text("mine"),
        ["export", "run", "keep", "--force"],
        "holds notes, not an earlier export",
    ),
    "export onto a file": (
        lambda root: (root / "model.bin").write_text("mine"),
        ["export", "run", "model.bin"],
        "exists and is not a directory",
    ),
}


# --- running them ---------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root: a directory's mode; a file's mode, size, mtime and sha256."""
    entries = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        key = str(path.relative_to(root))
        if path.is_dir():
            entries[key] = ("dir", info.st_mode)
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            entries[key] = ("file", info.st_mode, info.st_size, info.st_mtime_ns, digest)
    return entries


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, private_data_home):
    """{case id: (returncode, stdout, stderr, tree before, tree after)}."""
    template = tmp_path_factory.mktemp("template")
    torch.set_num_threads(1)
    cfg = resolve_config("shakespeare_char", "tiny", TINY)
    train(cfg, template / "run", progress=False, on_step=lambda step, x, y: step == 2)
    export(template / "run", template / "export")
    shutil.copytree(private_data_home / "shakespeare_char", template / "home" / "shakespeare_char")

    def run_case(name):
        setup, argv, _ = CASES[name]
        root = tmp_path_factory.mktemp("case")
        shutil.copytree(template, root, dirs_exist_ok=True)
        if setup is not None:
            setup(root)
        before = snapshot(root)
        env = {**os.environ, "GRADNOISE_HOME": str(root / "home"), "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "gradnoise", *argv]
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        return name, (done.returncode, done.stdout, done.stderr, before, snapshot(root))

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run_case, CASES))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_error_line_and_touches_nothing(outcomes, name):
    code, stdout, stderr, before, after = outcomes[name]
    message = CASES[name][2]
    assert "Traceback" not in stderr, stderr
    assert code == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradnoise: error: "), stderr
    assert message in lines[0]
    assert stdout == ""
    assert after == before

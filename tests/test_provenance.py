"""What made a run: code identity (git or source hash) and numerics, in every run's files."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from gradnoise.lm.config import resolve_config
from gradnoise.lm.storage import runlog
from gradnoise.lm.training import provenance
from gradnoise.lm.training.trainer import train
from helpers import configs

TINY = configs.tiny(
    max_iters=10, eval_interval=5, log_interval=5, checkpoint_interval=5, wide=True, eval_iters=2, device=None
)


def git(directory: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=directory,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.fixture
def package(tmp_path):
    """A package directory `pkg` inside a git repository, committed once."""
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("x = 1\n")
    (root / "pkg" / "data.txt").write_text("not code\n")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "first")
    return root / "pkg"


def test_a_checkout_gives_its_commit_and_whether_the_package_differs_from_it(package):
    commit = git(package, "rev-parse", "HEAD")
    assert provenance._git_state(package) == (commit, False)
    (package / "new.py").write_text("y = 2\n")  # untracked code counts
    assert provenance._git_state(package) == (commit, True)
    (package / "new.py").unlink()
    (package.parent / "README").write_text("outside the package\n")
    assert provenance._git_state(package) == (commit, False)


def test_a_package_untracked_in_someone_elses_repository_has_no_commit(package):
    installed = package.parent / "site-packages" / "pkg"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("x = 1\n")
    assert provenance._git_state(installed) == (None, None)
    assert provenance._git_state(package.parent.parent) == (None, None)  # no repository at all


def test_the_source_hash_follows_the_python_files_alone(package):
    first = provenance.source_sha256(package)
    (package / "data.txt").write_text("changed\n")
    assert provenance.source_sha256(package) == first
    (package / "__init__.py").write_text("x = 2\n")
    assert provenance.source_sha256(package) != first
    (package / "__init__.py").write_text("x = 1\n")
    assert provenance.source_sha256(package) == first


def test_labels_name_the_commit_or_the_source_and_unknown_otherwise():
    code = {"version": "1.0", "commit": "a" * 40, "dirty": False, "source_sha256": "b" * 64}
    assert provenance.code_label(code) == "1.0 @ aaaaaaaaaaaa"
    assert provenance.code_label({**code, "dirty": True}) == "1.0 @ aaaaaaaaaaaa (dirty, source bbbbbbbbbbbb)"
    assert provenance.code_label({**code, "commit": None}) == "1.0, source bbbbbbbbbbbb"
    assert provenance.code_label(None) == provenance.code_label({}) == "unknown"
    assert provenance.same_code(code, {**code, "commit": None})
    assert not provenance.same_code(None, None)


def test_a_run_records_what_made_it_from_its_start(tmp_path, one_thread):
    cfg = resolve_config("shakespeare_char", "tiny", TINY)
    run_dir = tmp_path / "run"
    steps_seen = []

    def stop_at_5(step, x, y):
        # Written before the first step: a run killed now has it.
        steps_seen.append(json.loads((run_dir / runlog.PROVENANCE_FILE).read_text()))
        return step == 5

    train(cfg, run_dir, progress=False, on_step=stop_at_5)
    result = train(cfg, run_dir, resume=True, progress=False)
    (first,) = steps_seen[0]["attempts"]
    assert first["from_step"] == 0
    assert first["code"] == provenance.code_identity()
    assert first["numerics"] == {
        "torch": torch.__version__,
        "device": "cpu",
        "device_model": provenance.device_model(torch.device("cpu")),
        "dtype": "float32",
        "threads": 1,
        "compile": False,
        "replicas": 1,
    }
    attempts = json.loads((run_dir / runlog.PROVENANCE_FILE).read_text())["attempts"]
    assert [a["from_step"] for a in attempts] == [0, 5]
    saved = json.loads((run_dir / runlog.RESULT_FILE).read_text())["provenance"]
    assert {k: saved[k] for k in ("code", "numerics")} == {k: first[k] for k in ("code", "numerics")}
    assert (saved["attempts"], saved["consistent"]) == (2, True)
    assert result["provenance"] == saved


def test_a_thread_count_that_is_not_one_is_refused_before_anything_is_written(tmp_path, capsys):
    from gradnoise.cli import main

    assert main(["train", "--run-dir", str(tmp_path / "run"), "--threads", "0", "max_iters=1"]) == 2
    assert "threads=0: give an integer ≥ 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

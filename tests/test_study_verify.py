"""`gradnoise study verify`: reruns of a study's runs compared with its stored numbers."""

import hashlib
import logging
import shutil
import sqlite3

import pytest

from gradnoise.cli import main
from gradnoise.cli.common import configure_logging
from gradnoise.study.runner import run_study
from gradnoise.study.spec import load_spec
from gradnoise.study.verify import STEP0_TOLERANCE, TOLERANCE, verify_study
from helpers.configs import STUDY
from helpers.studies import write_spec


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two finished runs (one with noise), trained by worker processes on one thread."""
    root = tmp_path_factory.mktemp("verify")
    methods = {"baseline": {}, "noisy": {"noise": "const:sigma=0.01"}}
    spec = load_spec(write_spec(root, "verified", methods))
    run_study(spec, root / "study", progress=False)
    return root / "study", [run.run_id for run in spec.runs]


def tree_digest(directory) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def copy_with(study, tmp_path, *statements) -> object:
    """A copy of the study whose store had `statements` run on it."""
    copy = tmp_path / "copy"
    shutil.copytree(study, copy)
    with sqlite3.connect(copy / "study.sqlite") as db:
        for statement in statements:
            db.execute(statement)
    return copy


def test_reruns_of_the_same_code_are_exact_and_leave_the_study_untouched(study, capsys):
    directory, run_ids = study
    before = tree_digest(directory)
    assert main(["study", "verify", str(directory), "--runs", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[-1] == "verify: all 2 run(s) agree"
    assert sorted(line.split()[0] for line in lines[:2]) == sorted(run_ids)
    assert all(": exact (whole run, " in line and "same code and numerics" in line for line in lines[:2])
    assert tree_digest(directory) == before


def test_a_changed_loss_is_a_mismatch_that_says_where(study, tmp_path, capsys):
    directory, (baseline, noisy) = study
    copy = copy_with(
        directory,
        tmp_path,
        f"UPDATE curves SET val_loss = val_loss + 1e-6 WHERE run_id = '{noisy}' AND step = 10",
    )
    assert main(["study", "verify", str(copy), "--run", noisy, "--run", baseline]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{noisy} shakespeare_char/noisy seed 0: MISMATCH (whole run): ")
    assert "first differs at eval val_loss at step 10" in lines[0]
    assert ": exact (" in lines[1]
    assert lines[-1] == "verify: 1 of 2 run(s) do not match their stored numbers"


def test_a_run_without_its_identity_is_compared_within_the_tolerance(study, tmp_path):
    directory, (baseline, _) = study
    unknown = copy_with(directory, tmp_path, "UPDATE runs SET code_sha256 = NULL, torch_version = NULL")
    with sqlite3.connect(unknown / "study.sqlite") as db:
        where = f"WHERE run_id = '{baseline}'"
        db.execute(f"UPDATE curves SET loss = loss + {TOLERANCE / 2} {where} AND step = 10")
        db.execute(f"UPDATE curves SET val_loss = val_loss + {STEP0_TOLERANCE / 2} {where} AND step = 0")
    (verdict,) = verify_study(unknown, run_ids=[baseline], steps=10).verdicts
    assert verdict.agrees and "agrees within tolerance, largest |Δ| 0.01 (steps ≤ 10" in verdict.line
    assert "code is unknown" in verdict.line and "rerun on 1 thread(s)" in verdict.line
    with sqlite3.connect(unknown / "study.sqlite") as db:
        where = f"WHERE run_id = '{baseline}' AND step = 0"
        db.execute(f"UPDATE curves SET val_loss = val_loss + {STEP0_TOLERANCE} {where}")
    (verdict,) = verify_study(unknown, run_ids=[baseline], steps=10).verdicts
    assert not verdict.agrees
    assert "at step 0" in verdict.line and "the initial weights or the eval batches differ" in verdict.line


def test_other_code_is_named_and_compared_within_the_tolerance(study, tmp_path):
    directory, (baseline, _) = study
    other = copy_with(directory, tmp_path, "UPDATE runs SET code_sha256 = 'f00d', threads = 1")
    (verdict,) = verify_study(other, run_ids=[baseline], steps=5).verdicts
    assert verdict.agrees and "stored code 0.1.0" in verdict.line and "source f00d" in verdict.line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--runs", "0"], "--runs 0: give an integer from 1 to 2"),
        (["--runs", "3"], "--runs 3: give an integer from 1 to 2"),
        (["--run", "nope"], "run(s) nope: not finished runs of this study"),
        (["--runs", "1", "--steps", "0"], f"--steps 0: give an integer from 1 to {STUDY['max_iters']}"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(study, capsys, args, message):
    directory, _ = study
    before = tree_digest(directory)
    assert main(["study", "verify", str(directory), *args]) == 2
    assert message in capsys.readouterr().err
    assert tree_digest(directory) == before


def test_a_directory_without_a_study_is_refused(tmp_path, capsys):
    assert main(["study", "verify", str(tmp_path)]) == 2
    assert "holds no study" in capsys.readouterr().err


def test_study_run_warns_when_the_store_holds_runs_of_other_code(study, tmp_path, capsys):
    directory, (baseline, _) = study
    configure_logging(logging.INFO)
    capsys.readouterr()
    run_study(load_spec(directory / "spec.yaml"), directory, progress=False)  # all finished: no warning
    assert "warning" not in capsys.readouterr().err
    other = copy_with(directory, tmp_path, f"UPDATE runs SET code_sha256 = 'f00d' WHERE id = '{baseline}'")
    run_study(load_spec(other / "spec.yaml"), other, progress=False)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "came from other code" in warnings[0] and baseline in warnings[0]

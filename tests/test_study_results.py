"""The committed studies under results/: each store holds the spec beside it, and the
seed paper's published values and table reach their reports."""

import contextlib
import json
import re
import shutil
import sqlite3
from pathlib import Path

import pytest

from gradnoise.study.layout import parse_published, parse_table
from gradnoise.study.report import write_report
from gradnoise.study.report.analysis import analyze
from gradnoise.study.report.loading import load_study
from gradnoise.study.runner import study_status
from gradnoise.study.spec import load_spec
from gradnoise.study.store import Store

RESULTS = Path(__file__).resolve().parents[1] / "results"
STUDIES = sorted(path.parent for path in RESULTS.glob("*/study.sqlite"))


def read_committed(study_dir: Path, query: str) -> list[tuple]:
    # Immutable: the test must not touch the committed file, nor leave -wal or -shm beside it.
    uri = f"file:{study_dir / 'study.sqlite'}?mode=ro&immutable=1"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        return db.execute(query).fetchall()


def stored_spec(study_dir: Path) -> dict:
    return json.loads(read_committed(study_dir, "SELECT spec FROM study WHERE id = 1")[0][0])


@pytest.mark.parametrize("study_dir", STUDIES, ids=lambda path: path.name)
def test_committed_store_holds_its_spec_yaml_with_the_papers_values(study_dir):
    spec = load_spec(study_dir / "spec.yaml")
    stored = stored_spec(study_dir)
    assert stored == spec.data
    paper = load_spec("paper").published
    published = parse_published(stored)
    if published is not None:  # the seed paper's numbers, keyed as the paper measured them
        for dataset, values in published.values.items():
            assert values == paper.values[dataset]
        assert published.how == paper.how
        assert parse_table(stored) is not None  # the published values sit in the paper's table


def test_the_paper_baseline_is_reported_like_for_like():
    stored = stored_spec(RESULTS / "paper-baseline")
    assert parse_published(stored).values["shakespeare_char"] == {
        "train_loss_last_batch": 0.8132,
        "best_val_loss": 1.4692,
    }
    assert parse_table(stored).metrics == (
        "train_loss_window",
        "best_val_loss",
        "train_loss",
        "val_loss_full",
    )


def test_the_committed_studies_are_there():
    expected = {"quick", "paper-baseline", "sweep", "placements", "neelakantan", "confirm", "transfer"}
    assert {path.name for path in STUDIES} >= expected


@pytest.mark.parametrize("study_dir", STUDIES, ids=lambda path: path.name)
def test_the_spec_still_expands_to_the_committed_runs(study_dir):
    # New config keys at their former value leave run ids as they were.
    stored_ids = {row[0] for row in read_committed(study_dir, "SELECT id FROM runs")}
    assert {run.run_id for run in load_spec(study_dir / "spec.yaml").runs} == stored_ids


def copied_store(study_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / study_dir.name
    copy.mkdir()
    shutil.copy(study_dir / "study.sqlite", copy / "study.sqlite")
    return copy


LM_STUDIES = [path for path in STUDIES if stored_spec(path).get("task", "lm") == "lm"]


@pytest.mark.parametrize("study_dir", LM_STUDIES, ids=lambda path: path.name)
def test_a_committed_lm_store_loads_and_reports_with_this_version(study_dir, tmp_path):
    copy = copied_store(study_dir, tmp_path)
    with Store(copy / "study.sqlite") as store:  # adds the columns written since
        analysis = analyze(load_study(store))
    assert analysis.summaries and all(row.done == row.runs for row in analysis.summaries)
    # Stored before train_loss_window was a final: read from the last train log line.
    assert all(row.summary("train_loss_window").n == row.done for row in analysis.summaries)
    report = write_report(copy)
    assert (report / "index.html").is_file()
    # Every run made by one code: one commit, or (made before runs recorded it) unknown for
    # every run alike; never a mix.
    code = r"(unknown|\d+\.\d+\.\d+\S* @ [0-9a-f]{12}) \(all \d+ finished runs\)"
    assert re.search(f"Runs made by code: {code}", (report / "report.md").read_text())
    assert re.search(f"\ncode: {code}", study_status(copy))


def test_the_committed_mnist_study_reports_with_this_version_from_one_commit(tmp_path):
    copy = copied_store(RESULTS / "neelakantan", tmp_path)
    text = (write_report(copy) / "report.md").read_text()
    # Every run from the one commit the study ran at, none left unfinished.
    assert "Runs made by code: 0.1.0 @ 856b46c1f148 (all 520 finished runs)" in text
    assert "520 runs: 516 done, 4 diverged, 0 failed, 0 not finished." in text
    # The paper's row beside ours: dropout without noise stays at chance (published 11.3 / 10.8).
    assert "| 1. Simple init, no clipping, dropout 0.5 (no noise) | 10.0 | 11.3 | 10.0 | 10.8 |" in text

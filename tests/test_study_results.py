"""The committed studies under results/: each store holds the spec beside it, and the
seed paper's published values and table reach their reports."""

import contextlib
import json
import sqlite3
from pathlib import Path

import pytest

from gradnoise.study.spec import load_spec, parse_published, parse_table

RESULTS = Path(__file__).resolve().parents[1] / "results"
STUDIES = sorted(path.parent for path in RESULTS.glob("*/study.sqlite"))


def stored_spec(study_dir: Path) -> dict:
    # Immutable: the test must not touch the committed file, nor leave -wal or -shm beside it.
    uri = f"file:{study_dir / 'study.sqlite'}?mode=ro&immutable=1"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        return json.loads(db.execute("SELECT spec FROM study WHERE id = 1").fetchone()[0])


@pytest.mark.parametrize("study_dir", STUDIES, ids=lambda path: path.name)
def test_committed_store_holds_its_spec_yaml_with_the_papers_values(study_dir):
    spec = load_spec(study_dir / "spec.yaml")
    stored = stored_spec(study_dir)
    assert stored == spec.data
    published = parse_published(stored)
    assert published.values["shakespeare_char"] == {"train_loss": 0.8132, "best_val_loss": 1.4692}
    assert parse_table(stored).metrics == ("train_loss", "val_loss")


def test_the_committed_studies_are_there():
    assert {path.name for path in STUDIES} >= {"quick", "paper-baseline"}

"""The SQLite store: API, no duplicates, one transaction per result, kill safety, concurrency."""

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

import gradnoise
from gradnoise.errors import UserError
from gradnoise.study.store import FINAL_METRICS, PROVENANCE_COLUMNS, Store, run_code, run_numerics

SPEC = {"name": "unit", "methods": {"baseline": {}}}


def result(val_loss: float, status: str = "done") -> dict:
    finals = dict.fromkeys(FINAL_METRICS, 0.5) | {"steps": 20, "best_val_step": 10}
    finals |= {"val_loss": val_loss, "test_loss_full": None, "gpu_memory_gb": 1.5}
    return {"status": status, "error": None, "device": "cpu", "host": "box", "finals": finals}


def curve(steps, loss=2.0) -> list[dict]:
    train = [
        {
            "kind": "train",
            "step": s,
            "loss": loss + s,
            "lr": 1e-3,
            "sigma": 0.01,
            "time_s": s / 10,
            "tokens_per_s": 100.0,
        }
        for s in steps
    ]
    evals = [
        {"kind": "eval", "step": s, "train_loss": loss, "val_loss": loss + 1, "time_s": s / 10}
        for s in steps
        if s % 10 == 0
    ]
    return train + evals


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "study.sqlite") as store:
        store.create_study("unit", SPEC)
        store.add_runs(
            [
                ("r1", "shakespeare_char", "baseline", 0, {"seed": 0}),
                ("r2", "shakespeare_char", "baseline", 1, {"seed": 1}),
            ]
        )
        yield store


def test_study_row_and_a_different_spec_is_refused(tmp_path, store):
    study = store.study()
    assert (study["name"], study["spec"]) == ("unit", SPEC)
    assert abs(study["created"] - time.time()) < 600
    store.create_study("unit", json.loads(json.dumps(SPEC)))  # the same spec again: fine
    with pytest.raises(UserError, match="different spec"):
        store.create_study("unit", {**SPEC, "seeds": 5})
    with pytest.raises(UserError, match="different spec"):
        store.create_study("other", SPEC)


def test_replace_spec_stores_the_new_version(tmp_path, store):
    newer = {**SPEC, "caveats": ["a new caveat"]}
    store.replace_spec(newer)
    assert store.study()["spec"] == newer
    with Store(tmp_path / "empty.sqlite") as empty, pytest.raises(UserError, match="holds no study"):
        empty.replace_spec(SPEC)


def test_wal_mode(store):
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_add_runs_never_duplicates_and_keeps_status(store):
    store.mark_running("r1", "box", "cpu")
    store.add_runs(
        [("r1", "shakespeare_char", "baseline", 0, {"seed": 0}), ("r3", "enwik8", "exp", 2, {"seed": 2})]
    )
    runs = {r["id"]: r for r in store.runs()}
    assert list(runs) == ["r1", "r2", "r3"]
    assert (runs["r1"]["status"], runs["r1"]["attempts"]) == ("running", 1)
    assert runs["r3"] | {"config": None} == {
        "id": "r3",
        "dataset": "enwik8",
        "method": "exp",
        "seed": 2,
        "status": "pending",
        "error": None,
        "config": None,
        "host": None,
        "device": None,
        "started": None,
        "finished": None,
        "attempts": 0,
        **dict.fromkeys(PROVENANCE_COLUMNS),
    }
    assert runs["r3"]["config"] == {"seed": 2}


def test_mark_running_counts_attempts(store):
    for expected in (1, 2, 3):
        store.mark_running("r1", f"host{expected}", "cuda:0")
        run = store.run("r1")
        assert (run["status"], run["attempts"], run["host"]) == ("running", expected, f"host{expected}")
        assert run["started"] is not None and run["finished"] is None


def test_record_result_writes_status_finals_and_curves(store):
    store.mark_running("r1", "box", "cpu")
    store.record_result("r1", result(1.25), curve(range(0, 30, 5)))
    run = store.run("r1")
    assert (run["status"], run["host"], run["device"]) == ("done", "box", "cpu")
    assert run["finished"] >= run["started"]
    (finals,) = store.finals()
    expected = result(1.25)["finals"]
    assert {k: finals[k] for k in expected} == expected  # every key, the extra one too
    assert (finals["id"], finals["method"], finals["seed"], finals["status"]) == ("r1", "baseline", 0, "done")
    assert isinstance(finals["steps"], int)
    points = store.curves(["r1"])
    assert len([p for p in points if p["kind"] == "train"]) == 6
    assert len([p for p in points if p["kind"] == "eval"]) == 3
    evaluation = next(p for p in points if p["kind"] == "eval" and p["step"] == 20)
    assert evaluation == {
        "run_id": "r1",
        "kind": "eval",
        "step": 20,
        "time_s": 2.0,
        "loss": None,
        "lr": None,
        "sigma": None,
        "tokens_per_s": None,
        "grad_norm": None,
        "noise_norm": None,
        "noise_to_grad": None,
        "train_loss": 2.0,
        "val_loss": 3.0,
        "test_loss": None,
        "test_acc": None,  # logged by the MNIST task's evals
    }
    assert store.curves(["r2"]) == []
    assert store.counts() == {"pending": 1, "running": 0, "done": 1, "failed": 0, "diverged": 0}


# The schema of stores written before the gradient statistics and the last-batch finals.
OLD_SCHEMA = """
CREATE TABLE study (id INTEGER PRIMARY KEY CHECK (id = 1), name TEXT NOT NULL, spec TEXT NOT NULL,
    created REAL NOT NULL);
CREATE TABLE runs (id TEXT PRIMARY KEY, dataset TEXT NOT NULL, method TEXT NOT NULL,
    seed INTEGER NOT NULL, status TEXT NOT NULL, error TEXT, config TEXT NOT NULL, host TEXT,
    device TEXT, started REAL, finished REAL, attempts INTEGER NOT NULL DEFAULT 0);
CREATE TABLE curves (run_id TEXT NOT NULL REFERENCES runs(id), kind TEXT NOT NULL,
    step INTEGER NOT NULL, time_s REAL, loss REAL, lr REAL, sigma REAL, tokens_per_s REAL,
    train_loss REAL, val_loss REAL, test_loss REAL, PRIMARY KEY (run_id, kind, step));
CREATE TABLE finals (run_id TEXT PRIMARY KEY REFERENCES runs(id), steps INTEGER, train_loss REAL,
    val_loss REAL, best_val_loss REAL, best_val_step INTEGER, val_loss_full REAL,
    test_loss_full REAL, train_bpc REAL, val_bpc REAL, best_val_bpc REAL, val_bpc_full REAL,
    test_bpc_full REAL, wall_s REAL, train_s REAL, step_time_median_s REAL, tokens_per_s REAL,
    final_sigma REAL, extra TEXT NOT NULL DEFAULT '{}');
INSERT INTO study VALUES (1, 'unit', '{"methods":{"baseline":{}},"name":"unit"}', 0);
INSERT INTO runs (id, dataset, method, seed, status, config) VALUES
    ('old', 'shakespeare_char', 'baseline', 0, 'done', '{}');
INSERT INTO curves (run_id, kind, step, loss, sigma) VALUES ('old', 'train', 10, 2.5, 0.01);
INSERT INTO finals (run_id, steps, val_loss, extra) VALUES ('old', 20, 1.75, '{"test_loss": null}');
"""


def test_an_older_store_gets_the_new_columns_and_keeps_its_rows(tmp_path):
    path = tmp_path / "study.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
    with Store(path) as store:
        (point,) = store.curves(["old"])
        assert (point["loss"], point["sigma"]) == (2.5, 0.01)
        assert (point["grad_norm"], point["noise_norm"], point["noise_to_grad"]) == (None, None, None)
        assert point["test_acc"] is None
        (finals,) = store.finals()
        assert (finals["steps"], finals["val_loss"]) == (20, 1.75)
        assert finals["train_loss_last_batch"] is None and finals["parameters"] is None
        # The migrated store takes results with the new values.
        store.add_runs([("new", "shakespeare_char", "baseline", 1, {})])
        new_point = {"kind": "train", "step": 10, "loss": 2.0, "grad_norm": 0.75, "noise_norm": 0.0}
        store.record_result(
            "new", result(1.5) | {"finals": result(1.5)["finals"] | {"parameters": 7}}, [new_point]
        )
        assert store.curves(["new"])[0]["grad_norm"] == 0.75
        assert [f["parameters"] for f in store.finals()] == [None, 7]
    with Store(path) as store:  # opening it again adds nothing and loses nothing
        assert len(store.finals()) == 2
    with sqlite3.connect(path) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(curves)")]
    assert columns.count("grad_norm") == 1 and columns.count("test_acc") == 1
    assert columns[-4:] == ["grad_norm", "noise_norm", "noise_to_grad", "test_acc"]


def test_recording_a_run_again_replaces_never_duplicates(store):
    store.record_result("r1", result(1.5), curve(range(0, 20, 5)))
    store.record_result("r1", result(1.25), curve(range(0, 30, 5), loss=7.0))
    assert [f["val_loss"] for f in store.finals()] == [1.25]
    keys = [(p["kind"], p["step"]) for p in store.curves()]
    assert len(keys) == len(set(keys)) == 6 + 3
    assert {p["loss"] for p in store.curves() if p["kind"] == "train" and p["step"] == 5} == {12.0}


def test_failure_and_divergence(store):
    store.mark_running("r1", "box", "cpu")
    store.record_failure("r1", "Traceback\nRuntimeError: boom")
    store.record_result("r2", result(float("nan"), "diverged") | {"error": "loss is nan"}, curve([0]))
    runs = {r["id"]: r for r in store.runs()}
    assert (runs["r1"]["status"], runs["r1"]["error"]) == ("failed", "Traceback\nRuntimeError: boom")
    assert (runs["r2"]["status"], runs["r2"]["error"]) == ("diverged", "loss is nan")
    assert [(f["id"], f["status"]) for f in store.finals()] == [("r2", "diverged")]
    with pytest.raises(ValueError, match="status"):
        store.record_result("r1", {"status": "failed", "finals": {}}, [])
    with pytest.raises(KeyError):
        store.record_failure("nope", "x")


def test_a_result_that_fails_midway_leaves_nothing(store):
    store.mark_running("r1", "box", "cpu")
    bad_curves = [*curve(range(3)), {"kind": "train", "step": 99, "loss": {"not": "a number"}}]
    with pytest.raises(sqlite3.Error):
        store.record_result("r1", result(1.0), bad_curves)
    assert store.run("r1")["status"] == "running"
    assert store.finals() == [] and store.curves() == []


def test_readers_see_writes_from_another_connection(tmp_path, store):
    with Store(tmp_path / "study.sqlite") as reader:
        assert reader.counts()["done"] == 0
        store.record_result("r1", result(1.0), curve([0, 10]))
        assert reader.counts()["done"] == 1 and len(reader.curves()) == 4


def test_missing_study_row_is_a_user_error(tmp_path):
    with Store(tmp_path / "empty.sqlite") as empty, pytest.raises(UserError, match="no study"):
        empty.study()


# The writer skips gradnoise/__init__ (it imports torch: seconds); the store needs none of it.
WRITER = f"""
import sys, types
from pathlib import Path
package = types.ModuleType("gradnoise")
package.__path__ = {list(gradnoise.__path__)!r}
sys.modules["gradnoise"] = package
""" + textwrap.dedent(
    """
    from gradnoise.study.store import Store, FINAL_METRICS

    store = Store(Path(sys.argv[1]))
    store.create_study("load", {"name": "load"})
    n = int(sys.argv[2])
    store.add_runs([(f"r{i}", "shakespeare_char", "m", i, {"i": i}) for i in range(n)])
    for i in range(n):
        store.mark_running(f"r{i}", "box", "cpu")
        points = [{"kind": "train", "step": s, "loss": float(i)} for s in range(200)]
        finals = dict.fromkeys(FINAL_METRICS, float(i))
        store.record_result(f"r{i}", {"status": "done", "finals": finals}, points)
        print(i, flush=True)
    """
)


def check_consistent(path, n: int) -> int:
    """Each run has either everything (done, finals, 200 points) or nothing; returns # done."""
    with Store(path) as store:
        runs = store.runs()
        finals = {f["id"] for f in store.finals()}
        points = {}
        for p in store.curves():
            points[p["run_id"]] = points.get(p["run_id"], 0) + 1
    assert len(runs) == n
    done = 0
    for run in runs:
        if run["status"] == "done":
            done += 1
            assert run["id"] in finals and points.get(run["id"]) == 200, run
        else:
            assert run["id"] not in finals and run["id"] not in points, run
    return done


def test_sigkill_while_writing_leaves_each_run_all_or_nothing(tmp_path):
    path = tmp_path / "study.sqlite"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), "2000"], stdout=subprocess.PIPE, text=True
    )
    for _ in range(30):  # let it record a few runs, then kill it mid-stream
        writer.stdout.readline()
    time.sleep(0.05)  # not at the print: somewhere in a later run's writes
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert check_consistent(path, 2000) >= 30


def test_two_stores_written_concurrently(tmp_path):
    paths = [tmp_path / "a" / "study.sqlite", tmp_path / "b" / "study.sqlite"]
    writers = []
    for path in paths:
        path.parent.mkdir()
        writers.append(
            subprocess.Popen([sys.executable, "-c", WRITER, str(path), "60"], stdout=subprocess.DEVNULL)
        )
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    assert [check_consistent(path, 60) for path in paths] == [60, 60]


def test_readers_write_nothing_not_even_a_schema(tmp_path):
    empty = tmp_path / "study.sqlite"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="holds no study"):
        Store(empty, readonly=True)
    assert empty.read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.sqlite"]


def test_a_reader_sees_columns_an_older_store_lacks_as_none(tmp_path):
    path = tmp_path / "study.sqlite"
    with Store(path) as store:
        store.create_study("s", {"name": "s"})
        store.add_runs([("r1", "shakespeare_char", "baseline", 0, {})])
        store.record_result(
            "r1",
            {"status": "done", "finals": {"val_loss": 1.5}},
            [{"kind": "eval", "step": 0, "val_loss": 2.0}],
        )
        store._db.execute("ALTER TABLE finals DROP COLUMN final_sigma")
        store._db.execute("ALTER TABLE curves DROP COLUMN val_loss")
    before = path.read_bytes()
    with Store(path, readonly=True) as reader:
        assert reader.finals()[0]["val_loss"] == 1.5
        assert reader.finals()[0]["final_sigma"] is None
        assert reader.curves()[0]["val_loss"] is None
    assert path.read_bytes() == before


def test_reading_a_finished_study_leaves_no_files_beside_it(tmp_path):
    path = tmp_path / "study.sqlite"
    with Store(path) as store:
        store.create_study("s", {"name": "s"})
        store.add_runs([("r1", "shakespeare_char", "baseline", 0, {})])
    with Store(path, readonly=True) as reader:
        assert len(reader.runs()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.sqlite"]


MADE_BY = {
    "code": {"version": "0.1.0", "commit": "c" * 40, "dirty": False, "source_sha256": "s" * 64},
    "numerics": {
        "torch": "2.13.0",
        "device": "cpu",
        "device_model": "Some CPU",
        "dtype": "float32",
        "threads": 2,
        "compile": False,
        "replicas": 1,
    },
    "attempts": 1,
    "consistent": True,
}


def test_a_result_is_stored_with_what_made_it(store):
    store.record_result("r1", result(1.5) | {"provenance": MADE_BY}, [])
    store.record_result("r2", result(1.5), [])  # a result without one: unknown
    rows = {r["id"]: r for r in store.runs()}
    assert run_code(rows["r1"]) == MADE_BY["code"]
    assert run_numerics(rows["r1"]) == {k: v for k, v in MADE_BY["numerics"].items() if k != "device"}
    assert rows["r1"]["provenance_consistent"] == 1
    assert run_code(rows["r2"]) is None and run_numerics(rows["r2"]) is None


def test_an_older_store_reads_its_runs_code_as_unknown_and_takes_new_ones(tmp_path):
    path = tmp_path / "study.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
    before = path.read_bytes()
    with Store(path, readonly=True) as reader:
        (row,) = reader.runs()
        assert row["code_sha256"] is None and run_code(row) is None
    assert path.read_bytes() == before
    with Store(path) as store:
        store.add_runs([("new", "shakespeare_char", "baseline", 1, {})])
        store.record_result("new", result(1.5) | {"provenance": MADE_BY}, [])
        codes = [run_code(r) for r in store.runs()]
    assert codes == [None, MADE_BY["code"]]
    with sqlite3.connect(path) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(runs)")]
    assert columns[-len(PROVENANCE_COLUMNS) :] == list(PROVENANCE_COLUMNS)

"""Running studies for real (tiny models, worker subprocesses): skip, resume, failure, kills,
concurrent studies, and the `gradnoise study` CLI."""

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from gradnoise.cli import main
from gradnoise.errors import UserError
from gradnoise.lm.storage.runlog import read_curves
from gradnoise.study.runner import run_study, study_status
from gradnoise.study.spec import load_spec, parse_spec
from gradnoise.study.store import Store
from helpers.configs import STUDY
from helpers.studies import latest_checkpoint_step, log_lines, processes_with, wait_for, write_spec

TINY = STUDY
# Passes validation, fails in the trainer: the val split is shorter than one block.
FAILING = {"block_size": 200_000}
# Long enough to be killed after its first checkpoint, short enough to finish soon after.
LONG = {"max_iters": 500, "eval_interval": 250, "log_interval": 10, "checkpoint_interval": 20}


def worker_pids(run_dir: Path) -> list[int]:
    """Processes training into run_dir."""
    return processes_with("train", str(run_dir))


def assert_one_row_per_run_and_no_duplicate_curves(study_dir: Path, spec) -> None:
    with Store(study_dir / "study.sqlite") as store:
        runs, curves = store.runs(), store.curves()
    assert sorted(r["id"] for r in runs) == sorted(r.run_id for r in spec.runs)
    keys = [(p["run_id"], p["kind"], p["step"]) for p in curves]
    assert len(keys) == len(set(keys))


# ---- a finished study: results, failure, re-run, report ------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """baseline and exp (2 seeds each) plus a method that fails at run time, run with 3 jobs."""
    root = tmp_path_factory.mktemp("finished")
    methods = {"baseline": {}, "exp": {"noise": "exp:sigma0=0.01,gamma=0.9"}, "broken": FAILING}
    spec = load_spec(write_spec(root, "finished", methods, seeds=2))
    summary = run_study(spec, root / "study", jobs=3, progress=False)
    return spec, root / "study", summary


def test_study_runs_every_run_and_stores_its_results(finished):
    spec, study_dir, summary = finished
    assert (summary["total"], summary["done"], summary["failed"], summary["ran"]) == (6, 4, 2, 6)
    assert yaml.safe_load((study_dir / "spec.yaml").read_text()) == spec.data
    with Store(study_dir / "study.sqlite") as store:
        assert store.study()["spec"] == spec.data
        runs = {r["id"]: r for r in store.runs()}
        finals = {f["id"]: f for f in store.finals()}
        curves = store.curves()
    for run in spec.runs:
        row = runs[run.run_id]
        assert (row["dataset"], row["method"], row["seed"]) == (run.dataset, run.method, run.seed)
        assert row["config"] == run.config.to_dict()
        if run.method == "broken":
            continue
        assert row["status"] == "done" and row["attempts"] == 1 and row["host"]
        run_dir = study_dir / "runs" / run.run_id
        result = json.loads((run_dir / "result.json").read_text())
        assert finals[run.run_id]["val_loss"] == result["finals"]["val_loss"]
        assert finals[run.run_id]["steps"] == TINY["max_iters"]
        mine = {(p["kind"], p["step"]) for p in curves if p["run_id"] == run.run_id}
        assert mine == {(p["kind"], p["step"]) for p in read_curves(run_dir)}
        assert {s for k, s in mine if k == "eval"} == {0, 10, 20}
        assert {s for k, s in mine if k == "train"} == {5, 10, 15, 20}
    # Paired seeds: the same seed gives the same initial loss whatever the method.
    first_eval = {
        (runs[p["run_id"]]["method"], runs[p["run_id"]]["seed"]): p["val_loss"]
        for p in curves
        if p["kind"] == "eval" and p["step"] == 0
    }
    for seed in (0, 1):
        assert first_eval[("baseline", seed)] == first_eval[("exp", seed)]


def test_failing_run_is_recorded_with_its_error_and_the_study_goes_on(finished):
    _, study_dir, _ = finished
    with Store(study_dir / "study.sqlite") as store:
        broken = [r for r in store.runs() if r["method"] == "broken"]
    assert [r["status"] for r in broken] == ["failed", "failed"]
    for row in broken:
        assert "exited with status 2" in row["error"]
        assert "block_size=200000" in row["error"]  # the tail of the trainer's stderr
    assert "failed (run again" in study_status(study_dir)


def test_rerun_skips_finished_runs_retries_failed_ones_and_records_unrecorded_ones(finished):
    """Besides the skips and retries, one run is made to look as if the driver died between
    its end and its recording: the next driver records it from result.json and log.jsonl
    without training it again."""
    spec, study_dir, _ = finished
    unrecorded = next(r for r in spec.runs if r.method == "exp")
    run_dir = study_dir / "runs" / unrecorded.run_id
    with Store(study_dir / "study.sqlite") as store:
        before = {r["id"]: r for r in store.runs()}
        finals_before = store.finals()
        curves_before = store.curves()
        store._db.execute("DELETE FROM curves WHERE run_id = ?", (unrecorded.run_id,))
        store._db.execute("DELETE FROM finals WHERE run_id = ?", (unrecorded.run_id,))
        store._db.execute("UPDATE runs SET status = 'running' WHERE id = ?", (unrecorded.run_id,))
    log_before = log_lines(run_dir)

    summary = run_study(spec, study_dir, jobs=2, progress=False)
    assert (summary["skipped"], summary["recovered"], summary["ran"]) == (3, 1, 2)
    assert (summary["done"], summary["failed"]) == (4, 2)
    with Store(study_dir / "study.sqlite") as store:
        after = {r["id"]: r for r in store.runs()}
        assert store.finals() == finals_before
        assert sorted(store.curves(), key=str) == sorted(curves_before, key=str)
    assert log_lines(run_dir) == log_before  # not trained again
    for run_id, row in after.items():
        if row["method"] == "broken":
            assert row["attempts"] == before[run_id]["attempts"] + 1
        elif run_id == unrecorded.run_id:
            assert row["attempts"] == before[run_id]["attempts"]
        else:
            assert row == before[run_id]  # attempts, started and finished untouched
    assert_one_row_per_run_and_no_duplicate_curves(study_dir, spec)


def test_cli_report_and_status(finished, capsys):
    _, study_dir, _ = finished
    assert main(["study", "report", str(study_dir)]) == 0
    assert (study_dir / "report" / "index.html").is_file()
    assert main(["study", "status", str(study_dir)]) == 0
    status = capsys.readouterr().out
    assert "6 runs" in status and "4 done" in status and "2 failed" in status


def test_a_different_study_in_the_same_directory_is_refused(finished, tmp_path):
    spec, study_dir, _ = finished
    before = (study_dir / "study.sqlite").read_bytes()
    other = write_spec(tmp_path, "finished", {"baseline": {}}, seeds=2)
    with pytest.raises(UserError, match="different spec"):
        run_study(load_spec(other), study_dir, progress=False)
    same = tmp_path / "same.yaml"
    same.write_text(yaml.safe_dump(spec.data))
    with pytest.raises(UserError, match="different spec"):  # the same spec with --set
        run_study(load_spec(same, {"max_iters": 5}), study_dir, progress=False)
    assert (study_dir / "study.sqlite").read_bytes() == before


def test_a_spec_changed_in_its_report_keys_alone_is_taken_without_running(finished, tmp_path):
    """How a study gets published values (or new caveats) after it ran: run its spec again."""
    spec, study_dir, _ = finished
    data = yaml.safe_load((study_dir / "spec.yaml").read_text())
    data["caveats"] = ["a caveat added later"]
    data["published"] = {"source": "a paper", "values": {"shakespeare_char": {"val_loss": 1.47}}}
    data["table"] = {"title": "Table 1", "metrics": ["val_loss"]}
    path = tmp_path / "later.yaml"
    path.write_text(yaml.safe_dump(data))
    with Store(study_dir / "study.sqlite") as store:
        runs_before = store.runs()

    summary = run_study(path, study_dir, progress=False)
    assert (summary["ran"], summary["done"]) == (2, 4)  # the broken runs only, failing again
    assert yaml.safe_load((study_dir / "spec.yaml").read_text()) == data
    with Store(study_dir / "study.sqlite") as store:
        assert store.study()["spec"] == data
        assert [r["attempts"] for r in store.runs() if r["status"] == "done"] == [
            r["attempts"] for r in runs_before if r["status"] == "done"
        ]
    assert main(["study", "report", str(study_dir)]) == 0
    markdown = (study_dir / "report" / "report.md").read_text()
    assert "a caveat added later" in markdown and "## Table 1" in markdown
    assert "Published values (a paper) beside baseline's, like for like" in markdown
    assert "| shakespeare_char | final val loss, estimate | 1.4700 |" in markdown
    # The original spec is a report-key change too, back again.
    run_study(spec, study_dir, progress=False)
    with Store(study_dir / "study.sqlite") as store:
        assert store.study()["spec"] == spec.data


# ---- kills ---------------------------------------------------------------------------------


def test_worker_killed_midway_resumes_from_its_checkpoint(tmp_path):
    path = write_spec(tmp_path, "killworker", {"baseline": {}}, overrides=LONG)
    spec = load_spec(path)
    study_dir = tmp_path / "study"
    run_dir = study_dir / "runs" / spec.runs[0].run_id
    with ThreadPoolExecutor(1) as pool:  # the driver, in this process
        driver = pool.submit(run_study, spec, study_dir, progress=False)
        wait_for(lambda: latest_checkpoint_step(run_dir), what="a checkpoint")
        (pid,) = worker_pids(run_dir)
        os.kill(pid, signal.SIGKILL)
        summary = driver.result(timeout=120)
    assert (summary["failed"], summary["done"]) == (1, 0)
    with Store(study_dir / "study.sqlite") as store:
        row = store.runs()[0]
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert "killed by SIGKILL" in row["error"]

    checkpoint_step = latest_checkpoint_step(run_dir)
    assert 0 < checkpoint_step < LONG["max_iters"]
    kept = log_lines(run_dir, checkpoint_step)
    summary = run_study(path, study_dir, progress=False)
    assert (summary["done"], summary["ran"]) == (1, 1)
    # Resumed, not restarted: the lines logged before the checkpoint (with their measured
    # times) are still there, and training went on to the end.
    assert log_lines(run_dir, checkpoint_step) == kept
    assert json.loads(log_lines(run_dir)[-1])["step"] == LONG["max_iters"]
    with Store(study_dir / "study.sqlite") as store:
        row = store.runs()[0]
        assert (row["status"], row["attempts"]) == ("done", 2)
        assert store.finals()[0]["steps"] == LONG["max_iters"]
    assert_one_row_per_run_and_no_duplicate_curves(study_dir, spec)


def test_driver_killed_midway_stops_its_workers_and_the_study_resumes(tmp_path):
    path = write_spec(tmp_path, "killdriver", {"baseline": {}}, overrides=LONG)
    spec = load_spec(path)
    study_dir = tmp_path / "study"
    run_dir = study_dir / "runs" / spec.runs[0].run_id
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gradnoise",
            "study",
            "run",
            str(path),
            "--dir",
            str(study_dir),
            "--no-progress",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: latest_checkpoint_step(run_dir), what="a checkpoint")
    assert len(worker_pids(run_dir)) == 1
    # While the driver lives: a second driver is refused, and status shows the live run.
    later = yaml.safe_load(path.read_text()) | {"caveats": ["added while the driver runs"]}
    with pytest.raises(UserError, match="another `gradnoise study run`"):
        run_study(parse_spec(later), study_dir, progress=False)
    with Store(study_dir / "study.sqlite") as store:
        assert store.study()["spec"] == spec.data  # the refused driver changed nothing
    assert "running:" in study_status(study_dir) and "step" in study_status(study_dir)

    driver.send_signal(signal.SIGKILL)
    driver.wait()
    # The orphaned worker is told to stop (SIGTERM: checkpoint, then exit).
    wait_for(lambda: not worker_pids(run_dir), timeout=60, what="the worker to exit")
    assert "interrupted (resume with" in study_status(study_dir)
    with Store(study_dir / "study.sqlite") as store:
        assert store.runs()[0]["status"] == "running"

    checkpoint_step = latest_checkpoint_step(run_dir)
    kept = log_lines(run_dir, checkpoint_step)
    summary = run_study(path, study_dir, progress=False)
    assert summary["done"] == 1
    assert log_lines(run_dir, checkpoint_step) == kept
    with Store(study_dir / "study.sqlite") as store:
        assert [(r["status"], r["attempts"]) for r in store.runs()] == [("done", 2)]
    assert_one_row_per_run_and_no_duplicate_curves(study_dir, spec)


# Killed after its first checkpoint (step 20) with 100 steps to go.
SHORTER = {**LONG, "max_iters": 120}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--jobs 1 and 2 give one thread alike")
def test_a_study_resumed_with_other_jobs_ends_as_the_uninterrupted_one(tmp_path, monkeypatch):
    # The executor's own thread count, cores // jobs: --jobs 1 and 2 train on different counts.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    path = write_spec(tmp_path, "rejobs", {"baseline": {"noise": "const:sigma=0.01"}}, overrides=SHORTER)
    spec = load_spec(path)
    run_id = spec.runs[0].run_id
    run_study(spec, tmp_path / "whole", jobs=1, progress=False)
    run_dir = tmp_path / "parts" / "runs" / run_id
    with ThreadPoolExecutor(1) as pool:
        driver = pool.submit(run_study, spec, tmp_path / "parts", jobs=1, progress=False)
        wait_for(lambda: latest_checkpoint_step(run_dir), what="a checkpoint")
        (pid,) = worker_pids(run_dir)
        os.kill(pid, signal.SIGKILL)
        driver.result(timeout=120)
    assert 0 < latest_checkpoint_step(run_dir) < SHORTER["max_iters"]
    summary = run_study(spec, tmp_path / "parts", jobs=2, progress=False)
    assert (summary["done"], summary["ran"]) == (1, 1)

    def ended(study_dir):
        with Store(study_dir / "study.sqlite") as store:
            (finals,) = store.finals()
            (row,) = store.runs()
        attempts = json.loads((study_dir / "runs" / run_id / "provenance.json").read_text())["attempts"]
        return finals, row, [a["numerics"]["threads"] for a in attempts]

    whole, whole_row, whole_threads = ended(tmp_path / "whole")
    parts, parts_row, parts_threads = ended(tmp_path / "parts")
    for key in ("train_loss", "val_loss", "best_val_loss", "train_loss_window", "final_sigma"):
        assert parts[key] == whole[key], key
    # The resume (under --jobs 2) kept the thread count the run was checkpointed with.
    assert whole_threads == [len(os.sched_getaffinity(0))]
    assert parts_threads == whole_threads * 2
    assert parts_row["threads"] == whole_row["threads"] and parts_row["provenance_consistent"] == 1


# ---- concurrency and the CLI -----------------------------------------------------------------


def test_two_studies_run_concurrently_into_separate_stores(tmp_path):
    """Two `gradnoise study run` at once; the second with --set and its default --dir."""
    first = write_spec(tmp_path, "first", {"baseline": {}, "exp": {"noise": "const:sigma=0.001"}})
    second = write_spec(tmp_path, "second", {"baseline": {}})
    commands = [
        ["study", "run", str(first), "--dir", str(tmp_path / "first"), "--jobs", "2"],
        ["study", "run", str(second), "--set", "max_iters=10"],  # into ./studies/second
    ]
    drivers = [
        subprocess.Popen(
            [sys.executable, "-m", "gradnoise", *command, "--no-progress"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    outputs = [driver.communicate(timeout=300) for driver in drivers]
    for driver, (_, stderr) in zip(drivers, outputs, strict=True):
        assert driver.returncode == 0, stderr
    # The summary is a message (logging, stderr), not a result.
    assert "2 done" in outputs[0][1] and "1 done" in outputs[1][1]
    with Store(tmp_path / "first" / "study.sqlite") as store:
        assert store.study()["name"] == "first"
        assert [r["status"] for r in store.runs()] == ["done", "done"]
        assert [f["steps"] for f in store.finals()] == [TINY["max_iters"]] * 2
    second_dir = tmp_path / "studies" / "second"
    assert yaml.safe_load((second_dir / "spec.yaml").read_text())["set"] == {"max_iters": 10}
    with Store(second_dir / "study.sqlite") as store:
        assert store.study()["name"] == "second"
        assert [f["steps"] for f in store.finals()] == [10]


def test_cli_list_shows_each_packaged_spec_with_its_run_count(capsys):
    assert main(["study", "list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    # quick: 5 methods × 3 seeds; paper-small: 7 × 3 (issue 4).
    assert " 15 runs" in lines["quick"] and " 21 runs" in lines["paper-small"]
    assert "paper" in lines


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "max_itres=5"], "max_iters"),
        (["--set", "dropout=2"], "dropout"),
        (["--jobs", "0"], "jobs"),
        (["--devices", "gpu0"], "cuda:N"),
        (["--devices", "cuda:99"], "do not exist"),
        (["--address", "auto"], "--executor ray"),
        (["--per-device", "2"], "needs devices"),
        (["--devices", "cpu", "--jobs", "2"], "one or the other"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    study_dir = tmp_path / "never"
    assert main(["study", "run", "quick", "--dir", str(study_dir), *args]) == 2
    assert message in capsys.readouterr().err
    assert not study_dir.exists()


def test_directory_that_is_not_a_study_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    spec = load_spec(write_spec(tmp_path, "x", {"baseline": {}}))
    with pytest.raises(UserError, match="not empty and holds no study"):
        run_study(spec, tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "x.yaml"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_share_a_gpu_with_per_device(tmp_path):
    spec = load_spec(write_spec(tmp_path, "gpu", {"baseline": {}, "exp": {"noise": "const:sigma=0.001"}}))
    summary = run_study(spec, tmp_path / "study", devices=["cuda:0"], per_device=2, progress=False)
    assert summary["done"] == 2
    with Store(tmp_path / "study" / "study.sqlite") as store:
        assert all(r["device"].startswith("cuda:0 ") for r in store.runs())
    for run in spec.runs:
        run_dir = tmp_path / "study" / "runs" / run.run_id
        assert json.loads((run_dir / "config.json").read_text())["device"] == "cuda"
        assert "cuda" in json.loads((run_dir / "result.json").read_text())["device"].lower()

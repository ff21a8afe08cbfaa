"""Studies with --batch-models: which runs share a process, the command lines, and that a
batched study stores the same per-run rows as one run per process, through kills."""

import json
import math
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from gradnoise.cli import main
from gradnoise.lm.storage import checkpoint
from gradnoise.lm.training.group import read_group
from gradnoise.study import local_executor
from gradnoise.study.plan import group_directory, plan_groups, run_directory
from gradnoise.study.runner import run_study
from gradnoise.study.spec import load_spec, parse_spec
from gradnoise.study.store import Store
from helpers import configs
from helpers.studies import latest_checkpoint_step, log_lines, processes_with, wait_for

# The tiny study, pinned to the CPU (groups are formed per device).
TINY = {**configs.STUDY, "device": "cpu"}
# Long enough to be killed after its first checkpoint, short enough to finish soon after.
LONG = {"max_iters": 200, "eval_interval": 100, "log_interval": 10, "checkpoint_interval": 20}
# Per-replica settings (the noise, weight decay) may share a process; the learning rate may not.
METHODS = {
    "baseline": {},
    "exp": {"noise": "exp:sigma0=0.01,gamma=0.9"},
    "wd": {"weight_decay": 0.2},
    "huge": {"noise": "const:sigma=1e30"},  # AdamW's second moment overflows: diverges at once
    "lr": {"lr": 2e-3},
}
# Runs of one process may differ in floating-point reassociation only (dropout is 0).
TOLERANCE = 1e-3


def spec_data(name: str, methods: dict, seeds: int, datasets=("shakespeare_char",), overrides=None) -> dict:
    return {
        "name": name,
        "preset": "tiny",
        "datasets": list(datasets),
        "seeds": seeds,
        "overrides": {**TINY, **(overrides or {})},
        "methods": methods,
    }


def write_spec(directory: Path, data: dict) -> Path:
    path = directory / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


commands: list[list[str]] = []


def labels(group) -> list[tuple[str, str, int]]:
    return [(run.dataset, run.method, run.seed) for run in group.members]


# ---- the plan ------------------------------------------------------------------------------


@pytest.fixture
def planned():
    """5 methods × 3 seeds on shakespeare_char, × 1 seed on enwik8 (not trained here)."""
    data = spec_data("plan", METHODS, seeds=3, datasets=("shakespeare_char", "enwik8"))
    data["dataset_overrides"] = {"enwik8": {"seeds": 1}}
    return parse_spec(data)


def test_runs_differing_only_in_per_replica_settings_share_groups_of_at_most_m(planned, tmp_path):
    groups = plan_groups(list(planned.runs), list(planned.runs), tmp_path, batch_models=4)
    s, e = "shakespeare_char", "enwik8"
    # In the spec's order (dataset, seed, method); a different lr or dataset is another group.
    assert [labels(g) for g in groups] == [
        [(s, "baseline", 0), (s, "exp", 0), (s, "wd", 0), (s, "huge", 0)],
        [(s, "lr", 0), (s, "lr", 1), (s, "lr", 2)],
        [(s, "baseline", 1), (s, "exp", 1), (s, "wd", 1), (s, "huge", 1)],
        [(s, "baseline", 2), (s, "exp", 2), (s, "wd", 2), (s, "huge", 2)],
        [(e, "baseline", 0), (e, "exp", 0), (e, "wd", 0), (e, "huge", 0)],
        [(e, "lr", 0)],
    ]
    assert all(g.todo == g.members for g in groups)
    # A group of one is a run alone; the others have distinct ids.
    ids = [g.group_id for g in groups]
    assert ids[-1] is None and None not in ids[:-1] and len(set(ids)) == len(ids)
    # Planned again, the same groups.
    assert plan_groups(list(planned.runs), list(planned.runs), tmp_path, batch_models=4) == groups

    three = plan_groups(list(planned.runs), list(planned.runs), tmp_path, batch_models=3)
    assert [len(g.members) for g in three] == [3, 3, 3, 3, 3, 3, 1, 1]  # enwik8: 3 + 1, and lr
    assert labels(three[0]) == [(s, "baseline", 0), (s, "exp", 0), (s, "wd", 0)]
    assert labels(three[1]) == [(s, "huge", 0), (s, "baseline", 1), (s, "exp", 1)]


def test_batch_models_1_trains_every_run_alone_in_spec_order(planned, tmp_path):
    groups = plan_groups(list(planned.runs), list(planned.runs), tmp_path, batch_models=1)
    assert [g.group_id for g in groups] == [None] * len(planned.runs)
    assert [g.members for g in groups] == [(run,) for run in planned.runs]


def test_a_launched_group_is_launched_again_whole_and_a_run_with_its_own_checkpoint_alone(planned, tmp_path):
    runs = list(planned.runs)
    first = plan_groups(runs, runs, tmp_path, batch_models=4)
    with local_executor.LocalExecutor(tmp_path, [None]) as local:
        local.prepare(first[0])  # writes its group.json: the group is launched
    # Its first run finished, the rest was killed; another run trained alone before.
    finished = first[0].members[0]
    alone = first[2].members[1]
    make_checkpoint(run_directory(tmp_path, alone.run_id))
    todo = [run for run in runs if run is not finished]

    for batch_models in (4, 1):  # a launched group keeps its runs whatever M is now
        again = plan_groups(todo, runs, tmp_path, batch_models=batch_models)
        assert again[0].group_id == first[0].group_id
        assert again[0].members == first[0].members
        assert again[0].todo == first[0].members[1:]
        assert [g.members for g in again].count((alone,)) == 1
        assert sorted(r.run_id for g in again for r in g.todo) == sorted(r.run_id for r in todo)
    s = "shakespeare_char"
    # The others are grouped afresh, M at a time, in the order of their first run.
    assert [labels(g) for g in plan_groups(todo, runs, tmp_path, batch_models=4)[1:5]] == [
        [(s, "lr", 0), (s, "lr", 1), (s, "lr", 2)],
        [(s, "baseline", 1), (s, "wd", 1), (s, "huge", 1), (s, "baseline", 2)],
        [(s, "exp", 1)],
        [(s, "exp", 2), (s, "wd", 2), (s, "huge", 2)],
    ]


def make_checkpoint(run_dir: Path) -> None:
    """The files `checkpoint.latest` looks for (contents unread by the planner)."""
    step_dir = run_dir / checkpoint.CHECKPOINTS / "step_0000010"
    step_dir.mkdir(parents=True)
    (step_dir / checkpoint.WEIGHTS).write_bytes(b"")
    (step_dir / checkpoint.STATE).write_bytes(b"")
    (run_dir / checkpoint.CHECKPOINTS / checkpoint.LATEST).write_text(step_dir.name)


class FakeProcess:
    """A Popen that records its command in `commands` and never runs."""

    def __init__(self, command, **options):
        commands.append(command)

    def poll(self):
        return None


def test_command_lines_alone_unchanged_and_a_group_as_one_process(planned, tmp_path, monkeypatch):
    monkeypatch.setattr(local_executor.subprocess, "Popen", FakeProcess)
    commands.clear()
    runs = [run for run in planned.runs if run.dataset == "shakespeare_char" and run.seed == 0]
    alone = plan_groups(runs, runs, tmp_path, batch_models=1)[0]
    group = plan_groups(runs, runs, tmp_path, batch_models=4)[0]
    with local_executor.LocalExecutor(tmp_path, [None, None]) as local:
        local.submit(local.prepare(alone))
        local.submit(local.prepare(group))
    run_dir = tmp_path / "runs" / alone.members[0].run_id
    group_dir = tmp_path / "groups" / group.group_id
    python = [sys.executable, "-m", "gradnoise", "train"]
    where = ["--config-file", str(run_dir / "config.json"), "--run-dir", str(run_dir)]
    assert commands == [
        [*python, *where, "--resume", "--no-progress"],
        [*python, "--group", str(group_dir), "--resume", "--no-progress"],
    ]
    assert json.loads((run_dir / "config.json").read_text()) == alone.members[0].config.to_dict()
    members = read_group(group_dir)
    assert [(m.run_id, m.config) for m in members] == [(r.run_id, r.config) for r in group.members]
    expected_dirs = [(tmp_path / "runs" / r.run_id).resolve() for r in group.members]
    assert [m.run_dir.resolve() for m in members] == expected_dirs


# ---- studies -------------------------------------------------------------------------------


def stored(study_dir: Path) -> tuple[dict, dict, dict]:
    with Store(study_dir / "study.sqlite") as store:
        runs = {r["id"]: r for r in store.runs()}
        finals = {f["id"]: f for f in store.finals()}
        curves = {}
        for point in store.curves():
            curves.setdefault(point["run_id"], {})[(point["kind"], point["step"])] = point
    return runs, finals, curves


def close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= TOLERANCE


def test_batched_study_stores_the_same_rows_as_one_run_per_process(tmp_path):
    """4 runs on shakespeare_char (enwik8 left out with --datasets), each alone, then up to 3
    to a process: baseline, huge (diverging) and exp share one, lr trains alone."""
    methods = {name: METHODS[name] for name in ("baseline", "huge", "exp", "lr")}
    spec = parse_spec(spec_data("same", methods, seeds=1, datasets=("shakespeare_char", "enwik8")))
    shakespeare = [run.run_id for run in spec.runs if run.dataset == "shakespeare_char"]
    summaries = {
        m: run_study(
            spec, tmp_path / f"m{m}", jobs=2, batch_models=m, datasets=["shakespeare_char"], progress=False
        )
        for m in (1, 3)
    }
    for summary in summaries.values():
        assert (summary["total"], summary["ran"], summary["pending"], summary["failed"]) == (8, 4, 4, 0)
        assert (summary["done"], summary["diverged"]) == (3, 1)
    alone, batched = stored(tmp_path / "m1"), stored(tmp_path / "m3")
    runs, finals, curves = alone
    assert not (tmp_path / "m1" / "groups").exists()
    (group_dir,) = (tmp_path / "m3" / "groups").iterdir()
    # One process trained these; the diverged run did not stop the one after it (see below).
    assert [batched[0][m.run_id]["method"] for m in read_group(group_dir)] == ["baseline", "huge", "exp"]
    assert runs.keys() == batched[0].keys()
    for run_id in runs:
        columns = ("dataset", "method", "seed", "status", "config", "attempts")
        assert [runs[run_id][c] for c in columns] == [batched[0][run_id][c] for c in columns]
        if run_id not in shakespeare:
            assert runs[run_id]["status"] == "pending"
            continue
        assert runs[run_id]["status"] == ("diverged" if runs[run_id]["method"] == "huge" else "done")
        mine, theirs = finals[run_id], batched[1][run_id]
        assert mine["steps"] == theirs["steps"]
        for metric in ("val_loss", "best_val_loss", "train_loss"):
            assert close(mine[metric], theirs[metric]), (run_id, metric, mine[metric], theirs[metric])
        assert curves[run_id].keys() == batched[2][run_id].keys()
        for key, point in curves[run_id].items():
            assert close(point.get("val_loss"), batched[2][run_id][key].get("val_loss")), (run_id, key)
            assert close(point.get("loss"), batched[2][run_id][key].get("loss")), (run_id, key)


def group_pids(group_dir: Path) -> list[int]:
    """Processes training the group in group_dir."""
    return processes_with("--group", str(group_dir))


def test_a_killed_group_resumes_and_records_every_run_once(tmp_path):
    path = write_spec(
        tmp_path, spec_data("killgroup", {"baseline": {}, "exp": METHODS["exp"]}, seeds=1, overrides=LONG)
    )
    spec = load_spec(path)
    study_dir = tmp_path / "study"
    (group,) = plan_groups(list(spec.runs), list(spec.runs), study_dir, batch_models=2)
    group_dir = group_directory(study_dir, group.group_id)
    run_dirs = [run_directory(study_dir, run.run_id) for run in spec.runs]

    def checkpointed():  # wherever the trainer keeps them: the group's or the runs' directories
        return any(latest_checkpoint_step(d) for d in (group_dir, *run_dirs))

    with ThreadPoolExecutor(1) as pool:  # the driver, in this process
        driver = pool.submit(run_study, spec, study_dir, batch_models=2, progress=False)
        wait_for(checkpointed, what="a checkpoint")
        (pid,) = group_pids(group_dir)
        os.kill(pid, signal.SIGKILL)
        summary = driver.result(timeout=120)
    assert (summary["failed"], summary["done"]) == (2, 0)
    runs, _, _ = stored(study_dir)
    assert [(r["status"], r["attempts"]) for r in runs.values()] == [("failed", 1)] * 2
    assert all("killed by SIGKILL" in r["error"] for r in runs.values())

    kept = {}
    for run_dir in run_dirs:
        step = latest_checkpoint_step(run_dir) or latest_checkpoint_step(group_dir) or 0
        kept[run_dir] = (step, log_lines(run_dir, step))
    assert any(step > 0 for step, _ in kept.values())
    # Resumed with --batch-models 1: the group started before trains on, as that group.
    summary = run_study(path, study_dir, batch_models=1, progress=False)
    assert (summary["done"], summary["ran"]) == (2, 2)
    assert [m.run_id for m in read_group(group_dir)] == [run.run_id for run in spec.runs]
    assert not any((run_dir / "stdout.log").exists() for run_dir in run_dirs)  # never alone
    for run_dir, (step, lines) in kept.items():
        if step > 0:
            assert log_lines(run_dir, step) == lines  # resumed, not restarted
    runs, finals, curves = stored(study_dir)
    assert [(r["status"], r["attempts"]) for r in runs.values()] == [("done", 2)] * 2
    assert [f["steps"] for f in finals.values()] == [LONG["max_iters"]] * 2
    for run in spec.runs:
        points = curves[run.run_id]
        assert {s for k, s in points if k == "train"} == set(range(10, LONG["max_iters"] + 1, 10))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-models", "0"], "batch_models=0"),
        (["--datasets", "enwik8"], "has datasets shakespeare_char"),
        (["--datasets", ""], "has datasets shakespeare_char"),
    ],
)
def test_cli_bad_batch_models_or_datasets_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    study_dir = tmp_path / "never"
    assert main(["study", "run", "quick", "--dir", str(study_dir), *args]) == 2
    assert message in capsys.readouterr().err
    assert not study_dir.exists()


def test_cli_help_says_the_default_batch_models():
    result = subprocess.run(
        [sys.executable, "-m", "gradnoise", "study", "run", "--help"], capture_output=True, text=True
    )
    text = " ".join(result.stdout.split())
    assert "Default: 8 where the runs train on CUDA" in text and "else 1" in text

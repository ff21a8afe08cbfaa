"""The driver loop on a scripted executor (no processes): the protocol every executor
shares, and the live display."""

import io
from pathlib import Path

import pytest

from gradnoise.study import runner
from gradnoise.study.executors import Attempt, Executor, Launch, Outcome
from gradnoise.study.plan import plan_groups
from gradnoise.study.progress import Progress, duration
from gradnoise.study.spec import parse_spec
from gradnoise.study.store import Store

SPEC = {
    "name": "scripted",
    "datasets": ["shakespeare_char"],
    "seeds": 2,
    "overrides": {"max_iters": 40},
    "methods": {"baseline": {}, "exp": {"noise": "exp:sigma0=0.01,gamma=0.9"}},
}


def finished_result(val_loss: float) -> dict:
    return {"status": "done", "error": None, "device": "cpu", "host": "box", "finals": {"val_loss": val_loss}}


class Scripted(Executor):
    """Two slots; launch k ends on the poll after it was submitted, as `script[k]` says for
    each of its runs: a val loss (done), an error text (failed), or an exception raised
    from poll."""

    def __init__(self, store: Store, script: list):
        self.store, self.script = store, list(script)
        self.launches: list[Launch] = []
        self.submitted, self.cancelled = [], []

    def capacity(self) -> int:
        return 2

    def prepare(self, group) -> Launch:
        attempts = [Attempt(run, Path("/nonexistent") / run.run_id, "box", "cpu", 0) for run in group.todo]
        return Launch(group, attempts, {}, Path("/nonexistent"), "cpu")

    def submit(self, launch: Launch) -> None:
        for attempt in launch.attempts:
            # The driver marks the runs running before their worker starts.
            assert self.store.run(attempt.run.run_id)["status"] == "running"
            self.submitted.append(attempt.run.run_id)
        self.launches.append(launch)

    def poll(self, timeout: float) -> list[Outcome]:
        launch = self.launches[0]
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        self.launches.remove(launch)
        if isinstance(step, float):
            curve = [{"kind": "eval", "step": 40, "val_loss": step}]
            return [Outcome(attempt, finished_result(step), curve) for attempt in launch.attempts]
        return [Outcome(attempt, error=f"Traceback\n{step}", reason=step) for attempt in launch.attempts]

    def cancel(self) -> list[Attempt]:
        self.cancelled, self.launches = self.running, []
        return self.cancelled


def alone(spec, store: Store):
    """Every run of the spec in a group of its own (--batch-models 1)."""
    return plan_groups(list(spec.runs), list(spec.runs), store.path.parent, batch_models=1)


@pytest.fixture
def study(tmp_path):
    spec = parse_spec(SPEC)
    store = runner.open_study(spec, tmp_path / "study")
    yield spec, store
    store.close()


def test_outcomes_are_recorded_and_every_run_is_submitted_once(study):
    spec, store = study
    executor = Scripted(store, [1.5, "RuntimeError: out of memory", 1.25, 1.0])
    stream = io.StringIO()
    display = Progress(spec.name, store, enabled=True, stream=stream)
    runner._drive(store, executor, alone(spec, store), display)

    assert executor.submitted == [run.run_id for run in spec.runs]
    runs = {r["id"]: r for r in store.runs()}
    ids = [run.run_id for run in spec.runs]
    assert [runs[i]["status"] for i in ids] == ["done", "failed", "done", "done"]
    assert all(runs[i]["attempts"] == 1 and runs[i]["host"] == "box" for i in ids)
    assert runs[ids[1]]["error"] == "Traceback\nRuntimeError: out of memory"
    assert [f["val_loss"] for f in store.finals()] == [1.5, 1.25, 1.0]
    assert [(p["run_id"], p["step"]) for p in store.curves([ids[0]])] == [(ids[0], 40)]
    ended = [line for line in stream.getvalue().splitlines() if " seed " in line]
    assert [line.split(" ", 1)[1] for line in ended] == [
        "shakespeare_char/baseline seed 0 done",
        "shakespeare_char/exp seed 0 failed: RuntimeError: out of memory",
        "shakespeare_char/baseline seed 1 done",
        "shakespeare_char/exp seed 1 done",
    ]


def test_an_interrupt_stops_what_is_in_flight_and_marks_it_pending(study):
    spec, store = study
    executor = Scripted(store, [1.5, KeyboardInterrupt()])
    display = Progress(spec.name, store, enabled=False)
    with pytest.raises(KeyboardInterrupt):
        runner._drive(store, executor, alone(spec, store), display)
    ids = [run.run_id for run in spec.runs]
    # Run 0 finished; runs 1 and 2 were in flight (two slots) and are pending again; 3 never began.
    assert [a.run.run_id for a in executor.cancelled] == ids[1:3]
    runs = {r["id"]: r for r in store.runs()}
    assert [(runs[i]["status"], runs[i]["attempts"]) for i in ids] == [
        ("done", 1),
        ("pending", 1),
        ("pending", 1),
        ("pending", 0),
    ]


def test_progress_line_counts_runs_and_estimates_the_time_left(study):
    spec, store = study
    stream = io.StringIO()  # not a terminal: one summary line per refresh, no run lines
    display = Progress(spec.name, store, enabled=True, stream=stream)
    display.start(steps_todo=4 * 40)
    display.started -= 60  # a minute ago
    first = Attempt(spec.runs[0], Path("/nonexistent"), "box", "cpu", first_step=0)
    store.mark_running(first.run.run_id, "box", "cpu")
    store.record_result(first.run.run_id, finished_result(1.5), [])
    display.finished(first, "done")
    display.refresh([])
    summary = stream.getvalue().splitlines()[-1]
    # 40 of 160 steps in 60 s: 120 steps left take 180 s.
    assert summary.startswith(f"{spec.name}: 1/4 done, 0 running, 0 failed, 0 diverged")
    assert summary.endswith("elapsed 1m00s · ETA 3m00s")


def test_duration():
    assert [duration(s) for s in (0, 59.9, 61, 3600 * 2 + 61)] == ["0m00s", "0m59s", "1m01s", "2h01m"]
    assert duration(float("inf")) == "?"

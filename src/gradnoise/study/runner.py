"""Running a study: every run of a spec exactly once, whatever is killed when.

    summary = run_study(load_spec("quick"), Path("studies/quick"), jobs=2)

The study directory holds spec.yaml, study.sqlite, runs/<run_id>/, each
run's own run directory (config.json, log.jsonl, checkpoints, result.json,
written by the trainer), and groups/<group_id>/ for runs trained together
(group.json; see `plan`). Only this driver process writes study.sqlite.

- Runs already done or diverged are skipped.
- Runs left "running" by a killed driver, and runs that failed, are started
  again with --resume: they continue from their last checkpoint.
- A run whose result.json exists but was never recorded (the driver died in
  between) is recorded from its files without training again.
- A failing run is recorded with its error and the study goes on.
- With batch_models M > 1, runs that differ only in per-replica settings train up
  to M at a time in one process (`plan.plan_groups`); the store, the display and
  `study status` still speak of runs: each member is running while its group runs,
  and is recorded on its own when the group ends.

The driver loop is the same whatever trains the runs: it launches groups while
the executor has room (marking their runs running first), records each run's
outcome in the store (a result with its curves, or a failure), and on any error
or interrupt stops what is in flight and marks those runs pending. The executors'
interface is in `executors`, the executors themselves (local worker processes, Ray
tasks) in `local_executor` and `ray_executor`, the live display in `progress`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from collections import deque
from pathlib import Path

import torch
import yaml

from gradnoise.errors import UserError
from gradnoise.lm.storage import atomic, runlog
from gradnoise.lm.training import provenance
from gradnoise.study import identity, tasks
from gradnoise.study.executors import Executor, Outcome, check_options, run_name
from gradnoise.study.local_executor import LocalExecutor
from gradnoise.study.plan import Group, last_step, plan_groups, run_directory
from gradnoise.study.progress import Progress, run_line
from gradnoise.study.ray_executor import RayExecutor
from gradnoise.study.spec import Run, StudySpec, canonical, load_spec, runs_differ
from gradnoise.study.store import STORE_FILE, Store

SPEC_FILE = "spec.yaml"
LOCK_FILE = ".driver.lock"
POLL_S = 0.5
#: --batch-models where the runs train on CUDA: a small model leaves a GPU idle alone.
CUDA_BATCH_MODELS = 8
log = logging.getLogger(__name__)


def run_study(
    spec: StudySpec | str | Path,
    study_dir: Path,
    *,
    executor: str = "local",
    jobs: int = 1,
    devices: list[str] | None = None,
    per_device: int = 1,
    address: str | None = None,
    batch_models: int | None = None,
    datasets: list[str] | None = None,
    progress: bool = True,
) -> dict:
    """Run every run of `spec` not yet finished in `study_dir`; return a summary dict
    {name, study_dir, total, done, diverged, failed, pending, running, ran, recovered,
    skipped, wall_s}.

    batch_models: at most this many runs per process (None: `default_batch_models`).
    datasets: run only these of the spec's datasets (None: all).
    """
    spec = spec if isinstance(spec, StudySpec) else load_spec(spec)
    study_dir = Path(study_dir)
    if batch_models is None:
        batch_models = default_batch_models(spec, devices)
    check_options(executor, jobs, devices, per_device, address, batch_models)
    selected = _selected_runs(spec, datasets)
    start = time.time()
    store = open_study(spec, study_dir)
    try:
        with _driver_lock(study_dir):
            adopt_report_keys(store, spec, study_dir)
            warn_if_other_code(store.runs(), study_dir)
            finished_before = {r["id"] for r in store.runs() if r["status"] in runlog.FINISHED}
            todo = [run for run in selected if run.run_id not in finished_before]
            recovered = _record_finished_on_disk(store, study_dir, todo)
            todo = [run for run in todo if run.run_id not in recovered]
            groups = plan_groups(todo, list(spec.runs), study_dir, batch_models)
            display = Progress(spec.name, store, enabled=progress)
            display.start(
                sum(
                    max(
                        0,
                        run.task.total_steps(run.config) - last_step(run_directory(study_dir, run.run_id)),
                    )
                    for run in todo
                )
            )
            try:
                if todo:
                    options = {"jobs": jobs, "devices": devices, "per_device": per_device, "address": address}
                    with make_executor(executor, study_dir, **options) as workers:
                        _drive(store, workers, groups, display)
            finally:
                display.close()
        counts = store.counts()
    finally:
        store.close()
    return {
        "name": spec.name,
        "study_dir": str(study_dir),
        "total": len(spec.runs),
        **counts,
        "ran": len(todo),
        "recovered": len(recovered),
        "skipped": len([run for run in selected if run.run_id in finished_before]),
        "wall_s": time.time() - start,
    }


def default_batch_models(spec: StudySpec, devices: list[str] | None) -> int:
    """CUDA_BATCH_MODELS where the runs train on CUDA (--devices names a GPU; without
    --devices, their device is cuda, or auto with a GPU on this machine), else the task's
    CPU default (1 for the LM task; 40 for the MNIST one, whose small model batches well)."""
    if devices is not None:
        on_cuda = any(device.startswith("cuda") for device in devices)
    else:
        gpu_here = torch.cuda.is_available()
        on_cuda = any(
            run.config.device.startswith("cuda") or (run.config.device == "auto" and gpu_here)
            for run in spec.runs
        )
    return CUDA_BATCH_MODELS if on_cuda else spec.task.cpu_batch_models


def _selected_runs(spec: StudySpec, datasets: list[str] | None) -> list[Run]:
    """The spec's runs on `datasets` (all where None); UserError for a dataset not in it."""
    if datasets is None:
        return list(spec.runs)
    unknown = [d for d in datasets if d not in spec.datasets]
    if unknown or not datasets:
        raise UserError(
            f"datasets={','.join(datasets)!r}: study {spec.name} has datasets "
            f"{', '.join(spec.datasets)}; give some of them, comma-separated"
        )
    return [run for run in spec.runs if run.dataset in datasets]


def _drive(store: Store, executor: Executor, groups: list[Group], display: Progress) -> None:
    """Train `groups` on `executor` until all ended; on any error or interrupt, stop the
    launches in flight and mark their runs pending (the next driver resumes them)."""
    queue = deque(groups)
    try:
        while queue or executor.launches:
            capacity = executor.capacity()
            while queue and len(executor.launches) < capacity:
                launch = executor.prepare(queue.popleft())
                for attempt in launch.attempts:
                    store.mark_running(attempt.run.run_id, attempt.host, attempt.device)
                executor.submit(launch)
            for outcome in executor.poll(POLL_S):
                _record(store, outcome, display)
            display.refresh(executor.running)
    except BaseException:
        stopped = executor.cancel()
        store.mark_pending([attempt.run.run_id for attempt in stopped])
        raise


def _record(store: Store, outcome: Outcome, display: Progress) -> None:
    run_id = outcome.attempt.run.run_id
    if outcome.result is not None:
        store.record_result(run_id, outcome.result, outcome.curves)
        display.finished(outcome.attempt, outcome.result["status"])
    else:
        store.record_failure(run_id, outcome.error)
        display.finished(outcome.attempt, "failed", outcome.reason)


def open_study(spec: StudySpec, study_dir: Path) -> Store:
    """The study's store, created (atomically, with spec.yaml) if `study_dir` is new or
    empty; UserError if it holds another study, or a spec that expands to other runs.
    A spec that differs from the stored one in its report keys alone (description,
    caveats, published, table) is accepted; `adopt_report_keys` then stores it."""
    store_path = study_dir / STORE_FILE
    runs = [(r.run_id, r.dataset, r.method, r.seed, r.config.to_dict()) for r in spec.runs]
    if not store_path.exists():
        if study_dir.exists() and any(study_dir.iterdir()):
            raise UserError(
                f"{study_dir} exists, is not empty and holds no study ({STORE_FILE}); "
                "choose a new or empty --dir"
            )
        _create_study_dir(spec, study_dir, runs)
    # Checked read-only first: a refused study leaves its store's file untouched (opening
    # it for writing switches the journal mode, which rewrites the header).
    with Store(store_path, readonly=True) as existing:
        stored = existing.study()
        if stored["name"] != spec.name or runs_differ(stored["spec"], spec.data):
            raise UserError(
                f"{store_path} already holds study {stored['name']!r} with a different spec; "
                f"choose another --dir, or run the spec it holds ({study_dir / SPEC_FILE})"
            )
        unknown = {r["id"] for r in existing.runs()} - {r.run_id for r in spec.runs}
        if unknown:
            raise UserError(
                f"{study_dir} holds {len(unknown)} run(s) that this spec no longer expands to "
                "(did the training config's fields or defaults change?); run the study into a "
                "new --dir"
            )
    store = Store(store_path)
    try:
        store.add_runs(runs)
    except BaseException:
        store.close()
        raise
    return store


def adopt_report_keys(store: Store, spec: StudySpec, study_dir: Path) -> bool:
    """Store `spec` and rewrite DIR/spec.yaml where the study holds an older version of it
    (`open_study` checked that only report keys differ); True if it did. The driver calls
    this under its lock, so a driver that is refused changes nothing."""
    if canonical(store.study()["spec"]) == canonical(spec.data):
        return False
    store.replace_spec(spec.data)
    atomic.write_text(study_dir / SPEC_FILE, _spec_yaml(spec))
    return True


def _create_study_dir(spec: StudySpec, study_dir: Path, runs: list[tuple]) -> None:
    """Build spec.yaml and the store aside, then rename them into place. If another driver
    created the study first, its directory is kept; the caller checks it is this study."""

    def write(tmp: Path) -> None:
        (tmp / SPEC_FILE).write_text(_spec_yaml(spec))
        with Store(tmp / STORE_FILE) as fresh:
            fresh.create_study(spec.name, spec.data)
            fresh.add_runs(runs)

    atomic.build_directory(study_dir, write, replace=False)


def warn_if_other_code(rows: list[dict], study_dir: Path) -> None:
    """A warning when runs already in the store came from other code than this process runs:
    the study's runs would then not be comparable (run long studies from a fixed commit)."""
    other = identity.differs_from_here(rows)
    if other:
        here = provenance.code_identity()
        runs = "; ".join(f"{label}: {', '.join(ids)}" for label, ids in other)
        log.warning(
            f"this process runs gradnoise {provenance.code_label(here)} (source "
            f"{here['source_sha256'][:12]}), but runs already in {study_dir} came from other code "
            f"({runs}); their numbers and the new ones need not be comparable: run a long study "
            "from one fixed commit (a separate clone or worktree)"
        )


def _spec_yaml(spec: StudySpec) -> str:
    return yaml.safe_dump(spec.data, sort_keys=False, allow_unicode=True)


def study_status(study_dir: Path) -> str:
    """A text block: counts by status, each running run's step and loss, each failure."""
    study_dir = Path(study_dir)
    if not (study_dir / STORE_FILE).exists():
        raise UserError(f"{study_dir} holds no study (no {STORE_FILE})")
    with Store(study_dir / STORE_FILE, readonly=True) as store:
        study, runs, counts = store.study(), store.runs(), store.counts()
    driver_alive = _driver_running(study_dir)
    lines = [
        f"study {study['name']} ({study_dir}): {len(runs)} runs — "
        + ", ".join(f"{n} {status}" for status, n in counts.items()),
        f"code: {identity.describe(identity.code_groups(runs))}",
        f"numerics: {identity.numerics_summary(runs)}",
    ]
    running = [r for r in runs if r["status"] == "running"]
    task = tasks.task_of_spec(study["spec"])
    if running:
        lines.append("running:" if driver_alive else "interrupted (resume with `gradnoise study run`):")
        lines += [
            "  "
            + run_line(
                _row_name(r),
                run_directory(study_dir, r["id"]),
                task.total_steps(task.from_dict(r["config"])),
                r["device"],
            )
            for r in running
        ]
    elif not driver_alive and counts["pending"]:
        lines.append("no driver is running; `gradnoise study run` continues the study")
    failed = [r for r in runs if r["status"] == "failed"]
    if failed:
        lines.append("failed (run again with `gradnoise study run`):")
        for r in failed:
            last = (r["error"] or "").strip().splitlines()[-1:] or [""]
            lines.append(f"  {_row_name(r)} (attempts {r['attempts']}): {last[0]}")
    return "\n".join(lines)


def _row_name(row: dict) -> str:
    return run_name(row["id"], row["dataset"], row["method"], row["seed"])


# ---- results on disk, the driver lock ---------------------------------------------


def _record_finished_on_disk(store: Store, study_dir: Path, runs: list[Run]) -> set[str]:
    recovered = set()
    for run in runs:
        run_dir = run_directory(study_dir, run.run_id)
        result = runlog.read_result(run_dir)
        if result is not None:
            store.record_result(run.run_id, result, runlog.read_curves(run_dir))
            recovered.add(run.run_id)
    return recovered


@contextlib.contextmanager
def _driver_lock(study_dir: Path):
    """One driver per study directory; the lock dies with its process."""
    with open(study_dir / LOCK_FILE, "a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another `gradnoise study run` is running the study in {study_dir}; "
                "watch it with `gradnoise study status`"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def _driver_running(study_dir: Path) -> bool:
    try:
        with open(study_dir / LOCK_FILE, "a+") as file:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(file, fcntl.LOCK_UN)
            return False
    except BlockingIOError:
        return True


def make_executor(
    executor: str,
    study_dir: Path,
    *,
    jobs: int = 1,
    devices: list[str] | None = None,
    per_device: int = 1,
    address: str | None = None,
) -> Executor:
    """The executor the options name (checked by `check_options`)."""
    if executor == "ray":
        return RayExecutor(study_dir, address=address, per_device=per_device)
    return LocalExecutor(study_dir, _device_slots(jobs, devices, per_device))


def _device_slots(jobs: int, devices: list[str] | None, per_device: int) -> list[str | None]:
    """One entry per concurrent worker: its device (None: the config's own). Round-robin over
    devices so the first runs spread across GPUs before any GPU takes a second run."""
    if devices is None:
        return [None] * jobs
    return [device for _ in range(per_device) for device in devices]

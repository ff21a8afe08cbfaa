"""Running a study: every run of a spec exactly once, whatever is killed when.

    summary = run_study(load_spec("quick"), Path("studies/quick"), jobs=2)

The study directory holds spec.yaml, study.sqlite and runs/<run_id>/, each
run's own run directory (config.json, log.jsonl, checkpoints, result.json,
written by the trainer). Only this driver process writes study.sqlite.

- Runs already done or diverged are skipped.
- Runs left "running" by a killed driver, and runs that failed, are started
  again with --resume: they continue from their last checkpoint.
- A run whose result.json exists but was never recorded (the driver died in
  between) is recorded from its files without training again.
- A failing run is recorded with the tail of its stderr and the study goes on.

Executors:
- local: at most `jobs` (or len(devices) · per_device) worker processes
  `python -m gradnoise train --config-file … --run-dir … --resume --no-progress`,
  each with its device and OMP_NUM_THREADS = cores // concurrent runs (unless set).
- ray: each run a Ray task that calls the trainer in-process and sends its
  result and curves back to the driver.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import yaml

from gradnoise.errors import UserError
from gradnoise.lm import atomic, runlog
from gradnoise.study.spec import Run, StudySpec, canonical, load_spec, runs_differ
from gradnoise.study.store import Store

EXECUTORS = ("local", "ray")
STORE_FILE = "study.sqlite"
SPEC_FILE = "spec.yaml"
LOCK_FILE = ".driver.lock"
POLL_S = 0.5
ERROR_TAIL_CHARS = 4000
# A worker given SIGTERM writes a checkpoint first; this long is allowed for that.
TERMINATE_GRACE_S = 60.0


def run_study(
    spec: StudySpec | str | Path,
    study_dir: Path,
    *,
    executor: str = "local",
    jobs: int = 1,
    devices: list[str] | None = None,
    per_device: int = 1,
    address: str | None = None,
    progress: bool = True,
) -> dict:
    """Run every run of `spec` not yet finished in `study_dir`; return a summary dict
    {name, study_dir, total, done, diverged, failed, pending, running, ran, recovered,
    skipped, wall_s}."""
    spec = spec if isinstance(spec, StudySpec) else load_spec(spec)
    study_dir = Path(study_dir)
    _check_executor_options(executor, jobs, devices, per_device, address)
    start = time.time()
    store = open_study(spec, study_dir)
    try:
        with _driver_lock(study_dir):
            adopt_report_keys(store, spec, study_dir)
            finished_before = {r["id"] for r in store.runs() if r["status"] in runlog.FINISHED}
            todo = [run for run in spec.runs if run.run_id not in finished_before]
            recovered = _record_finished_on_disk(store, study_dir, todo)
            todo = [run for run in todo if run.run_id not in recovered]
            display = Progress(spec.name, store, enabled=progress)
            display.start(todo, study_dir)
            try:
                if todo and executor == "local":
                    slots = _device_slots(jobs, devices, per_device)
                    _run_local(store, study_dir, todo, slots, display)
                elif todo:
                    _run_ray(store, study_dir, todo, address, per_device, display)
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
        "skipped": len(finished_before),
        "wall_s": time.time() - start,
    }


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
    store = Store(store_path)
    try:
        stored = store.study()
        if stored["name"] != spec.name or runs_differ(stored["spec"], spec.data):
            raise UserError(
                f"{store_path} already holds study {stored['name']!r} with a different spec; "
                f"choose another --dir, or run the spec it holds ({study_dir / SPEC_FILE})"
            )
        unknown = {r["id"] for r in store.runs()} - {r.run_id for r in spec.runs}
        if unknown:
            raise UserError(
                f"{study_dir} holds {len(unknown)} run(s) that this spec no longer expands to "
                "(did the training config's fields or defaults change?); run the study into a "
                "new --dir"
            )
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


def _spec_yaml(spec: StudySpec) -> str:
    return yaml.safe_dump(spec.data, sort_keys=False, allow_unicode=True)


def study_status(study_dir: Path) -> str:
    """A text block: counts by status, each running run's step and loss, each failure."""
    study_dir = Path(study_dir)
    if not (study_dir / STORE_FILE).exists():
        raise UserError(f"{study_dir} holds no study (no {STORE_FILE})")
    with Store(study_dir / STORE_FILE) as store:
        study, runs, counts = store.study(), store.runs(), store.counts()
    driver_alive = _driver_running(study_dir)
    lines = [
        f"study {study['name']} ({study_dir}): {len(runs)} runs — "
        + ", ".join(f"{n} {status}" for status, n in counts.items())
    ]
    running = [r for r in runs if r["status"] == "running"]
    if running:
        lines.append("running:" if driver_alive else "interrupted (resume with `gradnoise study run`):")
        lines += [
            "  "
            + _run_line(_row_name(r), study_dir / "runs" / r["id"], r["config"]["max_iters"], r["device"])
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
    return _run_name(row["id"], row["dataset"], row["method"], row["seed"])


# ---- curves and results on disk ------------------------------------------------------


def _record_finished_on_disk(store: Store, study_dir: Path, runs: list[Run]) -> set[str]:
    recovered = set()
    for run in runs:
        run_dir = study_dir / "runs" / run.run_id
        result = runlog.read_result(run_dir)
        if result is not None:
            store.record_result(run.run_id, result, runlog.read_curves(run_dir))
            recovered.add(run.run_id)
    return recovered


# ---- local executor ---------------------------------------------------------------------


@dataclass
class _Attempt:
    run: Run
    run_dir: Path
    device: str
    slot: int
    process: subprocess.Popen | None = None
    first_step: int = 0  # the step it resumes from

    @property
    def name(self) -> str:
        return _run_name(self.run.run_id, self.run.dataset, self.run.method, self.run.seed)


def _run_local(
    store: Store, study_dir: Path, runs: list[Run], slots: list[str | None], display: Progress
) -> None:
    threads = max(1, _cores() // len(slots))
    queue = deque(runs)
    free = list(range(len(slots)))
    active: list[_Attempt] = []
    try:
        while queue or active:
            while queue and free:
                slot = free.pop(0)
                run = queue.popleft()
                attempt = _launch(store, study_dir, run, slots[slot], slot, threads)
                active.append(attempt)
            for attempt in [a for a in active if a.process.poll() is not None]:
                active.remove(attempt)
                free.append(attempt.slot)
                _finish_local(store, attempt, display)
            display.refresh(active)
            time.sleep(POLL_S)
    except BaseException:
        _stop_workers(active)
        store.mark_pending([a.run.run_id for a in active])
        raise


def _launch(store: Store, study_dir: Path, run: Run, device: str | None, slot: int, threads: int) -> _Attempt:
    run_dir = study_dir / "runs" / run.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run.config.to_dict()
    # Threads per worker: cores // concurrent runs (oversubscribed cores slow a step
    # tenfold), unless the user set OMP_NUM_THREADS.
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **os.environ}
    if device is not None and device.startswith("cuda:"):
        # The worker sees only its GPU, as "cuda": a run resumed on another GPU keeps its
        # config (the trainer refuses to resume with a changed device).
        env["CUDA_VISIBLE_DEVICES"] = _physical_gpu(int(device[5:]))
        config["device"] = "cuda"
    elif device is not None:
        config["device"] = device
    atomic.write_text(run_dir / "config.json", json.dumps(config, indent=2) + "\n")
    command = [
        sys.executable,
        "-m",
        "gradnoise",
        "train",
        "--config-file",
        str(run_dir / "config.json"),
        "--run-dir",
        str(run_dir),
        "--resume",
        "--no-progress",
    ]
    first_step = runlog.last_step(run_dir)
    shown_device = device or config["device"]
    store.mark_running(run.run_id, socket.gethostname(), shown_device)
    with open(run_dir / "stdout.log", "wb") as stdout, open(run_dir / "stderr.log", "wb") as stderr:
        # A session of its own: Ctrl-C reaches the driver only, which then stops the worker
        # with SIGTERM, so that it writes a checkpoint first.
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    return _Attempt(run, run_dir, shown_device, slot, process, first_step)


def _physical_gpu(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry of the driver's cuda:index (it may itself be restricted)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return visible.split(",")[index].strip()
    return str(index)


def _finish_local(store: Store, attempt: _Attempt, display: Progress) -> None:
    code = attempt.process.returncode
    result = runlog.read_result(attempt.run_dir) if code in (0, 3) else None
    if result is not None:
        if attempt.device.startswith("cuda:"):
            # The worker saw only its GPU and calls it cuda:0; name the driver's index.
            result = {**result, "device": f"{attempt.device} {result['device'].partition(' ')[2]}"}
        store.record_result(attempt.run.run_id, result, runlog.read_curves(attempt.run_dir))
        display.finished(attempt, result["status"])
        return
    if code < 0:
        reason = f"killed by {signal.Signals(-code).name}"
    elif code == 128 + signal.SIGTERM:
        reason = "stopped by SIGTERM (checkpoint written; the next run of the study resumes it)"
    elif code in (0, 3):
        reason = f"exited with status {code} but left no finished result.json"
    else:
        reason = f"exited with status {code}"
    error = f"{reason}\n{_tail(attempt.run_dir / 'stderr.log')}".strip()
    store.record_failure(attempt.run.run_id, error)
    display.finished(attempt, "failed", reason)


def _stop_workers(active: list[_Attempt]) -> None:
    """SIGTERM (the trainer checkpoints and exits), then SIGKILL whoever is still there."""
    for attempt in active:
        with contextlib.suppress(ProcessLookupError):
            attempt.process.terminate()
    deadline = time.time() + TERMINATE_GRACE_S
    for attempt in active:
        try:
            attempt.process.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            attempt.process.kill()
            attempt.process.wait()


def _die_with_parent() -> None:
    """In the worker, before exec: get SIGTERM when the driver dies (Linux), so a killed
    driver leaves no orphan training into a run directory a later driver will reuse."""
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# ---- ray executor -----------------------------------------------------------------------


def _run_ray(
    store: Store,
    study_dir: Path,
    runs: list[Run],
    address: str | None,
    per_device: int,
    display: Progress,
) -> None:
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError) as error:
            raise UserError(f"cannot start or reach Ray (address={address!r}): {error}") from None
    train_task = ray.remote(_train_in_worker)
    queue = deque(runs)
    in_flight: dict = {}  # ObjectRef → _Attempt
    try:
        while queue or in_flight:
            resources = ray.cluster_resources()
            gpus = resources.get("GPU", 0)
            capacity = max(1, int(gpus * per_device) if gpus else int(resources.get("CPU", 1)))
            while queue and len(in_flight) < capacity:
                run = queue.popleft()
                use_gpu = gpus > 0 and run.config.device != "cpu"
                config = run.config.to_dict()
                if use_gpu:
                    config["device"] = "cuda"  # Ray sets CUDA_VISIBLE_DEVICES to the task's GPU
                run_dir = study_dir / "runs" / run.run_id
                attempt = _Attempt(run, run_dir, config["device"], 0, None, runlog.last_step(run_dir))
                store.mark_running(run.run_id, "ray", config["device"])
                task = train_task.options(num_cpus=1, num_gpus=1 / per_device if use_gpu else 0)
                in_flight[task.remote(config, str(study_dir.resolve()), run.run_id)] = attempt
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=POLL_S)
            for reference in done:
                attempt = in_flight.pop(reference)
                _finish_ray(ray, store, reference, attempt, display)
            display.refresh(list(in_flight.values()))
    except BaseException:
        for reference in in_flight:
            with contextlib.suppress(Exception):
                ray.cancel(reference)
        store.mark_pending([a.run.run_id for a in in_flight.values()])
        raise
    finally:
        if started_here:
            ray.shutdown()


def _finish_ray(ray, store: Store, reference, attempt: _Attempt, display: Progress) -> None:
    try:
        output = ray.get(reference)
    except Exception as error:  # the task raised, or its worker or node died
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        store.record_failure(attempt.run.run_id, str(error)[-ERROR_TAIL_CHARS:])
        display.finished(attempt, "failed", reason)
        return
    result = output["result"]
    result.setdefault("host", output["host"])
    if result.get("status") not in runlog.FINISHED:
        store.record_failure(attempt.run.run_id, f"trainer returned {result.get('status')!r}")
        display.finished(attempt, "failed", f"status {result.get('status')!r}")
        return
    store.record_result(attempt.run.run_id, result, output["curves"])
    display.finished(attempt, result["status"])


def _train_in_worker(config: dict, study_dir: str, run_id: str) -> dict:
    """A Ray task: train one run in-process and return its result and curves.

    The run directory is the study's own when this worker sees the study directory
    (a shared filesystem, or the driver's machine), else a directory local to the worker.
    """
    import torch

    from gradnoise.lm.config import TrainConfig
    from gradnoise.lm.data import gradnoise_home
    from gradnoise.lm.trainer import train

    torch.set_num_threads(1)
    shared = Path(study_dir)
    if (shared / STORE_FILE).exists():
        run_dir = shared / "runs" / run_id
    else:
        run_dir = gradnoise_home() / "study-runs" / shared.name / run_id
    result = train(TrainConfig.from_dict(config), run_dir, resume=True, progress=False)
    return {
        "result": result,
        "curves": runlog.read_curves(run_dir),
        "host": socket.gethostname(),
    }


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(
            "--executor ray needs Ray, which is not installed; pip install 'gradnoise[ray]'"
        ) from None
    return ray


# ---- live progress ----------------------------------------------------------------------


class Progress:
    """A status block redrawn in place on a terminal (or a line a minute when logging to a
    file): runs done/running/failed of total, ETA, and per running run its step and loss.

    ETA = elapsed · (steps left / steps trained since this driver started).
    """

    def __init__(self, name: str, store: Store, *, enabled: bool, stream=None):
        self.name = name
        self.store = store
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.drawn_lines = 0
        self.last_draw = 0.0
        self.started = time.time()
        self.steps_todo = 0
        self.steps_done = 0

    def start(self, runs: list[Run], study_dir: Path) -> None:
        self.started = time.time()
        self.steps_todo = sum(
            max(0, run.config.max_iters - runlog.last_step(study_dir / "runs" / run.run_id)) for run in runs
        )

    def finished(self, attempt: _Attempt, status: str, reason: str = "") -> None:
        reached = (
            attempt.run.config.max_iters if status in runlog.FINISHED else runlog.last_step(attempt.run_dir)
        )
        self.steps_done += max(0, reached - attempt.first_step)
        self.steps_todo -= attempt.run.config.max_iters - reached  # never trained in this session
        if self.enabled:
            self._clear()
            suffix = f": {reason}" if reason else ""
            print(f"{attempt.name} {status}{suffix}", file=self.stream, flush=True)

    def refresh(self, active: list[_Attempt]) -> None:
        interval = 1.0 if self.tty else 60.0
        if not self.enabled or time.time() - self.last_draw < interval:
            return
        self.last_draw = time.time()
        counts = self.store.counts()
        steps_now = self.steps_done + sum(max(0, runlog.last_step(a.run_dir) - a.first_step) for a in active)
        elapsed = time.time() - self.started
        eta = "?"
        if steps_now > 0:
            eta = _duration(elapsed * max(0, self.steps_todo - steps_now) / steps_now)
        lines = [
            f"{self.name}: {counts['done']}/{sum(counts.values())} done, "
            f"{counts['running']} running, {counts['failed']} failed, "
            f"{counts['diverged']} diverged · elapsed {_duration(elapsed)} · ETA {eta}"
        ]
        if self.tty:
            lines += ["  " + _run_line(a.name, a.run_dir, a.run.config.max_iters, a.device) for a in active]
            self._clear()
        print("\n".join(lines), file=self.stream, flush=True)
        self.drawn_lines = len(lines) if self.tty else 0

    def close(self) -> None:
        self._clear()

    def _clear(self) -> None:
        if self.drawn_lines:
            # Up to the block's first line, then erase to the end of the screen.
            self.stream.write(f"\x1b[{self.drawn_lines}F\x1b[J")
            self.stream.flush()
            self.drawn_lines = 0


def _run_name(run_id: str, dataset: str, method: str, seed: int) -> str:
    return f"{run_id} {dataset}/{method} seed {seed}"


def _run_line(name: str, run_dir: Path, max_iters: int, device: str | None) -> str:
    train, evaluation = runlog.read_log_tail(run_dir)
    parts = [name, f"[{device}]"] if device else [name]
    if train:
        parts.append(f"step {train['step']}/{max_iters}")
        if train.get("loss") is not None:
            parts.append(f"loss {train['loss']:.4f}")
    else:
        parts.append("starting")
    if evaluation and evaluation.get("val_loss") is not None:
        parts.append(f"val {evaluation['val_loss']:.4f} @ {evaluation['step']}")
    return "  ".join(parts)


# ---- helpers ----------------------------------------------------------------------------


def _check_executor_options(executor, jobs, devices, per_device, address) -> None:
    if executor not in EXECUTORS:
        raise UserError(f"executor={executor!r}; allowed: {', '.join(EXECUTORS)}")
    if not isinstance(jobs, int) or jobs < 1:
        raise UserError(f"jobs={jobs!r}: give an integer ≥ 1")
    if not isinstance(per_device, int) or per_device < 1:
        raise UserError(f"per_device={per_device!r}: give an integer ≥ 1")
    if executor == "local" and address is not None:
        raise UserError(f"address={address!r} is for --executor ray only")
    if executor == "local" and devices is None and per_device != 1:
        raise UserError(f"per_device={per_device} needs devices (e.g. cuda:0) to share")
    if devices is not None and jobs != 1:
        raise UserError(
            f"jobs={jobs} with devices: the devices set the concurrency "
            "(len(devices) · per_device); give one or the other"
        )
    if devices is not None:
        if executor == "ray":
            raise UserError("--devices is for the local executor; Ray assigns GPUs to tasks itself")
        if not devices:
            raise UserError("devices is empty; give e.g. cuda:0,cuda:1")
        for device in devices:
            if not re.fullmatch(r"cpu|cuda:\d+", device):
                raise UserError(f"device {device!r} is not allowed; allowed: cpu, cuda:N")
        import torch

        missing = [d for d in devices if d.startswith("cuda:") and int(d[5:]) >= torch.cuda.device_count()]
        if missing:
            raise UserError(f"devices {missing} do not exist here ({torch.cuda.device_count()} CUDA devices)")
    if executor == "ray":
        _import_ray()


def _device_slots(jobs: int, devices: list[str] | None, per_device: int) -> list[str | None]:
    """One entry per concurrent worker: its device (None: the config's own). Round-robin over
    devices so the first runs spread across GPUs before any GPU takes a second run."""
    if devices is None:
        return [None] * jobs
    return [device for _ in range(per_device) for device in devices]


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


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _tail(path: Path, chars: int = ERROR_TAIL_CHARS) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - chars))
            return file.read().decode(errors="replace")
    except OSError:
        return ""


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"

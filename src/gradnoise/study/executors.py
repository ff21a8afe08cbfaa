"""Executors: where a study's runs train. The driver (`runner`) alone writes the store;
an executor starts attempts, says which ended and how, and stops them.

    capacity() -> int          how many attempts may be in flight now
    prepare(run) -> Attempt    where and how the run will train; nothing started yet
    submit(attempt)            start it
    poll(timeout) -> [Outcome] the attempts that ended (waiting up to `timeout` s for one)
    cancel() -> [Attempt]      stop every attempt in flight, and return them
    running                    the attempts in flight
    close()                    (also on leaving a `with` block)

prepare and submit are two calls so that the driver can mark the run running
between them: no worker ever trains a run the store calls pending.

- local: a worker process per attempt,
  `python -m gradnoise train --config-file … --run-dir … --resume --no-progress`,
  each with its device and OMP_NUM_THREADS = cores // concurrent runs (unless set).
- ray: a Ray task per attempt that calls the trainer in-process and sends its result
  and curves back to the driver.

An Attempt is the unit of work: one run, trained once (a later change may make it
a group of runs trained together).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradnoise.errors import UserError
from gradnoise.lm import atomic, runlog
from gradnoise.study.spec import Run
from gradnoise.study.store import STORE_FILE

EXECUTORS = ("local", "ray")
ERROR_TAIL_CHARS = 4000
# A worker given SIGTERM writes a checkpoint first; this long is allowed for that.
TERMINATE_GRACE_S = 60.0


def run_directory(study_dir: Path, run_id: str) -> Path:
    """A run's own directory in its study: config.json, log.jsonl, checkpoints, result.json."""
    return Path(study_dir) / "runs" / run_id


def run_name(run_id: str, dataset: str, method: str, seed: int) -> str:
    return f"{run_id} {dataset}/{method} seed {seed}"


@dataclass
class Attempt:
    """One run trained once, by one executor."""

    run: Run
    run_dir: Path
    #: the training config the worker gets (its device set by the executor)
    config: dict
    #: where it trains, as the store and the display name it
    host: str
    device: str
    #: the step it resumes from (0 for a fresh run)
    first_step: int
    #: the share of a GPU it needs (Ray schedules by it)
    gpus: float = 0.0
    #: the local executor's worker slot
    slot: int | None = None
    #: the executor's handle on it: a Popen, a Ray ObjectRef
    handle: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return run_name(self.run.run_id, self.run.dataset, self.run.method, self.run.seed)


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended: a finished result (done or diverged) with its curves, or a
    failure with the error the store keeps and a one-line reason for the display."""

    attempt: Attempt
    result: dict | None = None
    curves: list[dict] = field(default_factory=list)
    error: str = ""
    reason: str = ""


def check_options(executor: str, jobs, devices, per_device, address) -> None:
    """UserError for any executor option that is not allowed, before anything is written."""
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


class Executor:
    """The interface of the module docstring; `running` is the attempts in flight."""

    running: list[Attempt]

    def capacity(self) -> int:
        raise NotImplementedError

    def prepare(self, run: Run) -> Attempt:
        raise NotImplementedError

    def submit(self, attempt: Attempt) -> None:
        raise NotImplementedError

    def poll(self, timeout: float) -> list[Outcome]:
        raise NotImplementedError

    def cancel(self) -> list[Attempt]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- local --------------------------------------------------------------------------------------


class LocalExecutor(Executor):
    """Worker processes on this machine, one per slot; a slot has a device or None (the
    run's configured device)."""

    def __init__(self, study_dir: Path, slots: list[str | None]):
        self.study_dir = Path(study_dir)
        self.slots = slots
        self.free = list(range(len(slots)))
        # Threads per worker: cores // concurrent runs (oversubscribed cores slow a step
        # tenfold), unless the user set OMP_NUM_THREADS.
        self.threads = max(1, _cores() // len(slots))
        self.running: list[Attempt] = []

    def capacity(self) -> int:
        return len(self.slots)

    def prepare(self, run: Run) -> Attempt:
        slot = self.free.pop(0)
        device = self.slots[slot]
        run_dir = run_directory(self.study_dir, run.run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        config = run.config.to_dict()
        if device is not None and device.startswith("cuda:"):
            # The worker sees only its GPU, as "cuda": a run resumed on another GPU keeps its
            # config (the trainer refuses to resume with a changed device).
            config["device"] = "cuda"
        elif device is not None:
            config["device"] = device
        atomic.write_text(run_dir / runlog.CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        return Attempt(
            run=run,
            run_dir=run_dir,
            config=config,
            host=socket.gethostname(),
            device=device or config["device"],
            first_step=runlog.last_step(run_dir),
            slot=slot,
        )

    def submit(self, attempt: Attempt) -> None:
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads), **os.environ}
        if attempt.device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = _physical_gpu(int(attempt.device[5:]))
        run_dir = attempt.run_dir
        command = [
            sys.executable,
            "-m",
            "gradnoise",
            "train",
            "--config-file",
            str(run_dir / runlog.CONFIG_FILE),
            "--run-dir",
            str(run_dir),
            "--resume",
            "--no-progress",
        ]
        with open(run_dir / "stdout.log", "wb") as stdout, open(run_dir / "stderr.log", "wb") as stderr:
            # A session of its own: Ctrl-C reaches the driver only, which then stops the worker
            # with SIGTERM, so that it writes a checkpoint first.
            attempt.handle = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.running.append(attempt)

    def poll(self, timeout: float) -> list[Outcome]:
        ended = self._ended()
        if not ended:
            time.sleep(timeout)
            ended = self._ended()
        for attempt in ended:
            self.running.remove(attempt)
            self.free.append(attempt.slot)
        return [self._outcome(attempt) for attempt in ended]

    def _ended(self) -> list[Attempt]:
        return [a for a in self.running if a.handle.poll() is not None]

    def _outcome(self, attempt: Attempt) -> Outcome:
        code = attempt.handle.returncode
        result = runlog.read_result(attempt.run_dir) if code in (0, 3) else None
        if result is not None:
            if attempt.device.startswith("cuda:"):
                # The worker saw only its GPU and calls it cuda:0; name the driver's index.
                result = {**result, "device": f"{attempt.device} {result['device'].partition(' ')[2]}"}
            return Outcome(attempt, result, runlog.read_curves(attempt.run_dir))
        if code < 0:
            reason = f"killed by {signal.Signals(-code).name}"
        elif code == 128 + signal.SIGTERM:
            reason = "stopped by SIGTERM (checkpoint written; the next run of the study resumes it)"
        elif code in (0, 3):
            reason = f"exited with status {code} but left no finished result.json"
        else:
            reason = f"exited with status {code}"
        error = f"{reason}\n{_tail(attempt.run_dir / 'stderr.log')}".strip()
        return Outcome(attempt, error=error, reason=reason)

    def cancel(self) -> list[Attempt]:
        """SIGTERM (the trainer checkpoints and exits), then SIGKILL whoever is still there."""
        stopped, self.running = self.running, []
        for attempt in stopped:
            with contextlib.suppress(ProcessLookupError):
                attempt.handle.terminate()
        deadline = time.time() + TERMINATE_GRACE_S
        for attempt in stopped:
            try:
                attempt.handle.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                attempt.handle.kill()
                attempt.handle.wait()
        return stopped


def _physical_gpu(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry of the driver's cuda:index (it may itself be restricted)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return visible.split(",")[index].strip()
    return str(index)


def _die_with_parent() -> None:
    """In the worker, before exec: get SIGTERM when the driver dies (Linux), so a killed
    driver leaves no orphan training into a run directory a later driver will reuse."""
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


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


# ---- Ray ----------------------------------------------------------------------------------------


class RayExecutor(Executor):
    """A Ray task per attempt on the cluster at `address` (None: a Ray started here, and
    shut down on close). Capacity: GPUs · per_device, or the CPUs where there is no GPU."""

    def __init__(self, study_dir: Path, *, address: str | None, per_device: int):
        self.ray = ray = _import_ray()
        self.study_dir = Path(study_dir)
        self.per_device = per_device
        self.started_here = not ray.is_initialized()
        if self.started_here:
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError) as error:
                raise UserError(f"cannot start or reach Ray (address={address!r}): {error}") from None
        self.task = ray.remote(train_in_worker)
        self.in_flight: dict = {}  # ObjectRef → Attempt

    @property
    def running(self) -> list[Attempt]:
        return list(self.in_flight.values())

    def capacity(self) -> int:
        resources = self.ray.cluster_resources()
        gpus = resources.get("GPU", 0)
        return max(1, int(gpus * self.per_device) if gpus else int(resources.get("CPU", 1)))

    def prepare(self, run: Run) -> Attempt:
        use_gpu = self.ray.cluster_resources().get("GPU", 0) > 0 and run.config.device != "cpu"
        config = run.config.to_dict()
        if use_gpu:
            config["device"] = "cuda"  # Ray sets CUDA_VISIBLE_DEVICES to the task's GPU
        run_dir = run_directory(self.study_dir, run.run_id)
        return Attempt(
            run=run,
            run_dir=run_dir,
            config=config,
            host="ray",
            device=config["device"],
            first_step=runlog.last_step(run_dir),
            gpus=1 / self.per_device if use_gpu else 0,
        )

    def submit(self, attempt: Attempt) -> None:
        task = self.task.options(num_cpus=1, num_gpus=attempt.gpus)
        reference = task.remote(attempt.config, str(self.study_dir.resolve()), attempt.run.run_id)
        attempt.handle = reference
        self.in_flight[reference] = attempt

    def poll(self, timeout: float) -> list[Outcome]:
        if not self.in_flight:
            return []
        done, _ = self.ray.wait(list(self.in_flight), num_returns=1, timeout=timeout)
        return [self._outcome(self.in_flight.pop(reference)) for reference in done]

    def _outcome(self, attempt: Attempt) -> Outcome:
        try:
            output = self.ray.get(attempt.handle)
        except Exception as error:  # the task raised, or its worker or node died
            text = str(error).strip()
            reason = text.splitlines()[-1] if text else type(error).__name__
            return Outcome(attempt, error=str(error)[-ERROR_TAIL_CHARS:], reason=reason)
        result = output["result"]
        result.setdefault("host", output["host"])
        if result.get("status") not in runlog.FINISHED:
            status = result.get("status")
            return Outcome(attempt, error=f"trainer returned {status!r}", reason=f"status {status!r}")
        return Outcome(attempt, result, output["curves"])

    def cancel(self) -> list[Attempt]:
        stopped = self.running
        for reference in self.in_flight:
            with contextlib.suppress(Exception):
                self.ray.cancel(reference)
        self.in_flight = {}
        return stopped

    def close(self) -> None:
        if self.started_here:
            self.ray.shutdown()


def train_in_worker(config: dict, study_dir: str, run_id: str) -> dict:
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
        run_dir = run_directory(shared, run_id)
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

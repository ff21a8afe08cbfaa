"""Executors: where a study's runs train. The driver (`runner`) alone writes the store;
an executor starts launches, says how each member run ended, and stops them.

    capacity() -> int          how many launches may be in flight now
    prepare(group) -> Launch   where and how the group (plan.Group) will train, its
                               config.json or group.json written; nothing started yet
    submit(launch)             start it
    poll(timeout) -> [Outcome] an outcome per attempt of each launch that ended
                               (waiting up to `timeout` s for one)
    cancel() -> [Attempt]      stop every launch in flight, and return their attempts
    launches                   the launches in flight
    running                    their attempts (one per run the study waits for)
    close()                    (also on leaving a `with` block)

prepare and submit are two calls so that the driver can mark the runs running
between them: no worker ever trains a run the store calls pending.

A Launch is one process (local) or one task (Ray) training one group; an Attempt is
one run within it, trained once. A group of one is a run alone:

- local: a worker process per launch, each with its device and
  OMP_NUM_THREADS = cores // concurrent launches (unless set):
  `python -m gradnoise train --config-file … --run-dir … --resume --no-progress` (a run alone),
  `python -m gradnoise train --group GROUP_DIR --resume --no-progress` (a group);
  for the MNIST task `python -m gradnoise train-mnist --group DIR --resume`, a run alone
  being a group of one in its own directory (`tasks.worker_arguments`).
- ray: a Ray task per launch that calls the trainer in-process and sends its members'
  results and curves back to the driver.
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
from gradnoise.lm.storage import atomic, runlog
from gradnoise.study import tasks
from gradnoise.study.plan import Group, group_directory, last_step, run_directory
from gradnoise.study.spec import Run
from gradnoise.study.store import STORE_FILE

EXECUTORS = ("local", "ray")
ERROR_TAIL_CHARS = 4000
# A worker given SIGTERM writes a checkpoint first; this long is allowed for that.
TERMINATE_GRACE_S = 60.0


def run_name(run_id: str, dataset: str, method: str, seed: int) -> str:
    return f"{run_id} {dataset}/{method} seed {seed}"


@dataclass
class Attempt:
    """One run trained once, alone or as a member of a group."""

    run: Run
    run_dir: Path
    #: where it trains, as the store and the display name it
    host: str
    device: str
    #: the step it resumes from (0 for a fresh run)
    first_step: int

    @property
    def name(self) -> str:
        return run_name(self.run.run_id, self.run.dataset, self.run.method, self.run.seed)


@dataclass
class Launch:
    """One process or task training one group: an attempt per member the study waits for."""

    group: Group
    attempts: list[Attempt]
    #: run id → the training config the worker gets (its device set by the executor), every member
    configs: dict[str, dict]
    #: the run's directory (a run alone) or the group's: where the worker's output goes
    directory: Path
    device: str
    #: the share of a GPU it needs (Ray schedules by it)
    gpus: float = 0.0
    #: the local executor's worker slot
    slot: int | None = None
    #: the executor's handle on it: a Popen, a Ray ObjectRef
    handle: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended: a finished result (done or diverged) with its curves, or a
    failure with the error the store keeps and a one-line reason for the display."""

    attempt: Attempt
    result: dict | None = None
    curves: list[dict] = field(default_factory=list)
    error: str = ""
    reason: str = ""


def check_options(executor: str, jobs, devices, per_device, address, batch_models=1) -> None:
    """UserError for any executor option that is not allowed, before anything is written."""
    if executor not in EXECUTORS:
        raise UserError(f"executor={executor!r}; allowed: {', '.join(EXECUTORS)}")
    if not isinstance(batch_models, int) or batch_models < 1:
        raise UserError(f"batch_models={batch_models!r}: give an integer ≥ 1 (the runs one process trains)")
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
    """The interface of the module docstring; `launches` is the launches in flight."""

    study_dir: Path
    launches: list[Launch]

    @property
    def running(self) -> list[Attempt]:
        return [attempt for launch in self.launches for attempt in launch.attempts]

    def capacity(self) -> int:
        raise NotImplementedError

    def prepare(self, group: Group) -> Launch:
        raise NotImplementedError

    def submit(self, launch: Launch) -> None:
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

    def _launch(self, group: Group, host: str, config_device=None, shown_device=None, **where) -> Launch:
        """The launch of `group`, its configs' device set to `config_device` (None: their
        own), shown to the store and display as `shown_device` (None: the configs' device);
        its run directories made and, for a group, its group.json written: that file is the
        study's record that these runs train together (plan.launched_groups)."""
        configs = {}
        for run in group.members:
            configs[run.run_id] = run.config.to_dict() | ({"device": config_device} if config_device else {})
            run_directory(self.study_dir, run.run_id).mkdir(parents=True, exist_ok=True)
        task = group.members[0].task
        if group.group_id is None:
            (run,) = group.members
            directory = run_directory(self.study_dir, run.run_id)
        else:
            directory = group_directory(self.study_dir, group.group_id)
            directory.mkdir(parents=True, exist_ok=True)
        if group.group_id is not None or task.name != "lm":  # MNIST: a run alone is a group of one
            task.write_group(
                directory,
                list(configs),
                [run_directory(self.study_dir, run_id) for run_id in configs],
                [task.from_dict(config) for config in configs.values()],
            )
        launch_device = shown_device or configs[group.members[0].run_id]["device"]
        attempts = [
            Attempt(
                run=run,
                run_dir=run_directory(self.study_dir, run.run_id),
                host=host,
                device=launch_device,
                first_step=last_step(run_directory(self.study_dir, run.run_id)),
            )
            for run in group.todo
        ]
        return Launch(group, attempts, configs, directory, launch_device, **where)


# ---- local --------------------------------------------------------------------------------------


class LocalExecutor(Executor):
    """Worker processes on this machine, one per slot; a slot has a device or None (the
    runs' configured device)."""

    def __init__(self, study_dir: Path, slots: list[str | None]):
        self.study_dir = Path(study_dir)
        self.slots = slots
        self.free = list(range(len(slots)))
        # Threads per worker: cores // concurrent launches (oversubscribed cores slow a step
        # tenfold), unless the user set OMP_NUM_THREADS.
        self.threads = max(1, _cores() // len(slots))
        self.launches: list[Launch] = []

    def capacity(self) -> int:
        return len(self.slots)

    def prepare(self, group: Group) -> Launch:
        slot = self.free.pop(0)
        device = self.slots[slot]
        # The worker sees only its GPU, as "cuda": a run resumed on another GPU keeps its
        # config (the trainer refuses to resume with a changed device).
        config_device = "cuda" if device is not None and device.startswith("cuda:") else device
        launch = self._launch(group, socket.gethostname(), config_device, device, slot=slot)
        if group.group_id is None:
            (config,) = launch.configs.values()
            atomic.write_text(launch.directory / runlog.CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        return launch

    def submit(self, launch: Launch) -> None:
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads), **os.environ}
        if launch.device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = _physical_gpu(int(launch.device[5:]))
        directory = launch.directory
        alone = launch.group.group_id is None
        task = launch.group.members[0].task
        command = [sys.executable, "-m", "gradnoise", *tasks.worker_arguments(task, directory, alone)]
        with open(directory / "stdout.log", "wb") as stdout, open(directory / "stderr.log", "wb") as stderr:
            # A session of its own: Ctrl-C reaches the driver only, which then stops the worker
            # with SIGTERM, so that it writes a checkpoint first.
            launch.handle = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.launches.append(launch)

    def poll(self, timeout: float) -> list[Outcome]:
        ended = self._ended()
        if not ended:
            time.sleep(timeout)
            ended = self._ended()
        for launch in ended:
            self.launches.remove(launch)
            self.free.append(launch.slot)
        return [outcome for launch in ended for outcome in self._outcomes(launch)]

    def _ended(self) -> list[Launch]:
        return [launch for launch in self.launches if launch.handle.poll() is not None]

    def _outcomes(self, launch: Launch) -> list[Outcome]:
        """Each member with a finished result.json (written by this launch: the driver
        recorded any earlier one before planning) ended so; the others failed with the
        worker's exit and the tail of its stderr."""
        code = launch.handle.returncode
        if code < 0:
            reason = f"killed by {signal.Signals(-code).name}"
        elif code == 128 + signal.SIGTERM:
            reason = "stopped by SIGTERM (checkpoint written; the next run of the study resumes it)"
        elif code in (0, 3):
            reason = f"exited with status {code} but left no finished result.json"
        else:
            reason = f"exited with status {code}"
        outcomes = []
        for attempt in launch.attempts:
            result = runlog.read_result(attempt.run_dir)
            if result is None:
                error = f"{reason}\n{_tail(launch.directory / 'stderr.log')}".strip()
                outcomes.append(Outcome(attempt, error=error, reason=reason))
                continue
            if launch.device.startswith("cuda:"):
                # The worker saw only its GPU and calls it cuda:0; name the driver's index.
                result = {**result, "device": f"{launch.device} {result['device'].partition(' ')[2]}"}
            outcomes.append(Outcome(attempt, result, runlog.read_curves(attempt.run_dir)))
        return outcomes

    def cancel(self) -> list[Attempt]:
        """SIGTERM (the trainer checkpoints and exits), then SIGKILL whoever is still there."""
        stopped, self.launches = self.launches, []
        for launch in stopped:
            with contextlib.suppress(ProcessLookupError):
                launch.handle.terminate()
        deadline = time.time() + TERMINATE_GRACE_S
        for launch in stopped:
            try:
                launch.handle.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                launch.handle.kill()
                launch.handle.wait()
        return [attempt for launch in stopped for attempt in launch.attempts]


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
    """A Ray task per launch on the cluster at `address` (None: a Ray started here, and
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
        self.in_flight: dict = {}  # ObjectRef → Launch

    @property
    def launches(self) -> list[Launch]:
        return list(self.in_flight.values())

    def capacity(self) -> int:
        resources = self.ray.cluster_resources()
        gpus = resources.get("GPU", 0)
        return max(1, int(gpus * self.per_device) if gpus else int(resources.get("CPU", 1)))

    def prepare(self, group: Group) -> Launch:
        use_gpu = self.ray.cluster_resources().get("GPU", 0) > 0 and group.members[0].config.device != "cpu"
        # Ray sets CUDA_VISIBLE_DEVICES to the task's GPU.
        return self._launch(
            group, "ray", "cuda" if use_gpu else None, gpus=1 / self.per_device if use_gpu else 0
        )

    def submit(self, launch: Launch) -> None:
        task = self.task.options(num_cpus=1, num_gpus=launch.gpus)
        reference = task.remote(
            launch.configs,
            str(self.study_dir.resolve()),
            launch.group.group_id,
            launch.group.members[0].task.name,
        )
        launch.handle = reference
        self.in_flight[reference] = launch

    def poll(self, timeout: float) -> list[Outcome]:
        if not self.in_flight:
            return []
        done, _ = self.ray.wait(list(self.in_flight), num_returns=1, timeout=timeout)
        return [outcome for reference in done for outcome in self._outcomes(self.in_flight.pop(reference))]

    def _outcomes(self, launch: Launch) -> list[Outcome]:
        try:
            output = self.ray.get(launch.handle)
        except Exception as error:  # the task raised, or its worker or node died
            text = str(error).strip()
            reason = text.splitlines()[-1] if text else type(error).__name__
            return [Outcome(a, error=str(error)[-ERROR_TAIL_CHARS:], reason=reason) for a in launch.attempts]
        outcomes = []
        for attempt in launch.attempts:
            result = output["results"][attempt.run.run_id]
            result.setdefault("host", output["host"])
            status = result.get("status")
            if status not in runlog.FINISHED:
                error, reason = f"trainer returned {status!r}", f"status {status!r}"
                outcomes.append(Outcome(attempt, error=error, reason=reason))
            else:
                outcomes.append(Outcome(attempt, result, output["curves"][attempt.run.run_id]))
        return outcomes

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


def train_in_worker(configs: dict[str, dict], study_dir: str, group_id: str | None, task: str = "lm") -> dict:
    """A Ray task: train a run alone (`group_id` None, one config) or a group in-process;
    return {"results", "curves"} by run id, and the host.

    The run (and group) directories are the study's own when this worker sees the study
    directory (a shared filesystem, or the driver's machine), else directories local to
    the worker.
    """
    import torch

    from gradnoise.lm.data.corpora import gradnoise_home

    torch.set_num_threads(1)
    shared = Path(study_dir)
    if (shared / STORE_FILE).exists():
        run_dirs = {run_id: run_directory(shared, run_id) for run_id in configs}
        group_dir = group_directory(shared, group_id) if group_id else None
    else:
        local = gradnoise_home() / "study-runs" / shared.name
        run_dirs = {run_id: local / run_id for run_id in configs}
        group_dir = group_directory(local, group_id) if group_id else None
    harness = tasks.TASKS[task]
    training = [harness.from_dict(config) for config in configs.values()]
    results = tasks.train_in_process(harness, training, list(run_dirs.values()), group_dir)
    return {
        "results": dict(zip(configs, results, strict=True)),
        "curves": {run_id: runlog.read_curves(run_dir) for run_id, run_dir in run_dirs.items()},
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

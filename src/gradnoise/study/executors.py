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

This module holds the interface and the types it passes; the executors themselves are
in `local_executor` and `ray_executor` (`runner.make_executor` makes the one the options
name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradnoise.errors import UserError
from gradnoise.study.plan import Group, group_directory, last_step, run_directory
from gradnoise.study.spec import Run

EXECUTORS = ("local", "ray")
ERROR_TAIL_CHARS = 4000


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
        import_ray()


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


def import_ray():
    """The ray module; UserError where it is not installed."""
    try:
        import ray
    except ImportError:
        raise UserError(
            "--executor ray needs Ray, which is not installed; pip install 'gradnoise[ray]'"
        ) from None
    return ray

"""The Ray executor: a Ray task per launch, training in-process on the cluster and
sending its members' results and curves back to the driver (see `executors` for the
interface). Ray is imported only when this executor is made.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

from gradnoise.errors import UserError
from gradnoise.lm.storage import runlog
from gradnoise.study import tasks
from gradnoise.study.executors import ERROR_TAIL_CHARS, Attempt, Executor, Launch, Outcome, import_ray
from gradnoise.study.plan import Group, group_directory, run_directory
from gradnoise.study.store import STORE_FILE


class RayExecutor(Executor):
    """A Ray task per launch on the cluster at `address` (None: a Ray started here, and
    shut down on close). Capacity: GPUs · per_device, or the CPUs where there is no GPU."""

    def __init__(self, study_dir: Path, *, address: str | None, per_device: int):
        self.ray = ray = import_ray()
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

"""The local executor: a worker process per launch on this machine, each with its
device slot and its share of the cores (see `executors` for the interface).

    python -m gradnoise train --group GROUP_DIR --resume --no-progress

A worker runs in a session of its own and dies with the driver; cancel() sends it
SIGTERM, so that it checkpoints, and SIGKILL after TERMINATE_GRACE_S.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from gradnoise.lm.storage import atomic, runlog
from gradnoise.study import tasks
from gradnoise.study.executors import ERROR_TAIL_CHARS, Attempt, Executor, Launch, Outcome
from gradnoise.study.plan import Group

# A worker given SIGTERM writes a checkpoint first; this long is allowed for that.
TERMINATE_GRACE_S = 60.0


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

"""A run's running totals between two steps: its clock (training and wall seconds), each
replica's progress (steps done, best val so far, the log window, divergence), and the losses
of the current log window still on the device."""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from gradnoise.lm.training.distributed import DistributedEnv


class Clock:
    """The run's one stopwatch, continued across resumes.

    wall_s: seconds since the run started (set-up, evaluation, checkpoints, all of it);
    train_s: only the seconds between start() and stop(), which the trainer places
    around optimizer steps, so time-to-target is comparable across methods.
    """

    def __init__(self):
        self._origin = time.perf_counter()
        self._wall_before = 0.0  # seconds of earlier processes of a resumed run
        self._train_before = 0.0
        self._since: float | None = None

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> None:
        if self._since is not None:
            self._train_before += time.perf_counter() - self._since
            self._since = None

    @property
    def train_s(self) -> float:
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        return self._train_before + running

    @property
    def wall_s(self) -> float:
        return self._wall_before + time.perf_counter() - self._origin

    def state_dict(self) -> dict:
        return {"train_s": self.train_s, "wall_s": self.wall_s}

    def load_state_dict(self, state: dict) -> None:
        self._train_before, self._wall_before = state["train_s"], state["wall_s"]


@dataclasses.dataclass
class Progress:
    """Steps done, the best eval so far and the log window: the run's scalar state."""

    step: int = 0  # optimizer steps whose loss has been read back (and was finite)
    checkpoint_step: int | None = None
    best_val_loss: float | None = None
    best_val_step: int | None = None
    last_eval: dict = dataclasses.field(default_factory=dict)
    # The log window: training losses since the previous "train" log line.
    window_loss_sum: float = 0.0
    window_steps: int = 0
    window_start_s: float = 0.0  # train_s at the window's start
    step_times: list = dataclasses.field(default_factory=list)  # mean step time of each window
    last_loss: float | None = None  # the last step's training loss (train mode)
    last_window_loss: float | None = None  # the mean training loss of the last logged window
    diverged: str | None = None  # why the run diverged (a group's other runs go on); None: it did not

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def absorb(self, losses: list[tuple[int, float]]) -> tuple[int, float] | None:
        """Add read-back step losses to the log window; the first non-finite one, if any."""
        for step, loss in losses:
            if not math.isfinite(loss):
                return step, loss
            self.step, self.last_loss = step, loss
            self.window_loss_sum += loss
            self.window_steps += 1
        return None

    def log_record(self, step: int, lr: float, sigma: float, train_s: float, tokens_per_step: int) -> dict:
        """The "train" log line of the window ending at `step` (train_s on the clock); starts
        the next window."""
        seconds = train_s - self.window_start_s
        self.step_times.append(seconds / self.window_steps)
        record = {
            "kind": "train",
            "step": step,
            "loss": self.window_loss_sum / self.window_steps,
            "lr": lr,
            "sigma": sigma,
            "time_s": train_s,
            "tokens_per_s": tokens_per_step * self.window_steps / seconds if seconds > 0 else 0.0,
        }
        self.last_window_loss = record["loss"]
        self.window_loss_sum, self.window_steps, self.window_start_s = 0.0, 0, train_s
        return record

    def record_eval(self, step: int, losses: dict) -> None:
        self.last_eval = {"step": step, **losses}
        if self.best_val_loss is None or losses["val_loss"] < self.best_val_loss:
            self.best_val_loss, self.best_val_step = losses["val_loss"], step


class PendingLosses:
    """Per-step training losses kept on the device until the next sync point, so the loop
    never waits for the device just to look for a non-finite loss. Never in a checkpoint:
    the loop reads them back before it writes one."""

    def __init__(self):
        self.steps: list[int] = []
        self.losses: list[torch.Tensor] = []

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.steps.append(step)
        self.losses.append(loss)

    def read_back(self, dist_env: DistributedEnv) -> list[tuple[int, list[float]]]:
        """[(step, [each replica's loss])] since the last read, averaged over ranks."""
        if not self.steps:
            return []
        losses = dist_env.mean(torch.stack(self.losses).float()).tolist()
        read = list(zip(self.steps, losses, strict=True))
        self.steps, self.losses = [], []
        return read

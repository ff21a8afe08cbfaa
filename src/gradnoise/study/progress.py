"""The live display of a running study, and the one-line view of a run it shares with
`gradnoise study status`."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from gradnoise.lm.storage import runlog
from gradnoise.study.executors import Attempt
from gradnoise.study.plan import last_step
from gradnoise.study.store import Store


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

    def start(self, steps_todo: int) -> None:
        """The clock starts; `steps_todo` steps are left to train over the runs to do."""
        self.started = time.time()
        self.steps_todo = steps_todo

    def finished(self, attempt: Attempt, status: str, reason: str = "") -> None:
        total = attempt.run.task.total_steps(attempt.run.config)
        reached = total if status in runlog.FINISHED else last_step(attempt.run_dir)
        self.steps_done += max(0, reached - attempt.first_step)
        self.steps_todo -= total - reached  # never trained in this session
        if self.enabled:
            self._clear()
            suffix = f": {reason}" if reason else ""
            print(f"{attempt.name} {status}{suffix}", file=self.stream, flush=True)

    def refresh(self, active: list[Attempt]) -> None:
        interval = 1.0 if self.tty else 60.0
        if not self.enabled or time.time() - self.last_draw < interval:
            return
        self.last_draw = time.time()
        counts = self.store.counts()
        steps_now = self.steps_done + sum(max(0, last_step(a.run_dir) - a.first_step) for a in active)
        elapsed = time.time() - self.started
        eta = "?"
        if steps_now > 0:
            eta = duration(elapsed * max(0, self.steps_todo - steps_now) / steps_now)
        lines = [
            f"{self.name}: {counts['done']}/{sum(counts.values())} done, "
            f"{counts['running']} running, {counts['failed']} failed, "
            f"{counts['diverged']} diverged · elapsed {duration(elapsed)} · ETA {eta}"
        ]
        if self.tty:
            lines += [
                "  " + run_line(a.name, a.run_dir, a.run.task.total_steps(a.run.config), a.device)
                for a in active
            ]
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


def run_line(name: str, run_dir: Path, max_iters: int, device: str | None) -> str:
    """`name [device]  step s/max  loss l  val v @ step`, from the tail of the run's log
    (`step s/max  test acc a` for a run that logs evals alone)."""
    train, evaluation = runlog.read_log_tail(run_dir)
    parts = [name, f"[{device}]"] if device else [name]
    if train:
        parts.append(f"step {train['step']}/{max_iters}")
        if train.get("loss") is not None:
            parts.append(f"loss {train['loss']:.4f}")
    elif evaluation and evaluation.get("test_acc") is not None:
        parts.append(f"step {evaluation['step']}/{max_iters}  test acc {evaluation['test_acc']:.3f}")
    else:
        parts.append("starting")
    if evaluation and evaluation.get("val_loss") is not None:
        parts.append(f"val {evaluation['val_loss']:.4f} @ {evaluation['step']}")
    return "  ".join(parts)


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"

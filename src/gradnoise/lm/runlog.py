"""A run's outputs on disk: the log it writes while training and the result it ends with.

    run_dir/config.json   the resolved TrainConfig
    run_dir/log.jsonl     one JSON object per line: {"kind": "train", "step", "loss", "lr",
                          "sigma", "time_s", "tokens_per_s"} every log_interval steps and
                          {"kind": "eval", "step", "train_loss", "val_loss"[, "test_loss"],
                          "time_s"} at every eval
    run_dir/result.json   {"status", "error", "device", "host", "world_size", "finals"},
                          written last and atomically

`RunLog` writes log.jsonl (and mirrors it to TensorBoard / W&B when asked);
`read_curves`, `read_log_tail`, `last_step` and `read_result` are how anything
else (the study runner, its live display) reads a run. A resumed run logs the
steps after its checkpoint again; readers keep the later line.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from gradnoise.errors import UserError
from gradnoise.lm import atomic

CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
RESULT_FILE = "result.json"
KINDS = ("train", "eval")
TRAIN_FIELDS = ("loss", "lr", "sigma", "tokens_per_s")
EVAL_FIELDS = ("train_loss", "val_loss", "test_loss")
#: Result statuses of a run that ended: it trained to max_iters, or stopped on a non-finite value.
FINISHED = ("done", "diverged")
#: The metrics every result's "finals" holds (see the trainer for their definitions).
FINAL_METRICS = (
    "steps",
    "train_loss",
    "val_loss",
    "best_val_loss",
    "best_val_step",
    "val_loss_full",
    "test_loss_full",
    "train_bpc",
    "val_bpc",
    "best_val_bpc",
    "val_bpc_full",
    "test_bpc_full",
    "wall_s",
    "train_s",
    "step_time_median_s",
    "tokens_per_s",
    "final_sigma",
)


class RunLog:
    """log.jsonl (always), TensorBoard and Weights & Biases (when the config asks); rank 0 only."""

    def __init__(self, run_dir: Path, cfg, enabled: bool):
        self.run_dir, self.cfg, self.enabled = run_dir, cfg, enabled
        self.file = self.tensorboard = self.wandb = None
        if not enabled:
            return
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "tensorboard=true needs TensorBoard: pip install 'gradnoise[tensorboard]'"
                ) from None
            self._tensorboard_writer = SummaryWriter
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise UserError("wandb=true needs Weights & Biases: pip install 'gradnoise[wandb]'") from None
            self._wandb_module = wandb

    def start(self, keep_through_step: int | None) -> None:
        """Open log.jsonl: keep the lines up to the resumed checkpoint's step, drop the rest."""
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOG_FILE
        kept = []
        if keep_through_step is not None and path.exists():
            for line in path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    if json.loads(line)["step"] <= keep_through_step:
                        kept.append(line + "\n")
        atomic.write_text(path, "".join(kept))
        self.file = path.open("a")
        if self.cfg.tensorboard:
            self.tensorboard = self._tensorboard_writer(str(self.run_dir / "tensorboard"))
        if self.cfg.wandb:
            self.wandb = self._wandb_module.init(
                project="gradnoise",
                name=self.run_dir.name,
                dir=str(self.run_dir),
                config=self.cfg.to_dict(),
            )

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in record.items() if k not in ("kind", "step")}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["step"])
        if self.wandb is not None:
            self.wandb.log({f"{record['kind']}/{k}": v for k, v in scalars.items()}, step=record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_curves(run_dir: Path) -> list[dict]:
    """The train and eval points of a run's log.jsonl, one per (kind, step): a resumed run
    logs again the steps after its checkpoint, and its later line wins. A line cut off by
    a kill is skipped."""
    log_path = Path(run_dir) / LOG_FILE
    points: dict[tuple[str, int], dict] = {}
    if not log_path.exists():
        return []
    with open(log_path) as file:
        for line in file:
            try:
                point = json.loads(line)
            except json.JSONDecodeError:
                continue
            if _is_point(point):
                points[(point["kind"], point["step"])] = point
    return list(points.values())


def _is_point(line) -> bool:
    return isinstance(line, dict) and line.get("kind") in KINDS and isinstance(line.get("step"), int)


def read_result(run_dir: Path) -> dict | None:
    """The run's result.json if it holds a finished run, else None."""
    try:
        result = json.loads((Path(run_dir) / RESULT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return result if isinstance(result, dict) and result.get("status") in FINISHED else None


def read_log_tail(run_dir: Path, nbytes: int = 16384) -> tuple[dict | None, dict | None]:
    """The last train and the last eval line of a log.jsonl (from its last `nbytes`)."""
    try:
        with open(Path(run_dir) / LOG_FILE, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - nbytes))
            lines = file.read().decode(errors="replace").splitlines()
    except OSError:
        return None, None
    last = {}
    for line in reversed(lines):
        try:
            point = json.loads(line)
        except json.JSONDecodeError:
            continue
        if _is_point(point):
            last.setdefault(point["kind"], point)
        if len(last) == 2:
            break
    return last.get("train"), last.get("eval")


def last_step(run_dir: Path) -> int:
    """The step of the run's last train log line (0 if none)."""
    train, _ = read_log_tail(run_dir)
    return int(train["step"]) if train else 0

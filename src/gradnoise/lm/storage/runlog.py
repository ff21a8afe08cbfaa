"""A run's outputs on disk: the log it writes while training and the result it ends with.

    run_dir/config.json   the resolved TrainConfig
    run_dir/log.jsonl     one JSON object per line: {"kind": "train", "step", "loss", "lr",
                          "sigma", "time_s", "tokens_per_s", "grad_norm", "noise_norm",
                          "noise_to_grad"} every log_interval steps and
                          {"kind": "eval", "step", "train_loss", "val_loss"[, "test_loss"],
                          "time_s"} at every eval
    run_dir/provenance.json  {"attempts": [{"from_step", "code", "numerics"}, ...]}: what
                          made the run (gradnoise.lm.training.provenance), one entry per start or
                          resume, written before its first step (a killed run has it)
    run_dir/result.json   {"status", "error", "device", "host", "world_size", "provenance",
                          "finals"}, written last and atomically; its provenance is the
                          last attempt's {"code", "numerics"} with "attempts" (how many)
                          and "consistent" (whether every attempt had the same code and
                          numerics)

`RunLog` writes log.jsonl (and mirrors it to TensorBoard / W&B when asked), and
tells the person watching: one line per eval (step, losses, σ, tokens/s) through
`logging` at INFO (every train line at DEBUG), and, where stderr is a terminal, a
progress bar of the steps with those lines printed above it, then one of the final
exact pass (`exact_pass`). Where stderr is not a terminal (a log file) there is no
bar, whose carriage-return updates would pile up on one line, only the lines.
`write_config`, `write_provenance` and `write_result` write the JSON files;
`read_curves`, `read_log_tail`, `last_step` and `read_result` are how anything
else (the study runner, its live display) reads a run. A resumed run logs the
steps after its checkpoint again; readers keep the later line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import statistics
import sys
from pathlib import Path

from gradnoise.errors import UserError
from gradnoise.lm.storage import atomic

CONFIG_FILE = "config.json"
PROVENANCE_FILE = "provenance.json"
LOG_FILE = "log.jsonl"
RESULT_FILE = "result.json"
KINDS = ("train", "eval")
#: A "train" line's values: loss is the mean training loss (train mode) over the log window;
#: lr and sigma those of its last step; grad_norm, noise_norm and noise_to_grad measured at
#: its last step (see GRADIENT_FIELDS).
TRAIN_FIELDS = ("loss", "lr", "sigma", "tokens_per_s", "grad_norm", "noise_norm", "noise_to_grad")
#: ‖g‖: the gradient the optimizer (and the noise, placed after clipping) gets, after
#: clipping; ‖noise‖: the noise added to it (0 without noise); noise_to_grad their ratio.
#: With noise placed before clipping, both are measured before clipping; placed on the
#: update, ‖noise‖ is the noise added to the weights after the step.
GRADIENT_FIELDS = ("grad_norm", "noise_norm", "noise_to_grad")
EVAL_FIELDS = ("train_loss", "val_loss", "test_loss")
#: Result statuses of a run that ended: it trained to max_iters, or stopped on a non-finite value.
FINISHED = ("done", "diverged")
#: The metrics every result's "finals" holds (defined in `final_metrics`), beside
#: test_loss and test_bpc (None without a test split).
FINAL_METRICS = (
    "steps",
    "train_loss",
    "train_loss_last_batch",
    "train_loss_window",
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
    "parameters",
)


LN2 = math.log(2)
log = logging.getLogger(__name__)


def gradient_fields(stats: dict) -> dict:
    """GRADIENT_FIELDS from a step's measurement (floats, or device tensors read back
    here): None where missing or not finite (JSON has no inf or NaN)."""
    values = {}
    for field in GRADIENT_FIELDS:
        value = stats.get(field)
        value = None if value is None else float(value)
        values[field] = value if value is not None and math.isfinite(value) else None
    return values


def final_metrics(
    progress, clock, tokens_per_step: int, *, final_sigma: float, exact: dict, parameters: int
) -> dict:
    """A result's "finals", from the run's progress and clock at its end. Losses in nats
    per character, *_bpc = nats / ln 2.

    train_loss, val_loss, test_loss: the last eval (eval mode, eval_iters batches; None
    for a split the corpus lacks); train_loss_last_batch: the training loss of the last
    step's minibatch, in train mode (dropout on), as the step computed it;
    train_loss_window: the mean of those over the last logged window (log_interval
    steps; None if no window was logged); best_val_loss / best_val_step: the lowest eval
    val_loss and its step; *_full: the exact pass over the whole split (`exact`: split →
    nats, from final_eval); train_s: training seconds without evaluation and
    checkpointing; wall_s: the whole run's seconds; step_time_median_s: median over log
    windows of the window's mean step time (a window ends with a host sync, so device
    time is counted); final_sigma: σ used at the last step (0 without noise);
    parameters: the number of trained parameter elements (‖g‖ sums over them, so the
    gradient's RMS is grad_norm / √parameters).
    """

    def bpc(nats):
        return None if nats is None else nats / LN2

    train_s, last = clock.train_s, progress.last_eval
    if progress.step_times:
        step_time = statistics.median(progress.step_times)
    else:
        step_time = train_s / progress.step if progress.step else None
    return {
        "steps": progress.step,
        "train_loss": last.get("train_loss"),
        "train_loss_last_batch": progress.last_loss,
        "train_loss_window": progress.last_window_loss,
        "val_loss": last.get("val_loss"),
        "test_loss": last.get("test_loss"),
        "best_val_loss": progress.best_val_loss,
        "best_val_step": progress.best_val_step,
        "val_loss_full": exact.get("val"),
        "test_loss_full": exact.get("test"),
        "train_bpc": bpc(last.get("train_loss")),
        "val_bpc": bpc(last.get("val_loss")),
        "test_bpc": bpc(last.get("test_loss")),
        "best_val_bpc": bpc(progress.best_val_loss),
        "val_bpc_full": bpc(exact.get("val")),
        "test_bpc_full": bpc(exact.get("test")),
        "wall_s": clock.wall_s,
        "train_s": train_s,
        "step_time_median_s": step_time,
        "tokens_per_s": tokens_per_step * progress.step / train_s if train_s > 0 else None,
        "final_sigma": final_sigma,
        "parameters": parameters,
    }


class RunLog:
    """log.jsonl (always), TensorBoard and Weights & Biases (when the config asks), a line
    per eval (logging), and a tqdm bar of the steps with the last "train" line when
    progress_bar and stderr is a terminal; rank 0 only."""

    def __init__(self, run_dir: Path, cfg, enabled: bool, progress_bar: bool = False, label: str = ""):
        self.run_dir, self.cfg, self.enabled = run_dir, cfg, enabled
        self.label = label  # begins its eval lines: which run of a group they are
        self.progress_bar = progress_bar and sys.stderr.isatty()
        self.file = self.tensorboard = self.wandb = self.bar = None
        self.last_train: dict = {}
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
        if self.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.cfg.max_iters,
                initial=keep_through_step or 0,
                desc=self.cfg.dataset,
                unit="step",
                dynamic_ncols=True,
            )
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
        scalars = {k: v for k, v in record.items() if k not in ("kind", "step") and v is not None}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["step"])
        if self.wandb is not None:
            self.wandb.log({f"{record['kind']}/{k}": v for k, v in scalars.items()}, step=record["step"])
        if record["kind"] == "eval":
            log.info(self.label + eval_line(record, self.last_train, self.cfg.max_iters))
            return
        self.last_train = record
        log.debug(
            f"step {record['step']}: loss {record['loss']:.4f}, lr {record['lr']:.2e}, "
            f"σ {record['sigma']:.3g}, {record['tokens_per_s']:,.0f} tok/s"
        )
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                lr=f"{record['lr']:.2e}",
                sigma=f"{record['sigma']:.3g}",
                tok_s=f"{record['tokens_per_s']:.0f}",
            )

    def tick(self) -> None:
        """One more optimizer step on the progress bar."""
        if self.bar is not None:
            self.bar.update(1)

    def exact_pass(self, split: str):
        """A report(done, total) for Evaluator.exact: says that the pass over the whole split
        runs, and on a terminal shows its windows on a bar of its own. None on other ranks."""
        if not self.enabled:
            return None
        bar = None

        def report(done: int, total: int) -> None:
            nonlocal bar
            if done == 0:
                log.info(f"final evaluation: exact {split} loss over the whole split ({total:,} windows)")
                if self.bar is not None:
                    from tqdm import tqdm

                    bar = tqdm(
                        total=total, desc=f"exact {split}", unit="window", leave=False, dynamic_ncols=True
                    )
            elif bar is not None:
                bar.update(done - bar.n)
            if done == total and bar is not None:
                bar.close()

        return report

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def eval_line(record: dict, last_train: dict, max_iters: int) -> str:
    """`step 250/1000: train loss 2.0417, val loss 2.0941, σ 0.01, 41,234 tok/s` (σ and
    tokens/s from the last train line, where there is one)."""
    parts = [
        f"{split} loss {record[f'{split}_loss']:.4f}"
        for split in ("train", "val", "test")
        if record.get(f"{split}_loss") is not None
    ]
    if last_train:
        parts += [f"σ {last_train['sigma']:.3g}", f"{last_train['tokens_per_s']:,.0f} tok/s"]
    return f"step {record['step']}/{max_iters}: " + ", ".join(parts)


def write_config(run_dir: Path, cfg) -> None:
    atomic.write_text(Path(run_dir) / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n")


def write_provenance(run_dir: Path, made_by: dict, resumed_from: int | None) -> dict:
    """Add this attempt ({"code", "numerics"}, from step `resumed_from`, None: a fresh
    start) to run_dir/provenance.json, dropping the attempts that began after that step
    (their steps are trained again); return what the result records (see the docstring)."""
    path = Path(run_dir) / PROVENANCE_FILE
    earlier = []
    if resumed_from is not None:
        with contextlib.suppress(OSError, json.JSONDecodeError, TypeError, AttributeError):
            earlier = [
                a
                for a in json.loads(path.read_text())["attempts"]
                if isinstance(a, dict) and a.get("from_step", 0) <= resumed_from
            ]
    attempts = [*earlier, {"from_step": resumed_from or 0, **made_by}]
    atomic.write_text(path, json.dumps({"attempts": attempts}, indent=2) + "\n")
    consistent = all(_same_attempt(a, made_by) for a in attempts)
    return {**made_by, "attempts": len(attempts), "consistent": consistent}


def _same_attempt(attempt: dict, made_by: dict) -> bool:
    """Same code and numerics (the device's name aside: a GPU's index may change)."""

    def key(entry):
        numerics = {k: v for k, v in (entry.get("numerics") or {}).items() if k != "device"}
        return (entry.get("code") or {}).get("source_sha256"), numerics

    return key(attempt) == key(made_by)


def read_provenance(run_dir: Path) -> dict | None:
    """The last attempt's {"code", "numerics"} from run_dir/provenance.json, or None."""
    try:
        attempts = json.loads((Path(run_dir) / PROVENANCE_FILE).read_text())["attempts"]
        return {"code": attempts[-1]["code"], "numerics": attempts[-1]["numerics"]}
    except (OSError, json.JSONDecodeError, KeyError, IndexError, TypeError):
        return None


def write_result(run_dir: Path, result: dict) -> None:
    atomic.write_text(Path(run_dir) / RESULT_FILE, json.dumps(result, indent=2) + "\n")


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

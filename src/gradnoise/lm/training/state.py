"""What a run (or a group of runs trained as one batched model) is between two steps, and
the rules for resuming it.

`RunState` holds everything a resume needs, with torch's state_dict protocol:

    model, optimizer, scaler     weights, AdamW/SGD moments, GradScaler's scale (every replica's)
    noise                        GradientNoise (seeds, step; a plateau schedule's memory)
    rng_per_rank                 each rank's global RNG: its dropout masks
    clock                        training and wall seconds so far
    replicas                     per run of the group (`Replica`):
      batch_generator              the training batches' stream
      augment_generator            character substitution's stream
      progress                     steps done, best val so far, the log window, divergence

A checkpoint is `RunState.state_dict()` (its "model" entry goes to
model.safetensors, the rest to state.pt) plus the config(s) it was trained with;
`load_state_dict` puts every piece back, and the run continues bit for bit as
if it had not stopped (on CPU; CUDA kernels may not be deterministic). A plain
run's (one replica) holds its replica's entries at the top level, as checkpoints
did before batching; a group's holds them in a list, "replicas".

A run may be resumed only with the same config, except the RESUMABLE_CHANGES,
which do not alter the computation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path

import torch

from gradnoise.errors import UserError
from gradnoise.lm.config import LATER_KEYS, TrainConfig, read_config
from gradnoise.lm.model.gpt import load_weights, weights_for_saving
from gradnoise.lm.storage import checkpoint, runlog
from gradnoise.lm.storage.files import read_json
from gradnoise.lm.training.distributed import DistributedEnv, gather_rng_states, restore_rng_state
from gradnoise.lm.training.group import GROUP_FILE, REPLICA_FILE, read_replica_link
from gradnoise.lm.training.replicas import Freezer
from gradnoise.replicated import ReplicatedGradientNoise

# Settings a resumed run may change: they do not alter the computation.
RESUMABLE_CHANGES = {"checkpoint_interval", "tensorboard", "wandb", "compile", "final_eval"}


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


@dataclasses.dataclass
class Replica:
    """One run of a (batched) group: its data streams and its progress."""

    batch_generator: torch.Generator
    augment_generator: torch.Generator
    progress: Progress = dataclasses.field(default_factory=Progress)

    def state_dict(self) -> dict:
        return {
            "batch_generator": self.batch_generator.get_state(),
            "augment_generator": self.augment_generator.get_state(),
            "progress": self.progress.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.batch_generator.set_state(state["batch_generator"])
        self.augment_generator.set_state(state["augment_generator"])
        self.progress = Progress(**state["progress"])


@dataclasses.dataclass
class RunState:
    """Everything a resume needs (see the module docstring), on one rank."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    noise: ReplicatedGradientNoise | None
    replicas: list[Replica]
    dist_env: DistributedEnv
    device: torch.device
    clock: Clock = dataclasses.field(default_factory=Clock)

    @functools.cached_property
    def params(self) -> list[torch.nn.Parameter]:
        """The trained parameters: clipped, and checked for non-finite values."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @functools.cached_property
    def freezer(self) -> Freezer:
        return Freezer(self.params, self.optimizer)

    @functools.cached_property
    def nonfinite_norms(self) -> torch.Tensor:
        """(M,) bool on the device: whether a replica's gradient norm was not finite at a step
        since it was last checked (it is clipped with it: the update is broken)."""
        return torch.zeros(len(self.replicas), dtype=torch.bool, device=self.device)

    def state_dict(self) -> dict:
        """The whole state. Under DDP every rank must call it: it gathers the RNG states."""
        state = {
            "model": weights_for_saving(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "noise": self._noise_state(),
            "rng_per_rank": gather_rng_states(self.dist_env, self.device),
            "clock": self.clock.state_dict(),
            "replica_dim": True,  # the optimizer's state has the replica dimension
        }
        replicas = [replica.state_dict() for replica in self.replicas]
        if len(replicas) == 1:
            return {**state, **replicas[0]}
        return {**state, "replicas": replicas}

    def _noise_state(self) -> dict | None:
        if self.noise is None:
            return None
        replicas = self.noise.state_dict()["replicas"]
        return replicas[0] if len(replicas) == 1 else {"replicas": replicas}

    def load_state_dict(self, state: dict) -> None:
        if "book" in state:  # written before RunState existed: progress and clock in one entry
            book = dict(state["book"])
            state = {**state, "clock": {k: book.pop(k) for k in ("train_s", "wall_s")}, "progress": book}
        if "replica_dim" not in state:
            state = _with_replica_dim(state)
        replicas = state.get("replicas", [state])
        if len(replicas) != len(self.replicas):
            raise UserError(f"the checkpoint holds {len(replicas)} runs, this group {len(self.replicas)}")
        load_weights(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.noise is not None:
            noise = state["noise"]  # a plain run's holds its one replica's, as its other entries
            self.noise.load_state_dict(noise if "replicas" in noise else {"replicas": [noise]})
        restore_rng_state(state["rng_per_rank"], self.dist_env.rank, self.device)
        self.clock.load_state_dict(state["clock"])
        for replica, saved in zip(self.replicas, replicas, strict=True):
            replica.load_state_dict(saved)
        for index, replica in enumerate(self.replicas):
            if replica.progress.diverged is not None:
                self.freezer.freeze(index)


def _with_replica_dim(state: dict) -> dict:
    """A plain run's checkpoint from before the replica dimension: its optimizer's state
    gains it, and its weight decay moves from the optimizer to WeightDecay (param group 0,
    the matrices, is the decayed one)."""
    optimizer = state["optimizer"]
    per_param = {
        key: {
            name: value.unsqueeze(0) if isinstance(value, torch.Tensor) and value.dim() > 0 else value
            for name, value in entry.items()
        }
        for key, entry in optimizer["state"].items()
    }
    groups = [
        {**group, "weight_decay": 0.0, "decay": index == 0}
        for index, group in enumerate(optimizer["param_groups"])
    ]
    return {**state, "optimizer": {"state": per_param, "param_groups": groups}}


# --- resuming ----------------------------------------------------------------------


def check_resumable(saved: dict, cfg: TrainConfig) -> None:
    """UserError unless `cfg` differs from the saved config only in RESUMABLE_CHANGES."""
    changed = sorted(_differences(saved, cfg) - RESUMABLE_CHANGES)
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} → {getattr(cfg, k)!r}" for k in changed)
        raise UserError(
            f"cannot resume with a different config ({detail}); only "
            f"{', '.join(sorted(RESUMABLE_CHANGES))} may change on resume"
        )


def finished_result(run_dir: Path, cfg: TrainConfig) -> dict | None:
    """The result of a run in run_dir that ended with this config (runlog.FINISHED: it trained
    to the end, or diverged), else None."""
    result = runlog.read_result(run_dir)
    try:
        saved = read_config(run_dir / runlog.CONFIG_FILE)
    except UserError:
        return None
    if result is not None and _differences(saved.to_dict(), cfg) <= RESUMABLE_CHANGES:
        return result
    return None


#: Every file a run writes in its directory: present, the directory holds a run.
RUN_FILES = (runlog.CONFIG_FILE, runlog.LOG_FILE, runlog.RESULT_FILE, REPLICA_FILE, checkpoint.CHECKPOINTS)


def refuse_existing_run(run_dir: Path) -> None:
    """UserError if run_dir already holds a run's outputs (a fresh run would overwrite them)."""
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if existing:
        raise UserError(
            f"{run_dir} already holds a run ({', '.join(existing)}); pass --resume to continue "
            "it, or choose another --run-dir"
        )


def check_owner(run_dir: Path, cfg: TrainConfig, member: tuple[Path, int] | None) -> None:
    """UserError unless what run_dir holds is this run's, so that resuming it may write there:
    its config.json equals `cfg` (up to RESUMABLE_CHANGES), and its replica.json names the
    group and replica `member` (group directory, index), or is absent for a plain run.

    A member's directory without replica.json (or one naming a group directory that is gone)
    may hold what a run without a checkpoint left (config.json, log.jsonl: the study may
    group a run it had launched alone), never a finished result or checkpoints of its own.
    Nothing but the trainer writes log.jsonl, results or checkpoints, and it writes
    config.json first."""
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not existing:
        return
    config_path = run_dir / runlog.CONFIG_FILE
    if not config_path.exists() and set(existing) - {REPLICA_FILE}:
        raise UserError(
            f"{run_dir} holds {', '.join(existing)} but no {runlog.CONFIG_FILE}: not a run "
            "this command can continue; choose another directory"
        )
    _check_link(run_dir, member, existing)
    if config_path.exists():
        try:
            check_resumable(read_json(config_path, "run config"), cfg)
        except UserError as error:
            raise UserError(f"{run_dir} holds another run: {error}") from None


def check_group_members(saved_dirs, run_dirs: list[Path], group_dir: Path, directory: Path) -> None:
    """UserError unless the group checkpoint `directory` was trained for these run
    directories, in this order (`saved_dirs`: relative to the group directory)."""
    saved = [(Path(group_dir) / d).resolve() for d in saved_dirs]
    if saved != [Path(d).resolve() for d in run_dirs]:
        moved = [
            f"run {m}: {Path(group_dir) / s} → {d}"
            for m, (s, d) in enumerate(zip(saved_dirs, run_dirs, strict=False))
            if (Path(group_dir) / s).resolve() != Path(d).resolve()
        ]
        raise UserError(
            f"the group checkpoint {directory} was trained for other run directories than "
            f"{Path(group_dir) / GROUP_FILE} lists ({'; '.join(moved) or 'another count'}); "
            "restore group.json as it was"
        )


def _check_link(run_dir: Path, member: tuple[Path, int] | None, existing: list[str]) -> None:
    """The replica.json part of check_owner."""
    link = read_replica_link(run_dir)
    if link is not None and not link[0].exists():
        link = None  # its group directory is gone: there is nothing of it to continue
    if member is None:
        if link is not None:
            raise UserError(
                f"{run_dir} is run {link[1]} of the batched group {link[0]}, whose checkpoints hold its "
                f"weights; continue it with: gradnoise train --group {link[0]} --resume"
            )
        return
    group_dir, index = member
    if link is None:
        if runlog.read_result(run_dir) is not None or checkpoint.CHECKPOINTS in existing:
            raise UserError(
                f"{run_dir} holds a run that is not a member of the group {group_dir} "
                f"({', '.join(existing)}); give each of the group's runs a directory of its own"
            )
    elif link[0].resolve() != Path(group_dir).resolve() or link[1] != index:
        raise UserError(
            f"{run_dir} is run {link[1]} of the group {link[0]}, not run {index} of {group_dir}; "
            "give each of the group's runs a directory of its own"
        )


def _differences(saved: dict, cfg: TrainConfig) -> set[str]:
    """The keys whose values differ; a key the saved config predates has its LATER_KEYS value."""
    current = cfg.to_dict()
    return {key for key in current if saved.get(key, LATER_KEYS.get(key)) != current[key]}

"""Training the MNIST task: one run, or a group of M runs as one batched DeepMLP.

One step, for every replica m at once:

    x[m], y[m]    the next batch_size digits of replica m's permutation of the train split
                  for this epoch (a generator seeded from (seed_m, epoch): batches never
                  depend on noise, init or the other replicas)
    loss[m]       mean cross-entropy of replica m's logits; the loop backpropagates Σ_m loss[m]
    clip          g[m] ← g[m] · min(1, c_m / (‖g[m]‖ + 1e-6)), replica m's own norm (c_m = 0: none)
    noise         ReplicatedGradientNoise: replica m's own schedule and seed, after clipping
    update        SGD without momentum or AdamW (weight decay 0), at the group's fixed lr

So replica m equals its run trained alone up to float reassociation of the batched
matmuls (dropout included: replica m's masks come from a generator seeded by (seed_m, step)
alone). A replica whose loss turns non-finite is frozen (its slices
put back after every step) and recorded diverged; the others go on.

Outputs: each run directory gets config.json, provenance.json (each attempt's code
and numerics, as gradnoise.lm.training.provenance records them for LM runs), log.jsonl (an
"eval" line every eval_every steps: step, epoch, test_acc, test_loss, train_loss over
the window, sigma) and result.json (status, finals: steps, test_acc, test_loss,
best_test_acc, train_loss, escape_step = the first evaluated step with test accuracy
above ESCAPE_ACCURACY, or None; a diverged run's are those of its last evaluation
before it diverged, with steps = the step it diverged at; and provenance: the
attempt's code and numerics, how many attempts made the run and whether they all had
the same). The group's checkpoints (weights as safetensors, the rest
loaded with weights_only) go to group_dir/checkpoints; `resume=True` continues exactly,
and SIGTERM checkpoints and returns status "interrupted".
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import gradnoise
from gradnoise.errors import UserError
from gradnoise.lm.devices import describe_device, resolve_device
from gradnoise.lm.seeding import derive_seed
from gradnoise.lm.storage import atomic, checkpoint, files, rundir, runlog
from gradnoise.lm.training import provenance, replicas
from gradnoise.mnist import data
from gradnoise.mnist.config import MnistConfig, check_group
from gradnoise.mnist.model import DeepMLP

log = logging.getLogger(__name__)

CONFIG_FILE, LOG_FILE, RESULT_FILE = "config.json", "log.jsonl", "result.json"
#: Test accuracy above which a run has left chance (10%): its escape step.
ESCAPE_ACCURACY = 0.2


def train(cfg: MnistConfig, run_dir: Path, *, resume: bool = False) -> dict:
    """One run: a group of one whose checkpoints live in its own run directory."""
    return train_group([cfg], [Path(run_dir)], Path(run_dir), resume=resume)[0]


def train_group(
    cfgs: list[MnistConfig], run_dirs: list[Path], group_dir: Path, *, resume=False
) -> list[dict]:
    """Train the runs as one batched model; returns each run's result (also in its result.json)."""
    check_group(cfgs)
    with rundir.claim(Path(group_dir)):
        for run_dir, cfg in zip(run_dirs, cfgs, strict=True):
            _prepare_run_dir(Path(run_dir), cfg, resume)
        return Training(cfgs, [Path(d) for d in run_dirs], Path(group_dir)).run(resume)


def _prepare_run_dir(run_dir: Path, cfg: MnistConfig, resume: bool) -> None:
    saved = run_dir / CONFIG_FILE
    if saved.is_file():
        if not resume:
            raise UserError(f"{run_dir} already holds a run; continue it with --resume or choose another")
        if MnistConfig.from_dict(files.read_json(saved, "run config"), str(saved)) != cfg:
            raise UserError(f"{saved} is another config than the one given; resume with that one")
    atomic.write_text(saved, json.dumps(cfg.to_dict(), indent=2) + "\n")


class Training:
    """A group at step 0 (or, after run(resume=True), at its checkpoint): the model, the
    optimizer, each run's noise and clipping, and the data on the device."""

    def __init__(self, cfgs: list[MnistConfig], run_dirs: list[Path], group_dir: Path):
        self.cfgs, self.run_dirs, self.group_dir = cfgs, run_dirs, group_dir
        cfg = self.cfg = cfgs[0]
        self.device = resolve_device(cfg.device)
        digits = data.load(cfg.dataset)
        self.train_x, self.train_y = self._tensors(digits.train_images, digits.train_labels)
        self.test_x, self.test_y = self._tensors(digits.test_images, digits.test_labels)
        self.steps_per_epoch = len(self.train_y) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"batch_size={cfg.batch_size} exceeds the {len(self.train_y)} train digits")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        seeds = [derive_seed(c.seed, "init") for c in cfgs]
        self.model = DeepMLP([c.init for c in cfgs], seeds, depth=cfg.depth, width=cfg.width).to(self.device)
        params = list(self.model.parameters())
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.0)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        self.noise = build_noise(self.optimizer, cfgs)
        self.freezer = replicas.Freezer(params, self.optimizer)
        self.clip = torch.tensor([c.grad_clip for c in cfgs], device=self.device)
        rates = [c.dropout for c in cfgs]
        self.dropout = torch.tensor(rates, device=self.device) if any(rates) else None
        self.step, self.window = 0, torch.zeros(len(cfgs), dtype=torch.float64)
        self.window_steps, self.evals = 0, [[] for _ in cfgs]
        self.diverged: dict[int, int] = {}
        self.stop = False
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, (M, N) permutations)

    def _tensors(self, images, labels) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(images).to(self.device, torch.float32) / 255.0
        return x, torch.from_numpy(labels).to(self.device)

    def run(self, resume: bool) -> list[dict]:
        latest = checkpoint.latest(self.group_dir) if resume else None
        if latest is not None:
            self._restore(latest)
        elif any((d / LOG_FILE).exists() for d in self.run_dirs):
            for run_dir in self.run_dirs:  # a resume without a checkpoint starts afresh
                (run_dir / LOG_FILE).unlink(missing_ok=True)
        made_by = provenance.current(self.device, torch.float32, False, replicas=len(self.cfgs))
        resumed_from = self.step if latest is not None else None
        self.provenance = [runlog.write_provenance(d, made_by, resumed_from) for d in self.run_dirs]
        started = time.monotonic()
        with _stop_on_sigterm(self):
            while self.step < self.total_steps and not self.stop:
                self.train_step()
                if self.step % self.cfg.eval_every == 0 or self.step == self.total_steps:
                    self._evaluate(time.monotonic() - started)
                if self.step % self.cfg.checkpoint_every == 0 and self.step < self.total_steps:
                    self._save()
        self._save()
        if self.step < self.total_steps:
            return [{"status": "interrupted", "finals": {"steps": self.step}} for _ in self.cfgs]
        return [self._result(m) for m in range(len(self.cfgs))]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Replica m's batch of `step`: its permutation for the epoch, sliced (M, B, 784), (M, B)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            orders = [permutation(len(self.train_y), c.seed, epoch) for c in self.cfgs]
            self._order = (epoch, torch.stack(orders).to(self.device))
        size = self.cfg.batch_size
        rows = self._order[1][:, index * size : (index + 1) * size]
        return self.train_x[rows], self.train_y[rows]

    def train_step(self) -> None:
        """One optimizer step of every replica (the module docstring's recipe); a replica whose
        loss is non-finite is frozen and recorded diverged at this step."""
        x, y = self.batch(self.step)
        self.model.train()
        generators = None
        if self.dropout is not None:
            generators = [
                torch.Generator(self.device).manual_seed(derive_seed(c.seed, f"dropout/{self.step}"))
                if c.dropout
                else None
                for c in self.cfgs
            ]
        logits = self.model(x, self.dropout, generators)
        losses = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(dim=1)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        if bool((self.clip > 0).any()):
            replicas.clip_grad_norms_(list(self.model.parameters()), self.clip)
        self.optimizer.step()
        self.freezer.restore()
        self.step += 1
        values = losses.detach().double().cpu()
        for m in torch.nonzero(~torch.isfinite(values)).flatten().tolist():
            if m not in self.diverged:
                self.diverged[m] = self.step
                self.freezer.freeze(m)
                log.warning(f"{self.run_dirs[m]} diverged at step {self.step} (non-finite loss); frozen")
        self.window += torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        self.window_steps += 1

    @torch.no_grad()
    def evaluate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(test accuracy, test loss) of every replica on the whole test split, (M,) each."""
        self.model.eval()
        logits = self.model(self.test_x)
        y = self.test_y.expand(len(self.cfgs), -1)
        loss = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(dim=1)
        accuracy = (logits.argmax(dim=2) == y).double().mean(dim=1)
        return accuracy.cpu(), loss.double().cpu()

    def _evaluate(self, elapsed: float) -> None:
        accuracy, loss = self.evaluate()
        train_loss = (self.window / max(self.window_steps, 1)).tolist()
        self.window.zero_()
        self.window_steps = 0
        sigmas = self.sigmas()
        for m, run_dir in enumerate(self.run_dirs):
            if m in self.diverged:
                continue  # frozen: its last evaluation before the divergence stands
            record = {
                "kind": "eval",
                "step": self.step,
                "epoch": self.step / self.steps_per_epoch,
                "test_acc": float(accuracy[m]),
                "test_loss": _finite_or_none(float(loss[m])),
                "train_loss": train_loss[m],
                "sigma": sigmas[m],
                "time_s": round(elapsed, 3),
            }
            self.evals[m].append(record)
            with open(run_dir / LOG_FILE, "a") as file:
                file.write(json.dumps(record) + "\n")
        shown = ", ".join(f"{float(a):.3f}" for a in accuracy[:8])
        log.info(f"step {self.step}/{self.total_steps}: test acc {shown}{' …' if len(accuracy) > 8 else ''}")

    def sigmas(self) -> list[float]:
        if self.noise is None:
            return [0.0] * len(self.cfgs)
        return self.noise.sigma

    def _result(self, m: int) -> dict:
        evals = self.evals[m] or [{"test_acc": None, "test_loss": None, "train_loss": None, "step": 0}]
        escaped = [e["step"] for e in evals if e["test_acc"] is not None and e["test_acc"] > ESCAPE_ACCURACY]
        result = {
            "status": "diverged" if m in self.diverged else "done",
            "error": None if m not in self.diverged else f"non-finite loss at step {self.diverged[m]}",
            "device": describe_device(self.device),
            "finals": {
                "steps": self.diverged.get(m, self.step),
                "test_acc": evals[-1]["test_acc"],
                "test_loss": evals[-1]["test_loss"],
                "train_loss": evals[-1]["train_loss"],
                "best_test_acc": max(
                    (e["test_acc"] for e in evals if e["test_acc"] is not None), default=None
                ),
                "escape_step": escaped[0] if escaped else None,
            },
            "provenance": self.provenance[m],
        }
        atomic.write_text(self.run_dirs[m] / RESULT_FILE, json.dumps(result, indent=2) + "\n")
        return result

    def _save(self) -> None:
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "noise": self.noise.state_dict() if self.noise is not None else {},
            "diverged": torch.tensor([self.diverged.get(m, 0) for m in range(len(self.cfgs))]),
            "window": self.window.clone(),
            "window_steps": self.window_steps,
            "evals": json.dumps(self.evals),
            "threads": torch.get_num_threads(),
        }
        checkpoint.save(self.group_dir, self.step, self.model.state_dict(), state)

    def _restore(self, directory: Path) -> None:
        weights, state = checkpoint.load(directory, self.device)
        checkpoint.resume_threads(state, directory, keep_current=False)
        with checkpoint.restoring(directory):
            files.check_tensors(weights, self.model.state_dict(), f"the weights in {directory}")
            self.model.load_state_dict(weights)
            self.optimizer.load_state_dict(state["optimizer"])
            if self.noise is not None:
                self.noise.load_state_dict(state["noise"])
            self.step, self.window_steps = int(state["step"]), int(state["window_steps"])
            self.window = state["window"].clone()
            self.evals = json.loads(state["evals"])
            self.diverged = {m: int(s) for m, s in enumerate(state["diverged"].tolist()) if s > 0}
        for m in self.diverged:
            self.freezer.freeze(m)
        for m, run_dir in enumerate(self.run_dirs):  # the log as it was at the checkpoint
            atomic.write_text(run_dir / LOG_FILE, "".join(json.dumps(e) + "\n" for e in self.evals[m]))


def permutation(size: int, seed: int, epoch: int) -> torch.Tensor:
    """Replica order of the train split in `epoch` for a run seeded `seed`."""
    generator = torch.Generator().manual_seed(derive_seed(seed, f"batches/{epoch}"))
    return torch.randperm(size, generator=generator)


def build_noise(
    optimizer: torch.optim.Optimizer, cfgs: list[MnistConfig]
) -> gradnoise.ReplicatedGradientNoise | None:
    """Each run's noise schedule (none: σ = 0 for that replica) and seed, after clipping; a
    run alone is a group of one, as its weights carry the replica dimension too."""
    parsed = [gradnoise.schedules.parse(c.noise) for c in cfgs]
    if all(schedule is None for schedule in parsed):
        return None
    lanes = [schedule or gradnoise.schedules.Constant(0.0) for schedule in parsed]
    seeds = [derive_seed(c.seed, "noise") for c in cfgs]
    return gradnoise.ReplicatedGradientNoise(optimizer, lanes, seed=seeds)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


@contextlib.contextmanager
def _stop_on_sigterm(training: Training):
    """SIGTERM asks the loop to stop after the current step (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request(signum, frame):
        training.stop = True

    previous = signal.signal(signal.SIGTERM, request)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

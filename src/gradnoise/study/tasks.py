"""The harness tasks a study can run: what differs between the LM task and the MNIST one.

    task = TASKS[spec.task]
    config = task.resolve(dataset, preset, values)     # TrainConfig or MnistConfig
    task.run_id(config), task.group_key(config), task.total_steps(config)
    task.command(directory, alone)                     # the worker's `gradnoise ...` arguments
    task.metrics                                       # final metric → Direction

The study layer reaches each harness through this module only: the LM harness's config,
group files and trainer, and the MNIST harness's public surface (MnistConfig, its group
file, `train_group`). A run of either task keeps the same run directory (config.json,
provenance.json, log.jsonl, result.json), so the store, `study status` and the runner's
recovery read both alike.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gradnoise.errors import UserError
from gradnoise.lm.config import DATASETS, LATER_KEYS, PRESETS, TrainConfig, parse_overrides, resolve_config
from gradnoise.lm.config import group_key as lm_group_key
from gradnoise.lm.storage.runlog import FINAL_METRICS

#: Where a run executes does not change what it computes, so it is not part of the run id.
EXECUTION_KEYS = ("device",)
LOWER, HIGHER = "lower", "higher"


@dataclass(frozen=True)
class Task:
    """One harness task as the study layer sees it."""

    name: str
    datasets: tuple[str, ...]
    presets: tuple[str, ...]
    #: final metric → which way is better ("lower" or "higher")
    metrics: dict[str, str]
    #: the `gradnoise` subcommand that trains a run or a group
    train_command: str
    #: runs per process where --batch-models is not given, on a CPU
    cpu_batch_models: int
    resolve: Callable[[str, str, dict], object]
    from_dict: Callable[[dict], object]
    group_key: Callable[[object], str]
    total_steps: Callable[[object], int]
    write_group: Callable[[Path, list[str], list[Path], list[object]], None]
    #: ["key=value", ...] → {key: value typed as the task's config field} (`study run --set`)
    parse_set: Callable[[list[str]], dict]

    def run_id(self, config) -> str:
        """sha256[:12] of the canonical JSON of the resolved config (dataset and seed
        included, execution keys such as the device left out; for the LM task, LATER_KEYS
        at their former value are left out too, so older run ids stay)."""
        values = {
            k: v
            for k, v in config.to_dict().items()
            if k not in EXECUTION_KEYS and not (self.name == "lm" and k in LATER_KEYS and v == LATER_KEYS[k])
        }
        return hashlib.sha256(canonical(values).encode()).hexdigest()[:12]

    def better(self, metric: str) -> str:
        """ "higher" for a metric where more is better (accuracy), "lower" for the others."""
        return self.metrics.get(metric, LOWER)


def canonical(value) -> str:
    """The JSON text two equal values share."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _lm_write_group(directory: Path, run_ids, run_dirs, configs) -> None:
    from gradnoise.lm.training.group import Member, write_group

    write_group(directory, [Member(i, d, c) for i, d, c in zip(run_ids, run_dirs, configs, strict=True)])


def _mnist_resolve(dataset: str, preset: str, values: dict):
    from gradnoise.mnist.config import MnistConfig

    return MnistConfig.from_dict({**values, "dataset": dataset}, "the run's config")


def _mnist_from_dict(values: dict):
    from gradnoise.mnist.config import MnistConfig

    return MnistConfig.from_dict(values)


def _mnist_group_key(config) -> str:
    return canonical(config.group_key())


def _mnist_parse_set(pairs: list[str]) -> dict:
    from gradnoise.mnist.config import parse_overrides as parse_mnist

    typed = parse_mnist(pairs)
    return {key: getattr(typed, key) for key in (pair.partition("=")[0] for pair in pairs)}


def _mnist_write_group(directory: Path, run_ids, run_dirs, configs) -> None:
    from gradnoise.mnist.config import write_group

    write_group(directory, list(run_ids), list(run_dirs), list(configs))


LM = Task(
    name="lm",
    datasets=DATASETS,
    presets=tuple(PRESETS),
    metrics=dict.fromkeys(FINAL_METRICS, LOWER),
    train_command="train",
    cpu_batch_models=1,
    resolve=resolve_config,
    from_dict=TrainConfig.from_dict,
    group_key=lm_group_key,
    total_steps=lambda config: config.max_iters,
    write_group=_lm_write_group,
    parse_set=parse_overrides,
)
#: The MNIST task's finals (its trainer's result.json) and their directions.
MNIST_METRICS = {
    "test_acc": HIGHER,
    "best_test_acc": HIGHER,
    "test_loss": LOWER,
    "train_loss": LOWER,
    "escape_step": LOWER,
}
MNIST = Task(
    name="mnist",
    datasets=("mnist_5k", "mnist"),
    presets=("default",),
    metrics=MNIST_METRICS,
    train_command="train-mnist",
    # Batching is what makes the MNIST budget affordable on a CPU (docs/benchmarks.md).
    cpu_batch_models=40,
    resolve=_mnist_resolve,
    from_dict=_mnist_from_dict,
    group_key=_mnist_group_key,
    total_steps=lambda config: config.total_steps(),
    write_group=_mnist_write_group,
    parse_set=_mnist_parse_set,
)
TASKS = {task.name: task for task in (LM, MNIST)}


def task_of(name, where: str) -> Task:
    """The task a spec names; UserError for another."""
    if name not in TASKS:
        raise UserError(f"{where}: task={name!r}; allowed: {', '.join(TASKS)}")
    return TASKS[name]


def task_of_spec(spec: dict) -> Task:
    """The task of a spec's data as a store holds it (lm where it names none)."""
    return TASKS.get(spec.get("task", "lm"), LM)


def worker_arguments(task: Task, directory: Path, alone: bool) -> list[str]:
    """`gradnoise …` arguments that train a run alone (its config.json in `directory`) or a
    group (group.json in `directory`), resuming from any checkpoint."""
    if task.name == "lm":
        where = ["--config-file", str(directory / "config.json"), "--run-dir", str(directory)]
        where = where if alone else ["--group", str(directory)]
        return [task.train_command, *where, "--resume", "--no-progress"]
    # A run alone of the MNIST task is a group of one in its own directory.
    return [task.train_command, "--group", str(directory), "--resume"]


def train_in_process(task: Task, configs: list, run_dirs: list[Path], group_dir: Path | None) -> list[dict]:
    """Train a run alone (group_dir None) or a group in this process (the Ray executor, and
    `study verify`); each run's result."""
    if task.name == "mnist":
        from gradnoise.mnist.trainer import train_group

        return train_group(configs, run_dirs, group_dir or run_dirs[0], resume=True)
    from gradnoise.lm.training.trainer import train, train_group

    if group_dir is None:
        return [train(configs[0], run_dirs[0], resume=True, progress=False)]
    return train_group(configs, run_dirs, group_dir, resume=True, progress=False)

"""What the runs of a study ran under, as the report shows it: the noise schedules they
used, what each method's config changes from the baseline's, the baseline's gradient
scale, and the per-run list with each run's files.

    schedule_uses(study)[0].horizon     # the step where σ_t falls below 1% of σ0
    gradient_scales(study)[0].rms       # ‖g‖ / √N of the baseline

Rows computed from a loaded study (`loading`), beside the functions that compute them.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from gradnoise import schedules
from gradnoise.study.plan import run_directory
from gradnoise.study.report.loading import Study
from gradnoise.study.report.metrics import RUN_METRICS
from gradnoise.study.spec import EXECUTION_KEYS

#: σ_t below this fraction of σ0 counts as "no noise any more" (a schedule's horizon).
HORIZON_FRACTION = 0.01


@dataclass(frozen=True)
class ScheduleUse:
    """One noise schedule as the runs used it."""

    spec: str
    schedule: schedules.Schedule
    relative: bool
    max_iters: int
    methods: tuple[str, ...]
    run_ids: tuple[str, ...]

    @property
    def data_driven(self) -> bool:
        """σ_t depends on observed validation losses, not on t alone (plateau)."""
        return isinstance(getattr(self.schedule, "inner", self.schedule), schedules.Plateau)

    @property
    def horizon(self) -> int | None:
        return self.schedule.horizon(HORIZON_FRACTION)


@dataclass(frozen=True)
class RunRow:
    """One run as the per-run table and runs.csv show it; `directory` and `log` are paths
    relative to the report directory."""

    run_id: str
    dataset: str
    method: str
    seed: int
    status: str
    finals: dict[str, float | None]
    wall_s: float | None
    directory: str
    log: str
    error: str | None


@dataclass(frozen=True)
class ConfigDiff:
    """What a method's resolved config changes from the baseline's: (key, baseline value,
    method value), over the study's datasets (seed and execution keys aside)."""

    method: str
    changes: tuple[tuple[str, object, object], ...]


@dataclass(frozen=True)
class GradientScale:
    """The baseline's gradient on one dataset, from its train log lines: RMS = ‖g‖ / √N
    (N = parameters), median over the logged steps of all its done runs."""

    dataset: str
    grad_norm: float
    parameters: int
    points: int

    @property
    def rms(self) -> float:
        return self.grad_norm / math.sqrt(self.parameters)


def schedule_uses(study: Study) -> list[ScheduleUse]:
    """The noise schedules of the study's runs, one per (schedule, relative or not)."""
    grouped: dict[tuple[str, bool], list[dict]] = defaultdict(list)
    for run in study.runs:
        schedule = schedules.parse(run["config"].get("noise", "none"))
        if schedule is None:
            continue
        relative = isinstance(schedule, schedules.Relative) or run["config"].get("noise_mode") == "relative"
        grouped[(schedule.spec, relative)].append(run)
    return [
        ScheduleUse(
            spec=spec,
            schedule=schedules.parse(spec),
            relative=relative,
            max_iters=max(int(run["config"]["max_iters"]) for run in runs),
            methods=tuple(dict.fromkeys(run["method"] for run in runs)),
            run_ids=tuple(run["id"] for run in runs),
        )
        for (spec, relative), runs in grouped.items()
    ]


def run_rows(study: Study) -> list[RunRow]:
    """Every run, in the store's order, with its finals (done or diverged) and its files."""
    finals = {row["id"]: row for rows in study.done.values() for row in rows.values()}
    rows = []
    for run in study.runs:
        values = finals.get(run["id"], {})
        directory = run_directory(Path(".."), run["id"])
        rows.append(
            RunRow(
                run_id=run["id"],
                dataset=run["dataset"],
                method=run["method"],
                seed=run["seed"],
                status=run["status"],
                finals={key: values.get(key) for key in RUN_METRICS},
                wall_s=values.get("wall_s"),
                directory=f"{directory.as_posix()}/",
                log=(directory / "log.jsonl").as_posix(),
                error=run["error"],
            )
        )
    return rows


#: Per run, not per method: left out of the config comparison.
_PER_RUN_KEYS = ("seed", "dataset", *EXECUTION_KEYS)


def config_diffs(study: Study) -> list[ConfigDiff]:
    """Each method's resolved config against the baseline's on the same dataset."""
    diffs = []
    for method in study.methods:
        changes: dict[str, tuple] = {}
        for dataset in study.datasets:
            base, mine = study.config(dataset, study.baseline), study.config(dataset, method)
            if base is None or mine is None:
                continue
            for key in mine:
                if key not in _PER_RUN_KEYS and base.get(key) != mine[key]:
                    changes.setdefault(key, (key, base.get(key), mine[key]))
        diffs.append(ConfigDiff(method, tuple(changes.values())))
    return diffs


def gradient_scales(study: Study) -> list[GradientScale]:
    """The baseline's median ‖g‖ and parameter count per dataset, where its runs logged them."""
    scales = []
    for dataset in study.datasets:
        runs = study.done.get((dataset, study.baseline), {}).values()
        norms = [
            p["grad_norm"]
            for row in runs
            for p in study.trains.get(row["id"], [])
            if p["grad_norm"] is not None
        ]
        parameters = {row.get("parameters") for row in runs} - {None}
        if norms and len(parameters) == 1:
            scales.append(GradientScale(dataset, statistics.median(norms), parameters.pop(), len(norms)))
    return scales

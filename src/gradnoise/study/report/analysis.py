"""The report's numbers: a study as loaded from its store, and the typed rows that
every table, CSV file and plot of the report is drawn from.

    study = load_study(store)
    analysis = analyze(study)
    analysis.summary("shakespeare_char", "exp").summary("val_loss").mean

Only runs with status "done" enter summaries, comparisons and speeds; the
others are counted. The statistics themselves come from `stats`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from gradnoise import schedules
from gradnoise.lm.runlog import FINAL_METRICS
from gradnoise.study.spec import Published, TableLayout, parse_published, parse_table
from gradnoise.study.stats import (
    Comparison,
    Overhead,
    Summary,
    holm,
    paired_comparison,
    step_time_overhead,
    steps_to_target,
    summarize,
)
from gradnoise.study.store import Store

LOSS_UNIT = "nats/char"
BPC_UNIT = "bits/char"
#: σ_t below this fraction of σ0 counts as "no noise any more" (a schedule's horizon).
HORIZON_FRACTION = 0.01


@dataclass(frozen=True)
class Metric:
    """A final metric as the report names it."""

    key: str
    label: str
    unit: str
    meaning: str = ""


METRICS = {
    metric.key: metric
    for metric in (
        Metric("train_loss", "final train loss", LOSS_UNIT, "the last eval, in eval mode"),
        Metric("val_loss", "final val loss", LOSS_UNIT, "the last eval"),
        Metric("best_val_loss", "best val loss", LOSS_UNIT, "the lowest eval"),
        Metric("val_loss_full", "val loss, full pass", LOSS_UNIT, "one pass over the whole split"),
        Metric("test_loss_full", "test loss, full pass", LOSS_UNIT, "one pass over the whole split"),
        Metric("train_bpc", "train BPC", BPC_UNIT, "the last eval, in eval mode"),
        Metric("val_bpc", "final val BPC", BPC_UNIT, "the last eval"),
        Metric("best_val_bpc", "best val BPC", BPC_UNIT, "the lowest eval"),
        Metric("val_bpc_full", "val BPC, full pass", BPC_UNIT, "one pass over the whole split"),
        Metric("test_bpc_full", "test BPC, full pass", BPC_UNIT, "one pass over the whole split"),
        Metric("step_time_median_s", "median step time (s)", "s"),
        Metric("tokens_per_s", "tokens/s", "tokens/s"),
        Metric("train_s", "training time (s)", "s"),
    )
}
LOSS_METRICS = ("train_loss", "val_loss", "best_val_loss", "val_loss_full", "test_loss_full")
BPC_METRICS = ("train_bpc", "val_bpc", "best_val_bpc", "val_bpc_full", "test_bpc_full")
COST_METRICS = ("step_time_median_s", "tokens_per_s", "train_s")
#: Summarized per dataset × method (and written to summary.csv).
SUMMARY_METRICS = LOSS_METRICS + BPC_METRICS + COST_METRICS
#: Compared with the baseline; each metric of each dataset is one Holm family.
COMPARED_METRICS = ("train_loss", "val_loss", "best_val_loss", "test_loss_full")


def metric(key: str) -> Metric:
    """The report's name for a final metric (the key itself for those it has no words for)."""
    return METRICS.get(key) or Metric(key, key, "")


# ---- the study, as loaded -------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    """What the report needs of a study's store."""

    name: str
    spec: dict
    baseline: str
    #: every run (Store.runs rows), in the store's order
    runs: tuple[dict, ...]
    #: the spec's order first, then any other seen in the runs; only those with runs
    datasets: tuple[str, ...]
    methods: tuple[str, ...]
    #: (dataset, method) → seed → finals row (Store.finals) of a done run
    done: dict[tuple[str, str], dict[int, dict]]
    #: run id → its eval points (Store.curves rows of kind "eval"), done runs only
    evals: dict[str, list[dict]]
    #: run id → (step, σ) of its train log lines, done runs only
    sigmas: dict[str, list[tuple[int, float]]]
    published: Published | None
    table: TableLayout | None

    def values(self, dataset: str, method: str, metric: str) -> dict[int, float | None]:
        """seed → the metric's value, over the done runs of (dataset, method)."""
        return {seed: row.get(metric) for seed, row in self.done.get((dataset, method), {}).items()}


def load_study(store: Store) -> Study:
    """Read a study from its store: runs, the finals of done runs, and of their curves the
    eval points and logged σ (a paper-scale study logs hundreds of thousands of train
    points; only these are kept)."""
    stored = store.study()
    spec = stored["spec"]
    runs = store.runs()
    done: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for row in store.finals():
        if row["status"] == "done":
            done[(row["dataset"], row["method"])][row["seed"]] = row
    evals, sigmas = {}, {}
    for run_id in (row["id"] for rows in done.values() for row in rows.values()):
        points = store.curves([run_id])
        evals[run_id] = [p for p in points if p["kind"] == "eval"]
        sigmas[run_id] = [
            (p["step"], p["sigma"]) for p in points if p["kind"] == "train" and p["sigma"] is not None
        ]
    baseline = spec.get("baseline", "baseline")
    datasets = _ordered(spec.get("datasets") or [], (run["dataset"] for run in runs))
    methods = _ordered([baseline, *(spec.get("methods") or {})], (run["method"] for run in runs))
    source = f"in {store.path}"
    return Study(
        name=stored["name"],
        spec=spec,
        baseline=baseline,
        runs=tuple(runs),
        datasets=tuple(d for d in datasets if any(run["dataset"] == d for run in runs)),
        methods=tuple(m for m in methods if any(run["method"] == m for run in runs)),
        done=dict(done),
        evals=evals,
        sigmas=sigmas,
        published=parse_published(spec, source),
        table=parse_table(spec, source),
    )


def _ordered(preferred: Iterable[str], seen: Iterable[str]) -> list[str]:
    """`preferred` first (the spec's order), then any other name seen, sorted."""
    order = list(dict.fromkeys(preferred))
    return order + sorted(set(seen) - set(order))


# ---- rows -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SummaryRow:
    """One dataset × method: its runs by status, and each metric summarized over done seeds."""

    dataset: str
    method: str
    runs: int
    done: int
    diverged: int
    failed: int
    unfinished: int
    summaries: dict[str, Summary]

    def summary(self, metric: str) -> Summary:
        return self.summaries[metric]


@dataclass(frozen=True)
class ComparisonRow:
    """One method vs the baseline on one metric of one dataset, paired on seeds; the Holm
    adjustment is across the methods of that (dataset, metric)."""

    dataset: str
    method: str
    metric: str
    comparison: Comparison
    t_p_holm: float
    wilcoxon_p_holm: float


@dataclass(frozen=True)
class SpeedRow:
    """One dataset × method: steps and training seconds to the baseline's mean final val
    loss (over the runs that reached it), and the step-time overhead vs the baseline."""

    dataset: str
    method: str
    target_val_loss: float
    runs: int
    reached: int
    steps: Summary
    seconds: Summary
    overhead: Overhead


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
class PublishedRow:
    """A reference value from the spec's `published:` for `method` on one dataset."""

    dataset: str
    method: str
    metric: str
    value: float
    how: str


@dataclass(frozen=True)
class Analysis:
    """Every row of one study's report."""

    study: Study
    summaries: tuple[SummaryRow, ...]
    comparisons: tuple[ComparisonRow, ...]
    speeds: tuple[SpeedRow, ...]
    schedules: tuple[ScheduleUse, ...]
    published: tuple[PublishedRow, ...]

    def summary(self, dataset: str, method: str) -> SummaryRow | None:
        return next((r for r in self.summaries if (r.dataset, r.method) == (dataset, method)), None)

    def comparison(self, dataset: str, method: str, metric: str) -> ComparisonRow | None:
        key = (dataset, method, metric)
        return next((r for r in self.comparisons if (r.dataset, r.method, r.metric) == key), None)

    def speed(self, dataset: str, method: str) -> SpeedRow | None:
        return next((r for r in self.speeds if (r.dataset, r.method) == (dataset, method)), None)


def analyze(study: Study) -> Analysis:
    return Analysis(
        study=study,
        summaries=tuple(summary_rows(study)),
        comparisons=tuple(comparison_rows(study)),
        speeds=tuple(speed_rows(study)),
        schedules=tuple(schedule_uses(study)),
        published=tuple(published_rows(study)),
    )


def summarized_metrics(study: Study) -> tuple[str, ...]:
    """SUMMARY_METRICS, then any other metric the spec's table shows."""
    return tuple(dict.fromkeys([*SUMMARY_METRICS, *(study.table.metrics if study.table else ())]))


def compared_metrics(study: Study) -> tuple[str, ...]:
    """COMPARED_METRICS, then any other metric the spec's table shows (its cells carry p)."""
    return tuple(dict.fromkeys([*COMPARED_METRICS, *(study.table.metrics if study.table else ())]))


def summary_rows(study: Study) -> list[SummaryRow]:
    rows = []
    for dataset in study.datasets:
        for method in study.methods:
            runs = [r for r in study.runs if r["dataset"] == dataset and r["method"] == method]
            if not runs:
                continue
            statuses = [r["status"] for r in runs]
            rows.append(
                SummaryRow(
                    dataset=dataset,
                    method=method,
                    runs=len(runs),
                    done=statuses.count("done"),
                    diverged=statuses.count("diverged"),
                    failed=statuses.count("failed"),
                    unfinished=statuses.count("pending") + statuses.count("running"),
                    summaries={
                        metric: summarize(study.values(dataset, method, metric).values())
                        for metric in summarized_metrics(study)
                    },
                )
            )
    return rows


def comparison_rows(study: Study) -> list[ComparisonRow]:
    """Every method vs the baseline; Holm across the methods of one (dataset, metric)."""
    rows = []
    for dataset in study.datasets:
        if (dataset, study.baseline) not in study.done:
            continue
        others = [m for m in study.methods if m != study.baseline and (dataset, m) in study.done]
        for metric in compared_metrics(study):
            baseline_values = study.values(dataset, study.baseline, metric)
            if all(v is None for v in baseline_values.values()):
                continue
            family = [
                (method, paired_comparison(study.values(dataset, method, metric), baseline_values))
                for method in others
            ]
            t_holm = holm([c.t_p for _, c in family])
            w_holm = holm([c.wilcoxon_p for _, c in family])
            for (method, comparison), t_adj, w_adj in zip(family, t_holm, w_holm, strict=True):
                rows.append(ComparisonRow(dataset, method, metric, comparison, t_adj, w_adj))
    return rows


def speed_rows(study: Study) -> list[SpeedRow]:
    """Steps / seconds to the baseline's mean final val loss, and step-time overhead."""
    rows = []
    for dataset in study.datasets:
        target = summarize(study.values(dataset, study.baseline, "val_loss").values()).mean
        baseline_times = study.values(dataset, study.baseline, "step_time_median_s").values()
        for method in study.methods:
            runs = study.done.get((dataset, method))
            if not runs:
                continue
            hits = (
                []
                if math.isnan(target)
                else [steps_to_target(study.evals.get(row["id"], []), target) for row in runs.values()]
            )
            reached = [hit for hit in hits if hit is not None]
            rows.append(
                SpeedRow(
                    dataset=dataset,
                    method=method,
                    target_val_loss=target,
                    runs=len(runs),
                    reached=len(reached),
                    steps=summarize(step for step, _ in reached),
                    seconds=summarize(seconds for _, seconds in reached),
                    overhead=step_time_overhead(
                        study.values(dataset, method, "step_time_median_s").values(), baseline_times
                    ),
                )
            )
    return rows


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


def published_rows(study: Study) -> list[PublishedRow]:
    """The spec's published values of the study's datasets, in the study's dataset order and
    the final metrics' order (a stored spec's mappings come back sorted by key)."""
    published = study.published
    if published is None:
        return []
    return [
        PublishedRow(dataset, published.method, key, values[key], published.how.get(key, ""))
        for dataset in study.datasets
        if (values := published.values.get(dataset))
        for key in FINAL_METRICS
        if key in values
    ]

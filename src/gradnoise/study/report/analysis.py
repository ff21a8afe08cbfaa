"""The report's numbers: the typed rows that every table, CSV file and plot of the
report is drawn from, computed from a loaded study (`loading`).

    study = load_study(store)
    analysis = analyze(study)
    analysis.summary("shakespeare_char", "exp").summary("val_loss").mean

Only runs with status "done" enter summaries, comparisons and speeds; the
others are counted. The statistics themselves come from `stats`, the metrics'
names and directions from `metrics`, the rows on what the runs ran under (schedules,
configs, gradient scale, the run list) from `conditions`. Each row type sits beside
the function that computes it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from gradnoise import schedules
from gradnoise.lm.storage.runlog import FINAL_METRICS
from gradnoise.study.report.conditions import (
    ConfigDiff,
    GradientScale,
    RunRow,
    ScheduleUse,
    config_diffs,
    gradient_scales,
    run_rows,
    schedule_uses,
)
from gradnoise.study.report.loading import Study
from gradnoise.study.report.metrics import COMPARED_METRICS, LIKE_FOR_LIKE, SUMMARY_METRICS
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
    """One dataset × method: steps and training seconds to the target val loss (the
    baseline's best, see `speed_rows`), over the runs that reached it, and the step-time
    overhead vs the baseline."""

    dataset: str
    method: str
    target_val_loss: float
    runs: int
    reached: int
    steps: Summary
    seconds: Summary
    overhead: Overhead


@dataclass(frozen=True)
class PublishedRow:
    """A reference value from the spec's `published:` for `method` on one dataset, beside
    this study's value of the same metric and (LIKE_FOR_LIKE) of its averaged stand-in."""

    dataset: str
    method: str
    metric: str
    value: float
    how: str
    ours: Summary
    stand_in: str | None = None
    stand_in_ours: Summary | None = None

    @property
    def comparable(self) -> tuple[str, Summary]:
        """Our metric to read the published value against: the same one where we have it,
        else its stand-in."""
        if self.ours.n or self.stand_in is None:
            return self.metric, self.ours
        return self.stand_in, self.stand_in_ours


@dataclass(frozen=True)
class DoseRow:
    """One noise level of the dose-response family on one metric: the difference from
    the baseline (paired on seeds) at the σ the runs used; Holm across the family's levels
    on that (dataset, metric)."""

    dataset: str
    method: str
    metric: str
    relative: bool
    #: the schedule's own value at step 0: σ (absolute) or r (relative: σ = r · RMS(g))
    level: float
    #: σ as used: the logged σ, median over the run's log lines, median over its seeds
    sigma: float
    comparison: Comparison
    t_p_holm: float
    wilcoxon_p_holm: float


@dataclass(frozen=True)
class ReferenceRow:
    """One method vs the spec's findings reference (e.g. dropout) on one metric, paired on
    seeds; Holm across the methods compared with the reference on that (dataset, metric)."""

    dataset: str
    method: str
    metric: str
    reference: str
    comparison: Comparison
    t_p_holm: float


@dataclass(frozen=True)
class Analysis:
    """Every row of one study's report."""

    study: Study
    summaries: tuple[SummaryRow, ...]
    comparisons: tuple[ComparisonRow, ...]
    speeds: tuple[SpeedRow, ...]
    schedules: tuple[ScheduleUse, ...]
    published: tuple[PublishedRow, ...]
    runs: tuple[RunRow, ...] = ()
    config_diffs: tuple[ConfigDiff, ...] = ()
    gradient_scales: tuple[GradientScale, ...] = ()
    doses: tuple[DoseRow, ...] = ()
    references: tuple[ReferenceRow, ...] = ()

    def summary(self, dataset: str, method: str) -> SummaryRow | None:
        return next((r for r in self.summaries if (r.dataset, r.method) == (dataset, method)), None)

    def comparison(self, dataset: str, method: str, metric: str) -> ComparisonRow | None:
        key = (dataset, method, metric)
        return next((r for r in self.comparisons if (r.dataset, r.method, r.metric) == key), None)

    def speed(self, dataset: str, method: str) -> SpeedRow | None:
        return next((r for r in self.speeds if (r.dataset, r.method) == (dataset, method)), None)

    def gradient_scale(self, dataset: str) -> GradientScale | None:
        return next((r for r in self.gradient_scales if r.dataset == dataset), None)

    def dose(self, dataset: str, metric: str) -> list[DoseRow]:
        """The family's rows on (dataset, metric), in order of σ used."""
        rows = [r for r in self.doses if (r.dataset, r.metric) == (dataset, metric)]
        return sorted(rows, key=lambda r: (r.sigma, r.relative))


def analyze(study: Study) -> Analysis:
    summaries = tuple(summary_rows(study))
    return Analysis(
        study=study,
        summaries=summaries,
        comparisons=tuple(comparison_rows(study)),
        speeds=tuple(speed_rows(study)),
        schedules=tuple(schedule_uses(study)),
        published=tuple(published_rows(study, summaries)),
        runs=tuple(run_rows(study)),
        config_diffs=tuple(config_diffs(study)),
        gradient_scales=tuple(gradient_scales(study)),
        doses=tuple(dose_rows(study)),
        references=tuple(reference_rows(study)),
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
    """Steps / seconds to the target val loss, and step-time overhead.

    The target is the baseline's best val loss: the highest of its runs' best_val_loss,
    so every baseline run reaches it (its mean would leave some out, and a final val loss
    is reached on the way down by a run that overfits)."""
    rows = []
    for dataset in study.datasets:
        bests = [v for v in study.values(dataset, study.baseline, "best_val_loss").values() if v is not None]
        target = max(bests) if bests else math.nan
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


def published_rows(study: Study, summaries: Iterable[SummaryRow]) -> list[PublishedRow]:
    """The spec's published values of the study's datasets, in the study's dataset order and
    the final metrics' order (a stored spec's mappings come back sorted by key), each with
    our summary of the same metric and of its LIKE_FOR_LIKE stand-in."""
    published = study.published
    if published is None:
        return []
    by_key = {(row.dataset, row.method): row for row in summaries}
    empty = summarize([])

    def ours(dataset: str, metric: str) -> Summary:
        row = by_key.get((dataset, published.method))
        if row is None:
            return empty
        return row.summaries.get(metric) or summarize(
            study.values(dataset, published.method, metric).values()
        )

    rows = []
    for dataset in study.datasets:
        values = published.values.get(dataset) or {}
        for key in FINAL_METRICS:
            if key not in values:
                continue
            stand_in = LIKE_FOR_LIKE.get(key)
            rows.append(
                PublishedRow(
                    dataset,
                    published.method,
                    key,
                    values[key],
                    published.how.get(key, ""),
                    ours(dataset, key),
                    stand_in,
                    ours(dataset, stand_in) if stand_in else None,
                )
            )
    return rows


def used_sigma(study: Study, dataset: str, method: str) -> float:
    """The σ a method's runs used: median over each run's logged σ, then over its seeds."""
    per_run = []
    for row in study.done.get((dataset, method), {}).values():
        sigmas = [p["sigma"] for p in study.trains.get(row["id"], []) if p["sigma"] is not None]
        if sigmas:
            per_run.append(statistics.median(sigmas))
    return statistics.median(per_run) if per_run else math.nan


def dose_rows(study: Study) -> list[DoseRow]:
    """The spec's dose_response family vs the baseline; Holm across the family per
    (dataset, metric)."""
    layout = study.dose
    if layout is None:
        return []
    rows = []
    for dataset in study.datasets:
        if (dataset, study.baseline) not in study.done:
            continue
        levels = []
        for method in layout.methods:
            config = study.config(dataset, method)
            schedule = schedules.parse(config["noise"]) if config else None
            if schedule is None or (dataset, method) not in study.done:
                continue
            relative = isinstance(schedule, schedules.Relative) or config.get("noise_mode") == "relative"
            inner = schedule.inner if isinstance(schedule, schedules.Relative) else schedule
            levels.append((method, relative, float(inner(0)), used_sigma(study, dataset, method)))
        for metric in layout.metrics:
            baseline = study.values(dataset, study.baseline, metric)
            family = [
                (level, paired_comparison(study.values(dataset, level[0], metric), baseline))
                for level in levels
            ]
            t_holm = holm([c.t_p for _, c in family])
            w_holm = holm([c.wilcoxon_p for _, c in family])
            for ((method, relative, level, sigma), c), t_adj, w_adj in zip(
                family, t_holm, w_holm, strict=True
            ):
                rows.append(DoseRow(dataset, method, metric, relative, level, sigma, c, t_adj, w_adj))
    return rows


def reference_rows(study: Study) -> list[ReferenceRow]:
    """Every method but the baseline and the reference vs the spec's findings reference
    (method − reference, paired on seeds); Holm across them per (dataset, metric)."""
    layout = study.findings
    if layout is None or layout.reference is None:
        return []
    rows = []
    for dataset in study.datasets:
        if (dataset, layout.reference) not in study.done:
            continue
        others = [
            m
            for m in study.methods
            if m not in (study.baseline, layout.reference) and (dataset, m) in study.done
        ]
        for metric in layout.metrics:
            reference_values = study.values(dataset, layout.reference, metric)
            family = [
                (method, paired_comparison(study.values(dataset, method, metric), reference_values))
                for method in others
            ]
            for (method, comparison), t_adj in zip(family, holm([c.t_p for _, c in family]), strict=True):
                rows.append(ReferenceRow(dataset, method, metric, layout.reference, comparison, t_adj))
    return rows

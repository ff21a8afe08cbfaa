"""The report's numbers: a study as loaded from its store, and the typed rows that
every table, CSV file and plot of the report is drawn from.

    study = load_study(store)
    analysis = analyze(study)
    analysis.summary("shakespeare_char", "exp").summary("val_loss").mean

Only runs with status "done" enter summaries, comparisons and speeds; the
others are counted. The statistics themselves come from `stats`.

One file (about 750 lines) for one idea, the report's numbers: each row type sits
beside the function that computes it, and every table, plot and sentence reads them.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gradnoise import schedules
from gradnoise.lm.storage.runlog import FINAL_METRICS, GRADIENT_FIELDS
from gradnoise.study.hypotheses import Hypotheses, parse_hypotheses
from gradnoise.study.plan import run_directory
from gradnoise.study.spec import (
    EXECUTION_KEYS,
    DoseLayout,
    FindingsLayout,
    Published,
    TableLayout,
    parse_dose_response,
    parse_findings,
    parse_published,
    parse_table,
)
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
from gradnoise.study.tasks import HIGHER, LOWER, MNIST

LOSS_UNIT = "nats/char"
BPC_UNIT = "bits/char"
#: σ_t below this fraction of σ0 counts as "no noise any more" (a schedule's horizon).
HORIZON_FRACTION = 0.01


@dataclass(frozen=True)
class Metric:
    """A final metric as the report names it; `better` says which way is better ("lower" for
    a loss, "higher" for an accuracy: `tasks.Task.metrics`)."""

    key: str
    label: str
    unit: str
    meaning: str = ""
    better: str = LOWER


METRICS = {
    metric.key: metric
    for metric in (
        Metric(
            "val_loss_full",
            "final val loss, full pass",
            LOSS_UNIT,
            "exact: one pass over the whole val split at the end",
        ),
        Metric("best_val_loss", "best val loss", LOSS_UNIT, "the lowest of the periodic estimates"),
        Metric("val_loss", "final val loss, estimate", LOSS_UNIT, "the last eval, eval_iters batches"),
        Metric("train_loss", "final train loss, eval mode", LOSS_UNIT, "the last eval, eval_iters batches"),
        Metric(
            "train_loss_window",
            "train loss, last log window",
            LOSS_UNIT,
            "train mode (dropout on): the mean of the last log_interval minibatches' losses",
        ),
        Metric(
            "train_loss_last_batch",
            "train loss, last minibatch",
            LOSS_UNIT,
            "train mode (dropout on): the last step's minibatch alone",
        ),
        Metric("test_loss_full", "test loss, full pass", LOSS_UNIT, "one pass over the whole split"),
        Metric("val_bpc_full", "final val BPC, full pass", BPC_UNIT, "one pass over the whole split"),
        Metric("best_val_bpc", "best val BPC", BPC_UNIT, "the lowest eval"),
        Metric("val_bpc", "final val BPC, estimate", BPC_UNIT, "the last eval"),
        Metric("train_bpc", "train BPC, eval mode", BPC_UNIT, "the last eval, in eval mode"),
        Metric("test_bpc_full", "test BPC, full pass", BPC_UNIT, "one pass over the whole split"),
        Metric("best_val_step", "step of the best val loss", "steps"),
        Metric("step_time_median_s", "median step time (s)", "s"),
        Metric("tokens_per_s", "tokens/s", "tokens/s"),
        Metric("train_s", "training time (s)", "s"),
    )
}
#: The final val loss first: exact where the runs made the full pass (see `headline_metric`).
LOSS_METRICS = (
    "val_loss_full",
    "best_val_loss",
    "val_loss",
    "train_loss",
    "train_loss_window",
    "train_loss_last_batch",
    "test_loss_full",
)
BPC_METRICS = ("val_bpc_full", "best_val_bpc", "val_bpc", "train_bpc", "test_bpc_full")
COST_METRICS = ("step_time_median_s", "tokens_per_s", "train_s")
#: Summarized per dataset × method (and written to summary.csv).
SUMMARY_METRICS = LOSS_METRICS + BPC_METRICS + COST_METRICS
#: Compared with the baseline; each metric of each dataset is one Holm family.
COMPARED_METRICS = ("val_loss_full", "best_val_loss", "val_loss", "train_loss", "test_loss_full")
#: A published value measured as the first is also set beside our second: the same
#: quantity (train mode, end of training) averaged over a log window's minibatches.
LIKE_FOR_LIKE = {"train_loss_last_batch": "train_loss_window"}
#: Shown per run (the per-run table and runs.csv).
RUN_METRICS = (
    "val_loss_full",
    "best_val_loss",
    "best_val_step",
    "val_loss",
    "train_loss",
    "train_loss_window",
    "train_loss_last_batch",
    "test_loss_full",
    "final_sigma",
)


def metric(key: str) -> Metric:
    """The report's name for a final metric (the key itself for those it has no words for),
    with its direction (a metric some task calls higher-is-better is so here too)."""
    return METRICS.get(key) or Metric(key, key, "", better=MNIST.better(key))


def improvement_sign(key: str) -> int:
    """−1 where a lower value is better (a loss: Δ < 0 helps), +1 where a higher one is."""
    return 1 if metric(key).better == HIGHER else -1


def improves(key: str, difference: float) -> bool:
    """Whether a difference (method − control) in `key` is in the better direction."""
    return improvement_sign(key) * difference > 0


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
    #: run id → its train log points (step, loss, sigma and GRADIENT_FIELDS), done runs only
    trains: dict[str, list[dict]]
    published: Published | None
    table: TableLayout | None
    dose: DoseLayout | None = None
    findings: FindingsLayout | None = None
    hypotheses: Hypotheses | None = None

    def values(self, dataset: str, method: str, metric: str) -> dict[int, float | None]:
        """seed → the metric's value, over the done runs of (dataset, method)."""
        return {seed: row.get(metric) for seed, row in self.done.get((dataset, method), {}).items()}

    def has(self, metric: str) -> bool:
        """Whether any done run has a value for `metric`."""
        return any(row.get(metric) is not None for rows in self.done.values() for row in rows.values())

    def config(self, dataset: str, method: str) -> dict | None:
        """The resolved config of (dataset, method)'s first run (seed and device aside, a
        method's runs on one dataset share it)."""
        return next(
            (r["config"] for r in self.runs if (r["dataset"], r["method"]) == (dataset, method)), None
        )


def headline_metric(study: Study) -> str:
    """The final val loss the report leads with: the exact full pass where the runs made
    it, else the last eval's estimate."""
    return "val_loss_full" if study.has("val_loss_full") else "val_loss"


TRAIN_KEYS = ("step", "loss", "sigma", *GRADIENT_FIELDS)


def load_study(store: Store) -> Study:
    """Read a study from its store: runs, the finals of done runs, and of their curves the
    eval points and the train points' loss, σ and gradient statistics.

    A store written before train_loss_window was a final gets it from the run's last
    train log line, when that line is the run's last step (the same number)."""
    stored = store.study()
    spec = stored["spec"]
    runs = store.runs()
    done: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for row in store.finals():
        if row["status"] == "done":
            done[(row["dataset"], row["method"])][row["seed"]] = row
    evals, trains = {}, {}
    for row in (row for rows in done.values() for row in rows.values()):
        points = store.curves([row["id"]])
        evals[row["id"]] = [p for p in points if p["kind"] == "eval"]
        trains[row["id"]] = [{k: p[k] for k in TRAIN_KEYS} for p in points if p["kind"] == "train"]
        last = trains[row["id"]][-1] if trains[row["id"]] else None
        if row.get("train_loss_window") is None and last is not None and last["step"] == row["steps"]:
            row["train_loss_window"] = last["loss"]
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
        trains=trains,
        published=parse_published(spec, source),
        table=parse_table(spec, source),
        dose=parse_dose_response(spec, source),
        findings=parse_findings(spec, source),
        hypotheses=parse_hypotheses(spec, source),
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

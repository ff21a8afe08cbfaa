"""What the report says, as text: its tables (cells formatted from the analysis rows) and
its caveats. `render` lays these out as Markdown and HTML."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from gradnoise.lm.config import resolve_config
from gradnoise.study.report.analysis import (
    BPC_METRICS,
    BPC_UNIT,
    HORIZON_FRACTION,
    LOSS_METRICS,
    LOSS_UNIT,
    Analysis,
    Study,
    SummaryRow,
    compared_metrics,
    metric,
)
from gradnoise.study.stats import Comparison, Summary, wilcoxon_min_p

MISSING = "—"


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


@dataclass
class Section:
    """A heading with text, tables and plots, rendered the same way in Markdown and HTML."""

    title: str
    tables: list[Table] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    text: list[str] = field(default_factory=list)


# ---- numbers as text ------------------------------------------------------------------------


def number(x: float | None, digits: int = 4) -> str:
    if x is None or math.isnan(x):
        return MISSING
    return f"{x:.{digits}f}"


def mean_sd(summary: Summary, digits: int = 4) -> str:
    if summary.n == 0:
        return MISSING
    if summary.n == 1:
        return f"{number(summary.mean, digits)} (n=1)"
    return f"{number(summary.mean, digits)} ± {number(summary.sd, digits)}"


def mean_sd_ci(summary: Summary, digits: int = 4) -> str:
    if summary.n < 2:
        return mean_sd(summary, digits)
    ci = f"[{number(summary.ci_low, digits)}, {number(summary.ci_high, digits)}]"
    return f"{mean_sd(summary, digits)} {ci}"


def p_value(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def signed(x: float, digits: int = 4) -> str:
    return MISSING if math.isnan(x) else f"{x:+.{digits}f}"


def difference(c: Comparison) -> str:
    if c.n_pairs < 2 or math.isnan(c.ci_low):
        return signed(c.mean_diff)
    return f"{signed(c.mean_diff)} [{signed(c.ci_low)}, {signed(c.ci_high)}]"


# ---- tables ---------------------------------------------------------------------------------


def _present_metrics(rows: list[SummaryRow], metrics: tuple[str, ...]) -> list[str]:
    """The metrics some row has a value for (test loss exists only with a test split)."""
    return [key for key in metrics if any(row.summary(key).n for row in rows)]


def summary_tables(analysis: Analysis, dataset: str) -> list[Table]:
    rows = [row for row in analysis.summaries if row.dataset == dataset]
    tables = []
    for title, metrics, unit in (
        ("Final losses", LOSS_METRICS, LOSS_UNIT),
        ("Bits per character", BPC_METRICS, BPC_UNIT),
    ):
        shown = _present_metrics(rows, metrics)
        if not shown:
            continue
        tables.append(
            Table(
                title=f"{dataset}: {title} ({unit}), mean ± sd [95% CI] over done seeds",
                columns=["method", "n", *(metric(key).label for key in shown)],
                rows=[
                    [row.method, str(row.done), *(mean_sd_ci(row.summary(key)) for key in shown)]
                    for row in rows
                ],
            )
        )
    return tables


def comparison_tables(analysis: Analysis, dataset: str) -> list[Table]:
    baseline = analysis.study.baseline
    tables = []
    for key in compared_metrics(analysis.study):
        rows = [r for r in analysis.comparisons if r.dataset == dataset and r.metric == key]
        if not rows:
            continue
        methods_by_note = defaultdict(list)
        for r in rows:
            if r.comparison.note:
                methods_by_note[r.comparison.note].append(r.method)
        notes = [f"{', '.join(methods)}: {note}" for note, methods in methods_by_note.items()]
        tables.append(
            Table(
                title=f"{dataset}: {metric(key).label} vs {baseline} (method − {baseline}, paired on seeds)",
                columns=[
                    "method",
                    "pairs",
                    "mean diff [95% CI]",
                    "d_z",
                    "t p",
                    "t p (Holm)",
                    "Wilcoxon p",
                    "Wilcoxon p (Holm)",
                ],
                rows=[
                    [
                        r.method,
                        str(r.comparison.n_pairs),
                        difference(r.comparison),
                        number(r.comparison.effect_size, 2),
                        p_value(r.comparison.t_p),
                        p_value(r.t_p_holm),
                        p_value(r.comparison.wilcoxon_p),
                        p_value(r.wilcoxon_p_holm),
                    ]
                    for r in rows
                ],
                notes=[
                    "Negative differences: lower loss than the baseline. d_z = mean diff / sd of diffs. "
                    "Holm: adjusted across the methods of this table.",
                    *notes,
                ],
            )
        )
    return tables


def speed_table(analysis: Analysis, dataset: str) -> Table | None:
    baseline = analysis.study.baseline
    rows = [r for r in analysis.speeds if r.dataset == dataset]
    if not rows:
        return None
    target = rows[0].target_val_loss
    return Table(
        title=f"{dataset}: speed to {baseline}'s mean final val loss ({number(target)}) and step-time cost",
        columns=[
            "method",
            "reached",
            "steps to target",
            "seconds to target",
            "median step time (ms)",
            f"overhead vs {baseline}",
        ],
        rows=[
            [
                r.method,
                f"{r.reached}/{r.runs}",
                mean_sd(r.steps, 0),
                mean_sd(r.seconds, 1),
                number(r.overhead.method_median_s * 1000, 2),
                MISSING if math.isnan(r.overhead.percent) else f"{r.overhead.percent:+.1f}%",
            ]
            for r in rows
        ],
        notes=[
            "Steps and seconds (training time, evals excluded) to the first eval at or below the "
            "target, mean ± sd over the runs that reached it. Overhead: median of the runs' "
            "median step times vs the baseline's.",
        ],
    )


def paper_table(analysis: Analysis) -> Table | None:
    """The spec's `table:`: rows datasets, columns method × metric, cells mean ± sd and the
    Holm-adjusted p of the paired t-test against the baseline. None if the spec has none."""
    study = analysis.study
    layout = study.table
    if layout is None:
        return None
    columns = ["dataset"]
    for method in study.methods:
        columns += [f"{method} {layout.label(key)}" for key in layout.metrics]
    rows = []
    for dataset in study.datasets:
        row = [dataset]
        for method in study.methods:
            summary = analysis.summary(dataset, method)
            for key in layout.metrics:
                cell = mean_sd(summary.summary(key)) if summary else MISSING
                if method != study.baseline and summary and summary.summary(key).n:
                    compared = analysis.comparison(dataset, method, key)
                    p = p_value(compared.t_p_holm if compared else math.nan)
                    cell += f" (p{p})" if p.startswith("<") else f" (p={p})"
                row.append(cell)
        rows.append(row)
    meanings = "; ".join(
        f"{layout.label(key)}: {_described(key)}" for key in layout.metrics if layout.label(key) != key
    )
    notes = [
        f"Mean ± sd over seeds{'; ' + meanings if meanings else ''}. "
        "p: paired t-test vs the baseline, Holm-adjusted across methods."
    ]
    if published := published_note(analysis):
        notes.append(published)
    about = f"{layout.caption}, with ± sd and p" if layout.caption else "with ± sd and p"
    return Table(f"{layout.title} ({about})", columns, rows, notes)


def _described(key: str) -> str:
    m = metric(key)
    details = ", ".join(part for part in (m.unit, m.meaning) if part)
    return f"{m.label} ({details})" if details else m.label


def published_note(analysis: Analysis) -> str | None:
    """The spec's `published:` values of this study's datasets, in one sentence (and how the
    source measured them)."""
    rows = analysis.published
    if not rows:
        return None
    published = analysis.study.published
    by_dataset = defaultdict(list)
    for row in rows:
        by_dataset[row.dataset].append(f"{metric(row.metric).label} {row.value:.4f}")
    text = (
        f"Published values for {published.method} ({published.source}): "
        + "; ".join(f"{dataset}: {', '.join(values)}" for dataset, values in by_dataset.items())
        + "."
    )
    hows = {row.metric: row.how for row in rows if row.how}
    if hows:
        measured = "; ".join(f"{metric(key).label}, {how}" for key, how in hows.items())
        text += f" How the source measured them: {measured}."
    return text


def methods_table(study: Study) -> Table:
    methods = study.spec.get("methods") or {}
    return Table(
        title="Methods (config overrides on top of the preset and the study's overrides)",
        columns=["method", "overrides"],
        rows=[
            [m, ", ".join(f"{k}={v}" for k, v in (methods.get(m) or {}).items()) or "(none)"]
            for m in study.methods
        ],
    )


def not_done_table(study: Study) -> Table | None:
    rows = [
        [r["id"], r["dataset"], r["method"], str(r["seed"]), r["status"], _first_line(r["error"])]
        for r in study.runs
        if r["status"] != "done"
    ]
    if not rows:
        return None
    return Table(
        title="Runs not in the statistics (failed, diverged or unfinished)",
        columns=["run", "dataset", "method", "seed", "status", "error"],
        rows=rows,
    )


def _first_line(error: str | None, limit: int = 160) -> str:
    if not error:
        return ""
    lines = [line for line in error.strip().splitlines() if line.strip()]
    text = lines[-1] if lines else ""  # a traceback's last line says what went wrong
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---- caveats --------------------------------------------------------------------------------


def caveats(analysis: Analysis) -> list[str]:
    study = analysis.study
    preset = study.spec.get("preset", "tiny")
    lines = [_budget(study, preset)]
    lines += [str(line) for line in study.spec.get("caveats") or []]

    counts = {s: sum(r["status"] == s for r in study.runs) for s in ("done", "diverged", "failed")}
    unfinished = len(study.runs) - sum(counts.values())
    lines.append(
        f"Runs: {counts['done']} done, {counts['diverged']} diverged, {counts['failed']} failed, "
        f"{unfinished} unfinished (pending or running), of {len(study.runs)}. Only done runs "
        "enter the means, tests and plots; the others are listed at the end."
    )
    if counts["diverged"]:
        lines.append(
            "Diverged runs are left out of the means, so a method that diverged on some seeds "
            "looks better in the tables than it is."
        )

    seeds = sorted({row.done for row in analysis.summaries if row.done})
    if seeds:
        lines.append(
            f"Seeds per method: {_choices(seeds)}. So few seeds give the tests little power: "
            "a non-significant difference is not evidence of no effect. Read the 95% CI of the "
            "difference: it bounds the effects the data are consistent with."
        )
    if any(row.summary(key).n == 1 for row in analysis.summaries for key in LOSS_METRICS):
        lines.append(f"Where only one seed finished, sd and CI are undefined (shown as {MISSING}).")
    # Counted over the comparisons that ran a test: the Wilcoxon test drops zero differences.
    tested = [r.comparison for r in analysis.comparisons if not math.isnan(r.comparison.wilcoxon_p)]
    for n in sorted({c.n_nonzero for c in tested}):
        min_p = wilcoxon_min_p(n)
        line = f"With {n} non-zero paired differences the smallest two-sided Wilcoxon p is {min_p:.4g}"
        if min_p > 0.05:
            line += ", so the Wilcoxon test cannot reach 0.05 here, whatever the effect"
        lines.append(line + ".")
    if analysis.comparisons:
        lines.append(
            "p-values marked Holm are adjusted across the methods compared in the same table "
            "(one dataset, one metric); the unadjusted ones are shown beside them."
        )

    for use in analysis.schedules:
        where = f"`{use.spec}` ({', '.join(use.methods)})"
        if use.schedule(0) == 0:
            lines.append(f"{where}: σ is zero from the start, so this adds no noise at all.")
        elif use.data_driven:
            lines.append(
                f"{where}: σ follows the validation loss, so it has no horizon known in advance; "
                "the σ_t plot shows what the runs logged."
            )
        elif use.horizon is not None and use.horizon < use.max_iters:
            silent = 100 * (1 - use.horizon / use.max_iters)
            lines.append(
                f"{where}: σ_t falls below {HORIZON_FRACTION:.0%} of σ0 at step {use.horizon} of "
                f"{use.max_iters}, so the noise is effectively zero for the last {silent:.0f}% "
                "of training."
            )
    lines.append(
        "Step times are the runs' own; runs that shared the machine (--jobs, --per-device) "
        "slowed each other, so overhead % is indicative. `gradnoise bench noise` measures the "
        "cost interleaved in one process."
    )
    return lines


def _budget(study: Study, preset: str) -> str:
    parts = []
    reduced = preset != "paper"
    for dataset in study.datasets:
        iters = sorted({int(r["config"]["max_iters"]) for r in study.runs if r["dataset"] == dataset})
        seeds = sorted({r["seed"] for r in study.runs if r["dataset"] == dataset})
        paper_iters = resolve_config(dataset, "paper").max_iters
        reduced = reduced or max(iters) < paper_iters
        parts.append(
            f"{dataset}: max_iters {_choices(iters)} (the paper's: {paper_iters}), "
            f"{_count(len(seeds), 'seed')}"
        )
    line = f"Budget: preset `{preset}`; " + "; ".join(parts) + "."
    if reduced:
        line += (
            " This is a reduced budget: the numbers are not comparable with the seed paper's, "
            "only the methods with each other."
        )
    return line


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _choices(values: list) -> str:
    return " / ".join(str(v) for v in values)

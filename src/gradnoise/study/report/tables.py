"""The report's tables: cells formatted from the analysis rows (the cell and number
formats are in `document`). `render` lays them out as Markdown and HTML."""

from __future__ import annotations

import math
from collections import defaultdict

from gradnoise.study.report.analysis import Analysis, PublishedRow, SummaryRow, compared_metrics
from gradnoise.study.report.document import (
    MISSING,
    Link,
    Table,
    difference,
    mean_sd,
    mean_sd_ci,
    number,
    p_value,
    scientific,
    value_text,
)
from gradnoise.study.report.loading import Study, headline_metric
from gradnoise.study.report.metrics import BPC_METRICS, BPC_UNIT, LOSS_METRICS, LOSS_UNIT, RUN_METRICS, metric
from gradnoise.study.stats import Summary


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
        title=(
            f"{dataset}: speed to {baseline}'s best val loss, worst seed ({number(target)}), "
            "and step-time cost"
        ),
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
            f"Target: {baseline}'s best val loss, the highest of its runs' best estimates, so "
            f"every {baseline} run reaches it. Steps and seconds (training time, evals excluded) "
            "to the first eval at or below it, mean ± sd over the runs that reached it. "
            "Overhead: median of the runs' median step times vs the baseline's.",
        ],
    )


def paper_table(analysis: Analysis) -> Table | None:
    """The spec's `table:`: rows datasets, columns method × metric, cells mean ± sd and the
    Holm-adjusted p of the paired t-test against the baseline; under each dataset's row,
    the published values in the column of the same metric (or its like-for-like
    stand-in). None if the spec has no table."""
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
        if published := _published_row(analysis, dataset, layout.metrics):
            rows.append(published)
    meanings = "; ".join(f"{layout.label(key)}: {_described(key)}" for key in layout.metrics)
    notes = [
        f"Mean ± sd over seeds. {meanings}. p: paired t-test vs the baseline, Holm-adjusted across methods."
    ]
    if analysis.published:
        notes.append(_published_placement(analysis, layout.metrics))
    about = layout.caption or "the paper's layout"
    return Table(f"{about}: mean ± sd over seeds, p vs {study.baseline}", columns, rows, notes)


def _published_column(row: PublishedRow, metrics: tuple[str, ...]) -> str | None:
    """The table column a published value goes in: its own metric, else its stand-in."""
    if row.metric in metrics:
        return row.metric
    return row.stand_in if row.stand_in in metrics else None


def _published_row(analysis: Analysis, dataset: str, metrics: tuple[str, ...]) -> list[str] | None:
    published = [r for r in analysis.published if r.dataset == dataset]
    placed = {column: r for r in published if (column := _published_column(r, metrics))}
    if not placed:
        return None
    row = [f"{dataset}, published"]
    for method in analysis.study.methods:
        for key in metrics:
            entry = placed.get(key) if method == published[0].method else None
            row.append(f"{entry.value:.4f}" if entry else "")
    return row


def _published_placement(analysis: Analysis, metrics: tuple[str, ...]) -> str:
    source = analysis.study.published.source
    parts = []
    for row in analysis.published:
        column = _published_column(row, metrics)
        if column is None:
            where = "not a column here (see the next table)"
        elif column == row.metric:
            where = f"under ours, measured the same way ({metric(column).label})"
        else:
            where = f"under ours averaged like for like ({metric(column).label})"
        parts.append(f"{metric(row.metric).label} ({row.how or 'as ours'}): {where}")
    return f"Published ({source}): " + "; ".join(dict.fromkeys(parts)) + "."


def _described(key: str) -> str:
    m = metric(key)
    details = ", ".join(part for part in (m.unit, m.meaning) if part)
    return f"{m.label} ({details})" if details else m.label


def published_table(analysis: Analysis) -> Table | None:
    """The spec's published values beside ours: the same metric where this study has it,
    its like-for-like stand-in, and our own headline measures (not published) below."""
    if not analysis.published:
        return None
    study = analysis.study
    published = study.published
    rows = []
    for dataset in study.datasets:
        entries = [r for r in analysis.published if r.dataset == dataset]
        if not entries:
            continue
        for entry in entries:
            rows.append(
                [
                    dataset,
                    metric(entry.metric).label,
                    f"{entry.value:.4f}",
                    entry.how or MISSING,
                    *_ours_and_ci(entry.ours, entry.value),
                ]
            )
            if entry.stand_in is not None:
                rows.append(
                    [
                        dataset,
                        f"{metric(entry.stand_in).label} (like for like)",
                        f"{entry.value:.4f}",
                        f"compared with ours: {metric(entry.stand_in).meaning}",
                        *_ours_and_ci(entry.stand_in_ours, entry.value),
                    ]
                )
        shown = {r.metric for r in entries} | {r.stand_in for r in entries}
        summary = analysis.summary(dataset, published.method)
        for key in (headline_metric(study), "train_loss"):
            if key not in shown and summary is not None and summary.summary(key).n:
                rows.append(
                    [
                        dataset,
                        metric(key).label,
                        MISSING,
                        "not published",
                        mean_sd_ci(summary.summary(key)),
                        "",
                    ]
                )
    return Table(
        title=f"Published values ({published.source}) beside {published.method}'s, like for like",
        columns=[
            "dataset",
            "metric",
            "published",
            "how the source measured it",
            "ours, mean ± sd [95% CI]",
            "published in our CI",
        ],
        rows=rows,
        notes=[
            "Each published number sits beside ours measured the same way, where this study has "
            "it. The rows marked like for like average the same quantity over more minibatches; "
            "the rows marked not published are this project's own measures of the end of training.",
        ],
    )


def _ours_and_ci(summary: Summary | None, value: float) -> list[str]:
    if summary is None or summary.n == 0:
        return [MISSING, "not recorded in these runs"]
    if summary.n < 2:
        return [mean_sd(summary), MISSING]
    return [mean_sd_ci(summary), "yes" if summary.ci_low <= value <= summary.ci_high else "no"]


def methods_table(analysis: Analysis) -> Table:
    """Each method's resolved config as a difference from the baseline's."""
    study = analysis.study
    rows = []
    for diff in analysis.config_diffs:
        if diff.method == study.baseline:
            changes = "(the baseline)"
        else:
            changes = "; ".join(f"{k}: {value_text(a)} → {value_text(b)}" for k, a, b in diff.changes)
        rows.append([diff.method, changes or "(none)"])
    return Table(
        title=f"Methods: each resolved config against {study.baseline}'s (key: {study.baseline} → method)",
        columns=["method", f"differs from {study.baseline}"],
        rows=rows,
        notes=[
            f"{study.baseline}'s own config is in any of its runs' config.json (linked in the "
            "per-run table); seeds and devices differ per run and are left out here.",
        ],
    )


def runs_table(analysis: Analysis) -> Table:
    """Every run: its finals and wall time, linked to its directory and log."""
    keys = [k for k in RUN_METRICS if any(r.finals.get(k) is not None for r in analysis.runs)]
    rows = []
    for r in analysis.runs:
        values = [
            scientific(r.finals.get(k)) if k == "final_sigma" else _run_value(r.finals.get(k), k)
            for k in keys
        ]
        wall = MISSING if r.wall_s is None else f"{r.wall_s:.0f}"
        rows.append(
            [
                Link(r.run_id, r.directory),
                r.dataset,
                r.method,
                str(r.seed),
                r.status,
                *values,
                wall,
                Link("log", r.log),
            ]
        )
    return Table(
        title="Runs: one line each, linked to its directory and log",
        columns=[
            "run",
            "dataset",
            "method",
            "seed",
            "status",
            *(metric(k).label for k in keys),
            "wall (s)",
            "log",
        ],
        rows=rows,
        notes=["Also in runs.csv. Losses in nats/char; wall time includes evaluation and set-up."],
    )


def _run_value(value, key: str) -> str:
    if value is None:
        return MISSING
    return str(int(value)) if key == "best_val_step" else number(value)


# ---- dose-response ---------------------------------------------------------------------------


def dose_table(analysis: Analysis, dataset: str, key: str) -> Table | None:
    rows = analysis.dose(dataset, key)
    if not rows:
        return None
    study = analysis.study
    scale = analysis.gradient_scale(dataset)
    return Table(
        title=f"{dataset}: {metric(key).label} by noise level (method − {study.baseline}, paired on seeds)",
        columns=[
            "method",
            "noise",
            "σ used",
            f"σ used / {study.baseline}'s RMS(g)",
            "pairs",
            "mean diff [95% CI]",
            "d_z",
            "t p",
            "t p (Holm)",
            "Wilcoxon p (Holm)",
        ],
        rows=[
            [
                r.method,
                study.config(dataset, r.method)["noise"],
                scientific(r.sigma),
                scientific(r.sigma / scale.rms) if scale else MISSING,
                str(r.comparison.n_pairs),
                difference(r.comparison),
                number(r.comparison.effect_size, 2),
                p_value(r.comparison.t_p),
                p_value(r.t_p_holm),
                p_value(r.wilcoxon_p_holm),
            ]
            for r in rows
        ],
        notes=[
            "σ used: the σ each run logged (relative noise: r · RMS of that step's gradient), "
            "median over the run, median over seeds. Holm: adjusted across the noise levels of "
            "this table (the dose-response family), not the other methods.",
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

"""The study report: what `gradnoise study report DIR` writes into DIR/report/.

    write_report(study_dir) -> study_dir / "report"

reads DIR/study.sqlite through `Store` and writes

    report.md        tables and caveats (Markdown; links the PNGs)
    index.html       the same tables with the plots embedded: one self-contained file
    summary.csv      per dataset × method: run counts, n / mean / sd / 95% CI of every final
    comparison.csv   per dataset × metric × method vs the baseline: paired tests, Holm
    speed_cost.csv   per dataset × method: steps and seconds to the baseline's final val
                     loss, median step time, overhead %
    curves_*.png, final_val_*.png, sigma_schedules.png, overhead.png

Only runs with status "done" enter means, tests and plots; failed, diverged and
unfinished runs are counted and listed. The numbers come from `stats`; this
module gathers, lays out and draws them. The directory is built aside and
swapped in whole, so a report is never half-written.
"""

from __future__ import annotations

import base64
import csv
import html
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

import gradnoise
from gradnoise import schedules
from gradnoise.errors import UserError
from gradnoise.lm import atomic
from gradnoise.lm.config import resolve_config
from gradnoise.study.stats import (
    Comparison,
    Summary,
    holm,
    paired_comparison,
    step_time_overhead,
    steps_to_target,
    summarize,
    wilcoxon_min_p,
)
from gradnoise.study.store import Store

# Final metrics summarized per dataset × method: (finals key, label).
LOSS_METRICS = (
    ("train_loss", "final train loss"),
    ("val_loss", "final val loss"),
    ("best_val_loss", "best val loss"),
    ("val_loss_full", "val loss, full pass"),
    ("test_loss_full", "test loss, full pass"),
)
BPC_METRICS = (
    ("train_bpc", "train BPC"),
    ("val_bpc", "final val BPC"),
    ("best_val_bpc", "best val BPC"),
    ("val_bpc_full", "val BPC, full pass"),
    ("test_bpc_full", "test BPC, full pass"),
)
COST_METRICS = (
    ("step_time_median_s", "median step time (s)"),
    ("tokens_per_s", "tokens/s"),
    ("train_s", "training time (s)"),
)
SUMMARY_METRICS = LOSS_METRICS + BPC_METRICS + COST_METRICS
# Compared with the baseline; each metric of each dataset is one Holm family.
COMPARED_METRICS = (
    ("train_loss", "final train loss"),
    ("val_loss", "final val loss"),
    ("best_val_loss", "best val loss"),
    ("test_loss_full", "test loss, full pass"),
)
# The seed paper's baseline (train, val) loss, mean of seeds, at the paper preset.
PUBLISHED_BASELINE = {
    "shakespeare_char": (0.8132, 1.4692),
    "enwik8": (0.9323, 1.0048),
    "text8": (0.9978, 0.9793),
}
HORIZON_FRACTION = 0.01
LOSS_UNIT = "nats/char"
MISSING = "—"


def write_report(study_dir: Path) -> Path:
    """Write DIR/report/ (see the module docstring) from DIR/study.sqlite; returns that dir."""
    study_dir = Path(study_dir)
    database = study_dir / "study.sqlite"
    if not database.is_file():
        raise UserError(
            f"no study in {study_dir}: {database} does not exist; "
            "run `gradnoise study run SPEC --dir DIR` first"
        )
    with Store(database) as store:
        study = _load(store)
    report_dir = study_dir / "report"
    atomic.build_directory(report_dir, lambda building: _build(study, building), replace=True)
    return report_dir


# ---- the study's data, as the report needs it ----------------------------


@dataclass
class _Study:
    name: str
    spec: dict
    baseline: str
    runs: list[dict]
    datasets: list[str]
    methods: list[str]
    #: (dataset, method) → seed → finals row of a done run
    done: dict[tuple[str, str], dict[int, dict]]
    #: run id → its eval points (Store.curves rows of kind "eval")
    evals: dict[str, list[dict]]
    #: run id → (step, σ) of its train log lines
    sigmas: dict[str, list[tuple[int, float]]]
    colors: dict[str, tuple] = field(default_factory=dict)

    def values(self, dataset: str, method: str, metric: str) -> dict[int, float | None]:
        return {seed: row.get(metric) for seed, row in self.done.get((dataset, method), {}).items()}


def _load(store: Store) -> _Study:
    study = store.study()
    spec = study["spec"]
    runs = store.runs()
    done: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for row in store.finals():
        if row["status"] == "done":
            done[(row["dataset"], row["method"])][row["seed"]] = row
    evals, sigmas = {}, {}
    # One run at a time, keeping only what the report draws: a paper-scale study
    # logs hundreds of thousands of train points.
    for run_id in (row["id"] for rows in done.values() for row in rows.values()):
        points = store.curves([run_id])
        evals[run_id] = [p for p in points if p["kind"] == "eval"]
        sigmas[run_id] = [
            (p["step"], p["sigma"]) for p in points if p["kind"] == "train" and p["sigma"] is not None
        ]
    datasets = _ordered(spec.get("datasets") or [], (run["dataset"] for run in runs))
    baseline = spec.get("baseline", "baseline")
    methods = _ordered([baseline, *(spec.get("methods") or {})], (run["method"] for run in runs))
    methods = [m for m in methods if any(run["method"] == m for run in runs)]
    palette = _palette(len(methods))
    return _Study(
        name=study["name"],
        spec=spec,
        baseline=baseline,
        runs=runs,
        datasets=[d for d in datasets if any(run["dataset"] == d for run in runs)],
        methods=methods,
        done=dict(done),
        evals=evals,
        sigmas=sigmas,
        colors={method: palette[i] for i, method in enumerate(methods)},
    )


def _ordered(preferred, seen) -> list[str]:
    """`preferred` first (the spec's order), then any other name seen, sorted."""
    order = list(dict.fromkeys(preferred))
    return order + sorted(set(seen) - set(order))


def _palette(n: int) -> list[tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# ---- numbers: one set of rows feeds the CSVs, the tables and the plots -----


def _summary_rows(study: _Study) -> list[dict]:
    rows = []
    for dataset in study.datasets:
        for method in study.methods:
            runs = [r for r in study.runs if r["dataset"] == dataset and r["method"] == method]
            if not runs:
                continue
            statuses = [r["status"] for r in runs]
            rows.append(
                {
                    "dataset": dataset,
                    "method": method,
                    "runs": len(runs),
                    "done": statuses.count("done"),
                    "diverged": statuses.count("diverged"),
                    "failed": statuses.count("failed"),
                    "unfinished": statuses.count("pending") + statuses.count("running"),
                    **{
                        metric: summarize(study.values(dataset, method, metric).values())
                        for metric, _ in SUMMARY_METRICS
                    },
                }
            )
    return rows


def _comparison_rows(study: _Study) -> list[dict]:
    """Every method vs the baseline; Holm across the methods of one (dataset, metric)."""
    rows = []
    for dataset in study.datasets:
        if (dataset, study.baseline) not in study.done:
            continue
        others = [m for m in study.methods if m != study.baseline and (dataset, m) in study.done]
        for metric, _ in COMPARED_METRICS:
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
                rows.append(
                    {
                        "dataset": dataset,
                        "method": method,
                        "metric": metric,
                        "comparison": comparison,
                        "t_p_holm": t_adj,
                        "wilcoxon_p_holm": w_adj,
                    }
                )
    return rows


def _speed_rows(study: _Study) -> list[dict]:
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
                {
                    "dataset": dataset,
                    "method": method,
                    "target_val_loss": target,
                    "runs": len(runs),
                    "reached": len(reached),
                    "steps": summarize(step for step, _ in reached),
                    "seconds": summarize(seconds for _, seconds in reached),
                    "overhead": step_time_overhead(
                        study.values(dataset, method, "step_time_median_s").values(), baseline_times
                    ),
                }
            )
    return rows


@dataclass(frozen=True)
class _ScheduleUse:
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


def _schedule_uses(study: _Study) -> list[_ScheduleUse]:
    grouped: dict[tuple[str, bool], list[dict]] = defaultdict(list)
    for run in study.runs:
        spec = run["config"].get("noise", "none")
        schedule = schedules.parse(spec)
        if schedule is None:
            continue
        relative = isinstance(schedule, schedules.Relative) or run["config"].get("noise_mode") == "relative"
        grouped[(schedule.spec, relative)].append(run)
    return [
        _ScheduleUse(
            spec=spec,
            schedule=schedules.parse(spec),
            relative=relative,
            max_iters=max(int(run["config"]["max_iters"]) for run in runs),
            methods=tuple(dict.fromkeys(run["method"] for run in runs)),
            run_ids=tuple(run["id"] for run in runs),
        )
        for (spec, relative), runs in grouped.items()
    ]


# ---- formatting ----------------------------------------------------------


def _number(x: float | None, digits: int = 4) -> str:
    if x is None or math.isnan(x):
        return MISSING
    return f"{x:.{digits}f}"


def _mean_sd(summary: Summary, digits: int = 4) -> str:
    if summary.n == 0:
        return MISSING
    if summary.n == 1:
        return f"{_number(summary.mean, digits)} (n=1)"
    return f"{_number(summary.mean, digits)} ± {_number(summary.sd, digits)}"


def _mean_sd_ci(summary: Summary, digits: int = 4) -> str:
    if summary.n < 2:
        return _mean_sd(summary, digits)
    ci = f"[{_number(summary.ci_low, digits)}, {_number(summary.ci_high, digits)}]"
    return f"{_mean_sd(summary, digits)} {ci}"


def _p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _signed(x: float, digits: int = 4) -> str:
    return MISSING if math.isnan(x) else f"{x:+.{digits}f}"


@dataclass
class _Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        def line(cells):
            return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

        lines = [f"**{self.title}**", "", line(self.columns), line(["---"] * len(self.columns))]
        lines += [line(row) for row in self.rows]
        for note in self.notes:
            lines += ["", f"*{note}*"]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in self.rows
        )
        notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in self.notes)
        return (
            f"<h4>{html.escape(self.title)}</h4>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{notes}"
        )


# ---- tables --------------------------------------------------------------


def _present_metrics(rows: list[dict], metrics) -> list[tuple[str, str]]:
    """The metrics some row has a value for (test loss exists only with a test split)."""
    return [(key, label) for key, label in metrics if any(row[key].n for row in rows)]


def _summary_tables(dataset: str, summary_rows: list[dict]) -> list[_Table]:
    rows = [row for row in summary_rows if row["dataset"] == dataset]
    tables = []
    for title, metrics, unit in (
        ("Final losses", LOSS_METRICS, LOSS_UNIT),
        ("Bits per character", BPC_METRICS, "bits/char"),
    ):
        shown = _present_metrics(rows, metrics)
        if not shown:
            continue
        tables.append(
            _Table(
                title=f"{dataset}: {title} ({unit}), mean ± sd [95% CI] over done seeds",
                columns=["method", "n", *(label for _, label in shown)],
                rows=[
                    [row["method"], str(row["done"]), *(_mean_sd_ci(row[key]) for key, _ in shown)]
                    for row in rows
                ],
            )
        )
    return tables


def _comparison_tables(dataset: str, comparison_rows: list[dict], baseline: str) -> list[_Table]:
    tables = []
    for metric, label in COMPARED_METRICS:
        rows = [r for r in comparison_rows if r["dataset"] == dataset and r["metric"] == metric]
        if not rows:
            continue
        methods_by_note = defaultdict(list)
        for r in rows:
            if r["comparison"].note:
                methods_by_note[r["comparison"].note].append(r["method"])
        notes = [f"{', '.join(methods)}: {note}" for note, methods in methods_by_note.items()]
        tables.append(
            _Table(
                title=f"{dataset}: {label} vs {baseline} (method − {baseline}, paired on seeds)",
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
                        r["method"],
                        str(r["comparison"].n_pairs),
                        _difference(r["comparison"]),
                        _number(r["comparison"].effect_size, 2),
                        _p(r["comparison"].t_p),
                        _p(r["t_p_holm"]),
                        _p(r["comparison"].wilcoxon_p),
                        _p(r["wilcoxon_p_holm"]),
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


def _difference(c: Comparison) -> str:
    if c.n_pairs < 2 or math.isnan(c.ci_low):
        return _signed(c.mean_diff)
    return f"{_signed(c.mean_diff)} [{_signed(c.ci_low)}, {_signed(c.ci_high)}]"


def _speed_table(dataset: str, speed_rows: list[dict], baseline: str) -> _Table | None:
    rows = [r for r in speed_rows if r["dataset"] == dataset]
    if not rows:
        return None
    target = rows[0]["target_val_loss"]
    return _Table(
        title=(
            f"{dataset}: speed to {baseline}'s mean final val loss ({_number(target)}) and step-time cost"
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
                r["method"],
                f"{r['reached']}/{r['runs']}",
                _mean_sd(r["steps"], 0),
                _mean_sd(r["seconds"], 1),
                _number(r["overhead"].method_median_s * 1000, 2),
                MISSING if math.isnan(r["overhead"].percent) else f"{r['overhead'].percent:+.1f}%",
            ]
            for r in rows
        ],
        notes=[
            "Steps and seconds (training time, evals excluded) to the first eval at or below the "
            "target, mean ± sd over the runs that reached it. Overhead: median of the runs' "
            "median step times vs the baseline's.",
        ],
    )


def _table_one(study: _Study, summary_rows: list[dict], comparison_rows: list[dict]) -> _Table:
    """The seed paper's Table 1 layout: rows datasets, columns method × (train, val)."""
    summaries = {(r["dataset"], r["method"]): r for r in summary_rows}
    p_holm = {(r["dataset"], r["method"], r["metric"]): r["t_p_holm"] for r in comparison_rows}
    columns = ["dataset"]
    for method in study.methods:
        columns += [f"{method} train", f"{method} val"]
    rows = []
    for dataset in study.datasets:
        row = [dataset]
        for method in study.methods:
            summary = summaries.get((dataset, method))
            for metric in ("train_loss", "val_loss"):
                cell = _mean_sd(summary[metric]) if summary else MISSING
                if method != study.baseline and summary and summary[metric].n:
                    p = _p(p_holm.get((dataset, method, metric), math.nan))
                    cell += f" (p{p})" if p.startswith("<") else f" (p={p})"
                row.append(cell)
        rows.append(row)
    published = [
        f"{d} {train:.4f} / {val:.4f}"
        for d, (train, val) in PUBLISHED_BASELINE.items()
        if d in study.datasets
    ]
    notes = [
        f"Loss in {LOSS_UNIT}, mean ± sd over seeds; train loss estimated in eval mode; val is "
        "the final eval. p: paired t-test vs the baseline, Holm-adjusted across methods.",
    ]
    if published:
        notes.append(
            "Published baseline train / val of the seed paper (paper preset): " + "; ".join(published) + "."
        )
    return _Table("Table 1 (the seed paper's layout, with ± sd and p)", columns, rows, notes)


def _methods_table(study: _Study) -> _Table:
    methods = study.spec.get("methods") or {}
    return _Table(
        title="Methods (config overrides on top of the preset and the study's overrides)",
        columns=["method", "overrides"],
        rows=[
            [m, ", ".join(f"{k}={v}" for k, v in (methods.get(m) or {}).items()) or "(none)"]
            for m in study.methods
        ],
    )


def _not_done_table(study: _Study) -> _Table | None:
    rows = [
        [r["id"], r["dataset"], r["method"], str(r["seed"]), r["status"], _first_line(r["error"])]
        for r in study.runs
        if r["status"] != "done"
    ]
    if not rows:
        return None
    return _Table(
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


# ---- caveats ---------------------------------------------------------------


def _caveats(
    study: _Study,
    summary_rows: list[dict],
    comparison_rows: list[dict],
    schedule_uses: list[_ScheduleUse],
) -> list[str]:
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

    seeds = sorted({row["done"] for row in summary_rows if row["done"]})
    if seeds:
        lines.append(
            f"Seeds per method: {_choices(seeds)}. So few seeds give the tests little power: "
            "a non-significant difference is not evidence of no effect. Read the 95% CI of the "
            "difference: it bounds the effects the data are consistent with."
        )
    if any(row[metric].n == 1 for row in summary_rows for metric, _ in LOSS_METRICS):
        lines.append(f"Where only one seed finished, sd and CI are undefined (shown as {MISSING}).")
    for n in sorted({r["comparison"].n_pairs for r in comparison_rows} - {0, 1}):
        min_p = wilcoxon_min_p(n)
        line = f"With {n} paired seeds the smallest two-sided Wilcoxon p is {min_p:.4g}"
        if min_p > 0.05:
            line += ", so the Wilcoxon test cannot reach 0.05 here, whatever the effect"
        lines.append(line + ".")
    if comparison_rows:
        lines.append(
            "p-values marked Holm are adjusted across the methods compared in the same table "
            "(one dataset, one metric); the unadjusted ones are shown beside them."
        )

    for use in schedule_uses:
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


def _budget(study: _Study, preset: str) -> str:
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


# ---- plots -----------------------------------------------------------------


def _save(figure: Figure, path: Path) -> Path:
    # No "Software" metadata: it would put matplotlib's URL into every PNG.
    figure.savefig(path, dpi=110, metadata={"Software": None})
    return path


def _plot_curves(study: _Study, dataset: str, path: Path) -> Path | None:
    figure = Figure(figsize=(12, 4.6), layout="constrained")
    axes = figure.subplots(1, 2, sharex=True)
    plotted = False
    for method in study.methods:
        runs = study.done.get((dataset, method), {})
        points = [p for row in runs.values() for p in study.evals.get(row["id"], [])]
        for ax, metric in zip(axes, ("train_loss", "val_loss"), strict=True):
            by_step = defaultdict(list)
            for p in points:
                if p.get(metric) is not None:
                    by_step[p["step"]].append(p[metric])
            if not by_step:
                continue
            steps = sorted(by_step)
            values = [np.array(by_step[s]) for s in steps]
            color = study.colors[method]
            ax.plot(steps, [v.mean() for v in values], color=color, label=f"{method} (n={len(runs)})")
            ax.fill_between(
                steps, [v.min() for v in values], [v.max() for v in values], color=color, alpha=0.2
            )
            plotted = True
    if not plotted:
        return None
    for ax, what in zip(axes, ("train (eval mode)", "val"), strict=True):
        ax.set_xlabel("step")
        ax.set_ylabel(f"{what.split()[0]} loss ({LOSS_UNIT})")
        ax.set_title(f"{dataset}: {what} loss, mean over seeds, band = min–max")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize="small")
    return _save(figure, path)


def _plot_final_val(study: _Study, dataset: str, summary_rows: list[dict], path: Path) -> Path | None:
    rows = [r for r in summary_rows if r["dataset"] == dataset and r["val_loss"].n]
    if not rows:
        return None
    figure = Figure(figsize=(max(6, 1.0 * len(rows) + 2), 4.6), layout="constrained")
    ax = figure.subplots()
    for x, row in enumerate(rows):
        method = row["method"]
        values = study.values(dataset, method, "val_loss")
        seeds = sorted(s for s, v in values.items() if v is not None)
        offsets = np.linspace(-0.12, 0.12, len(seeds)) if len(seeds) > 1 else [0.0]
        color = study.colors[method]
        ax.scatter([x + o for o in offsets], [values[s] for s in seeds], color=color, s=18, alpha=0.7)
        summary = row["val_loss"]
        if summary.n >= 2:
            ax.errorbar(
                x + 0.3,
                summary.mean,
                yerr=[[summary.mean - summary.ci_low], [summary.ci_high - summary.mean]],
                fmt="D",
                color=color,
                capsize=4,
            )
        else:
            ax.plot(x + 0.3, summary.mean, "D", color=color)
        if method == study.baseline:
            ax.axhline(summary.mean, color=color, linestyle="--", linewidth=0.8, label="baseline mean")
    ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=30, ha="right")
    ax.set_xlabel("method")
    ax.set_ylabel(f"final val loss ({LOSS_UNIT})")
    ax.set_title(f"{dataset}: final val loss\nper seed (dots), mean with 95% CI (diamond)")
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return _save(figure, path)


def _sigma_values(study: _Study, use: _ScheduleUse) -> tuple[np.ndarray, np.ndarray]:
    """σ_t over the run: from the formula, or (data-driven σ) the median the runs logged."""
    if use.data_driven:
        by_step = defaultdict(list)
        for run_id in use.run_ids:
            for step, sigma in study.sigmas.get(run_id, []):
                by_step[step].append(sigma)
        steps = np.array(sorted(by_step), dtype=float)
        return steps, np.array([np.median(by_step[s]) for s in sorted(by_step)])
    # Linear spacing for the body of the run, geometric for the fast early decays.
    last = max(use.max_iters - 1, 1)
    steps = np.unique(
        np.concatenate(
            [
                np.linspace(0, last, 1000).astype(int),
                np.geomspace(1, last, 500).astype(int),
                [0],
            ]
        )
    )
    return steps.astype(float), np.array([use.schedule(int(s)) for s in steps])


def _plot_sigma(study: _Study, uses: list[_ScheduleUse], path: Path) -> Path | None:
    if not uses:
        return None
    figure = Figure(figsize=(10, 5), layout="constrained")
    ax = figure.subplots()
    palette = _palette(len(uses))
    plotted = False
    for use, color in zip(uses, palette, strict=True):
        steps, sigma = _sigma_values(study, use)
        positive = sigma > 0  # log axis: σ = 0 cannot be drawn, and means no noise anyway
        if not positive.any():
            continue
        label = f"{use.spec}{' (relative)' if use.relative else ''} — {', '.join(use.methods)}"
        if use.data_driven:
            label += " [logged σ, median of runs]"
        ax.plot(steps[positive], sigma[positive], color=color, label=label)
        plotted = True
        horizon = None if use.data_driven else use.horizon
        if horizon is not None and horizon < use.max_iters:
            ax.axvline(horizon, color=color, linestyle=":", linewidth=1.2)
            ax.annotate(
                f"{horizon}",
                (horizon, 1),
                xycoords=("data", "axes fraction"),
                color=color,
                fontsize="small",
                xytext=(3, -12),
                textcoords="offset points",
            )
    if not plotted:
        return None
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("σ_t (noise std; relative: × gradient RMS)")
    ax.set_title(f"Noise schedules over the run; dotted: horizon (σ_t < {HORIZON_FRACTION:.0%} of σ0)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(0, -0.12))
    return _save(figure, path)


def _plot_overhead(study: _Study, speed_rows: list[dict], path: Path) -> Path | None:
    rows = [r for r in speed_rows if r["method"] != study.baseline and not math.isnan(r["overhead"].percent)]
    if not rows:
        return None
    methods = [m for m in study.methods if any(r["method"] == m for r in rows)]
    datasets = [d for d in study.datasets if any(r["dataset"] == d for r in rows)]
    width = min(0.8 / len(datasets), 0.35)
    figure = Figure(figsize=(max(6, 0.9 * len(methods) + 2), 4.6), layout="constrained")
    ax = figure.subplots()
    for i, dataset in enumerate(datasets):
        by_method = {r["method"]: r["overhead"].percent for r in rows if r["dataset"] == dataset}
        xs = [j + (i - (len(datasets) - 1) / 2) * width for j, m in enumerate(methods)]
        bars = ax.bar(xs, [by_method.get(m, math.nan) for m in methods], width, label=dataset)
        ax.bar_label(bars, fmt="%+.1f%%", fontsize="small")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    ax.set_xlim(-0.75, len(methods) - 0.25)
    ax.set_xlabel("method")
    ax.set_ylabel(f"median step time vs {study.baseline} (%)")
    ax.set_title("Step-time overhead (runs' median step times)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(figure, path)


# ---- writing ---------------------------------------------------------------


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _csv_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    # float() first: numpy scalars subclass float, and their repr is "np.float64(…)".
    return repr(float(value)) if isinstance(value, float) else str(value)


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([[_csv_value(row.get(c)) for c in columns] for row in rows])


def _write_csvs(directory: Path, summary_rows, comparison_rows, speed_rows) -> None:
    columns = ["dataset", "method", "runs", "done", "diverged", "failed", "unfinished"]
    flat = []
    for row in summary_rows:
        record = {c: row[c] for c in columns}
        for metric, _ in SUMMARY_METRICS:
            s = row[metric]
            record |= {
                f"{metric}_n": s.n,
                f"{metric}_mean": s.mean,
                f"{metric}_sd": s.sd,
                f"{metric}_ci_low": s.ci_low,
                f"{metric}_ci_high": s.ci_high,
            }
        flat.append(record)
    stats_columns = [f"{m}_{s}" for m, _ in SUMMARY_METRICS for s in ("n", "mean", "sd", "ci_low", "ci_high")]
    _write_csv(directory / "summary.csv", columns + stats_columns, flat)

    comparison_columns = [
        "dataset",
        "method",
        "metric",
        "n_pairs",
        "seeds",
        "mean_diff",
        "sd_diff",
        "ci_low",
        "ci_high",
        "t_stat",
        "t_p",
        "t_p_holm",
        "wilcoxon_stat",
        "wilcoxon_p",
        "wilcoxon_p_holm",
        "wilcoxon_min_p",
        "effect_size_dz",
        "note",
    ]
    records = []
    for row in comparison_rows:
        c: Comparison = row["comparison"]
        records.append(
            {
                "dataset": row["dataset"],
                "method": row["method"],
                "metric": row["metric"],
                "n_pairs": c.n_pairs,
                "seeds": " ".join(str(s) for s in c.seeds),
                "mean_diff": c.mean_diff,
                "sd_diff": c.sd_diff,
                "ci_low": c.ci_low,
                "ci_high": c.ci_high,
                "t_stat": c.t_stat,
                "t_p": c.t_p,
                "t_p_holm": row["t_p_holm"],
                "wilcoxon_stat": c.wilcoxon_stat,
                "wilcoxon_p": c.wilcoxon_p,
                "wilcoxon_p_holm": row["wilcoxon_p_holm"],
                "wilcoxon_min_p": c.wilcoxon_min_p,
                "effect_size_dz": c.effect_size,
                "note": c.note,
            }
        )
    _write_csv(directory / "comparison.csv", comparison_columns, records)

    speed_columns = [
        "dataset",
        "method",
        "target_val_loss",
        "runs",
        "reached",
        "steps_mean",
        "steps_sd",
        "seconds_mean",
        "seconds_sd",
        "step_time_median_s",
        "baseline_step_time_median_s",
        "overhead_percent",
    ]
    records = [
        {
            "dataset": r["dataset"],
            "method": r["method"],
            "target_val_loss": r["target_val_loss"],
            "runs": r["runs"],
            "reached": r["reached"],
            "steps_mean": r["steps"].mean,
            "steps_sd": r["steps"].sd,
            "seconds_mean": r["seconds"].mean,
            "seconds_sd": r["seconds"].sd,
            "step_time_median_s": r["overhead"].method_median_s,
            "baseline_step_time_median_s": r["overhead"].baseline_median_s,
            "overhead_percent": r["overhead"].percent,
        }
        for r in speed_rows
    ]
    _write_csv(directory / "speed_cost.csv", speed_columns, records)


@dataclass
class _Section:
    """A heading with tables and plots, rendered the same way in Markdown and HTML."""

    title: str
    tables: list[_Table] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    text: list[str] = field(default_factory=list)


def _build(study: _Study, directory: Path) -> None:
    summary_rows = _summary_rows(study)
    comparison_rows = _comparison_rows(study)
    speed_rows = _speed_rows(study)
    uses = _schedule_uses(study)
    _write_csvs(directory, summary_rows, comparison_rows, speed_rows)

    caveats = _caveats(study, summary_rows, comparison_rows, uses)
    sections = [
        _Section("Table 1", tables=[_table_one(study, summary_rows, comparison_rows)]),
    ]
    for dataset in study.datasets:
        slug = _slug(dataset)
        speed = _speed_table(dataset, speed_rows, study.baseline)
        sections.append(
            _Section(
                dataset,
                tables=[
                    *_summary_tables(dataset, summary_rows),
                    *_comparison_tables(dataset, comparison_rows, study.baseline),
                    *([speed] if speed else []),
                ],
                plots=[
                    p
                    for p in (
                        _plot_curves(study, dataset, directory / f"curves_{slug}.png"),
                        _plot_final_val(study, dataset, summary_rows, directory / f"final_val_{slug}.png"),
                    )
                    if p
                ],
            )
        )
    sigma_plot = _plot_sigma(study, uses, directory / "sigma_schedules.png")
    overhead_plot = _plot_overhead(study, speed_rows, directory / "overhead.png")
    sections.append(
        _Section(
            "Noise schedules and cost",
            plots=[p for p in (sigma_plot, overhead_plot) if p],
            text=[] if uses else ["No run of this study adds gradient noise."],
        )
    )
    not_done = _not_done_table(study)
    sections.append(
        _Section("Methods and runs", tables=[_methods_table(study), *([not_done] if not_done else [])])
    )

    description = str(study.spec.get("description") or "").strip()
    stamp = (
        f"gradnoise {gradnoise.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, baseline: {study.baseline}"
    )
    (directory / "report.md").write_text(
        _markdown(study.name, description, stamp, caveats, sections), encoding="utf-8"
    )
    (directory / "index.html").write_text(
        _html(study.name, description, stamp, caveats, sections), encoding="utf-8"
    )


def _markdown(name, description, stamp, caveats, sections: list[_Section]) -> str:
    parts = [f"# Study `{name}`: report", ""]
    if description:
        parts += [description, ""]
    parts += [f"*{stamp}*", "", "## Caveats", ""]
    parts += [f"- {line}" for line in caveats] + [""]
    for section in sections:
        parts += [f"## {section.title}", ""]
        parts += [line + "\n" for line in section.text]
        parts += [table.markdown() for table in section.tables]
        parts += [f"![{plot.stem}]({plot.name})\n" for plot in section.plots]
    return "\n".join(parts)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 0.3em; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
.note { font-size: 0.85em; color: #555; margin: 0.2em 0; }
.caveats { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5em 1.5em; }
img { max-width: 100%; display: block; margin: 1em 0; }
"""


def _html(name, description, stamp, caveats, sections: list[_Section]) -> str:
    def image(path: Path) -> str:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'

    body = [f"<h1>Study {html.escape(name)}: report</h1>"]
    if description:
        body.append(f"<p>{html.escape(description)}</p>")
    body.append(f'<p class="note">{html.escape(stamp)}</p>')
    body.append('<div class="caveats"><h2>Caveats</h2><ul>')
    body += [f"<li>{_inline_code(html.escape(line))}</li>" for line in caveats]
    body.append("</ul></div>")
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        body += [f"<p>{html.escape(line)}</p>" for line in section.text]
        body += [table.html() for table in section.tables]
        body += [image(plot) for plot in section.plots]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Study {html.escape(name)}: report</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def _inline_code(escaped: str) -> str:
    """Markdown's `code` spans, as HTML."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)

"""The report's figures, one function per figure: each draws from the analysis, saves a
PNG to `path` and returns it, or returns None (and writes nothing) when there is nothing
to draw."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from gradnoise.study.report.analysis import HORIZON_FRACTION, LOSS_UNIT, Analysis, ScheduleUse, Study


def palette(n: int) -> list[tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def method_colors(study: Study) -> dict[str, tuple]:
    """One color per method, the same in every figure."""
    return dict(zip(study.methods, palette(len(study.methods)), strict=True))


def _save(figure: Figure, path: Path) -> Path:
    # No "Software" metadata: it would put matplotlib's URL into every PNG.
    figure.savefig(path, dpi=110, metadata={"Software": None})
    return path


def curves(analysis: Analysis, dataset: str, path: Path) -> Path | None:
    """Train (eval mode) and val loss over steps: mean over seeds, band = min–max."""
    study = analysis.study
    colors = method_colors(study)
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
            color = colors[method]
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


def final_val(analysis: Analysis, dataset: str, path: Path) -> Path | None:
    """Final val loss per method: each seed, and the mean with its 95% CI."""
    study = analysis.study
    colors = method_colors(study)
    rows = [r for r in analysis.summaries if r.dataset == dataset and r.summary("val_loss").n]
    if not rows:
        return None
    figure = Figure(figsize=(max(6, 1.0 * len(rows) + 2), 4.6), layout="constrained")
    ax = figure.subplots()
    for x, row in enumerate(rows):
        values = study.values(dataset, row.method, "val_loss")
        seeds = sorted(s for s, v in values.items() if v is not None)
        offsets = np.linspace(-0.12, 0.12, len(seeds)) if len(seeds) > 1 else [0.0]
        color = colors[row.method]
        ax.scatter([x + o for o in offsets], [values[s] for s in seeds], color=color, s=18, alpha=0.7)
        summary = row.summary("val_loss")
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
        if row.method == study.baseline:
            ax.axhline(summary.mean, color=color, linestyle="--", linewidth=0.8, label="baseline mean")
    ax.set_xticks(range(len(rows)), [r.method for r in rows], rotation=30, ha="right")
    ax.set_xlabel("method")
    ax.set_ylabel(f"final val loss ({LOSS_UNIT})")
    ax.set_title(f"{dataset}: final val loss\nper seed (dots), mean with 95% CI (diamond)")
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return _save(figure, path)


def _sigma_values(study: Study, use: ScheduleUse) -> tuple[np.ndarray, np.ndarray]:
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


def sigma_schedules(analysis: Analysis, path: Path) -> Path | None:
    """σ_t of every schedule the runs used, on a log axis, with each one's horizon."""
    uses = analysis.schedules
    if not uses:
        return None
    figure = Figure(figsize=(10, 5), layout="constrained")
    ax = figure.subplots()
    plotted = False
    for use, color in zip(uses, palette(len(uses)), strict=True):
        steps, sigma = _sigma_values(analysis.study, use)
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


def overhead(analysis: Analysis, path: Path) -> Path | None:
    """Median step time of each method vs the baseline's, in %, per dataset."""
    study = analysis.study
    rows = [r for r in analysis.speeds if r.method != study.baseline and not math.isnan(r.overhead.percent)]
    if not rows:
        return None
    methods = [m for m in study.methods if any(r.method == m for r in rows)]
    datasets = [d for d in study.datasets if any(r.dataset == d for r in rows)]
    width = min(0.8 / len(datasets), 0.35)
    figure = Figure(figsize=(max(6, 0.9 * len(methods) + 2), 4.6), layout="constrained")
    ax = figure.subplots()
    for i, dataset in enumerate(datasets):
        by_method = {r.method: r.overhead.percent for r in rows if r.dataset == dataset}
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

"""The report's figures, one function per figure: each draws from the analysis, saves a
PNG to `path` and returns it, or returns None (and writes nothing) when there is nothing
to draw. A method has one colour in every figure (`method_colors`)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from gradnoise.study.report.analysis import Analysis
from gradnoise.study.report.conditions import HORIZON_FRACTION, ScheduleUse
from gradnoise.study.report.loading import Study, headline_metric
from gradnoise.study.report.metrics import LOSS_UNIT, metric
from gradnoise.study.stats import paired_comparison

#: The zoomed panels of the loss curves show this last part of the run.
ZOOM_FRACTION = 0.6
#: Published train-mode losses: drawn beside the train-mode loss of the runs.
TRAIN_MODE = ("train_loss_last_batch", "train_loss_window")


def palette(n: int) -> list[tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def method_colors(study: Study) -> dict[str, tuple]:
    """One color per method, the same in every figure."""
    return dict(zip(study.methods, palette(len(study.methods)), strict=True))


_LINE_STYLES = ("-", "--", "-.", (0, (1, 1)))


def method_lines(study: Study) -> dict[str, object]:
    """One line style per method, the same in every figure: curves that coincide (two
    schedules with the same effect) still show both."""
    return {method: _LINE_STYLES[i % len(_LINE_STYLES)] for i, method in enumerate(study.methods)}


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _save(figure: Figure, path: Path) -> Path:
    # No "Software" metadata: it would put matplotlib's URL into every PNG.
    figure.savefig(path, dpi=110, metadata={"Software": None})
    return path


def _legend_below(figure: Figure, axes, columns: int = 3, extra: dict | None = None) -> None:
    """One figure-wide legend under the panels (it never covers a curve): every label of
    `axes` once, then `extra` (label → handle)."""
    handles = {}
    for ax in np.atleast_1d(axes).flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    for label, handle in (extra or {}).items():
        handles.setdefault(label, handle)
    if handles:
        figure.legend(
            list(handles.values()), list(handles), loc="outside lower center", ncols=columns, fontsize="small"
        )


def _by_step(points: list[dict], key: str) -> dict[int, list[float]]:
    by_step = defaultdict(list)
    for p in points:
        if p.get(key) is not None:
            by_step[p["step"]].append(p[key])
    return by_step


def curves(analysis: Analysis, dataset: str, path: Path) -> Path | None:
    """Train (eval mode) and val loss over steps, mean over seeds, band = min–max; below,
    the last ZOOM_FRACTION of the run with the y-axis fitted to it. Published values of
    the spec are dashed reference lines, and the train-mode loss of the method they
    belong to is drawn dotted beside its eval-mode train curve."""
    study = analysis.study
    figure = _figure(12, 8.4)
    axes = figure.subplots(2, 2)
    published = [row for row in analysis.published if row.dataset == dataset]
    train_mode = any(row.metric in TRAIN_MODE for row in published)
    #: per column, the values the zoomed panel's y-axis must show
    zoom_values: dict[int, list[float]] = {0: [], 1: []}
    last_steps = [
        _method_curves(axes, study, dataset, method, zoom_values, train_mode) for method in study.methods
    ]
    if all(step is None for step in last_steps):
        return None
    _published_lines(axes, published, zoom_values)
    _curve_axes(axes, dataset, max(step or 0 for step in last_steps), zoom_values)
    _legend_below(figure, axes)
    return _save(figure, path)


def _method_curves(
    axes, study: Study, dataset: str, method: str, zoom_values, train_mode: bool
) -> int | None:
    """One method's train and val curves on both rows of panels (and its train-mode loss,
    dotted, where it is the published values' method); the last step drawn, None if none."""
    colors, lines = method_colors(study), method_lines(study)
    runs = study.done.get((dataset, method), {})
    points = [p for row in runs.values() for p in study.evals.get(row["id"], [])]
    last_step = None
    for column, key in enumerate(("train_loss", "val_loss")):
        by_step = _by_step(points, key)
        if not by_step:
            continue
        steps = np.array(sorted(by_step))
        values = [np.array(by_step[s]) for s in steps]
        mean = np.array([v.mean() for v in values])
        low, high = [v.min() for v in values], [v.max() for v in values]
        for ax in axes[:, column]:
            ax.plot(
                steps,
                mean,
                color=colors[method],
                linestyle=lines[method],
                label=f"{method} (n={len(runs)})",
            )
            ax.fill_between(steps, low, high, color=colors[method], alpha=0.18, linewidth=0)
        last_step = max(last_step or 0, int(steps[-1]))
        zoom_values[column] += list(mean[steps >= (1 - ZOOM_FRACTION) * steps[-1]])
    if study.published and method == study.published.method and train_mode:
        trains = [p for row in runs.values() for p in study.trains.get(row["id"], [])]
        by_step = _by_step(trains, "loss")
        steps = sorted(by_step)
        for ax in axes[:, 0]:
            ax.plot(
                steps,
                [np.mean(by_step[s]) for s in steps],
                color=colors[method],
                linestyle=":",
                linewidth=1,
                label=f"{method}, train mode (log-window mean)",
            )
    return last_step


def _published_lines(axes, published: list, zoom_values) -> None:
    """The published train and val values as horizontal lines in their column's panels."""
    for row in published:
        column = (
            0
            if row.metric.startswith("train_loss")
            else 1
            if row.metric.startswith(("val", "best_val"))
            else None
        )
        if column is None:
            continue
        for ax in axes[:, column]:
            ax.axhline(
                row.value,
                color="black",
                linestyle="--" if column == 0 else "-.",
                linewidth=1,
                label=f"published {metric(row.metric).label}: {row.value:.4f}",
            )
        zoom_values[column].append(row.value)


def _curve_axes(axes, dataset: str, last_step: int, zoom_values) -> None:
    """Titles, labels and grids; the zoomed row's limits fitted to the last part of the run."""
    titles = ("train loss (eval mode)", "val loss")
    for column, title in enumerate(titles):
        top, bottom = axes[0, column], axes[1, column]
        top.set_title(f"{dataset}: {title}; mean over seeds, band = min–max")
        bottom.set_title(f"the last {ZOOM_FRACTION:.0%} of the run, zoomed")
        start = (1 - ZOOM_FRACTION) * last_step
        bottom.set_xlim(start, last_step * 1.01)
        if zoom_values[column]:
            low, high = min(zoom_values[column]), max(zoom_values[column])
            margin = 0.08 * (high - low) or 0.01
            bottom.set_ylim(low - margin, high + margin)
        for ax in (top, bottom):
            ax.set_xlabel("step")
            ax.set_ylabel(f"loss ({LOSS_UNIT})")
            ax.grid(alpha=0.3)


def final_val(analysis: Analysis, dataset: str, path: Path) -> Path | None:
    """The final val loss per method (full pass where the runs made it): each seed, and
    the mean with its 95% CI."""
    study = analysis.study
    key = headline_metric(study)
    colors = method_colors(study)
    rows = [r for r in analysis.summaries if r.dataset == dataset and r.summary(key).n]
    if not rows:
        return None
    figure = _figure(max(5.0, 0.75 * len(rows) + 2.5), 4.8)
    ax = figure.subplots()
    for x, row in enumerate(rows):
        values = study.values(dataset, row.method, key)
        seeds = sorted(s for s, v in values.items() if v is not None)
        offsets = np.linspace(-0.15, 0.15, len(seeds)) if len(seeds) > 1 else [0.0]
        color = colors[row.method]
        ax.scatter([x - 0.1 + o for o in offsets], [values[s] for s in seeds], color=color, s=18, alpha=0.7)
        summary = row.summary(key)
        if summary.n >= 2:
            ax.errorbar(
                x + 0.22,
                summary.mean,
                yerr=[[summary.mean - summary.ci_low], [summary.ci_high - summary.mean]],
                fmt="D",
                color=color,
                capsize=4,
            )
        else:
            ax.plot(x + 0.22, summary.mean, "D", color=color)
        if row.method == study.baseline:
            ax.axhline(summary.mean, color=color, linestyle="--", linewidth=0.8, label=f"{row.method} mean")
    ax.set_xticks(range(len(rows)), [r.method for r in rows], rotation=30 if len(rows) > 1 else 0, ha="right")
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_xlabel("method")
    ax.set_ylabel(f"{metric(key).label} ({LOSS_UNIT})")
    ax.set_title(f"{dataset}: {metric(key).label}\nper seed (dots), mean with 95% CI (diamond)")
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return _save(figure, path)


def _logged_sigma(study: Study, run_ids: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The σ the runs logged, median over runs per step."""
    by_step = defaultdict(list)
    for run_id in run_ids:
        for p in study.trains.get(run_id, []):
            if p["sigma"] is not None:
                by_step[p["step"]].append(p["sigma"])
    steps = sorted(by_step)
    return np.array(steps, dtype=float), np.array([np.median(by_step[s]) for s in steps])


def _formula_sigma(use: ScheduleUse) -> tuple[np.ndarray, np.ndarray]:
    """σ_t from the schedule's formula: linear spacing for the body of the run, geometric
    for the fast early decays."""
    last = max(use.max_iters - 1, 1)
    steps = np.unique(
        np.concatenate([np.linspace(0, last, 1000).astype(int), np.geomspace(1, last, 500).astype(int), [0]])
    )
    return steps.astype(float), np.array([use.schedule(int(s)) for s in steps])


def sigma_schedules(analysis: Analysis, path: Path) -> Path | None:
    """σ_t of every method with noise, in its method's colour, on a log axis: the
    schedule's formula for absolute σ, the logged σ (median over runs) where σ depends on
    the run (relative noise: r · RMS(g); plateau schedules); dotted, each horizon."""
    study = analysis.study
    colors, lines = method_colors(study), method_lines(study)
    figure = _figure(10, 5.6)
    ax = figure.subplots()
    plotted, horizons = False, []
    method_of = {run["id"]: run["method"] for run in study.runs}
    for use in analysis.schedules:
        logged = use.relative or use.data_driven
        for method in use.methods:
            run_ids = tuple(r for r in use.run_ids if method_of[r] == method)
            steps, sigma = _logged_sigma(study, run_ids) if logged else _formula_sigma(use)
            positive = sigma > 0  # log axis: σ = 0 cannot be drawn, and means no noise anyway
            if not positive.any():
                continue
            how = "logged σ, median of runs" if logged else "formula"
            ax.plot(
                steps[positive],
                sigma[positive],
                color=colors[method],
                linestyle=lines[method],
                label=f"{method}: {use.spec} [{how}]",
            )
            plotted = True
            horizon = None if logged else use.horizon
            if horizon is not None and horizon < use.max_iters:
                horizons.append((horizon, method))
    if not plotted:
        return None
    # Labels stacked downwards in step order, so close horizons (495, 496) never overprint.
    for index, (horizon, method) in enumerate(sorted(horizons)):
        ax.axvline(horizon, color=colors[method], linestyle=":", linewidth=1.2)
        ax.annotate(
            f"{horizon}",
            (horizon, 1),
            xycoords=("data", "axes fraction"),
            color=colors[method],
            fontsize="small",
            xytext=(3, -12 - 11 * index),
            textcoords="offset points",
        )
    for scale in analysis.gradient_scales:
        ax.axhline(
            scale.rms,
            color="gray",
            linestyle="--",
            linewidth=1,
            label=f"RMS(g) of {study.baseline}, {scale.dataset}",
        )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("σ_t (noise std per element)")
    ax.set_title(f"Noise σ over the run; dotted: horizon (σ_t < {HORIZON_FRACTION:.0%} of σ0)")
    ax.grid(alpha=0.3, which="both")
    _legend_below(figure, ax, columns=1)
    return _save(figure, path)


def gradient_norms(analysis: Analysis, dataset: str, path: Path) -> Path | None:
    """‖g‖ (after clipping), ‖noise‖ and their ratio over training, per method: the
    median over its runs at each logged step, log axes."""
    study = analysis.study
    colors, lines = method_colors(study), method_lines(study)
    keys = (
        ("grad_norm", "‖g‖ (after clipping)"),
        ("noise_norm", "‖noise‖"),
        ("noise_to_grad", "‖noise‖ / ‖g‖"),
    )
    figure = _figure(13, 4.6)
    axes = figure.subplots(1, 3)
    plotted = False
    for method in study.methods:
        runs = study.done.get((dataset, method), {})
        points = [p for row in runs.values() for p in study.trains.get(row["id"], [])]
        for ax, (key, _) in zip(axes, keys, strict=True):
            by_step = _by_step(points, key)
            steps = [s for s in sorted(by_step) if np.median(by_step[s]) > 0]
            if not steps:
                continue
            ax.plot(
                steps,
                [np.median(by_step[s]) for s in steps],
                color=colors[method],
                linestyle=lines[method],
                label=method,
                linewidth=1.2,
            )
            plotted = True
    if not plotted:
        return None
    config = study.config(dataset, study.baseline) or {}
    if config.get("grad_clip"):
        axes[0].axhline(config["grad_clip"], color="gray", linestyle="--", linewidth=1, label="grad_clip")
    axes[2].axhline(1.0, color="gray", linestyle="--", linewidth=1, label="noise as large as the gradient")
    for ax, (_, title) in zip(axes, keys, strict=True):
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{dataset}: {title}")
        ax.grid(alpha=0.3, which="both")
    _legend_below(figure, axes, columns=4)
    return _save(figure, path)


#: The dose-response plot's colour and marker per mode: one colour each, not one per level.
MODE_STYLE = {False: ("tab:blue", "o", "absolute σ"), True: ("tab:orange", "s", "relative σ = r·RMS(g)")}


def dose_response(
    analysis: Analysis, dataset: str, path: Path, metrics: tuple[str, ...] | None = None
) -> Path | None:
    """Per metric (a row of panels): Δ vs the baseline (mean and 95% CI, paired on seeds)
    against the σ each noise level used (log axis), coloured by mode (absolute, relative);
    beside it, if the spec names references, each level minus the first reference, paired
    on seeds (below zero: better than it). The gradient's RMS is marked; a star marks a
    level whose Holm-adjusted t p (the family's, vs the baseline) is below 0.05."""
    study = analysis.study
    layout = study.dose
    if layout is None:
        return None
    metrics = [key for key in (metrics or layout.metrics) if analysis.dose(dataset, key)]
    if not metrics:
        return None
    reference = next((m for m in layout.references if (dataset, m) in study.done), None)
    columns = 2 if reference else 1
    figure = _figure(5.6 * columns, 3.9 * len(metrics) + 0.5)
    axes = np.array(figure.subplots(len(metrics), columns, squeeze=False))
    scale = analysis.gradient_scale(dataset)
    for row, key in zip(axes, metrics, strict=True):
        levels = [r for r in analysis.dose(dataset, key) if not math.isnan(r.sigma) and r.sigma > 0]
        panels = [(row[0], study.baseline, [(r, r.comparison, r.t_p_holm < 0.05) for r in levels])]
        if reference:
            against = study.values(dataset, reference, key)
            paired = [
                (r, paired_comparison(study.values(dataset, r.method, key), against), False) for r in levels
            ]
            panels.append((row[1], reference, paired))
        for ax, control, points in panels:
            _dose_panel(ax, points)
            if scale is not None:
                ax.axvline(scale.rms, color="black", linestyle=":", linewidth=1.2, label="RMS(g)")
            ax.set_ylabel(f"Δ {metric(key).label} ({LOSS_UNIT})")
            ax.set_title(f"noise level − {control}, paired on seeds", fontsize="medium")
    for ax in axes[-1]:
        ax.set_xlabel("σ used (median of the logged σ)")
    figure.suptitle(f"{dataset}: mean and 95% CI; * Holm p < 0.05 vs {study.baseline}", fontsize="medium")
    _legend_below(figure, axes, columns=4)
    return _save(figure, path)


def _dose_panel(ax, points: list) -> None:
    """One mode per line, its levels' mean differences with 95% CIs, zero marked."""
    for relative, (color, marker, label) in MODE_STYLE.items():
        family = [(r, c, star) for r, c, star in points if r.relative == relative]
        if not family:
            continue
        xs = [r.sigma for r, _, _ in family]
        means = np.array([c.mean_diff for _, c, _ in family])
        lows = np.array([c.mean_diff - c.ci_low if not math.isnan(c.ci_low) else 0 for _, c, _ in family])
        highs = np.array([c.ci_high - c.mean_diff if not math.isnan(c.ci_high) else 0 for _, c, _ in family])
        ax.errorbar(xs, means, yerr=[lows, highs], fmt=f"{marker}-", color=color, capsize=3, label=label)
        for (_, c, star), x in zip(family, xs, strict=True):
            if star:
                ax.annotate("*", (x, c.mean_diff), xytext=(5, 2), textcoords="offset points", fontsize=14)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.grid(alpha=0.3, which="both")


def overhead(analysis: Analysis, path: Path) -> Path | None:
    """Median step time of each method vs the baseline's, in %, per dataset."""
    study = analysis.study
    rows = [r for r in analysis.speeds if r.method != study.baseline and not math.isnan(r.overhead.percent)]
    if not rows:
        return None
    methods = [m for m in study.methods if any(r.method == m for r in rows)]
    datasets = [d for d in study.datasets if any(r.dataset == d for r in rows)]
    width = min(0.8 / len(datasets), 0.35)
    figure = _figure(max(6, 0.75 * len(methods) + 2), 4.6)
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

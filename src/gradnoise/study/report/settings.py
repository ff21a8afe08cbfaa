"""The report of a study with a `settings_table:` (the MNIST task): a classifier paper's table.

    rows = settings_rows(store_study, layout, task)
    build(rows, ..., directory)     # report.md, index.html, settings.csv, runs.csv, strip.png

Per setting (a row of the spec's `settings_table`), without → with noise:

- best and average of the metric over the side's done runs (best: the highest for a
  metric where higher is better, the lowest otherwise; `Task.better`), in percent, with
  the published (best, average) beside them;
- what the averages hide: the runs are bimodal (a run trains or stays at chance), so the
  fraction of runs that train (metric beyond `trained_above`; a diverged run has not
  trained) with a 95% Wilson interval, and McNemar's exact test of with against without,
  paired on seed (without[i] and with[i] of a row share seeds: the same init and batches);
- a strip plot of every run of every cell;
- whether each published contrast holds here (`published_contrasts`): the paired
  difference of the average, with noise − without, on the setting's seed pairs,
  Holm-adjusted across the settings;
- per method, how many runs ever left chance and at which steps (`escapes_table`).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from gradnoise.study.layout import SettingsRow, SettingsTable
from gradnoise.study.report.document import MISSING, Section, Table
from gradnoise.study.stats import (
    Comparison,
    Equivalence,
    McNemar,
    Proportion,
    equivalence_test,
    holm,
    mcnemar_exact,
    paired_comparison,
    wilson_interval,
)
from gradnoise.study.tasks import HIGHER, Task

ALPHA = 0.05
#: How a published contrast is read, fixed before the neelakantan study's runs: an average
#: gain with noise of at least CLAIM_MARGIN (a fraction: 1 point of accuracy) claims "noise
#: helps"; a smaller one claims "noise changes little", tested as equivalence within
#: ±CLAIM_MARGIN (TOST).
CLAIM_MARGIN = 0.01


@dataclass(frozen=True)
class Side:
    """One side (without or with noise) of a setting: its runs' values by (method, seed)."""

    #: (method, seed) → the metric of a done run
    values: dict[tuple[str, int], float]
    #: (method, seed) → whether the finished run (done or diverged) trained
    trained_by_run: dict[tuple[str, int], bool]
    #: runs of the side the spec expands to (finished or not)
    planned: int
    best: float
    average: float
    trained: Proportion


@dataclass(frozen=True)
class SettingResult:
    row: SettingsRow
    without: Side
    with_noise: Side | None
    paired: McNemar | None


def side(
    methods: tuple[str, ...], finished: dict, planned: dict, metric: str, layout: SettingsTable, task: Task
) -> Side:
    """The side of `methods`, from `finished` ((method, seed) → finals row of a finished run)."""
    higher = task.better(metric) == HIGHER
    values, trained = {}, {}
    for (method, seed), row in finished.items():
        if method not in methods:
            continue
        value = row.get(metric)
        done = row["status"] == "done" and value is not None and math.isfinite(value)
        if done:
            values[(method, seed)] = float(value)
        beyond = done and (value > layout.trained_above if higher else value < layout.trained_above)
        trained[(method, seed)] = bool(beyond)
    chosen = max if higher else min
    numbers = list(values.values())
    return Side(
        values=values,
        trained_by_run=trained,
        planned=sum(planned.get(m, 0) for m in methods),
        best=chosen(numbers) if numbers else math.nan,
        average=sum(numbers) / len(numbers) if numbers else math.nan,
        trained=wilson_interval(sum(trained.values()), len(trained)),
    )


def settings_rows(
    runs: list[dict], finals: list[dict], layout: SettingsTable, task: Task
) -> list[SettingResult]:
    """Every row of the layout, from the store's runs and finals rows."""
    finished = {(row["method"], row["seed"]): row for row in finals}
    planned: dict[str, int] = defaultdict(int)
    for run in runs:
        planned[run["method"]] += 1
    results = []
    for row in layout.rows:
        without = side(row.without, finished, planned, layout.metric, layout, task)
        with_noise = (
            side(row.with_noise, finished, planned, layout.metric, layout, task) if row.with_noise else None
        )
        paired = None
        if with_noise is not None:
            pairs = [
                (without.trained_by_run[(control, seed)], with_noise.trained_by_run[(treatment, seed)])
                for control, treatment in zip(row.without, row.with_noise, strict=True)
                for (method, seed) in without.trained_by_run
                if method == control and (treatment, seed) in with_noise.trained_by_run
            ]
            paired = mcnemar_exact(pairs)
        results.append(SettingResult(row, without, with_noise, paired))
    return results


# ---- text -----------------------------------------------------------------------------------


def percent(value: float | None) -> str:
    return MISSING if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _arrow(without: str, with_noise: str | None) -> str:
    return without if with_noise is None else f"{without} → {with_noise}"


def _trained_text(proportion: Proportion) -> str:
    if proportion.n == 0:
        return MISSING
    return f"{proportion.k}/{proportion.n} [{percent(proportion.low)}, {percent(proportion.high)}]%"


def _published(pair: tuple[float, float] | None, index: int) -> str | None:
    return None if pair is None else f"{pair[index]:.1f}"


def settings_table(results: list[SettingResult], layout: SettingsTable, unit_label: str) -> Table:
    """The paper's layout (best and average, without → with noise, published beside ours)
    and beside it the fraction of runs that train and the paired test."""
    rows = []
    for result in results:
        row, without, noisy = result.row, result.without, result.with_noise
        published_best = _arrow(
            _published(row.published_without, 0) or MISSING,
            _published(row.published_with, 0) if noisy else None,
        )
        published_average = _arrow(
            _published(row.published_without, 1) or MISSING,
            _published(row.published_with, 1) if noisy else None,
        )
        rows.append(
            [
                row.label,
                _arrow(percent(without.best), percent(noisy.best) if noisy else None),
                published_best,
                _arrow(percent(without.average), percent(noisy.average) if noisy else None),
                published_average,
                _arrow(_trained_text(without.trained), _trained_text(noisy.trained) if noisy else None),
                MISSING if result.paired is None else f"{result.paired.c}/{result.paired.b}",
                MISSING if result.paired is None else f"{result.paired.p:.3g}",
            ]
        )
    return Table(
        layout.title,
        [
            "setting",
            f"best {unit_label} (ours)",
            "best (published)",
            f"average {unit_label} (ours)",
            "average (published)",
            f"runs that train ({layout.metric} beyond {layout.trained_above:g}), 95% Wilson CI",
            "pairs only with noise trains / only without",
            "McNemar exact p",
        ],
        rows,
        notes=[
            "Cells read without noise → with noise; best and average over the setting's done "
            f"runs, in percent. Published: {layout.source}.",
            "A diverged run counts as one that did not train; pairs share a seed (the same "
            "initial weights and batches) and a learning rate.",
        ],
    )


def trained_sentence(result: SettingResult, alpha: float = ALPHA) -> str | None:
    """Whether noise makes a setting's runs train more often (None without both sides)."""
    if result.with_noise is None or result.paired is None:
        return None
    without, noisy, paired = result.without.trained, result.with_noise.trained, result.paired
    if without.n == 0 or noisy.n == 0:
        return None
    if paired.p < alpha:
        verdict = "more often" if paired.c > paired.b else "less often"
        claim = f"with noise runs train {verdict} (McNemar exact p = {paired.p:.3g} < {alpha})"
    else:
        claim = f"no detectable difference in how often runs train (McNemar exact p = {paired.p:.3g})"
    return f"{noisy.k} of {noisy.n} runs train with noise, {without.k} of {without.n} without; {claim}."


@dataclass(frozen=True)
class PublishedContrast:
    """A setting's published claim about noise, and what this study's seed pairs say of it."""

    label: str
    published: tuple[float, float]  # the published averages (without, with), in percent
    claim: str  # "helps" or "changes little"
    difference: Comparison  # with noise − without, paired: mean, 95% CI, t-test
    equivalence: Equivalence | None  # the TOST of a "changes little" claim
    adjusted_p: float
    verdict: str  # "holds", "does not hold", "inconclusive"


def _paired_values(side_: Side, methods: tuple[str, ...]) -> dict[tuple[int, int], float]:
    """(index of the method in the row, seed) → value: a row's runs keyed for pairing across
    the row's two sides, the i-th method of one side with the i-th of the other."""
    index = {method: i for i, method in enumerate(methods)}
    return {(index[method], seed): value for (method, seed), value in side_.values.items()}


def published_contrasts(results: list[SettingResult], alpha: float = ALPHA) -> list[PublishedContrast]:
    """Each setting with a published average on both sides, tested on its seed pairs:

        d = metric(with noise) − metric(without), paired on (learning rate, seed)
        claim "helps"           (published gain ≥ CLAIM_MARGIN): paired t-test of mean d = 0;
                                holds if the adjusted p < α and mean d > 0, does not hold if
                                the adjusted p < α and mean d < 0, else inconclusive
        claim "changes little"  (published |gain| < CLAIM_MARGIN): TOST within ±CLAIM_MARGIN;
                                holds if the adjusted p < α, does not hold if the 95% CI of
                                mean d lies wholly outside ±CLAIM_MARGIN, else inconclusive

    Where every pair is equal (no test is defined), "helps" does not hold and "changes little"
    holds. p-values are Holm-adjusted across the settings tested. Percent in the spec,
    fractions here.
    """
    tested = []
    for result in results:
        row = result.row
        if result.with_noise is None or row.published_without is None or row.published_with is None:
            continue
        noisy = _paired_values(result.with_noise, row.with_noise)
        without = _paired_values(result.without, row.without)
        gain = (row.published_with[1] - row.published_without[1]) / 100
        difference = paired_comparison(noisy, without)
        if gain >= CLAIM_MARGIN:
            tested.append((row, "helps", difference, None, difference.t_p))
        else:
            equivalence = equivalence_test(noisy, without, CLAIM_MARGIN, alpha)
            tested.append((row, "changes little", difference, equivalence, equivalence.p))
    raw = [entry[-1] for entry in tested]
    measured = [i for i, p in enumerate(raw) if not math.isnan(p)]
    adjusted = [math.nan] * len(raw)
    for i, p in zip(measured, holm([raw[i] for i in measured]), strict=True):
        adjusted[i] = p
    contrasts = []
    for (row, claim, difference, equivalence, _), p in zip(tested, adjusted, strict=True):
        if _unchanged(difference):
            verdict = "does not hold" if claim == "helps" else "holds"
        elif math.isnan(p):
            verdict = "inconclusive"
        elif claim == "helps":
            verdict = (
                "inconclusive" if p >= alpha else ("holds" if difference.mean_diff > 0 else "does not hold")
            )
        else:
            outside = difference.ci_low > CLAIM_MARGIN or difference.ci_high < -CLAIM_MARGIN
            verdict = "holds" if p < alpha else ("does not hold" if outside else "inconclusive")
        published = (row.published_without[1], row.published_with[1])
        contrasts.append(PublishedContrast(row.label, published, claim, difference, equivalence, p, verdict))
    return contrasts


def _unchanged(difference: Comparison) -> bool:
    """Every seed pair has the same value with and without noise (no test is defined)."""
    return difference.n_nonzero == 0 and difference.n_pairs > 0


def contrast_sentence(contrast: PublishedContrast) -> str:
    """The published claim, the estimate with its interval (the TOST's 90% one for a "changes
    little" claim, else the 95% one) and test, and the verdict."""
    difference, equivalence = contrast.difference, contrast.equivalence
    without, with_noise = contrast.published
    claim = "noise raises" if contrast.claim == "helps" else "noise barely changes"
    published = f"published, {claim} the average test accuracy ({without:.1f}% → {with_noise:.1f}%)"
    if _unchanged(difference):
        return (
            f"{published}; here every one of its {difference.n_pairs} seed pairs has the same "
            f"accuracy with noise as without: {_verdict_text(contrast)}."
        )
    if equivalence is None:
        low, high, interval = difference.ci_low, difference.ci_high, "95% CI"
        test = "paired t"
    else:
        low, high, interval = equivalence.ci_low, equivalence.ci_high, "90% CI"
        test = f"TOST ±{_points(CLAIM_MARGIN)}"
    return (
        f"{published}; here noise changes it by {_points(difference.mean_diff, sign=True)} points "
        f"[{_points(low, sign=True)}, {_points(high, sign=True)}] ({interval}, {difference.n_pairs} "
        f"seed pairs; {test}, Holm-adjusted p = {contrast.adjusted_p:.3g}): {_verdict_text(contrast)}."
    )


def answer_paragraphs(results: list[SettingResult]) -> list[str]:
    """A paragraph per setting: whether its published contrast holds, then how often runs train."""
    contrasts = {contrast.label: contrast for contrast in published_contrasts(results)}
    paragraphs = []
    for result in results:
        label = result.row.label
        parts = [contrast_sentence(contrasts[label])] if label in contrasts else []
        trained = trained_sentence(result)
        parts += [trained[0].upper() + trained[1:]] if trained else []
        if parts:
            paragraphs.append(f"**{label}**: " + " ".join(parts))
    return paragraphs


def _points(fraction: float, sign: bool = False) -> str:
    """A fraction as percentage points: 0.012 → "1.2 points" (sign: "+1.2")."""
    if math.isnan(fraction):
        return MISSING
    return f"{100 * fraction:+.1f}" if sign else f"{100 * fraction:g} point"


def _verdict_text(contrast: PublishedContrast) -> str:
    if _unchanged(contrast.difference):
        return "the claim does not hold" if contrast.claim == "helps" else "the claim holds"
    if contrast.claim == "helps":
        return {
            "holds": "the claim holds",
            "does not hold": "the claim does not hold (noise lowers it)",
            "inconclusive": "no detectable difference: the claim is neither confirmed nor refuted",
        }[contrast.verdict]
    margin = f"±{_points(CLAIM_MARGIN)}"
    return {
        "holds": f"the claim holds (equivalent within {margin})",
        "does not hold": f"the claim does not hold (the difference lies beyond {margin})",
        "inconclusive": f"inconclusive (equivalence within {margin} is not shown)",
    }[contrast.verdict]


def strip_plot(results: list[SettingResult], layout: SettingsTable, path: Path) -> Path | None:
    """Every run's metric (percent) per setting and side, jittered; the threshold dashed."""
    if not any(result.without.values for result in results):
        return None
    import numpy as np
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(6.0, 1.3 * len(results) + 2), 4.2), layout="constrained")
    axes = figure.subplots()
    generator = np.random.default_rng(0)
    for index, result in enumerate(results):
        sides = [("without noise", result.without, -0.18, "tab:gray")]
        if result.with_noise is not None:
            sides.append(("with noise", result.with_noise, 0.18, "tab:blue"))
        for label, part, offset, color in sides:
            values = 100 * np.array(list(part.values.values()), dtype=float)
            x = index + offset + generator.uniform(-0.08, 0.08, size=len(values))
            axes.scatter(x, values, s=12, alpha=0.7, color=color, label=label if index == 0 else None)
    axes.axhline(100 * layout.trained_above, color="black", linestyle="--", linewidth=0.8)
    axes.set_xticks(range(len(results)), [result.row.label for result in results], rotation=20, ha="right")
    axes.set_ylabel(f"{layout.metric} (%)")
    axes.set_title(
        f"Every run, per setting (dashed: {100 * layout.trained_above:g}%, the training threshold)"
    )
    axes.legend(loc="best", fontsize=8)
    figure.savefig(path, dpi=110, metadata={"Software": None})
    return path


def runs_table(finals: list[dict], metric: str) -> Table:
    rows = [
        [
            row["id"],
            row["method"],
            str(row["seed"]),
            row["status"],
            percent(row.get(metric)),
            MISSING if row.get("escape_step") is None else str(row["escape_step"]),
        ]
        for row in finals
    ]
    return Table("Runs", ["run", "method", "seed", "status", f"{metric} (%)", "escape step"], rows)


def escapes_table(finals: list[dict]) -> Table:
    """Per method, in the order its runs come: how many finished runs ever left chance (their
    `escape_step`, the first evaluated step above the trainer's escape accuracy, is set, also
    for a run that diverged later) and at which steps: the timing a final accuracy hides."""
    steps: dict[str, list[int]] = {}
    finished: dict[str, int] = defaultdict(int)
    for row in finals:
        finished[row["method"]] += 1
        left = steps.setdefault(row["method"], [])
        if row.get("escape_step") is not None:
            left.append(int(row["escape_step"]))
    rows = []
    for method, left in steps.items():
        timing = [MISSING, MISSING]
        if left:
            timing = [f"{statistics.median(left):g}", f"{min(left)}–{max(left)}"]
        rows.append([method, f"{len(left)}/{finished[method]}", *timing])
    return Table(
        "Leaving chance",
        ["method", "runs that left chance", "median step", "steps (first – last)"],
        rows,
        notes=[
            "A run leaves chance at its first evaluation (every eval_every steps) above the escape accuracy."
        ],
    )


def write_csvs(directory: Path, results: list[SettingResult], finals: list[dict], metric: str) -> None:
    """settings.csv (a line per setting and side) and runs.csv (a line per finished run)."""
    with open(directory / "settings.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(
            ["setting", "side", "planned", "done", "best", "average", "trained", "finished", "low", "high"]
        )
        for result in results:
            for name, part in (("without", result.without), ("with", result.with_noise)):
                if part is not None:
                    t = part.trained
                    counts = [result.row.label, name, part.planned, len(part.values)]
                    writer.writerow([*counts, part.best, part.average, t.k, t.n, t.low, t.high])
    with open(directory / "runs.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["run", "method", "seed", "status", metric, "escape_step"])
        for row in finals:
            writer.writerow(
                [
                    row["id"],
                    row["method"],
                    row["seed"],
                    row["status"],
                    row.get(metric),
                    row.get("escape_step"),
                ]
            )


def sections(results: list[SettingResult], layout: SettingsTable, finals: list[dict], directory: Path):
    """(the answer, the other sections) of the report."""
    plot = strip_plot(results, layout, directory / "strip.png")
    text = answer_paragraphs(results)
    answer = Section("The answer", text=text, plots=[plot] if plot else [])
    table = settings_table(results, layout, "%")
    return answer, [
        Section(layout.title, tables=[table], text=[layout.caption] if layout.caption else []),
        Section("Leaving chance", tables=[escapes_table(finals)]),
        Section("Runs", tables=[runs_table(finals, layout.metric)]),
    ]

"""The report's answer: the spec's pre-registered hypotheses tested (one Holm family), its
exploratory contrasts estimated, the word each test allows, and the figure that shows them;
and the findings tables (each method vs the baseline and the reference, with its word).

    rows = hypothesis_rows(study)     # one per (dataset, confirmatory hypothesis)
    verdict_paragraphs(study, rows)   # one paragraph each, generated from the numbers

Words: a `better` hypothesis is "better" (or "worse") where its Holm-adjusted two-sided
paired t p is below α, else "inconclusive"; an `equivalent` one is "equivalent within
±margin" where its Holm-adjusted TOST p is below α, else "inconclusive". Losses: lower
is better, so a negative difference (treatment − control) is the treatment helping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from gradnoise import schedules
from gradnoise.study.hypotheses import Contrast, Hypothesis
from gradnoise.study.report.analysis import Analysis
from gradnoise.study.report.document import MISSING, Table, p_equals, p_value, signed
from gradnoise.study.report.loading import Study
from gradnoise.study.report.metrics import LOSS_UNIT, improves, metric
from gradnoise.study.stats import (
    Comparison,
    Equivalence,
    equivalence_test,
    holm,
    interaction_contrast,
    paired_comparison,
)

BETTER, WORSE, INCONCLUSIVE, UNTESTED = "better", "worse", "inconclusive", "no test"
#: The words of an interaction (a difference of differences has no better side).
POSITIVE, NEGATIVE = "positive", "negative"
#: The colour each word is drawn in (the forest plot).
WORD_COLORS = {BETTER: "tab:green", WORSE: "tab:red", INCONCLUSIVE: "tab:gray", UNTESTED: "tab:gray"}


@dataclass(frozen=True)
class HypothesisRow:
    """One confirmatory hypothesis on one dataset: the paired comparison (95% CI, t test),
    the TOST for an equivalence hypothesis, the p it is judged by and its Holm adjustment
    across the whole confirmatory family."""

    dataset: str
    hypothesis: Hypothesis
    comparison: Comparison
    equivalence: Equivalence | None
    p: float
    p_holm: float
    alpha: float
    #: the primary metric (its direction decides better / worse)
    hypothesis_metric: str = "val_loss_full"

    @property
    def word(self) -> str:
        if math.isnan(self.p_holm):
            return UNTESTED
        if self.p_holm >= self.alpha:
            return INCONCLUSIVE
        if self.equivalence is not None:
            return f"equivalent within ±{self.hypothesis.margin:g}"
        return BETTER if improves(self.hypothesis_metric, self.comparison.mean_diff) else WORSE

    @property
    def interval(self) -> tuple[float, float, str]:
        """The interval the verdict is read from: (1 − 2α) for TOST, 95% otherwise."""
        if self.equivalence is not None:
            e = self.equivalence
            return e.ci_low, e.ci_high, f"{1 - 2 * e.alpha:.0%} CI"
        return self.comparison.ci_low, self.comparison.ci_high, "95% CI"


@dataclass(frozen=True)
class ContrastRow:
    """One exploratory contrast on one dataset (a difference, or an interaction), paired on
    seeds; Holm across the spec's contrasts (their own family, not the confirmatory one)."""

    dataset: str
    contrast: Contrast
    comparison: Comparison
    p_holm: float
    alpha: float = 0.05

    @property
    def word(self) -> str:
        """better / worse for a difference, positive / negative for an interaction, where
        the Holm-adjusted p is below α; else inconclusive."""
        if math.isnan(self.p_holm):
            return UNTESTED
        if self.p_holm >= self.alpha:
            return INCONCLUSIVE
        if self.contrast.versus is not None:
            return POSITIVE if self.comparison.mean_diff > 0 else NEGATIVE
        return BETTER if improves(self.contrast.metric, self.comparison.mean_diff) else WORSE


def hypothesis_rows(study: Study) -> list[HypothesisRow]:
    block = study.hypotheses
    if block is None or not block.confirmatory:
        return []
    tested = []
    for dataset in study.datasets:
        for h in block.confirmatory:
            treatment = study.values(dataset, h.treatment, h.metric)
            control = study.values(dataset, h.control, h.metric)
            comparison = paired_comparison(treatment, control)
            if h.kind == "equivalent":
                equivalence = equivalence_test(treatment, control, h.margin, block.alpha)
                tested.append((dataset, h, comparison, equivalence, equivalence.p))
            else:
                tested.append((dataset, h, comparison, None, comparison.t_p))
    adjusted = holm([p for *_, p in tested])
    return [
        HypothesisRow(dataset, h, c, e, p, p_adj, block.alpha, block.metric)
        for (dataset, h, c, e, p), p_adj in zip(tested, adjusted, strict=True)
    ]


def contrast_rows(study: Study) -> list[ContrastRow]:
    block = study.hypotheses
    if block is None:
        return []
    estimated = []
    for dataset in study.datasets:
        for c in block.contrasts:
            treatment, control = (study.values(dataset, m, c.metric) for m in (c.treatment, c.control))
            if c.versus is None:
                comparison = paired_comparison(treatment, control)
            else:
                versus = [study.values(dataset, m, c.metric) for m in c.versus]
                comparison = interaction_contrast(treatment, control, *versus)
            estimated.append((dataset, c, comparison))
    adjusted = holm([comparison.t_p for *_, comparison in estimated])
    return [
        ContrastRow(d, c, comp, p, block.alpha) for (d, c, comp), p in zip(estimated, adjusted, strict=True)
    ]


def family_sentence(study: Study, rows: list[HypothesisRow]) -> str:
    block = study.hypotheses
    return (
        f"{len(rows)} pre-registered {'test' if len(rows) == 1 else 'tests'}, one "
        f"{block.correction.capitalize()} family at α = {block.alpha:g}, on "
        f"{metric(block.metric).label} ({metric(block.metric).better} is better); the rest of this "
        "report is exploratory."
    )


def verdict_paragraphs(study: Study, rows: list[HypothesisRow]) -> list[str]:
    """One short paragraph per confirmatory hypothesis: the claim, the word the test
    allows, the estimate with the interval it is read from, and the Holm-adjusted p."""
    several = len(study.datasets) > 1
    return [_paragraph(row, several) for row in rows]


def _paragraph(row: HypothesisRow, several_datasets: bool) -> str:
    h, c = row.hypothesis, row.comparison
    claim = h.claim or f"{h.treatment} vs {h.control}"
    where = f" on {row.dataset}" if several_datasets else ""
    head = f"({h.id}) {claim}{where}: **{row.word}**"
    if row.word == WORSE:  # a `better` hypothesis claims the treatment wins
        head += ", the opposite of the claim"
    if math.isnan(row.p):
        note = row.equivalence.note if row.equivalence is not None else c.note
        return f"{head}: {h.treatment} − {h.control}: {note}."
    low, high, label = row.interval
    test = f"TOST vs ±{h.margin:g}, " if row.equivalence is not None else ""
    return (
        f"{head}. Δ = {signed(c.mean_diff, 3)} {LOSS_UNIT} ({label} {signed(low, 3)} to "
        f"{signed(high, 3)}, n = {c.n_pairs}), {test}Holm {p_equals(row.p_holm)}."
    )


def exploratory_paragraphs(study: Study, contrasts: list[ContrastRow]) -> list[str]:
    """Without confirmatory tests, the answer in words: the family, then one line per
    control (e.g. per model width) giving each contrast's word and Δ; the table gives CIs."""
    if not contrasts:
        return []
    block = study.hypotheses
    lead = (
        f"No confirmatory hypothesis: {len(contrasts)} exploratory "
        f"{'contrast' if len(contrasts) == 1 else 'contrasts'}, each against its own control, one "
        f"{block.correction.capitalize()} family at α = {block.alpha:g}; Δ in {LOSS_UNIT}, "
        "lower is better; 95% CIs in the table below."
    )
    groups: dict[tuple[str, str], list[ContrastRow]] = {}
    for row in contrasts:
        groups.setdefault((row.dataset, row.contrast.control), []).append(row)
    several = len(study.datasets) > 1
    lines = []
    for (dataset, control), rows in groups.items():
        prefix = _shared_prefix([r.contrast.claim for r in rows])
        where = f" on {dataset}" if several else ""
        head = f"{prefix} (vs {control}{where})" if prefix else f"vs {control}{where}"
        items = [
            f"{_claim(r.contrast, prefix)} **{r.word}** (Δ {signed(r.comparison.mean_diff, 3)})" for r in rows
        ]
        lines.append(f"{head}: {'; '.join(items)}.")
    return [lead, *lines]


def _shared_prefix(claims: list[str]) -> str:
    """The text before ": " that every claim starts with ("width 64" of "width 64: r = 3
    vs none"), or "" where they do not share one."""
    heads = {claim.split(": ", 1)[0] for claim in claims if ": " in claim}
    if len(heads) == 1 and all(": " in claim for claim in claims):
        return heads.pop()
    return ""


def _claim(c: Contrast, prefix: str) -> str:
    claim = c.claim or _contrast_text(c)
    return claim[len(prefix) + 2 :] if prefix else claim


TESTS_COLUMNS = [
    "dataset",
    "kind",
    "id",
    "claim",
    "treatment",
    "control",
    "versus",
    "metric",
    "pairs",
    "mean_diff",
    "ci_low",
    "ci_high",
    "p",
    "p_holm",
    "verdict",
    "control_final_minus_best",
]


def tests_records(study: Study, rows: list[HypothesisRow], contrasts: list[ContrastRow]) -> list[dict]:
    """tests.csv's lines: each confirmatory test (its CI the one its verdict reads), then each
    exploratory contrast, with the control's overfitting beside it."""

    def record(dataset, kind, c, comparison, interval, p, p_holm, word, versus=None) -> dict:
        return {
            "dataset": dataset,
            "kind": kind,
            "id": c.id,
            "claim": c.claim,
            "treatment": c.treatment,
            "control": c.control,
            "versus": " − ".join(versus) if versus else None,
            "metric": c.metric,
            "pairs": comparison.n_pairs,
            "mean_diff": comparison.mean_diff,
            "ci_low": interval[0],
            "ci_high": interval[1],
            "p": p,
            "p_holm": p_holm,
            "verdict": word,
            "control_final_minus_best": _overfit(study, dataset, c.control),
        }

    return [
        *[
            record(
                r.dataset,
                f"confirmatory ({r.hypothesis.kind})",
                r.hypothesis,
                r.comparison,
                r.interval,
                r.p,
                r.p_holm,
                r.word,
            )
            for r in rows
        ],
        *[
            record(
                c.dataset,
                "exploratory",
                c.contrast,
                c.comparison,
                (c.comparison.ci_low, c.comparison.ci_high),
                c.comparison.t_p,
                c.p_holm,
                c.word,
                c.contrast.versus,
            )
            for c in contrasts
        ],
    ]


def hypotheses_table(rows: list[HypothesisRow]) -> Table:
    return Table(
        title="Confirmatory hypotheses (one Holm family)",
        columns=["id", "treatment − control", "metric", "pairs", "Δ", "CI", "p", "p (Holm)", "verdict"],
        rows=[
            [
                r.hypothesis.id,
                f"{r.hypothesis.treatment} − {r.hypothesis.control}",
                r.hypothesis.metric,
                str(r.comparison.n_pairs),
                signed(r.comparison.mean_diff),
                _interval(*r.interval),
                p_value(r.p),
                p_value(r.p_holm),
                r.word,
            ]
            for r in rows
        ],
        notes=["Equivalence rows: two one-sided t-tests (TOST), p the larger of the two, CI at 1 − 2α."],
    )


def contrasts_table(study: Study, rows: list[ContrastRow]) -> Table:
    """The contrasts, with the control's overfitting (its final − best periodic val estimate,
    `_overfit`) beside each: how much room the regularizer had."""
    return Table(
        title="Exploratory contrasts (not pre-registered tests)",
        columns=[
            "id",
            "contrast",
            "metric",
            "pairs",
            "Δ",
            "95% CI",
            "p (Holm)",
            "verdict",
            "control's final − best val (20 batches)",
        ],
        rows=[
            [
                r.contrast.id,
                _contrast_text(r.contrast),
                r.contrast.metric,
                str(r.comparison.n_pairs),
                signed(r.comparison.mean_diff),
                _interval(r.comparison.ci_low, r.comparison.ci_high),
                p_value(r.p_holm),
                r.word,
                signed(_overfit(study, r.dataset, r.contrast.control), 3),
            ]
            for r in rows
        ],
        notes=[
            "Holm across these contrasts only; the verdict reads the Holm p at the spec's α. The "
            "control's final − best val: its last periodic val estimate minus the best of them, on "
            "the same batches (0 where the best is the last). An "
            "interaction (a − b) − (c − d) is negative where the treatment helps more in the first "
            "setting than in the second."
        ],
    )


def _contrast_text(c: Contrast) -> str:
    if c.versus is None:
        return f"{c.treatment} − {c.control}"
    return f"({c.treatment} − {c.control}) − ({c.versus[0]} − {c.versus[1]})"


def _interval(low: float, high: float, label: str = "") -> str:
    if math.isnan(low):
        return MISSING
    return f"[{signed(low)}, {signed(high)}]"


def _overfit(study: Study, dataset: str, method: str) -> float:
    """Mean over seeds of val_loss − best_val_loss: how far the last periodic val estimate
    ended above the best of them, all on the same batches (0 where the best is the last).
    Not val_loss_full: the full pass differs from the 20-batch estimate by a few hundredths
    of a nat on its own, which would read as overfitting where there is none."""
    last = study.values(dataset, method, "val_loss")
    best = study.values(dataset, method, "best_val_loss")
    gaps = [last[s] - best[s] for s in last if last[s] is not None and best.get(s) is not None]
    return sum(gaps) / len(gaps) if gaps else math.nan


def _contrast_label(row: ContrastRow, primary: str) -> str:
    """A contrast's id, and its metric where that is not the x axis's."""
    if row.contrast.metric == primary:
        return row.contrast.id
    return f"{row.contrast.id} ({metric(row.contrast.metric).label})"


def forest(study: Study, rows: list[HypothesisRow], contrasts: list[ContrastRow], path: Path) -> Path | None:
    """Each confirmatory difference with the interval its verdict reads (coloured by the
    word, the equivalence margin drawn as dashed lines), then the exploratory contrasts in
    grey below a rule; zero marked."""
    from matplotlib.figure import Figure

    items = [
        (
            f"({r.hypothesis.id}) {r.hypothesis.treatment} − {r.hypothesis.control}",
            r.comparison.mean_diff,
            *r.interval[:2],
            WORD_COLORS.get(r.word, "tab:blue"),
            r.hypothesis.margin,
        )
        for r in rows
    ] + [
        (
            _contrast_label(c, study.hypotheses.metric),
            c.comparison.mean_diff,
            c.comparison.ci_low,
            c.comparison.ci_high,
            "0.55",
            None,
        )
        for c in contrasts
    ]
    items = [item for item in items if not math.isnan(item[1])]
    if not items:
        return None
    figure = Figure(figsize=(7.5, 0.32 * len(items) + 1.3), layout="constrained")
    ax = figure.subplots()
    for y, (_, mean, low, high, color, margin) in enumerate(items):
        error = [[mean - low], [high - mean]] if not math.isnan(low) else None
        ax.errorbar(mean, y, xerr=error, fmt="o", color=color, capsize=3)
        if margin:
            ax.plot([-margin, -margin], [y - 0.4, y + 0.4], color=color, linestyle="--", linewidth=1)
            ax.plot([margin, margin], [y - 0.4, y + 0.4], color=color, linestyle="--", linewidth=1)
    if rows and contrasts:
        ax.axhline(len(rows) - 0.5, color="black", linewidth=0.6)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(items)), [item[0] for item in items], fontsize="small")
    ax.invert_yaxis()
    key = study.hypotheses.metric
    ax.set_xlabel(f"Δ {metric(key).label} ({LOSS_UNIT}); < 0: the first lowers the loss")
    titles = (
        [
            "confirmatory: green better, red worse, blue equivalent, grey inconclusive",
            "dashes: the equivalence margin",
        ]
        if rows
        else []
    )
    titles += ["exploratory contrasts (grey, 95% CI)"] if contrasts else []
    ax.set_title("\n".join(titles), fontsize="small")
    ax.grid(axis="x", alpha=0.3)
    figure.savefig(path, dpi=110, metadata={"Software": None})
    return path


def contrasts_by_level(study: Study, contrasts: list[ContrastRow], path: Path) -> Path | None:
    """The simple contrasts (no `versus`) whose treatment adds constant-shape noise, as Δ
    (mean, 95% CI) against the treatment's noise level (σ, or r for relative noise), one line
    per control, e.g. one per model width. None unless some control has two levels or more."""
    from matplotlib.figure import Figure

    lines: dict[tuple[str, str, bool], list[tuple[float, Comparison]]] = {}
    claims: dict[str, list[str]] = {}
    for row in contrasts:
        config = study.config(row.dataset, row.contrast.treatment) or {}
        schedule = schedules.parse(config.get("noise", "none"))
        if row.contrast.versus is not None or schedule is None or row.comparison.n_pairs < 2:
            continue
        relative = isinstance(schedule, schedules.Relative)
        level = float((schedule.inner if relative else schedule)(0))
        lines.setdefault((row.contrast.control, row.contrast.metric, relative), []).append(
            (level, row.comparison)
        )
        claims.setdefault(row.contrast.control, []).append(row.contrast.claim)
    if not any(len(points) > 1 for points in lines.values()):
        return None
    kinds = {relative for _, _, relative in lines}
    figure = Figure(figsize=(7.0, 3.8), layout="constrained")
    ax = figure.subplots()
    for k, ((control, key, relative), points) in enumerate(lines.items()):
        points.sort(key=lambda point: point[0])
        # Each line a little to the side of the last, so that CIs at one level do not overlap.
        dodge = 1.04 ** (k - (len(lines) - 1) / 2)
        xs = [level * dodge for level, _ in points]
        means = [c.mean_diff for _, c in points]
        errors = [[c.mean_diff - c.ci_low for _, c in points], [c.ci_high - c.mean_diff for _, c in points]]
        prefix = _shared_prefix(claims[control])
        label = f"{prefix} (vs {control})" if prefix else f"vs {control}"
        label += "" if key == study.hypotheses.metric else f", {metric(key).label}"
        label += f", {'r' if relative else 'σ'}" if len(kinds) > 1 else ""
        ax.errorbar(xs, means, yerr=errors, fmt="o-", capsize=3, label=label)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    levels = sorted({level for points in lines.values() for level, _ in points})
    ax.set_xticks(levels, [f"{level:g}" for level in levels])
    ax.minorticks_off()
    ax.set_xlabel(
        {
            frozenset({True}): "relative noise r (σ = r × RMS of the clipped gradient)",
            frozenset({False}): "noise σ",
        }.get(frozenset(kinds), "noise level of the treatment (σ, or r for relative noise)")
    )
    ax.set_ylabel(f"Δ {metric(study.hypotheses.metric).label} ({LOSS_UNIT})")
    ax.set_title("exploratory: treatment − its control by noise level, mean and 95% CI", fontsize="small")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    figure.savefig(path, dpi=110, metadata={"Software": None})
    return path


def findings_tables(analysis: Analysis, dataset: str, alpha: float = 0.05) -> list[Table]:
    """Per findings metric: each method vs the baseline (Holm across all methods) and, if
    the spec names a reference, vs it (Holm across the methods compared with it), with the
    word each paired t-test allows at `alpha`."""
    study = analysis.study
    if study.findings is None:
        return []
    reference = study.findings.reference
    tables = []
    for key in study.findings.metrics:
        rows = [c for c in analysis.comparisons if (c.dataset, c.metric) == (dataset, key)]
        if not rows:
            continue
        against = {r.method: r for r in analysis.references if (r.dataset, r.metric) == (dataset, key)}
        columns = ["method", f"Δ vs {study.baseline}", "95% CI", "p (Holm)", "verdict"]
        if reference:
            columns += [f"Δ vs {reference}", "95% CI", "p (Holm)", "verdict"]
        body = []
        for r in rows:
            line = [r.method, *_finding_cells(r.comparison, r.t_p_holm, alpha, key)]
            if reference:
                other = against.get(r.method)
                line += (
                    _finding_cells(other.comparison, other.t_p_holm, alpha, key) if other else [MISSING] * 4
                )
            body.append(line)
        tables.append(
            Table(
                title=f"{dataset}: {metric(key).label}, each method paired on seeds",
                columns=columns,
                rows=body,
                notes=[
                    f"Δ: method − the column's method ({LOSS_UNIT}); negative is a lower loss. "
                    f"Verdict: the paired t-test's Holm-adjusted p against α = {alpha:g} "
                    "(inconclusive is not evidence of no effect; read the CI)."
                    + (" Exploratory: not among the pre-registered tests." if study.hypotheses else "")
                ],
            )
        )
    return tables


def _finding_cells(c: Comparison, p_holm: float, alpha: float, key: str) -> list[str]:
    if math.isnan(p_holm):
        word = "no test"
    elif p_holm >= alpha:
        word = "inconclusive"
    else:
        word = "better" if improves(key, c.mean_diff) else "worse"
    ci = MISSING if math.isnan(c.ci_low) else f"[{signed(c.ci_low)}, {signed(c.ci_high)}]"
    return [signed(c.mean_diff), ci, p_value(p_holm), word]

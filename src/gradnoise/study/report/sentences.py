"""What the report says in words, generated from its numbers: the lead finding of a
study without hypotheses, the dose-response sentences, how optimistic best val is, the
gradient's scale, and the caveats. Every sentence names the levels, metric and budget it
covers, and says nothing its numbers do not show."""

from __future__ import annotations

import math

from gradnoise.lm.config import resolve_config
from gradnoise.study.report.analysis import Analysis, DoseRow
from gradnoise.study.report.conditions import HORIZON_FRACTION
from gradnoise.study.report.document import (
    MISSING,
    difference,
    p_equals,
    p_value,
    scientific,
    signed,
    value_text,
)
from gradnoise.study.report.loading import Study, headline_metric
from gradnoise.study.report.metrics import LOSS_METRICS, LOSS_UNIT, improvement_sign, improves, metric
from gradnoise.study.spec import EXECUTION_KEYS
from gradnoise.study.stats import summarize, wilcoxon_min_p

#: The significance level of the report's sentences (on Holm-adjusted p).
ALPHA = 0.05


def dose_findings(analysis: Analysis, dataset: str) -> list[str]:
    """One short sentence per dose-response metric, from the numbers: how many noise levels
    are significantly better (Holm-adjusted paired t-test, α = ALPHA) or worse than the
    baseline, and the largest effect among the better ones. The per-level numbers are in the
    table beside it; the references, paired with each level, in the plot."""
    study = analysis.study
    if study.dose is None:
        return []
    baseline = study.baseline
    lines = []
    for key in study.dose.metrics:
        rows = [r for r in analysis.dose(dataset, key) if not math.isnan(r.t_p_holm)]
        if not rows:
            continue
        sign = improvement_sign(key)
        better, worse = _significant(rows, sign), _significant(rows, -sign)
        family = f"Holm across {len(rows)} noise levels, α = {ALPHA}"
        if better:
            largest = max(better, key=lambda r: sign * r.comparison.mean_diff)
            text = (
                f"{metric(key).label}: {_count(len(better), 'noise level')} of {len(rows)} "
                f"{'is' if len(better) == 1 else 'are'} significantly better than {baseline} "
                f"({family}): {', '.join(r.method for r in better)}; the largest effect is "
                f"{_dose_effect(largest)}."
            )
        else:
            text = (
                f"{metric(key).label}: no noise level is significantly better than {baseline} "
                f"({family}); {_closest(rows, 'noise level', _dose_effect, sign)}."
            )
        if worse:
            text += (
                f" {_count(len(worse), 'level')} {'is' if len(worse) == 1 else 'are'} significantly "
                "worse: " + ", ".join(f"{r.method} (σ ≈ {scientific(r.sigma)})" for r in worse) + "."
            )
        lines.append(text)
    return lines


def lead_finding(analysis: Analysis, dataset: str) -> str | None:
    """The best-supported finding of a study without hypotheses: on the headline metric, of
    the methods it asks about (`asked_about`: those that add noise), the one whose
    difference from the baseline has the lowest Holm-adjusted p (Holm over every method),
    the word its test allows, and, where the spec names a reference, the same method
    against it."""
    study = analysis.study
    key = headline_metric(study)
    family = [
        r
        for r in analysis.comparisons
        if (r.dataset, r.metric) == (dataset, key) and not math.isnan(r.t_p_holm)
    ]
    asked = asked_about(study, dataset)
    rows = [r for r in family if r.method in asked]
    if not rows:
        return None
    best = min(rows, key=lambda r: (r.t_p_holm, -improvement_sign(key) * r.comparison.mean_diff))
    c = best.comparison
    word = "inconclusive" if best.t_p_holm >= ALPHA else ("better" if improves(key, c.mean_diff) else "worse")
    text = (
        f"Best-supported finding ({dataset}, {metric(key).label}): {best.method} vs {study.baseline}: "
        f"**{word}**, Δ = {signed(c.mean_diff, 3)} {LOSS_UNIT} (95% CI {signed(c.ci_low, 3)} to "
        f"{signed(c.ci_high, 3)}, n = {c.n_pairs}), paired t, Holm over {_count(len(family), 'method')}: "
        f"{p_equals(best.t_p_holm)}."
    )
    reference = next(
        (r for r in analysis.references if (r.dataset, r.method, r.metric) == (dataset, best.method, key)),
        None,
    )
    if reference is not None:
        r = reference.comparison
        text += (
            f" Against {reference.reference}: Δ = {signed(r.mean_diff, 3)} (95% CI {signed(r.ci_low, 3)} "
            f"to {signed(r.ci_high, 3)}), Holm {p_equals(reference.t_p_holm)}"
            f"{'' if reference.t_p_holm < ALPHA else ' (inconclusive: not a demonstration of equality)'}."
        )
    return text + " Exploratory: no hypothesis was fixed in advance."


def asked_about(study: Study, dataset: str) -> set[str]:
    """The methods a noise study asks about: those that add noise (to the gradient, the
    update or the embeddings), not the baseline and the regularizers they are compared
    with (dropout beating no noise is not its question); every method but the baseline in
    a study without noise."""
    others = [m for m in study.methods if m != study.baseline]
    noisy = {m for m in others if _adds_noise(study.config(dataset, m) or {})}
    return noisy or set(others)


def _adds_noise(config: dict) -> bool:
    return config.get("noise", "none") != "none" or bool(config.get("embedding_noise_alpha"))


def best_val_note(analysis: Analysis, dataset: str) -> str | None:
    """How optimistic the best val loss (the lowest periodic estimate on a fixed set of
    eval_iters batches) is, as far as the logs measure it: at the last step both the
    estimate and the full pass were made, so their difference is the fixed batches' bias
    there. The minimum's own selection bias needs a full pass at the best step: unmeasured."""
    study = analysis.study
    gaps = [
        row["val_loss"] - row["val_loss_full"]
        for (d, _), runs in study.done.items()
        if d == dataset
        for row in runs.values()
        if row.get("val_loss") is not None and row.get("val_loss_full") is not None
    ]
    if not gaps:
        return None
    iters = sorted({int(r["config"]["eval_iters"]) for r in study.runs if r["dataset"] == dataset})
    spread = summarize(gaps)
    return (
        f"How optimistic best val is: at the last step the {_choices(iters)}-batch estimate read "
        f"{signed(spread.mean, 3)} {LOSS_UNIT} against the full pass (sd {spread.sd:.3f}, "
        f"range {signed(min(gaps), 3)} to {signed(max(gaps), 3)}, {len(gaps)} runs). Best val is "
        "the minimum of such estimates on the same batches, so it is lower by at least about that "
        "much; the minimum's own selection bias is unmeasured (no full pass at the best step)."
    )


def left_out(analysis: Analysis, dataset: str) -> list[str]:
    """What the spec asks the report to compare but the runs cannot give, said instead of a
    section or a family member that would silently not be there: the findings' reference
    without a done run on `dataset`, and dose-response levels without a p-value (fewer than
    two done seeds paired with the baseline's)."""
    study, lines = analysis.study, []
    named = [*(study.findings.metrics if study.findings else ()), *(study.dose.metrics if study.dose else ())]
    for key in dict.fromkeys(named):
        if not any(value is not None for value in _values_of(study, dataset, key)):
            lines.append(
                f"{metric(key).label}: no done run on {dataset} has it (final_eval: false, or no "
                "test split), so no method is compared on it."
            )
    reference = study.findings.reference if study.findings is not None else None
    if reference is not None and (dataset, reference) not in study.done:
        lines.append(
            f"No comparison with {reference} on {dataset}: none of its runs is done "
            f"({_statuses(study, dataset, reference)})."
        )
    if study.dose is not None:
        for key in study.dose.metrics:
            if not any(value is not None for value in _values_of(study, dataset, key)):
                continue  # said above
            compared = {r.method for r in analysis.dose(dataset, key) if not math.isnan(r.t_p_holm)}
            missing = [m for m in study.dose.methods if m not in compared]
            if missing:
                lines.append(
                    f"{metric(key).label}: left out of the noise levels' family, for want of two "
                    "done seeds paired with the baseline's: "
                    + "; ".join(f"{m} ({_statuses(study, dataset, m)})" for m in missing)
                    + "."
                )
    return lines


def _values_of(study: Study, dataset: str, key: str) -> list:
    """The metric's values over every done run of `dataset`."""
    return [row.get(key) for (d, _), rows in study.done.items() if d == dataset for row in rows.values()]


def _statuses(study: Study, dataset: str, method: str) -> str:
    """`3 runs: 2 diverged, 1 done`: the runs of (dataset, method) by status."""
    statuses = [r["status"] for r in study.runs if (r["dataset"], r["method"]) == (dataset, method)]
    if not statuses:
        return "no runs"
    counts = {status: statuses.count(status) for status in dict.fromkeys(statuses)}
    return f"{_count(len(statuses), 'run')}: " + ", ".join(f"{n} {status}" for status, n in counts.items())


def _closest(rows, noun: str, describe, sign: int = -1) -> str:
    """Of the rows whose mean is on the better side of the baseline's (below it for a loss,
    `sign` −1; above for an accuracy, +1), the one with the lowest adjusted p; or that there
    is none (so a worse method is never presented as the nearest to helping)."""
    side, other = ("below", "above") if sign < 0 else ("above", "below")
    helping = [r for r in rows if sign * r.comparison.mean_diff > 0]
    if not helping:
        return f"every {noun}'s mean is {other} the baseline's"
    closest = min(helping, key=lambda r: r.t_p_holm)
    return f"the lowest adjusted p among those {side} the baseline is at {describe(closest)}"


def _significant(rows, sign: int) -> list:
    return [r for r in rows if r.t_p_holm < ALPHA and sign * r.comparison.mean_diff > 0]


def _dose_effect(row: DoseRow) -> str:
    kind = "relative" if row.relative else "absolute"
    return (
        f"{row.method} ({kind}, σ ≈ {scientific(row.sigma)}): mean diff "
        f"{difference(row.comparison)}, t p (Holm) = {p_value(row.t_p_holm)}"
    )


def gradient_note(analysis: Analysis, dataset: str) -> str | None:
    """The baseline's gradient scale on `dataset`, as the runs logged it."""
    scale = analysis.gradient_scale(dataset)
    if scale is None:
        return None
    study = analysis.study
    clip = (study.config(dataset, study.baseline) or {}).get("grad_clip")
    clipped = f" after clipping at {value_text(clip)}" if clip else ""
    return (
        f"{study.baseline}'s gradient on {dataset}: median ‖g‖ = {scale.grad_norm:.3g}{clipped} "
        f"(over {scale.points} logged steps of its runs), over N = {scale.parameters:,} parameters: "
        f"RMS(g) = ‖g‖/√N = {scale.rms:.3g}. Absolute noise of σ = {scale.rms:.2g} is as large as the "
        "gradient (‖noise‖/‖g‖ ≈ 1); relative noise r has ‖noise‖/‖g‖ ≈ r."
    )


def caveats(analysis: Analysis) -> list[str]:
    study = analysis.study
    preset = study.spec.get("preset", "tiny")
    lines = [_budget(study, preset)]
    changed = {k: v for k, v in (study.spec.get("set") or {}).items() if k not in EXECUTION_KEYS}
    if changed:
        # The spec's own caveats describe its settings (budget, regime), which these runs changed.
        shown = ", ".join(f"{k}={v}" for k, v in changed.items())
        lines.append(
            f"These runs override the spec with `--set` (set: {shown}): its own caveats, written for "
            "its settings, are left out; the budget above is these runs'."
        )
    else:
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
        fractions = sorted(
            {r["config"].get("train_fraction", 1.0) for r in study.runs if r["dataset"] == dataset}
        )
        paper_iters = resolve_config(dataset, "paper").max_iters
        reduced = reduced or max(iters) < paper_iters or fractions != [1.0]
        data = (
            ""
            if fractions == [1.0]
            else f", train_fraction {_choices(fractions)} (the first part of the train split)"
        )
        parts.append(
            f"{dataset}: max_iters {_choices(iters)} (the paper's: {paper_iters}){data}, "
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

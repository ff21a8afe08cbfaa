"""The study's statistics: summaries, paired comparisons, Holm, convergence speed, cost.

Seeds are paired (seed s means the same init, batches and dropout masks for
every method), so methods are compared through per-seed differences
d_s = method_s − baseline_s. Every test and quantile comes from scipy.stats;
degenerate inputs give NaN plus a `note` saying why, never an exception.

Whether runs train (a yes/no per run) is counted: k of n with a Wilson or Clopper–Pearson
interval, and two methods paired on seeds by McNemar's exact test (its binomial tail
summed in exact integers).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats

CONFIDENCE = 0.95
NAN = float("nan")
#: Differences whose sd is at most this fraction of the values compared are "equal up to
#: rounding": float64 subtraction leaves ~1e-16 relative error, while two different runs'
#: losses (float32 arithmetic) differ by 1e-7 relative at least.
ZERO_SPREAD_RTOL = 1e-12


def _measured(value: float | None) -> bool:
    """None and NaN mean "not measured" (e.g. test loss where there is no test split)."""
    return value is not None and not math.isnan(value)


def _present(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if _measured(v)]


@dataclass(frozen=True)
class Summary:
    """n values as mean ± sd with a 95% t confidence interval for the mean."""

    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    note: str = ""


def summarize(values: Iterable[float | None]) -> Summary:
    """Mean, sample sd and 95% t interval of `values` (None / NaN are skipped).

        mean = Σx / n,   sd = sqrt(Σ(x − mean)² / (n − 1)),
        CI   = mean ± t_{0.975, n−1} · sd / √n

    With n = 1 the mean is the value and sd / CI are NaN (one seed carries no
    spread); with n = 0 everything is NaN.
    """
    xs = _present(values)
    n = len(xs)
    if n == 0:
        return Summary(0, NAN, NAN, NAN, NAN, "no values")
    mean = float(np.mean(xs))
    if n == 1:
        return Summary(1, mean, NAN, NAN, NAN, "one value: no sd or CI")
    sd = float(np.std(xs, ddof=1))
    half_width = scipy.stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half_width, mean + half_width)


def wilcoxon_min_p(n_nonzero: int) -> float:
    """The smallest two-sided p the Wilcoxon signed-rank test can give with n non-zero
    differences (it drops the zero ones).

    Reached when every difference has the same sign; exactly 2 / 2ⁿ for the
    exact null distribution (n = 3 → 0.25, n = 5 → 0.0625), so with few seeds
    the test cannot reach p < 0.05 at all, whatever the effect.
    """
    if n_nonzero < 1:
        return NAN
    return float(scipy.stats.wilcoxon(np.arange(1, n_nonzero + 1)).pvalue)


@dataclass(frozen=True)
class Comparison:
    """Method vs baseline on the seeds both have; differences are method − baseline."""

    n_pairs: int
    seeds: tuple
    mean_diff: float
    sd_diff: float
    ci_low: float
    ci_high: float
    t_stat: float
    t_p: float
    wilcoxon_stat: float
    wilcoxon_p: float
    wilcoxon_min_p: float
    effect_size: float
    note: str = ""
    #: pairs whose difference is not exactly zero: the Wilcoxon test drops the others
    n_nonzero: int = 0


def paired_comparison(
    method_values: Mapping[int, float | None], baseline_values: Mapping[int, float | None]
) -> Comparison:
    """Paired comparison on the seeds present (not None / NaN) in both mappings.

        d_s = method_s − baseline_s,   mean_diff = Σd / n,   sd_diff = sd(d)
        CI of the mean difference: mean_diff ± t_{0.975, n−1} · sd_diff / √n
        paired t:   t = mean_diff / (sd_diff / √n), two-sided p from t_{n−1}
        Wilcoxon signed-rank (scipy.stats.wilcoxon, zero differences dropped)
        effect size: Cohen's d_z = mean_diff / sd_diff

    Negative differences mean the method's loss is lower. Fewer than two pairs,
    or differences with zero spread (sd_diff ≤ ZERO_SPREAD_RTOL · max |value|: equal
    up to rounding, where t and d_z would be rounding noise divided by ~0), give NaN
    tests and a `note`.
    """
    common = sorted(
        seed
        for seed in method_values.keys() & baseline_values.keys()
        if _measured(method_values[seed]) and _measured(baseline_values[seed])
    )
    diffs = np.array([method_values[s] - baseline_values[s] for s in common], dtype=float)
    n = len(common)
    summary = summarize(diffs)
    nonzero = int(np.count_nonzero(diffs))
    min_p = wilcoxon_min_p(nonzero)

    def degenerate(note: str) -> Comparison:
        return Comparison(
            n,
            tuple(common),
            summary.mean,
            summary.sd,
            summary.ci_low,
            summary.ci_high,
            NAN,
            NAN,
            NAN,
            NAN,
            min_p,
            NAN,
            note,
            nonzero,
        )

    if n < 2:
        return degenerate(f"{n} paired seed(s): at least 2 are needed for a test")
    if nonzero == 0:
        return degenerate("all paired differences are zero: the runs are identical")
    method = np.array([method_values[s] for s in common], dtype=float)
    baseline = np.array([baseline_values[s] for s in common], dtype=float)
    scale = float(max(np.abs(method).max(), np.abs(baseline).max()))
    if summary.sd <= ZERO_SPREAD_RTOL * scale:
        return degenerate(f"every paired difference equals {summary.mean:.6g} (up to rounding): zero spread")
    t_test = scipy.stats.ttest_rel(method, baseline)
    wilcoxon = scipy.stats.wilcoxon(diffs)
    return Comparison(
        n_pairs=n,
        seeds=tuple(common),
        mean_diff=summary.mean,
        sd_diff=summary.sd,
        ci_low=summary.ci_low,
        ci_high=summary.ci_high,
        t_stat=float(t_test.statistic),
        t_p=float(t_test.pvalue),
        wilcoxon_stat=float(wilcoxon.statistic),
        wilcoxon_p=float(wilcoxon.pvalue),
        wilcoxon_min_p=min_p,
        effect_size=summary.mean / summary.sd,
        n_nonzero=nonzero,
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni step-down adjusted p-values, in the input order.

    With the m non-NaN p-values sorted ascending, p_(1) ≤ … ≤ p_(m):

        p̃_(i) = min(1, max_{j ≤ i} (m − j + 1) · p_(j))

    Rejecting where p̃ ≤ α controls the family-wise error rate at α. NaN stays
    NaN and does not count towards m.
    """
    adjusted = [NAN] * len(p_values)
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    m = len(order)
    running_max = 0.0
    for rank, (p, index) in enumerate(order):
        running_max = max(running_max, (m - rank) * p)
        adjusted[index] = min(1.0, running_max)
    return adjusted


def steps_to_target(curve_points: Iterable[Mapping], target: float) -> tuple[int, float] | None:
    """(step, seconds) of the first eval whose val_loss ≤ target, or None if none did.

    `curve_points` are one run's curve rows (Store.curves); only eval rows
    (kind "eval") with a val_loss count. Seconds are the eval line's time_s.
    """
    evals = sorted(
        (p for p in curve_points if p.get("kind") == "eval" and p.get("val_loss") is not None),
        key=lambda p: p["step"],
    )
    for point in evals:
        if point["val_loss"] <= target:
            return int(point["step"]), float(point["time_s"])
    return None


@dataclass(frozen=True)
class Overhead:
    """Step-time cost of a method relative to the baseline."""

    percent: float
    method_median_s: float
    baseline_median_s: float
    n_method: int
    n_baseline: int


def step_time_overhead(
    method_step_times: Iterable[float | None], baseline_step_times: Iterable[float | None]
) -> Overhead:
    """Overhead % = 100 · (median(method) / median(baseline) − 1).

    Inputs are the runs' own median step times (finals.step_time_median_s);
    the median across runs keeps one slow run from moving the figure. NaN when
    either side has no runs.
    """
    method = _present(method_step_times)
    baseline = _present(baseline_step_times)
    if not method or not baseline:
        return Overhead(NAN, NAN, NAN, len(method), len(baseline))
    method_median = float(np.median(method))
    baseline_median = float(np.median(baseline))
    percent = 100.0 * (method_median / baseline_median - 1.0) if baseline_median > 0 else NAN
    return Overhead(percent, method_median, baseline_median, len(method), len(baseline))


@dataclass(frozen=True)
class Equivalence:
    """Two one-sided paired t-tests (TOST) of |treatment − control| < margin.

    `ci_low`/`ci_high` are the (1 − 2α) interval of the mean difference: the test
    concludes equivalence at level α exactly when that interval lies inside ±margin."""

    n_pairs: int
    seeds: tuple
    estimate: float
    sd_diff: float
    ci_low: float
    ci_high: float
    p_lower: float
    p_upper: float
    p: float
    margin: float
    alpha: float
    note: str = ""

    @property
    def equivalent(self) -> bool:
        return self.p < self.alpha


def paired_differences(
    treatment: Mapping[int, float | None], control: Mapping[int, float | None]
) -> dict[int, float]:
    """seed → treatment_s − control_s, on the seeds measured in both."""
    common = sorted(
        seed
        for seed in treatment.keys() & control.keys()
        if _measured(treatment[seed]) and _measured(control[seed])
    )
    return {seed: float(treatment[seed]) - float(control[seed]) for seed in common}


def equivalence_test(
    treatment: Mapping[int, float | None],
    control: Mapping[int, float | None],
    margin: float,
    alpha: float = 0.05,
) -> Equivalence:
    """TOST on the paired differences d_s = treatment_s − control_s, n pairs:

        se = sd(d) / √n,   t_lower = (mean + margin) / se,   t_upper = (mean − margin) / se
        p_lower = P(T_{n−1} ≥ t_lower)   (H0: mean ≤ −margin)
        p_upper = P(T_{n−1} ≤ t_upper)   (H0: mean ≥ +margin)
        p = max(p_lower, p_upper);  CI = mean ± t_{1−α, n−1} · se   (the (1 − 2α) interval)

    Fewer than two pairs or zero spread give NaN p-values and a `note`."""
    if not margin > 0:
        raise ValueError(f"margin={margin!r} must be > 0")
    diffs = paired_differences(treatment, control)
    values = np.array(list(diffs.values()), dtype=float)
    n = len(values)
    mean = float(values.mean()) if n else NAN
    sd = float(values.std(ddof=1)) if n > 1 else NAN

    def result(ci_low, ci_high, p_lower, p_upper, note=""):
        p = max(p_lower, p_upper) if not (math.isnan(p_lower) or math.isnan(p_upper)) else NAN
        return Equivalence(
            n, tuple(diffs), mean, sd, ci_low, ci_high, p_lower, p_upper, p, float(margin), alpha, note
        )

    if n < 2:
        return result(NAN, NAN, NAN, NAN, f"{n} paired seed(s): at least 2 are needed for a test")
    if not sd > 0:
        return result(mean, mean, NAN, NAN, f"every paired difference equals {mean:.6g}: zero spread")
    se = sd / math.sqrt(n)
    half_width = float(scipy.stats.t.ppf(1 - alpha, n - 1)) * se
    p_lower = float(scipy.stats.t.sf((mean + margin) / se, n - 1))
    p_upper = float(scipy.stats.t.cdf((mean - margin) / se, n - 1))
    return result(mean - half_width, mean + half_width, p_lower, p_upper)


def interaction_contrast(
    treatment: Mapping[int, float | None],
    control: Mapping[int, float | None],
    versus_treatment: Mapping[int, float | None],
    versus_control: Mapping[int, float | None],
) -> Comparison:
    """The interaction of a 2 × k factorial, paired on seeds: per seed

        c_s = (treatment_s − control_s) − (versus_treatment_s − versus_control_s)

    e.g. (noise − none at dropout 0.1) − (noise − none at dropout 0), then the paired
    comparison of the two differences (mean of c, its 95% t CI, paired t and Wilcoxon
    tests), on the seeds present in all four. Negative: the treatment helps more (its
    loss drops further) in the first setting than in the second."""
    return paired_comparison(
        paired_differences(treatment, control), paired_differences(versus_treatment, versus_control)
    )


# ---- proportions: how many runs train ---------------------------------------------------------


@dataclass(frozen=True)
class Proportion:
    """k of n runs, with a 95% interval for the proportion."""

    k: int
    n: int
    low: float
    high: float

    @property
    def fraction(self) -> float:
        return self.k / self.n if self.n else NAN


def _check_count(k: int, n: int) -> None:
    if not (isinstance(k, int) and isinstance(n, int) and 0 <= k <= n):
        raise ValueError(f"need integers 0 ≤ k ≤ n, got k={k!r}, n={n!r}")


def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> Proportion:
    """Wilson's score interval for k successes in n trials (NaN bounds where n = 0):

    p̂ = k/n,  z = Φ⁻¹(1 − α/2),
    centre = (p̂ + z²/2n) / (1 + z²/n),
    half   = z / (1 + z²/n) · sqrt(p̂(1 − p̂)/n + z²/4n²)
    """
    _check_count(k, n)
    if n == 0:
        return Proportion(k, n, NAN, NAN)
    z = float(scipy.stats.norm.ppf(1 - (1 - confidence) / 2))
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Proportion(k, n, max(0.0, centre - half), min(1.0, centre + half))


def clopper_pearson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> Proportion:
    """The exact (Clopper–Pearson) interval: the α/2 and 1 − α/2 quantiles of
    Beta(k, n − k + 1) and Beta(k + 1, n − k); 0 where k = 0, 1 where k = n."""
    _check_count(k, n)
    if n == 0:
        return Proportion(k, n, NAN, NAN)
    alpha = 1 - confidence
    low = 0.0 if k == 0 else float(scipy.stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(scipy.stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return Proportion(k, n, low, high)


@dataclass(frozen=True)
class McNemar:
    """Paired binary outcomes: b pairs where only the control succeeded, c where only the
    treatment did, and the exact two-sided p-value of b against c."""

    b: int
    c: int
    p: float


def mcnemar_exact(pairs: Iterable[tuple[bool, bool]]) -> McNemar:
    """McNemar's exact test on (control succeeded, treatment succeeded) pairs: under H0 each
    discordant pair is the treatment's with probability 1/2, so with m = b + c,

        p = min(1, 2 · Σ_{i=0}^{min(b, c)} C(m, i) / 2^m)    (p = 1 where m = 0)

    Concordant pairs carry no information about the difference and do not enter."""
    b = c = 0
    for control, treatment in pairs:
        b += bool(control) and not treatment
        c += bool(treatment) and not control
    m = b + c
    if m == 0:
        return McNemar(0, 0, 1.0)
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1)) / 2**m
    return McNemar(b, c, min(1.0, 2 * tail))

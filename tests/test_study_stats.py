"""Statistics against values worked out by hand on fixed small numbers."""

import math

import pytest
import scipy.stats

from gradnoise.study.stats import (
    equivalence_test,
    holm,
    interaction_contrast,
    paired_comparison,
    step_time_overhead,
    steps_to_target,
    summarize,
    wilcoxon_min_p,
)


def test_summarize_matches_hand_formula():
    # 1, 2, 4: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9, variance 42/9 / 2 = 7/3.
    summary = summarize([1.0, 2.0, 4.0])
    sd = math.sqrt(7 / 3)
    half_width = scipy.stats.t.ppf(0.975, 2) * sd / math.sqrt(3)  # the quantile only
    assert summary.n == 3
    assert summary.mean == pytest.approx(7 / 3)
    assert summary.sd == pytest.approx(sd)
    assert summary.ci_low == pytest.approx(7 / 3 - half_width)
    assert summary.ci_high == pytest.approx(7 / 3 + half_width)
    assert summary.note == ""


def test_summarize_skips_missing_values():
    assert summarize([None, 3.0, float("nan"), 5.0]).mean == pytest.approx(4.0)
    assert summarize([None, 3.0, float("nan"), 5.0]).n == 2


def test_summarize_one_and_zero_values_give_nan_spread_with_a_reason():
    one = summarize([1.25])
    assert (one.n, one.mean) == (1, 1.25)
    assert math.isnan(one.sd) and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    assert "one value" in one.note
    none = summarize([])
    assert none.n == 0 and math.isnan(none.mean) and none.note


def test_paired_comparison_matches_hand_computed_t_test():
    method = {0: 1.0, 1: 2.0, 2: 3.5}
    baseline = {0: 1.5, 1: 2.25, 2: 4.0, 3: 9.0}  # seed 3 has no partner: left out
    # d = -0.5, -0.25, -0.5: mean -5/12, squared deviations 1/144 + 4/144 + 1/144 → var 1/48.
    sd = math.sqrt(1 / 48)
    t = (-5 / 12) / (sd / math.sqrt(3))
    assert t == pytest.approx(-5.0)
    # Student t with 2 df has the closed-form cdf F(t) = 1/2 + t / (2·sqrt(2 + t²)).
    p = 2 * (0.5 + t / (2 * math.sqrt(2 + t * t)))
    result = paired_comparison(method, baseline)
    assert result.n_pairs == 3 and result.seeds == (0, 1, 2)
    assert result.mean_diff == pytest.approx(-5 / 12)
    assert result.sd_diff == pytest.approx(sd)
    assert result.t_stat == pytest.approx(-5.0)
    assert result.t_p == pytest.approx(p)
    assert result.effect_size == pytest.approx(-5 / math.sqrt(3))
    half_width = scipy.stats.t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert result.ci_low == pytest.approx(-5 / 12 - half_width)
    assert result.ci_high == pytest.approx(-5 / 12 + half_width)
    # Three differences of one sign: the exact Wilcoxon p is 2 · (1/2)³ = 0.25, its minimum.
    assert result.wilcoxon_p == pytest.approx(0.25)
    assert result.wilcoxon_min_p == pytest.approx(0.25)


def test_paired_comparison_wilcoxon_mixed_signs():
    baseline = {s: 10.0 for s in range(5)}
    method = {0: 9.0, 1: 8.0, 2: 13.0, 3: 6.0, 4: 5.0}  # d = -1, -2, +3, -4, -5
    # Ranks 1..5, positive rank sum W+ = 3. Subsets of {1..5} with sum ≤ 3:
    # {}, {1}, {2}, {3}, {1,2} → P(W+ ≤ 3) = 5/32, two-sided p = 10/32.
    result = paired_comparison(method, baseline)
    assert result.wilcoxon_p == pytest.approx(10 / 32)
    assert result.wilcoxon_min_p == pytest.approx(2 / 2**5)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_wilcoxon_min_p_is_two_over_two_to_the_n(n):
    assert wilcoxon_min_p(n) == pytest.approx(2 / 2**n)


def test_paired_comparison_degenerate_cases_return_nan_with_reason():
    one_pair = paired_comparison({0: 1.0, 1: 2.0}, {1: 1.5, 2: 3.0})
    assert one_pair.n_pairs == 1 and math.isnan(one_pair.t_p) and math.isnan(one_pair.wilcoxon_p)
    assert "at least 2" in one_pair.note

    identical = paired_comparison({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert identical.mean_diff == 0.0
    assert math.isnan(identical.t_p) and math.isnan(identical.effect_size)
    assert "zero" in identical.note

    shifted = paired_comparison({0: 1.5, 1: 2.5}, {0: 1.0, 1: 2.0})
    assert shifted.mean_diff == pytest.approx(0.5) and math.isnan(shifted.t_p)
    assert "zero spread" in shifted.note

    missing = paired_comparison({0: None, 1: 2.0, 2: 1.0}, {0: 1.0, 1: 2.5, 2: 2.0})
    assert missing.seeds == (1, 2)


def test_differences_equal_up_to_rounding_have_zero_spread():
    baseline = {0: 1.5432, 1: 2.2791, 2: 1.9875}
    method = {seed: value + 0.0123 for seed, value in baseline.items()}
    # Float subtraction leaves the differences unequal in their last bits (sd ~1e-16):
    # an exact sd == 0 guard would report t ~ 1e14 and p ~ 1e-28 here.
    diffs = [method[s] - baseline[s] for s in baseline]
    assert len(set(diffs)) > 1
    result = paired_comparison(method, baseline)
    assert result.mean_diff == pytest.approx(0.0123)
    assert math.isnan(result.t_p) and math.isnan(result.effect_size) and math.isnan(result.wilcoxon_p)
    assert "zero spread" in result.note and "0.0123" in result.note


def test_a_small_real_spread_is_still_tested():
    # Differences that vary by 1e-6 of the values: float32 losses of different runs do.
    baseline = {0: 1.5, 1: 2.0, 2: 2.5}
    method = {0: 1.5 + 1e-6, 1: 2.0 + 2e-6, 2: 2.5 + 4e-6}
    result = paired_comparison(method, baseline)
    assert result.note == ""
    expected = scipy.stats.ttest_rel(list(method.values()), list(baseline.values())).pvalue
    assert result.t_p == pytest.approx(expected)


def test_wilcoxon_minimum_counts_nonzero_differences():
    # 4 pairs, one of them identical: the test ranks 3 differences, so its floor is 2/2³.
    baseline = {s: 2.0 for s in range(4)}
    method = {0: 1.9, 1: 1.8, 2: 2.0, 3: 1.7}
    result = paired_comparison(method, baseline)
    assert (result.n_pairs, result.n_nonzero) == (4, 3)
    assert result.wilcoxon_min_p == pytest.approx(0.25)
    assert result.wilcoxon_p == pytest.approx(0.25)  # all three of one sign: the floor itself


def test_holm_hand_worked_example_with_monotonicity_and_nan():
    # Sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → raised to 0.06.
    adjusted = holm([0.01, 0.04, 0.03, 0.005, float("nan")])
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(adjusted[4])


def test_holm_caps_at_one_and_keeps_order():
    assert holm([0.4, 0.9, 0.02]) == pytest.approx([0.8, 0.9, 0.06])
    assert holm([0.7, 0.8]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_steps_to_target_first_eval_at_or_below_target():
    points = [
        {"kind": "eval", "step": 300, "time_s": 30.0, "val_loss": 1.4},
        {"kind": "train", "step": 150, "time_s": 15.0, "val_loss": None, "loss": 1.0},
        {"kind": "eval", "step": 0, "time_s": 0.5, "val_loss": 2.0},
        {"kind": "eval", "step": 200, "time_s": 21.0, "val_loss": 1.5},
        {"kind": "eval", "step": 100, "time_s": 11.0, "val_loss": 1.6},
        {"kind": "eval", "step": 250, "time_s": 26.0, "val_loss": None},
    ]
    assert steps_to_target(points, 1.5) == (200, 21.0)
    assert steps_to_target(points, 1.45) == (300, 30.0)
    assert steps_to_target(points, 1.0) is None


def test_step_time_overhead_from_medians():
    overhead = step_time_overhead([0.011, 0.013, 0.012], [0.010, 0.0105, 0.010])
    assert overhead.percent == pytest.approx(20.0)
    assert (overhead.n_method, overhead.n_baseline) == (3, 3)
    assert math.isnan(step_time_overhead([0.01], [None]).percent)


def _t2_cdf(t: float) -> float:
    """Student t with 2 df in closed form: F(t) = 1/2 + t / (2·sqrt(2 + t²))."""
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


def test_equivalence_test_matches_hand_computed_tost():
    treatment = {0: 1.01, 1: 1.03, 2: 1.02, 5: 7.0}  # seed 5 has no partner: left out
    control = {0: 1.0, 1: 1.0, 2: 1.0}
    # d = 0.01, 0.03, 0.02: mean 0.02, squared deviations 1e-4 + 1e-4 + 0 → var 1e-4, sd 0.01.
    se = 0.01 / math.sqrt(3)
    p_lower = 1 - _t2_cdf((0.02 + 0.05) / se)  # t = 7·√3
    p_upper = _t2_cdf((0.02 - 0.05) / se)  # t = −3·√3
    # t_{0.95, 2} from the closed form's inverse: (2q − 1) / sqrt(2q(1 − q)), q = 0.95.
    quantile = 0.9 / math.sqrt(2 * 0.95 * 0.05)
    result = equivalence_test(treatment, control, margin=0.05, alpha=0.05)
    assert result.n_pairs == 3 and result.seeds == (0, 1, 2)
    assert result.estimate == pytest.approx(0.02)
    assert result.p_lower == pytest.approx(p_lower)
    assert result.p_upper == pytest.approx(p_upper)
    assert result.p == pytest.approx(max(p_lower, p_upper)) and result.p == pytest.approx(p_upper)
    assert result.ci_low == pytest.approx(0.02 - quantile * se)
    assert result.ci_high == pytest.approx(0.02 + quantile * se)
    assert result.equivalent  # p ≈ 0.018 < 0.05, and the 90% CI [0.003, 0.037] is inside ±0.05


def test_equivalence_fails_when_the_interval_reaches_the_margin():
    treatment, control = {0: 1.01, 1: 1.03, 2: 1.02}, {0: 1.0, 1: 1.0, 2: 1.0}
    # margin 0.02 = the mean: t_upper = 0, so p_upper = 1/2.
    result = equivalence_test(treatment, control, margin=0.02)
    assert result.p == pytest.approx(0.5)
    assert not result.equivalent


def test_equivalence_degenerate_inputs_give_nan_with_a_reason():
    one = equivalence_test({0: 1.0}, {0: 2.0}, margin=0.1)
    assert math.isnan(one.p) and "at least 2" in one.note
    flat = equivalence_test({0: 1.5, 1: 2.5}, {0: 1.0, 1: 2.0}, margin=0.1)
    assert math.isnan(flat.p) and "zero spread" in flat.note
    with pytest.raises(ValueError):
        equivalence_test({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.5}, margin=0.0)


def test_interaction_contrast_matches_hand_computed_paired_t():
    treatment, control = {0: 1.0, 1: 2.0, 2: 3.5}, {0: 1.5, 1: 2.25, 2: 4.0}
    versus_treatment = {0: 2.0, 1: 2.1, 2: 2.2, 3: 9.0}  # seed 3 is not in all four: left out
    versus_control = {0: 2.1, 1: 2.0, 2: 2.4, 3: 1.0}
    # (t − c) = −0.5, −0.25, −0.5;  (vt − vc) = −0.1, +0.1, −0.2;  contrast = −0.4, −0.35, −0.3:
    # mean −0.35, squared deviations 0.0025 + 0 + 0.0025 → var 0.0025, sd 0.05.
    se = 0.05 / math.sqrt(3)
    t = -0.35 / se  # −7·√3
    half_width = (0.95 / math.sqrt(2 * 0.975 * 0.025)) * se  # t_{0.975, 2} by the closed form
    result = interaction_contrast(treatment, control, versus_treatment, versus_control)
    assert result.n_pairs == 3 and result.seeds == (0, 1, 2)
    assert result.mean_diff == pytest.approx(-0.35)
    assert result.sd_diff == pytest.approx(0.05)
    assert result.t_stat == pytest.approx(t)
    assert result.t_p == pytest.approx(2 * _t2_cdf(t))
    assert result.ci_low == pytest.approx(-0.35 - half_width)
    assert result.ci_high == pytest.approx(-0.35 + half_width)

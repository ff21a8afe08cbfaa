"""The dose-response family of a study: its rows (each noise level at the σ it logged,
Holm across the family), the sentence generated from them, and its table and plot,
on a synthetic study filled through the real Store writer API."""

import math
import statistics

import pytest
import scipy.stats

from gradnoise.study.report import document, sentences, tables, verdict, write_report
from helpers import fabricated

DATASET = "shakespeare_char"
PARAMETERS = 10_000
SEEDS = (0, 1, 2, 3)
METHODS = {
    "baseline": {},
    "abs-1e-4": {"noise": "const:sigma=1e-4"},
    "rel-0.1": {"noise": "relative:const:sigma=0.1"},
    "dropout-0.1": {"dropout": 0.1},
}
SPEC = fabricated.done_runs_spec(
    "dose",
    METHODS,
    SEEDS,
    DATASET,
    dose_response={"methods": ["rel-0.1", "abs-1e-4"], "references": ["dropout-0.1"]},
    findings={"reference": "dropout-0.1", "metrics": ["val_loss_full"]},
)
BASELINE = {"val_loss_full": [2.50, 2.52, 2.48, 2.51], "best_val_loss": [2.40, 2.43, 2.38, 2.41]}
# method − baseline per seed. abs-1e-4 is clearly better on the final val loss, rel-0.1 is
# clearly worse on the best val loss; one of rel-0.1's final differences is exactly zero.
DIFFS = {
    "abs-1e-4": {
        "val_loss_full": [-0.050, -0.051, -0.049, -0.0505],
        "best_val_loss": [0.01, -0.02, 0.015, -0.01],
    },
    "rel-0.1": {"val_loss_full": [0.01, -0.01, 0.02, 0.0], "best_val_loss": [0.040, 0.041, 0.039, 0.0405]},
    "dropout-0.1": {
        "val_loss_full": [-0.03, -0.02, -0.04, -0.03],
        "best_val_loss": [-0.01, 0.0, -0.02, -0.01],
    },
    "baseline": {"val_loss_full": [0.0] * 4, "best_val_loss": [0.0] * 4},
}
# ‖g‖ at the train log lines (steps 10..100) of every run; relative noise logs r·‖g‖/√N.
GRAD_NORMS = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.4, 0.4, 0.3]


def grad_norms(seed: int) -> list[float]:
    return [g * (1 + 0.1 * seed) for g in GRAD_NORMS]


def logged_sigma(method: str, seed: int) -> list[float]:
    if method == "abs-1e-4":
        return [1e-4] * len(GRAD_NORMS)
    if method == "rel-0.1":
        return [0.1 * g / math.sqrt(PARAMETERS) for g in grad_norms(seed)]
    return [0.0] * len(GRAD_NORMS)


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dose")

    def result_of(method, index, seed):
        finals = {"steps": 100, "parameters": PARAMETERS, "step_time_median_s": 0.01}
        for key in BASELINE:
            finals[key] = BASELINE[key][index] + DIFFS[method][key][index]
        curves = [
            {"kind": "train", "step": 10 * (i + 1), "loss": 2.0, "sigma": sigma, "grad_norm": norm}
            for i, (sigma, norm) in enumerate(zip(logged_sigma(method, seed), grad_norms(seed), strict=True))
        ]
        return finals, curves

    fabricated.store_done_runs(directory, SPEC, METHODS, SEEDS, DATASET, result_of)
    write_report(directory)
    return directory


@pytest.fixture(scope="module")
def analysis(study_dir):
    return fabricated.analyzed(study_dir)


def paired_t_p(method: str, key: str) -> float:
    ours = [b + d for b, d in zip(BASELINE[key], DIFFS[method][key], strict=True)]
    return scipy.stats.ttest_rel(ours, BASELINE[key]).pvalue


def test_dose_rows_are_the_family_at_the_sigma_it_logged(analysis):
    rows = analysis.dose(DATASET, "val_loss_full")
    # Ordered by σ used: abs-1e-4's 1e-4 is below rel-0.1's 0.1 · ‖g‖/√N (‖g‖ ≈ 0.5 here).
    assert [r.method for r in rows] == ["abs-1e-4", "rel-0.1"]
    absolute, rel = rows
    assert (rel.relative, rel.level, absolute.relative, absolute.level) == (True, 0.1, False, 1e-4)
    assert absolute.sigma == pytest.approx(1e-4)
    per_seed = [statistics.median(logged_sigma("rel-0.1", seed)) for seed in SEEDS]
    assert rel.sigma == pytest.approx(statistics.median(per_seed))
    assert {r.metric for r in analysis.doses} == {"val_loss_full", "best_val_loss"}  # the default metrics
    assert "dropout-0.1" not in {r.method for r in analysis.doses}  # a reference, not a level


def test_dose_holm_is_across_the_family_only(analysis):
    for key in ("val_loss_full", "best_val_loss"):
        p = {m: paired_t_p(m, key) for m in ("abs-1e-4", "rel-0.1")}
        low, high = sorted(p, key=p.get)
        expected = {low: min(1, 2 * p[low])}
        expected[high] = min(1, max(expected[low], p[high]))
        for row in analysis.dose(DATASET, key):
            assert row.comparison.t_p == pytest.approx(p[row.method])
            assert row.t_p_holm == pytest.approx(expected[row.method])
    # The study-wide comparison adjusts across all three methods, dropout included: larger.
    family = analysis.dose(DATASET, "val_loss_full")[0]
    everyone = analysis.comparison(DATASET, "abs-1e-4", "val_loss_full")
    assert everyone.t_p_holm > family.t_p_holm


def test_the_gradient_rms_is_the_baselines_median_norm_over_root_n(analysis):
    scale = analysis.gradient_scale(DATASET)
    norms = [g for seed in SEEDS for g in grad_norms(seed)]
    assert scale.grad_norm == pytest.approx(statistics.median(norms))
    assert scale.rms == pytest.approx(statistics.median(norms) / math.sqrt(PARAMETERS))


def test_the_sentence_says_what_the_numbers_say(analysis):
    final, best = sentences.dose_findings(analysis, DATASET)
    p_abs = document.p_value(min(1, 2 * paired_t_p("abs-1e-4", "val_loss_full")))
    assert final.startswith(
        "final val loss, full pass: 1 noise level of 2 is significantly better than baseline"
    )
    assert (
        "abs-1e-4 (absolute, σ ≈ 0.0001): mean diff -0.0501 [" in final and f"t p (Holm) = {p_abs}" in final
    )
    assert "rel-0.1 (" not in final  # neither better nor worse on the final val loss
    assert "the largest effect is abs-1e-4 (absolute" in final
    assert "dropout-0.1" not in final  # the reference is in the plot and the findings table

    assert best.startswith("best val loss: no noise level is significantly better than baseline")
    # Of the levels below the baseline on best val (abs-1e-4 alone: rel-0.1 is above), the nearest.
    assert (
        statistics.mean(DIFFS["abs-1e-4"]["best_val_loss"])
        < 0
        < statistics.mean(DIFFS["rel-0.1"]["best_val_loss"])
    )
    assert "the lowest adjusted p among those below the baseline is at abs-1e-4 (absolute" in best
    assert "1 level is significantly worse: rel-0.1" in best


def test_dose_table_and_plot(study_dir, analysis):
    table = tables.dose_table(analysis, DATASET, "val_loss_full")
    scale = analysis.gradient_scale(DATASET)
    rows = {row[0]: row for row in table.rows}
    assert rows["abs-1e-4"][1] == "const:sigma=0.0001"
    assert rows["abs-1e-4"][3] == f"{1e-4 / scale.rms:.3g}"
    assert rows["rel-0.1"][4] == "4"  # pairs; one of them a zero difference
    assert (study_dir / "report" / "dose_response_shakespeare_char.png").is_file()
    markdown = (study_dir / "report" / "report.md").read_text()
    assert "## shakespeare_char: does any amount of noise help?" in markdown


def test_wilcoxon_caveat_counts_nonzero_differences(analysis):
    caveats = "\n".join(sentences.caveats(analysis))
    # rel-0.1 has 4 pairs but 3 non-zero final differences: both floors are stated.
    assert "With 3 non-zero paired differences the smallest two-sided Wilcoxon p is 0.25" in caveats
    assert "With 4 non-zero paired differences the smallest two-sided Wilcoxon p is 0.125" in caveats


def holm_by_hand(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment, written out: the k-th smallest p times (m − k), running max."""
    adjusted, running = {}, 0.0
    for k, (name, p) in enumerate(sorted(p_values.items(), key=lambda item: item[1])):
        running = max(running, min(1.0, (len(p_values) - k) * p))
        adjusted[name] = running
    return adjusted


def test_reference_rows_pair_each_method_with_the_reference(analysis):
    rows = {r.method: r for r in analysis.references}
    assert set(rows) == {"abs-1e-4", "rel-0.1"} and {r.metric for r in rows.values()} == {"val_loss_full"}
    raw = {}
    for method, row in rows.items():
        diffs = [
            m - r
            for m, r in zip(
                DIFFS[method]["val_loss_full"], DIFFS["dropout-0.1"]["val_loss_full"], strict=True
            )
        ]
        assert row.comparison.mean_diff == pytest.approx(statistics.mean(diffs), abs=1e-12)
        ours = [b + d for b, d in zip(BASELINE["val_loss_full"], DIFFS[method]["val_loss_full"], strict=True)]
        theirs = [
            b + d
            for b, d in zip(BASELINE["val_loss_full"], DIFFS["dropout-0.1"]["val_loss_full"], strict=True)
        ]
        raw[method] = scipy.stats.ttest_rel(ours, theirs).pvalue
    for method, p in holm_by_hand(raw).items():
        assert rows[method].t_p_holm == pytest.approx(p, rel=1e-9)


def test_findings_table_gives_each_method_the_word_its_test_allows(analysis, study_dir):
    """A compact row per method: Δ, CI, Holm p and verdict vs the baseline and vs the reference."""
    (table,) = verdict.findings_tables(analysis, DATASET)
    assert table.columns == [
        "method",
        "Δ vs baseline",
        "95% CI",
        "p (Holm)",
        "verdict",
        "Δ vs dropout-0.1",
        "95% CI",
        "p (Holm)",
        "verdict",
    ]
    rows = {row[0]: row for row in table.rows}
    assert set(rows) == {"abs-1e-4", "rel-0.1", "dropout-0.1"}
    vs_baseline = holm_by_hand(
        {method: paired_t_p(method, "val_loss_full") for method in ("abs-1e-4", "rel-0.1", "dropout-0.1")}
    )

    def word(p: float, diffs: list[float]) -> str:
        if p >= 0.05:
            return "inconclusive"
        return "better" if statistics.mean(diffs) < 0 else "worse"

    for method, p in vs_baseline.items():
        diffs = DIFFS[method]["val_loss_full"]
        assert rows[method][1] == f"{statistics.mean(diffs):+.4f}"
        assert rows[method][3:5] == [document.p_value(p), word(p, diffs)]
    assert rows["abs-1e-4"][4] == "better"  # −0.05 on every seed
    assert rows["rel-0.1"][4] == "inconclusive"
    assert rows["dropout-0.1"][5:] == [document.MISSING] * 4  # the reference itself

    def ours(method: str) -> list[float]:
        return [b + d for b, d in zip(BASELINE["val_loss_full"], DIFFS[method]["val_loss_full"], strict=True)]

    vs_reference = holm_by_hand(
        {m: scipy.stats.ttest_rel(ours(m), ours("dropout-0.1")).pvalue for m in ("abs-1e-4", "rel-0.1")}
    )
    for method, p in vs_reference.items():
        diffs = [m - r for m, r in zip(ours(method), ours("dropout-0.1"), strict=True)]
        assert rows[method][7:] == [document.p_value(p), word(p, diffs)]
    assert "findings" in (study_dir / "report" / "report.md").read_text()


def test_a_findings_reference_must_be_a_method():
    from gradnoise.errors import UserError
    from gradnoise.study.layout import parse_findings

    with pytest.raises(UserError, match="reference='dropout' is not one of the methods"):
        parse_findings({**SPEC, "findings": {"reference": "dropout"}})
    with pytest.raises(UserError, match="unknown metric 'val'"):
        parse_findings({**SPEC, "findings": {"metrics": ["val"]}})

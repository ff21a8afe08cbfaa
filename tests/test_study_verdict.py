"""The report of a study with pre-registered hypotheses opens with one verdict paragraph per
hypothesis, with the word its test allows; on a synthetic study filled through the real
Store writer API, the words worked out here from scipy's t distribution and Holm by hand."""

import math
import re
import statistics
import zlib

import pytest
import scipy.stats

from gradnoise import schedules
from gradnoise.lm.config import resolve_config
from gradnoise.study.hypotheses import Contrast
from gradnoise.study.report import verdict, write_report
from gradnoise.study.report.loading import load_study
from gradnoise.study.spec import load_spec
from gradnoise.study.store import Store
from helpers import fabricated

DATASET = "shakespeare_char"
SEEDS = (0, 1, 2, 3, 4)
METHODS = {
    "baseline": {},
    "rel": {"noise": "relative:const:sigma=3.0"},
    "drop": {"dropout": 0.1},
    "rel+drop": {"dropout": 0.1, "noise": "relative:const:sigma=3.0"},
}
BASELINE = [2.70, 2.72, 2.69, 2.71, 2.70]
# method − baseline per seed (final val loss, full pass).
OFFSETS = {
    "baseline": [0.0] * 5,
    "rel": [-0.280, -0.270, -0.290, -0.280, -0.275],
    "drop": [-0.281, -0.272, -0.285, -0.279, -0.280],
    "rel+drop": [-0.271, -0.292, -0.270, -0.289, -0.280],
}
MARGIN = 0.05
HYPOTHESES = {
    "metric": "val_loss_full",
    "alpha": 0.05,
    "confirmatory": [
        {"id": "a", "kind": "better", "treatment": "rel", "control": "baseline", "claim": "noise helps"},
        {"id": "b", "kind": "better", "treatment": "rel+drop", "control": "drop", "claim": "it adds"},
        {"id": "c", "kind": "better", "treatment": "baseline", "control": "rel", "claim": "none helps"},
        {"id": "d", "kind": "equivalent", "margin": MARGIN, "treatment": "rel", "control": "drop"},
    ],
    "contrasts": [
        {"id": "inter", "treatment": "rel+drop", "control": "drop", "versus": ["rel", "baseline"]},
    ],
}
SPEC = fabricated.done_runs_spec(
    "verdict",
    METHODS,
    SEEDS,
    DATASET,
    hypotheses=HYPOTHESES,
)


def values(method: str) -> list[float]:
    return [b + d for b, d in zip(BASELINE, OFFSETS[method], strict=True)]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("verdict")

    def result_of(method, index, seed):
        full = values(method)[index]
        # The last periodic estimate 0.02 above the full pass, the best 0.1 below it.
        finals = {"steps": 100, "val_loss_full": full, "best_val_loss": full - 0.1, "val_loss": full + 0.02}
        return finals, []

    fabricated.store_done_runs(directory, SPEC, METHODS, SEEDS, DATASET, result_of)
    write_report(directory)
    return directory


def expected_words() -> dict[str, str]:
    """Each hypothesis's p (paired t, or TOST's larger one-sided p), Holm by hand, the word."""
    pairs = {h["id"]: (values(h["treatment"]), values(h["control"])) for h in HYPOTHESES["confirmatory"]}
    p = {}
    for h in HYPOTHESES["confirmatory"]:
        treatment, control = pairs[h["id"]]
        diffs = [t - c for t, c in zip(treatment, control, strict=True)]
        if h["kind"] == "better":
            p[h["id"]] = scipy.stats.ttest_rel(treatment, control).pvalue
        else:
            se = statistics.stdev(diffs) / math.sqrt(len(diffs))
            mean = statistics.mean(diffs)
            below = scipy.stats.t.sf((mean + MARGIN) / se, len(diffs) - 1)
            above = scipy.stats.t.cdf((mean - MARGIN) / se, len(diffs) - 1)
            p[h["id"]] = max(below, above)
    adjusted, running = {}, 0.0
    for k, name in enumerate(sorted(p, key=p.get)):
        running = max(running, min(1.0, (len(p) - k) * p[name]))
        adjusted[name] = running
    words = {}
    for h in HYPOTHESES["confirmatory"]:
        treatment, control = pairs[h["id"]]
        lower = statistics.mean(treatment) < statistics.mean(control)
        if adjusted[h["id"]] >= 0.05:
            words[h["id"]] = "inconclusive"
        elif h["kind"] == "equivalent":
            words[h["id"]] = f"equivalent within ±{MARGIN:g}"
        else:
            words[h["id"]] = "better" if lower else "worse"
    return words


def test_the_fixture_covers_every_word():
    assert expected_words() == {
        "a": "better",
        "b": "inconclusive",
        "c": "worse",
        "d": "equivalent within ±0.05",
    }


def test_hypothesis_rows_carry_the_words_the_tests_allow(study_dir):
    with Store(study_dir / "study.sqlite") as store:
        rows = verdict.hypothesis_rows(load_study(store))
    assert {r.hypothesis.id: r.word for r in rows} == expected_words()
    (d,) = [r for r in rows if r.hypothesis.id == "d"]
    diffs = [t - c for t, c in zip(values("rel"), values("drop"), strict=True)]
    assert d.equivalence.estimate == pytest.approx(statistics.mean(diffs))
    assert -MARGIN < d.interval[0] < d.interval[1] < MARGIN and d.interval[2] == "90% CI"


def test_the_report_opens_with_one_verdict_paragraph_per_hypothesis(study_dir):
    markdown = (study_dir / "report" / "report.md").read_text()
    sections = re.split(r"\n## ", markdown)
    first = sections[1]
    assert first.startswith("The answer\n")
    paragraphs = [line for line in first.splitlines() if re.match(r"\(\w+\) ", line)]
    words = expected_words()
    assert [p.split(")")[0][1:] for p in paragraphs] == list(words)
    for paragraph, word in zip(paragraphs, words.values(), strict=True):
        assert f"**{word}**" in paragraph
        # A "worse" verdict on a `better` hypothesis says it is the claim's opposite.
        assert ("the opposite of the claim" in paragraph) == (word == "worse")
        assert "Holm p" in paragraph and "CI" in paragraph
    assert "4 pre-registered tests, one Holm family at α = 0.05" in first
    assert "Caveats" not in first  # the caveats come after the answer
    html = (study_dir / "report" / "index.html").read_text()
    assert html.index("The answer") < html.index("Caveats")
    assert "<strong>equivalent within ±0.05</strong>" in html
    assert (study_dir / "report" / "answer.png").is_file()


def test_the_interaction_is_reported_with_its_ci(study_dir):
    with Store(study_dir / "study.sqlite") as store:
        (row,) = verdict.contrast_rows(load_study(store))
    per_seed = [
        (a - b) - (c - d)
        for a, b, c, d in zip(
            values("rel+drop"), values("drop"), values("rel"), values("baseline"), strict=True
        )
    ]
    assert row.comparison.mean_diff == pytest.approx(statistics.mean(per_seed))
    half = scipy.stats.t.ppf(0.975, len(per_seed) - 1) * statistics.stdev(per_seed) / math.sqrt(len(per_seed))
    assert row.comparison.ci_high - row.comparison.ci_low == pytest.approx(2 * half)
    markdown = (study_dir / "report" / "report.md").read_text()
    assert "| inter | (rel+drop − drop) − (rel − baseline) |" in markdown
    # One contrast: its Holm p is its own p; an interaction's word is its sign.
    p = scipy.stats.ttest_1samp(per_seed, 0.0).pvalue
    assert row.p_holm == pytest.approx(p)
    expected = "inconclusive" if p >= 0.05 else ("positive" if statistics.mean(per_seed) > 0 else "negative")
    assert row.word == expected


def test_tests_csv_lists_every_test_and_contrast_with_its_verdict(study_dir):
    import csv

    with open(study_dir / "report" / "tests.csv", newline="") as f:
        records = list(csv.DictReader(f))
    assert [r["id"] for r in records] == ["a", "b", "c", "d", "inter"]
    by_id = {r["id"]: r for r in records}
    assert {i: by_id[i]["verdict"] for i in "abcd"} == expected_words()
    assert by_id["d"]["kind"] == "confirmatory (equivalent)" and by_id["inter"]["kind"] == "exploratory"
    diffs = [t - c for t, c in zip(values("rel+drop"), values("drop"), strict=True)]
    assert float(by_id["b"]["mean_diff"]) == pytest.approx(statistics.mean(diffs))
    # Overfitting reads the periodic estimates alone: the last (full + 0.02) − the best (full − 0.1).
    assert float(by_id["a"]["control_final_minus_best"]) == pytest.approx(0.12)


def fill_packaged(directory, name: str, offset) -> dict:
    """A packaged spec's runs, each done with made-up finals: val_loss_full = 2.7 +
    offset(config) + a seed effect + a small jitter; best val 0.1 (no noise) or 0.05
    (noise) lower."""
    spec = load_spec(name)
    finals_of = {}
    with Store(directory / "study.sqlite") as store:
        store.create_study(spec.name, spec.data)
        store.add_runs([(r.run_id, r.dataset, r.method, r.seed, r.config.to_dict()) for r in spec.runs])
        for run in spec.runs:
            # A seed effect shared by every method, and a jitter of ≤ 0.004 of each run's own.
            jitter = 0.001 * (zlib.crc32(f"{run.method}/{run.seed}".encode()) % 5)
            full = 2.7 + offset(run.config) + 0.01 * (run.seed % 5) + jitter
            gap = 0.1 if run.config.noise == "none" else 0.05
            finals = {"steps": 1200, "val_loss_full": full, "best_val_loss": full - gap, "val_loss": full}
            store.mark_running(run.run_id, "test", "cpu")
            store.record_result(run.run_id, {"status": "done", "finals": finals}, [])
            finals_of[run.method] = finals
    write_report(directory)
    return finals_of


def test_the_transfer_report_draws_each_width_by_noise_level(tmp_path):
    def offset(config) -> float:  # noise helps at width 64, not at 256
        r = schedules.parse(config.noise).inner(0) if config.noise != "none" else 0.0
        return -0.02 * r if config.n_embd == 64 else 0.0

    fill_packaged(tmp_path, "transfer", offset)
    markdown = (tmp_path / "report" / "report.md").read_text()
    first = markdown.split("\n## ")[1]
    assert first.startswith("The answer\n") and "No confirmatory hypothesis" in first
    assert "(answer_levels.png)" in first and (tmp_path / "report" / "answer_levels.png").is_file()
    # Each contrast's control overfits by its best-val gap: 0.1 (no noise) in every made-up run.
    assert re.search(r"\| w64-r3 \| w64-r3 − w64-r0 \| val_loss_full \| 5 \| -0\.06\d\d \|", markdown)
    assert re.search(r"\| w64-r3 \| [^\n]*\| better \| \+0\.100 \|", markdown)
    # The answer in words: a line per control, its claims' shared prefix ahead.
    (line,) = [text for text in first.splitlines() if text.startswith("width 64 (vs w64-r0): ")]
    words = re.findall(r"(r = \d+) vs none \*\*(\w+)\*\* \(Δ (\S+)\)", line)
    assert [(level, word) for level, word, _ in words] == [
        ("r = 1", "better"),
        ("r = 3", "better"),
        ("r = 10", "better"),
    ]
    assert [round(float(delta.replace("−", "-")), 2) for *_, delta in words] == [-0.02, -0.06, -0.2]
    assert (
        sum(
            text.startswith(("width 128 (vs w128-r0)", "width 256 (vs w256-r0)"))
            for text in first.splitlines()
        )
        == 2
    )


def test_contrast_lines_share_a_prefix_only_where_every_claim_has_it():
    assert verdict._shared_prefix(["width 64: r = 1 vs none", "width 64: r = 3 vs none"]) == "width 64"
    assert verdict._shared_prefix(["width 64: r = 1 vs none", "width 256: r = 3 vs none"]) == ""
    assert verdict._shared_prefix(["width 64: r = 1 vs none", "no colon"]) == ""
    assert verdict._shared_prefix(["", ""]) == ""


def test_the_confirm_report_answers_its_four_hypotheses(tmp_path):
    def offset(config) -> float:  # relative noise −0.2 at every dropout; dropout −0.2 per 0.1
        return (-0.2 if config.noise.startswith("relative") else 0.0) - 2 * config.dropout

    fill_packaged(tmp_path, "confirm", offset)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "Exploratory: not among the pre-registered tests." in markdown  # the findings tables
    first = markdown.split("\n## ")[1]
    paragraphs = [line for line in first.splitlines() if re.match(r"\([a-d]\) ", line)]
    # Effects of 0.2 against a jitter of ≤ 0.004; rel-3 and dropout-0.1 differ by the jitter alone.
    words = [re.search(r"\*\*(.+?)\*\*", p).group(1) for p in paragraphs]
    assert words == ["better", "better", "better", "equivalent within ±0.05"]


def test_a_hypothesis_without_enough_seeds_gets_no_word_but_its_reason(tmp_path):
    spec = {**SPEC, "seeds": 1}
    with Store(tmp_path / "study.sqlite") as store:
        store.create_study(spec["name"], spec)
        for method, overrides in METHODS.items():
            config = resolve_config(DATASET, "tiny", {"max_iters": 100, **overrides, "seed": 0})
            store.add_runs([(f"{method}-0", DATASET, method, 0, config.to_dict())])
            finals = {"steps": 100, "val_loss_full": values(method)[0]}
            store.record_result(f"{method}-0", {"status": "done", "finals": finals}, [])
        study = load_study(store)
    rows = verdict.hypothesis_rows(study)
    paragraphs = verdict.verdict_paragraphs(study, rows)
    assert [r.word for r in rows] == ["no test"] * 4
    assert all("at least 2 are needed for a test" in p for p in paragraphs)


def test_the_forest_plot_names_a_contrast_on_another_metric_than_its_axis():
    def row(key: str) -> verdict.ContrastRow:
        contrast = Contrast(id="rel-vs-drop", treatment="rel", control="drop", metric=key)
        return verdict.ContrastRow(DATASET, contrast, comparison=None, p_holm=math.nan)

    assert verdict._contrast_label(row("val_loss_full"), "val_loss_full") == "rel-vs-drop"
    assert verdict._contrast_label(row("best_val_loss"), "val_loss_full") == "rel-vs-drop (best val loss)"


def test_a_noise_study_without_hypotheses_leads_with_a_noise_level_not_its_reference(tmp_path):
    def offset(config) -> float:  # dropout helps most; every noise level helps less
        if config.dropout:
            return -0.5
        return -0.1 if config.noise != "none" else 0.0

    fill_packaged(tmp_path, "sweep", offset)
    first = (tmp_path / "report" / "report.md").read_text().split("\n## ")[1]
    lead = next(line for line in first.splitlines() if line.startswith("Best-supported finding"))
    method = re.search(r": (\S+) vs baseline: \*\*better\*\*", lead).group(1)
    assert method in load_spec("sweep").dose_response.methods
    assert "Holm over 12 methods" in lead  # adjusted over every method, not only those it asks about
    assert re.search(r"Against dropout-0\.1: Δ = \+0\.(39\d|40\d) ", lead)  # 0.4 and the jitter

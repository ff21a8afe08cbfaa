"""The report on a synthetic study filled through the real Store writer API: its rows
(asserted on directly), and the files rendered from them."""

import base64
import csv
import dataclasses
import math
import re
import statistics

import matplotlib.image
import pytest

from gradnoise.errors import UserError
from gradnoise.study.report import document, render, sentences, tables, write_report
from gradnoise.study.report.analysis import analyze
from gradnoise.study.stats import summarize
from helpers import fabricated
from helpers.fabricated import (
    DATASET,
    EVAL_STEPS,
    EXP_SPEC,
    FINALS,
    GRAD_NORMS,
    MAX_ITERS,
    PARAMETERS,
    SPEC,
    STEP_TIME,
    fill_store,
    val_curve,
)


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("study")
    fill_store(directory, SPEC)
    write_report(directory)
    return directory


@pytest.fixture(scope="module")
def analysis(study_dir):
    return fabricated.analyzed(study_dir)


def student_t_p(t: float) -> float:
    """Two-sided p of Student's t with 2 degrees of freedom (its cdf has a closed form)."""
    return 2 * (0.5 - abs(t) / (2 * math.sqrt(2 + t * t)))


# exp − baseline final val loss per seed: -0.03, -0.02, -0.01: mean -0.02, sd 0.01.
VAL_T = -0.02 / (0.01 / math.sqrt(3))


# ---- the rows -------------------------------------------------------------------------------


def test_summary_rows_count_runs_by_status_and_summarize_done_seeds_only(analysis):
    for method, per_seed in FINALS.items():
        row = analysis.summary(DATASET, method)
        assert (row.runs, row.done) == (4, 3)  # seed 3 failed or diverged: not summarized
        assert (row.failed, row.diverged) == ((1, 0) if method == "baseline" else (0, 1))
        for index, metric in enumerate(("train_loss", "val_loss")):
            values = [pair[index] for pair in per_seed.values()]
            summary = row.summary(metric)
            assert summary.n == 3
            assert summary.mean == pytest.approx(statistics.mean(values))
            assert summary.sd == pytest.approx(statistics.stdev(values))
            assert summary.ci_low < summary.mean < summary.ci_high
        assert row.summary("test_loss_full").n == 0  # no test split
        assert row.summary("best_val_step").mean == MAX_ITERS  # the spec's table asks for it


def test_comparison_rows_pair_seeds_and_adjust_per_metric(analysis):
    row = analysis.comparison(DATASET, "exp", "val_loss")
    c = row.comparison
    assert (c.n_pairs, c.seeds) == (3, (0, 1, 2))
    assert c.mean_diff == pytest.approx(-0.02) and c.effect_size == pytest.approx(-2.0)
    assert c.t_p == pytest.approx(student_t_p(VAL_T))
    assert row.t_p_holm == pytest.approx(c.t_p)  # one comparison per family: Holm changes nothing
    assert c.wilcoxon_p == pytest.approx(0.25)  # three same-sign differences: the minimum, 2/2³
    metrics = {r.metric for r in analysis.comparisons}
    # test loss has no values; the table's metrics are compared because it shows their p.
    assert metrics == {
        *("val_loss_full", "best_val_loss", "val_loss", "train_loss"),
        *("train_loss_window", "best_val_step"),
    }
    assert analysis.comparison(DATASET, "baseline", "val_loss") is None


def test_speed_rows_reach_the_baseline_best_val_loss(analysis):
    # Every baseline run reaches the highest of its runs' best val losses (here = final).
    target = max(v for _, v in FINALS["baseline"].values())
    for method, per_seed in FINALS.items():
        row = analysis.speed(DATASET, method)
        assert row.target_val_loss == pytest.approx(target)
        first_steps = [
            next((s for s in EVAL_STEPS if val_curve(v, s) <= target), None) for _, v in per_seed.values()
        ]
        hits = [s for s in first_steps if s is not None]
        assert (row.runs, row.reached) == (3, len(hits))
        if method == "baseline":
            assert row.reached == row.runs
        assert row.steps.mean == pytest.approx(statistics.mean(hits))
        assert row.seconds.mean == pytest.approx(statistics.mean(hits) * STEP_TIME[method])
    assert analysis.speed(DATASET, "exp").overhead.percent == pytest.approx(10.0)


def test_schedule_uses_and_their_horizon(analysis):
    (use,) = analysis.schedules
    assert (use.methods, use.max_iters, use.relative, use.data_driven) == (("exp",), MAX_ITERS, False, False)
    assert sorted(use.run_ids) == [f"exp-{seed}" for seed in range(4)]
    assert 0.01 * 0.99**use.horizon < 0.0001 <= 0.01 * 0.99 ** (use.horizon - 1)


def test_published_rows_come_from_the_spec_beside_ours_like_for_like(analysis):
    (last_batch, best) = analysis.published  # the final metrics' order, not the YAML's
    train = [t for t, _ in FINALS["baseline"].values()]
    val = [v for _, v in FINALS["baseline"].values()]
    assert (last_batch.metric, last_batch.value, last_batch.how) == (
        "train_loss_last_batch",
        0.96,
        "the last minibatch, in train mode",
    )
    assert last_batch.ours.mean == pytest.approx(statistics.mean(train) - 0.25)
    assert last_batch.stand_in == "train_loss_window"
    assert last_batch.stand_in_ours.mean == pytest.approx(statistics.mean(train) - 0.2)
    assert last_batch.comparable == ("train_loss_last_batch", last_batch.ours)
    # A study that did not record the last minibatch reads the published value against the window.
    unrecorded = dataclasses.replace(last_batch, ours=summarize([]))
    assert unrecorded.comparable == ("train_loss_window", last_batch.stand_in_ours)
    assert (best.metric, best.value, best.how, best.stand_in) == ("best_val_loss", 1.25, "", None)
    assert best.ours.mean == pytest.approx(statistics.mean(val))


def test_published_table_sets_each_value_beside_ours(analysis):
    table = tables.published_table(analysis)
    rows = {row[1]: row for row in table.rows}
    window = analysis.summary(DATASET, "baseline").summary("train_loss_window")
    assert rows["train loss, last minibatch"][2:4] == ["0.9600", "the last minibatch, in train mode"]
    like = rows["train loss, last log window (like for like)"]
    assert like[2] == "0.9600" and like[4] == tables.mean_sd_ci(window)
    in_ci = window.ci_low <= 0.96 <= window.ci_high
    assert like[5] == ("yes" if in_ci else "no")
    assert rows["best val loss"][5] == "no"  # 1.25 is far below this study's 1.49–1.52
    # Our own end-of-training measures, not published, below them.
    assert rows["final val loss, full pass"][2:4] == [document.MISSING, "not published"]
    assert rows["final train loss, eval mode"][2:4] == [document.MISSING, "not published"]


def test_paper_table_follows_the_specs_layout(analysis):
    table = tables.paper_table(analysis)
    assert table.title == "a made-up paper's layout: mean ± sd over seeds, p vs baseline"
    assert "Table 9" not in table.title  # the section is titled Table 9: not twice
    assert table.columns == [
        "dataset",
        "baseline train",
        "baseline val",
        "baseline best_val_step",
        "exp train",
        "exp val",
        "exp best_val_step",
    ]
    row, published = table.rows
    val = [v for _, v in FINALS["exp"].values()]
    assert row[5] == f"{statistics.mean(val):.4f} ± {statistics.stdev(val):.4f} (p={student_t_p(VAL_T):.3f})"
    assert row[6] == f"{MAX_ITERS:.4f} ± 0.0000 (p=n/a)"  # no differences: the t-test is undefined
    # The published last-minibatch loss goes under the baseline's train-mode window mean.
    assert published == [f"{DATASET}, published", "0.9600", "", "", "", "", ""]
    assert "under ours averaged like for like (train loss, last log window)" in table.notes[-1]
    assert "best val loss (as ours): not a column here" in table.notes[-1]
    bare = dataclasses.replace(analysis.study, table=None, published=None)
    assert tables.paper_table(analyze(bare)) is None


def test_run_rows_link_each_run_to_its_files(analysis, study_dir):
    rows = {r.run_id: r for r in analysis.runs}
    assert len(rows) == 8
    done = rows["exp-1"]
    assert (done.method, done.seed, done.status) == ("exp", 1, "done")
    assert done.finals["val_loss"] == FINALS["exp"][1][1]
    assert (study_dir / "report" / done.directory).resolve() == (study_dir / "runs" / "exp-1").resolve()
    assert done.log == f"{done.directory}log.jsonl"
    assert rows["baseline-3"].status == "failed" and rows["baseline-3"].finals["val_loss"] is None
    table = tables.runs_table(analysis)
    assert [str(row[0]) for row in table.rows] == [r.run_id for r in analysis.runs]
    assert all(isinstance(row[0], document.Link) and row[0].href.startswith("../runs/") for row in table.rows)


def test_methods_table_shows_resolved_differences_from_the_baseline(analysis):
    (baseline, exp) = analysis.config_diffs
    assert (baseline.method, baseline.changes) == ("baseline", ())
    assert exp.changes == (("noise", "none", EXP_SPEC),)
    rows = {row[0]: row[1] for row in tables.methods_table(analysis).rows}
    assert rows == {"baseline": "(the baseline)", "exp": f"noise: none → {EXP_SPEC}"}


def test_gradient_scale_is_the_baselines_median_norm_over_root_n(analysis):
    scale = analysis.gradient_scale(DATASET)
    logged = [GRAD_NORMS[(s // 50) % 3] for s in range(50, MAX_ITERS + 1, 50)] * 3
    assert scale.grad_norm == statistics.median(logged) and scale.points == len(logged)
    assert scale.rms == pytest.approx(statistics.median(logged) / math.sqrt(PARAMETERS))
    note = sentences.gradient_note(analysis, DATASET)
    assert f"RMS(g) = ‖g‖/√N = {scale.rms:.3g}" in note and "after clipping at 1" in note


def test_caveats_state_budget_runs_power_and_horizons(analysis):
    caveats = "\n".join(sentences.caveats(analysis))
    assert "A made-up study for the tests." in caveats
    assert "preset `tiny`" in caveats and "max_iters 600" in caveats
    assert "6 done, 1 diverged, 1 failed" in caveats
    assert "not evidence of no effect" in caveats
    assert "smallest two-sided Wilcoxon p is 0.25" in caveats
    assert f"at step {analysis.schedules[0].horizon} of {MAX_ITERS}" in caveats
    rows = {row[0]: row for row in tables.not_done_table(analysis.study).rows}
    assert set(rows) == {"baseline-3", "exp-3"}
    assert rows["baseline-3"][4:] == ["failed", "RuntimeError: out of memory"]
    assert rows["exp-3"][4:] == ["diverged", "loss is nan at step 12"]


# ---- the files ------------------------------------------------------------------------------


def test_report_files_exist(study_dir):
    report = study_dir / "report"
    for name in (
        "report.md",
        "index.html",
        "summary.csv",
        "comparison.csv",
        "speed_cost.csv",
        "runs.csv",
        "curves_shakespeare_char.png",
        "final_val_shakespeare_char.png",
        "gradients_shakespeare_char.png",
        "sigma_schedules.png",
        "overhead.png",
    ):
        assert (report / name).is_file(), name
    leftovers = [p.name for p in study_dir.iterdir() if p.name.startswith(".report")]
    assert leftovers == []


def test_pngs_are_valid_images(study_dir):
    for png in (study_dir / "report").glob("*.png"):
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_markdown_holds_what_the_rows_say(study_dir, analysis):
    """The rendered tables: numbers computed here, independently of the report's formatting."""
    markdown = (study_dir / "report" / "report.md").read_text()
    for method, per_seed in FINALS.items():
        val = [v + 0.001 for _, v in per_seed.values()]  # the full pass leads
        summary = analysis.summary(DATASET, method).summary("val_loss_full")
        cell = (
            f"{statistics.mean(val):.4f} ± {statistics.stdev(val):.4f} "
            f"[{summary.ci_low:.4f}, {summary.ci_high:.4f}]"
        )
        assert f"| {method} | 3 | {cell} |" in markdown
    p = student_t_p(VAL_T)
    assert "| exp | 3 | -0.0200 [" in markdown
    assert f"| {p:.3f} | {p:.3f} | 0.250 | 0.250 |" in markdown  # t p, Holm, Wilcoxon p, Holm
    assert markdown.count("Table 9") == 1 and "## Table 9\n" in markdown
    for table in (
        tables.published_table(analysis),
        tables.runs_table(analysis),
        tables.methods_table(analysis),
    ):
        assert render.table_markdown(table) in markdown
    assert "[exp-1](../runs/exp-1/)" in markdown and "{max_iters}" not in markdown
    caveats = markdown.split("## Caveats", 1)[1].split("\n## ", 1)[0]
    assert [line[2:] for line in caveats.strip().splitlines()] == sentences.caveats(analysis)
    assert "test loss" not in markdown  # no test split, so no test-loss column or comparison


def test_csvs_hold_the_rows(study_dir, analysis):
    report = study_dir / "report"
    with open(report / "summary.csv") as f:
        summary = {row["method"]: row for row in csv.DictReader(f)}
    assert summary["baseline"]["failed"] == "1" and summary["exp"]["diverged"] == "1"
    assert float(summary["exp"]["val_loss_mean"]) == pytest.approx((1.47 + 1.50 + 1.48) / 3)
    assert summary["exp"]["test_loss_full_n"] == "0"
    for row in summary.values():  # every statistic is a plain number (or empty when undefined)
        for column, value in row.items():
            if column.endswith(("_mean", "_sd", "_ci_low", "_ci_high")) and value:
                float(value)

    with open(report / "comparison.csv") as f:
        rows = {row["metric"]: row for row in csv.DictReader(f)}
    assert set(rows) == {r.metric for r in analysis.comparisons}
    assert float(rows["val_loss"]["mean_diff"]) == pytest.approx(-0.02)
    assert float(rows["val_loss"]["effect_size_dz"]) == pytest.approx(-2.0)
    assert rows["val_loss"]["seeds"] == "0 1 2"

    with open(report / "speed_cost.csv") as f:
        speed = {row["method"]: row for row in csv.DictReader(f)}
    for method in FINALS:
        row = analysis.speed(DATASET, method)
        assert int(speed[method]["reached"]) == row.reached
        assert float(speed[method]["steps_mean"]) == pytest.approx(row.steps.mean)
        assert float(speed[method]["seconds_mean"]) == pytest.approx(row.seconds.mean)
    assert float(speed["exp"]["overhead_percent"]) == pytest.approx(10.0)

    with open(report / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert [r["run_id"] for r in runs] == [r.run_id for r in analysis.runs]
    by_id = {r["run_id"]: r for r in runs}
    assert float(by_id["exp-2"]["val_loss"]) == FINALS["exp"][2][1]
    assert by_id["exp-2"]["log"] == "../runs/exp-2/log.jsonl" and by_id["exp-2"]["wall_s"] == "40.0"
    assert by_id["baseline-3"]["status"] == "failed" and by_id["baseline-3"]["val_loss"] == ""
    assert by_id["baseline-3"]["error"] == "RuntimeError: out of memory"


def test_html_is_self_contained_and_embeds_every_plot(study_dir):
    report = study_dir / "report"
    page = (report / "index.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    pngs = sorted(report.glob("*.png"))
    assert sorted(base64.b64decode(i) for i in images) == sorted(p.read_bytes() for p in pngs)
    outside_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    for reference in ("http:", "https:", "//", "<link", "<script src", "@import", "url("):
        assert reference not in outside_images.lower()
    assert outside_images.count("<script>") == 1  # the inline sorting script, nothing fetched
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert page.count('<div class="wide"><table>') == page.count("<table>") > 0  # tables scroll
    assert "A made-up study for the tests." in page
    assert '<a href="../runs/exp-1/">exp-1</a>' in page


def test_without_a_table_published_values_get_their_own_section(tmp_path):
    spec = {key: value for key, value in SPEC.items() if key != "table"}
    fill_store(tmp_path, spec)
    markdown = (write_report(tmp_path) / "report.md").read_text()
    assert "Table 9" not in markdown
    section = markdown.split("## Published values\n", 1)[1].split("\n## ", 1)[0]
    assert "| shakespeare_char | best val loss | 1.2500 | — |" in section


def test_rewriting_replaces_the_report(study_dir):
    (study_dir / "report" / "stale.txt").write_text("from an older report")
    assert write_report(study_dir) == study_dir / "report"
    assert not (study_dir / "report" / "stale.txt").exists()
    assert (study_dir / "report" / "report.md").is_file()


def test_missing_store_is_a_user_error_and_writes_nothing(tmp_path):
    with pytest.raises(UserError, match=r"study\.sqlite"):
        write_report(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_without_hypotheses_the_report_opens_with_the_best_supported_finding(study_dir):
    markdown = (study_dir / "report" / "report.md").read_text()
    first = markdown.split("\n## ")[1]
    assert first.startswith("The answer\n")
    # exp − baseline on the full pass: −0.02 per seed on average, t = VAL_T, one method: Holm = raw.
    p = student_t_p(VAL_T)
    word = "better" if p < 0.05 else "inconclusive"
    assert f"exp vs baseline: **{word}**, Δ = -0.020 nats/char" in first
    assert f"Holm over 1 method: p = {p:.3f}" in first
    assert "![final_val_shakespeare_char](final_val_shakespeare_char.png)" in first
    assert markdown.count("final_val_shakespeare_char.png") == 1  # not drawn twice
    html = (study_dir / "report" / "index.html").read_text()
    assert html.index("The answer") < html.index("<details") < html.index("Caveats")


def test_best_val_note_measures_the_estimate_against_the_full_pass(analysis, study_dir):
    # The fabricated runs' last estimate is the full pass − 0.001 on every run.
    note = sentences.best_val_note(analysis, DATASET)
    assert "read -0.001 nats/char against the full pass" in note and "6 runs" in note
    assert "selection bias is unmeasured" in note
    assert note in (study_dir / "report" / "report.md").read_text()  # beside the tables of best val

"""The report on a synthetic study filled through the real Store writer API."""

import base64
import csv
import math
import re
import statistics

import matplotlib.image
import pytest

from gradnoise import schedules
from gradnoise.errors import UserError
from gradnoise.lm.config import resolve_config
from gradnoise.study.report import write_report
from gradnoise.study.store import Store

MAX_ITERS = 600
EXP_SPEC = "exp:sigma0=0.01,gamma=0.99"
# Fabricated per-seed results: method → seed → (final train loss, final val loss).
FINALS = {
    "baseline": {0: (1.20, 1.50), 1: (1.22, 1.52), 2: (1.19, 1.49)},
    "exp": {0: (1.18, 1.47), 1: (1.21, 1.50), 2: (1.20, 1.48)},
}
STEP_TIME = {"baseline": 0.050, "exp": 0.055}
EVAL_STEPS = range(0, MAX_ITERS + 1, 100)


def val_curve(final: float, step: int) -> float:
    return final + (2.5 - final) * (1 - step / MAX_ITERS) ** 2


def fabricated_result(method: str, train: float, val: float) -> tuple[dict, list[dict]]:
    schedule = schedules.parse(EXP_SPEC) if method == "exp" else None
    curves = [
        {
            "kind": "train",
            "step": s,
            "loss": val_curve(val, s) + 0.05,
            "lr": 1e-3,
            "sigma": schedule(s) if schedule else 0.0,
            "time_s": s * STEP_TIME[method],
            "tokens_per_s": 15000.0,
        }
        for s in range(0, MAX_ITERS, 50)
    ] + [
        {
            "kind": "eval",
            "step": s,
            "train_loss": val_curve(train, s),
            "val_loss": val_curve(val, s),
            "time_s": s * STEP_TIME[method],
        }
        for s in EVAL_STEPS
    ]
    finals = {
        "steps": MAX_ITERS,
        "train_loss": train,
        "val_loss": val,
        "best_val_loss": val,
        "best_val_step": MAX_ITERS,
        "val_loss_full": val + 0.001,
        "test_loss_full": None,
        "train_bpc": train / math.log(2),
        "val_bpc": val / math.log(2),
        "best_val_bpc": val / math.log(2),
        "val_bpc_full": (val + 0.001) / math.log(2),
        "test_bpc_full": None,
        "wall_s": 40.0,
        "train_s": 30.0,
        "step_time_median_s": STEP_TIME[method],
        "tokens_per_s": 15000.0,
        "final_sigma": schedule(MAX_ITERS - 1) if schedule else 0.0,
    }
    result = {"status": "done", "error": None, "device": "cpu", "host": "test", "finals": finals}
    return result, curves


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """2 methods × 3 done seeds, plus seed 3: baseline failed, exp diverged."""
    directory = tmp_path_factory.mktemp("study")
    spec = {
        "name": "synthetic",
        "description": "two methods, three seeds",
        "preset": "tiny",
        "datasets": ["shakespeare_char"],
        "seeds": 4,
        "baseline": "baseline",
        "overrides": {"max_iters": MAX_ITERS},
        "methods": {"baseline": {}, "exp": {"noise": EXP_SPEC}},
        "caveats": ["A made-up study for the tests."],
    }
    with Store(directory / "study.sqlite") as store:
        store.create_study("synthetic", spec)
        for method, noise in (("baseline", "none"), ("exp", EXP_SPEC)):
            for seed in range(4):
                config = resolve_config(
                    "shakespeare_char", "tiny", {"max_iters": MAX_ITERS, "noise": noise, "seed": seed}
                ).to_dict()
                run_id = f"{method}-{seed}"
                store.add_runs([(run_id, "shakespeare_char", method, seed, config)])
                store.mark_running(run_id, "test", "cpu")
                if seed in FINALS[method]:
                    store.record_result(run_id, *fabricated_result(method, *FINALS[method][seed]))
                elif method == "baseline":
                    store.record_failure(run_id, "Traceback ...\nRuntimeError: out of memory")
                else:
                    result, curves = fabricated_result(method, 9.0, float("nan"))
                    result |= {"status": "diverged", "error": "loss is nan at step 12"}
                    store.record_result(run_id, result, curves[:2])
    write_report(directory)
    return directory


def table_row(markdown: str, first_cell: str, title_part: str) -> list[str]:
    """The cells of the row starting with `first_cell` in the table whose title has `title_part`."""
    table = markdown.split(title_part, 1)[1].split("\n\n", 2)[1]
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} under {title_part!r}")


def test_report_files_exist(study_dir):
    report = study_dir / "report"
    for name in (
        "report.md",
        "index.html",
        "summary.csv",
        "comparison.csv",
        "speed_cost.csv",
        "curves_shakespeare_char.png",
        "final_val_shakespeare_char.png",
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


def test_markdown_summary_has_n_and_means_of_done_runs_only(study_dir):
    markdown = (study_dir / "report" / "report.md").read_text()
    for method, per_seed in FINALS.items():
        row = table_row(markdown, method, "shakespeare_char: Final losses")
        assert row[1] == "3"  # the failed / diverged seed 3 is not counted
        train = [t for t, _ in per_seed.values()]
        val = [v for _, v in per_seed.values()]
        assert row[2].startswith(f"{sum(train) / 3:.4f} ± {statistics.stdev(train):.4f} [")
        assert row[3].startswith(f"{sum(val) / 3:.4f} ± {statistics.stdev(val):.4f} [")
    assert "test loss" not in markdown.split("shakespeare_char: Final losses", 1)[1].split("\n")[2]


def test_table_one_and_comparison_p_values(study_dir):
    markdown = (study_dir / "report" / "report.md").read_text()
    # exp − baseline val: -0.03, -0.02, -0.01 → mean -0.02, sd 0.01, t = -0.02 / (0.01/√3).
    t = -0.02 / (0.01 / math.sqrt(3))
    p = 2 * (0.5 + t / (2 * math.sqrt(2 + t * t)))  # Student t, 2 df, closed-form cdf
    val = [v for _, v in FINALS["exp"].values()]
    row = table_row(markdown, "shakespeare_char", "**Table 1 (")
    assert row[4] == f"{sum(val) / 3:.4f} ± {statistics.stdev(val):.4f} (p={p:.3f})"
    comparison = table_row(markdown, "exp", "shakespeare_char: final val loss vs baseline")
    assert comparison[1] == "3"
    assert comparison[2].startswith("-0.0200 [")
    assert comparison[4] == f"{p:.3f}" and comparison[5] == f"{p:.3f}"  # one comparison: Holm = p
    assert comparison[6] == "0.250"  # three same-sign differences: Wilcoxon's minimum, 2/2³


def test_csvs_hold_the_numbers(study_dir):
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
    assert set(rows) == {"train_loss", "val_loss", "best_val_loss"}
    assert float(rows["val_loss"]["mean_diff"]) == pytest.approx(-0.02)
    assert float(rows["val_loss"]["effect_size_dz"]) == pytest.approx(-2.0)
    assert rows["val_loss"]["seeds"] == "0 1 2"

    with open(report / "speed_cost.csv") as f:
        speed = {row["method"]: row for row in csv.DictReader(f)}
    target = sum(v for _, v in FINALS["baseline"].values()) / 3
    for method, per_seed in FINALS.items():
        first_steps = [
            next((s for s in EVAL_STEPS if val_curve(v, s) <= target), None) for _, v in per_seed.values()
        ]
        hits = [s for s in first_steps if s is not None]
        assert int(speed[method]["reached"]) == len(hits)
        assert float(speed[method]["steps_mean"]) == pytest.approx(sum(hits) / len(hits))
        assert float(speed[method]["seconds_mean"]) == pytest.approx(
            sum(hits) / len(hits) * STEP_TIME[method]
        )
    assert float(speed["exp"]["overhead_percent"]) == pytest.approx(10.0)


def test_caveats_are_stated(study_dir):
    markdown = (study_dir / "report" / "report.md").read_text()
    caveats = markdown.split("## Caveats", 1)[1].split("\n## ", 1)[0]
    assert "A made-up study for the tests." in caveats
    assert "preset `tiny`" in caveats and "max_iters 600" in caveats
    assert "6 done, 1 diverged, 1 failed" in caveats
    assert "not evidence of no effect" in caveats
    assert "smallest two-sided Wilcoxon p is 0.25" in caveats
    horizon = schedules.parse(EXP_SPEC).horizon(0.01)
    assert 0.01 * 0.99**horizon < 0.0001 <= 0.01 * 0.99 ** (horizon - 1)
    assert f"at step {horizon} of {MAX_ITERS}" in caveats
    runs = markdown.split("Runs not in the statistics", 1)[1]
    assert "baseline-3" in runs and "RuntimeError: out of memory" in runs
    assert "exp-3" in runs and "diverged" in runs


def test_html_is_self_contained_and_embeds_every_plot(study_dir):
    report = study_dir / "report"
    page = (report / "index.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    pngs = sorted(report.glob("*.png"))
    assert sorted(base64.b64decode(i) for i in images) == sorted(p.read_bytes() for p in pngs)
    outside_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    for reference in ("http:", "https:", "//cdn", "//", "<link", "<script"):
        assert reference not in outside_images.lower()
    assert "A made-up study for the tests." in page and "<table>" in page


def test_rewriting_replaces_the_report(study_dir):
    (study_dir / "report" / "stale.txt").write_text("from an older report")
    assert write_report(study_dir) == study_dir / "report"
    assert not (study_dir / "report" / "stale.txt").exists()
    assert (study_dir / "report" / "report.md").is_file()


def test_missing_store_is_a_user_error_and_writes_nothing(tmp_path):
    with pytest.raises(UserError, match=r"study\.sqlite"):
        write_report(tmp_path)
    assert list(tmp_path.iterdir()) == []

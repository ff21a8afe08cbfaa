"""The study layer on the MNIST task: a spec's task, the settings table, the proportion
statistics against hand-computed values, and a tiny Neelakantan-like study end to end."""

from __future__ import annotations

import json
import math

import pytest

from gradnoise.cli import main
from gradnoise.errors import UserError
from gradnoise.mnist import data
from gradnoise.study.layout import SettingsRow, parse_settings_table
from gradnoise.study.report import write_report
from gradnoise.study.report.settings import (
    SettingResult,
    answer_paragraphs,
    contrast_sentence,
    escapes_table,
    published_contrasts,
    settings_rows,
    side,
)
from gradnoise.study.spec import load_spec, parse_spec
from gradnoise.study.stats import clopper_pearson_interval, mcnemar_exact, wilson_interval
from gradnoise.study.store import STORE_FILE, Store
from gradnoise.study.tasks import MNIST
from helpers.mnist import md5s, write_mnist

NOISE = "neelakantan:eta=0.01,gamma=0.55"

# ---- statistics, against values computed by hand ----------------------------------------------

Z = 1.959963984540054  # Φ⁻¹(0.975)


def test_wilson_interval_matches_the_formula_worked_by_hand():
    # 0 of 10: the lower bound is 0 and the upper z²/(n + z²).
    none = wilson_interval(0, 10)
    assert none.low == 0.0 and none.high == pytest.approx(Z**2 / (10 + Z**2), abs=1e-12)
    assert none.high == pytest.approx(0.277533, abs=1e-6)
    # 5 of 10: centred on 1/2, half-width z/(1 + z²/10) · sqrt(0.025 + z²/400) = 0.263406.
    half = wilson_interval(5, 10)
    assert (half.low, half.high) == (pytest.approx(0.236594, abs=1e-6), pytest.approx(0.763406, abs=1e-6))
    assert math.isnan(wilson_interval(0, 0).low)


def test_clopper_pearson_interval_matches_the_closed_forms():
    # k = 0: upper = 1 − (α/2)^(1/n); k = n: lower = (α/2)^(1/n); 0.025^(1/10) = 0.691503.
    assert clopper_pearson_interval(0, 10).high == pytest.approx(1 - 0.025**0.1, abs=1e-9)
    assert clopper_pearson_interval(10, 10).low == pytest.approx(0.691503, abs=1e-6)
    assert clopper_pearson_interval(10, 10).high == 1.0
    # 5 of 10, the textbook value [0.1871, 0.8129].
    five = clopper_pearson_interval(5, 10)
    assert (five.low, five.high) == (pytest.approx(0.187086, abs=1e-6), pytest.approx(0.812914, abs=1e-6))


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (1, 9, 22 / 1024),  # 2 · (C(10,0) + C(10,1)) / 2^10
        (2, 8, 2 * (1 + 10 + 45) / 2**10),  # 112/1024
        (0, 10, 2 / 2**10),
        (3, 3, 1.0),  # 2 · 42/64 > 1: capped
        (0, 0, 1.0),  # no discordant pair
    ],
)
def test_mcnemar_exact_matches_the_binomial_tail_by_hand(b, c, p):
    concordant = [(True, True)] * 4 + [(False, False)] * 3  # carry no information
    pairs = [(True, False)] * b + [(False, True)] * c + concordant
    result = mcnemar_exact(pairs)
    assert (result.b, result.c) == (b, c)
    assert result.p == pytest.approx(p, abs=1e-15)


# ---- the spec's task and its settings table ----------------------------------------------------


def tiny_spec(**changes) -> dict:
    spec = {
        "name": "tiny-neelakantan",
        "task": "mnist",
        "datasets": ["mnist"],
        "seeds": 2,
        "baseline": "simple",
        "overrides": {"depth": 2, "width": 8, "batch_size": 16, "epochs": 2, "eval_every": 5},
        "methods": {
            "simple": {"init": "simple", "grad_clip": 0},
            "simple-noise": {"init": "simple", "grad_clip": 0, "noise": NOISE},
            "he": {"init": "he", "lr": 0.01},
            "he-noise": {"init": "he", "lr": 0.01, "noise": NOISE},
        },
        "settings_table": {
            "title": "Table 1",
            "source": "the paper",
            "metric": "test_acc",
            "trained_above": 0.2,
            "rows": [
                {
                    "label": "simple and he",
                    "without": ["simple", "he"],
                    "with": ["simple-noise", "he-noise"],
                    "published": {"without": [89.9, 43.1], "with": [96.7, 52.7]},
                }
            ],
        },
    }
    return {**spec, **changes}


def test_a_task_mnist_spec_expands_to_mnist_configs_and_an_lm_spec_is_unchanged():
    spec = parse_spec(tiny_spec())
    assert spec.task is MNIST and len(spec.runs) == 8
    assert {type(run.config).__name__ for run in spec.runs} == {"MnistConfig"}
    assert {run.config.depth for run in spec.runs} == {2}
    assert load_spec("quick").task.name == "lm"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task": "vision"}, "task='vision'; allowed: lm, mnist"),
        ({"datasets": ["shakespeare_char"]}, "unknown dataset 'shakespeare_char'; allowed: mnist_5k, mnist"),
        ({"preset": "tiny"}, "preset='tiny'; allowed: default"),
        ({"table": {"title": "T", "metrics": ["test_acc"]}}, "table: is not drawn for task mnist"),
        ({"hypotheses": {"metric": "test_acc"}}, "hypotheses: is not drawn for task mnist"),
        ({"methods": {"simple": {"init": "orthogonal"}}}, "init='orthogonal' is not allowed"),
    ],
)
def test_a_task_mnist_spec_refuses_what_its_task_lacks(change, message):
    data = tiny_spec(**change)
    if "methods" in change:
        data.pop("settings_table")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_spec(data)


def test_an_lm_spec_may_not_draw_a_settings_table():
    lm = {"name": "x", "datasets": ["shakespeare_char"], "methods": {"baseline": {}}}
    block = tiny_spec()["settings_table"]
    with pytest.raises(UserError, match="settings_table: is not drawn for task lm"):
        parse_spec({**lm, "settings_table": block})


@pytest.mark.parametrize(
    ("row_change", "message"),
    [
        ({"with": ["simple-noise"]}, "must pair one to one"),
        ({"without": ["nope"]}, "must be a list of methods"),
        ({"published": {"without": [1.0]}}, r"must be \[best, average\] in percent"),
    ],
)
def test_a_settings_table_row_is_checked(row_change, message):
    data = tiny_spec()
    data["settings_table"]["rows"][0].update(row_change)
    with pytest.raises(UserError, match=message):
        parse_settings_table(data)


def test_the_packaged_neelakantan_spec_is_the_papers_design():
    spec = load_spec("neelakantan")
    assert spec.task is MNIST and len(spec.runs) == 13 * 2 * 20
    table = spec.settings_table
    assert [row.published_without for row in table.rows][-1] == (11.4, 10.1)  # zero init
    assert len(table.rows) == 7 and table.rows[1].with_noise == ()  # the dropout row
    for run in spec.runs:  # the pilot's budget, the same in every setting
        assert (run.config.batch_size, run.config.epochs, run.config.total_steps()) == (32, 100, 12_500)
    by_method = {run.method: run.config for run in spec.runs if run.seed == 0}
    assert by_method["zero-clip10-noise-lr0.01"].noise == NOISE
    assert by_method["simple-noclip-dropout-lr0.1"].dropout == 0.5
    # A pair shares everything but the noise (so its seed fixes the same init and batches).
    pair = by_method["he-clip10-lr0.1"].replace(noise=NOISE)
    assert pair == by_method["he-clip10-noise-lr0.1"]


# ---- direction-aware verdicts, on a synthetic store --------------------------------------------


def synthetic_store(tmp_path, values: dict[str, list[float]], metric: str, trained_above: float):
    """A study of the tiny spec whose done runs have `metric` = values[method][seed]."""
    spec = tiny_spec()
    spec["settings_table"] = {**spec["settings_table"], "metric": metric, "trained_above": trained_above}
    parsed = parse_spec(spec)
    tmp_path.mkdir(parents=True, exist_ok=True)
    with Store(tmp_path / STORE_FILE) as store:
        store.create_study(parsed.name, spec)
        store.add_runs([(r.run_id, r.dataset, r.method, r.seed, r.config.to_dict()) for r in parsed.runs])
        for run in parsed.runs:
            finals = {"steps": 24, metric: values[run.method][run.seed]}
            store.record_result(run.run_id, {"status": "done", "finals": finals}, [])
    return spec


def test_accuracy_up_is_better_and_a_loss_down_is(tmp_path):
    # Without noise one run of four trains (he, seed 1), with noise three do; the pairs that
    # differ are simple's seeds 0 and 1, trained only with noise: b = 0, c = 2.
    accuracy = {"simple": [0.1, 0.1], "he": [0.1, 0.9], "simple-noise": [0.8, 0.6], "he-noise": [0.1, 0.96]}
    spec = synthetic_store(tmp_path / "acc", accuracy, "test_acc", 0.2)
    with Store(tmp_path / "acc" / STORE_FILE, readonly=True) as store:
        (row,) = settings_rows(store.runs(), store.finals(), parse_settings_table(spec), MNIST)
    assert row.without.best == 0.9 and row.with_noise.best == 0.96  # the highest
    assert (row.without.trained.k, row.with_noise.trained.k) == (1, 3)
    assert (row.paired.b, row.paired.c) == (0, 2)
    report = (write_report(tmp_path / "acc") / "report.md").read_text()
    assert "3 of 4 runs train with noise, 1 of 4 without" in report
    # best 90 → 96, average (0.1 + 0.1 + 0.1 + 0.9)/4 = 30 → (0.8 + 0.6 + 0.1 + 0.96)/4 = 61.5
    assert "| simple and he | 90.0 → 96.0 | 89.9 → 96.7 | 30.0 → 61.5 | 43.1 → 52.7 |" in report

    # The same numbers as a loss: lower is better, and a run "trains" below the threshold.
    loss = {method: [1 - v for v in seeds] for method, seeds in accuracy.items()}
    spec = synthetic_store(tmp_path / "loss", loss, "test_loss", 0.8)
    with Store(tmp_path / "loss" / STORE_FILE, readonly=True) as store:
        (row,) = settings_rows(store.runs(), store.finals(), parse_settings_table(spec), MNIST)
    assert row.without.best == pytest.approx(0.1) and row.with_noise.best == pytest.approx(0.04)  # lowest
    assert (row.without.trained.k, row.with_noise.trained.k) == (1, 3)


def test_noise_that_makes_every_run_train_is_reported_significant(tmp_path):
    # 2 seeds × 2 methods is too few for p < 0.05 (4 discordant pairs give p = 0.125): 0 → 4.
    accuracy = {"simple": [0.1, 0.1], "he": [0.1, 0.1], "simple-noise": [0.9, 0.9], "he-noise": [0.9, 0.9]}
    spec = synthetic_store(tmp_path, accuracy, "test_acc", 0.2)
    with Store(tmp_path / STORE_FILE, readonly=True) as store:
        (row,) = settings_rows(store.runs(), store.finals(), parse_settings_table(spec), MNIST)
    assert (row.paired.b, row.paired.c, row.paired.p) == (0, 4, 2 / 16)
    report = (write_report(tmp_path) / "report.md").read_text()
    assert "no detectable difference in how often runs train (McNemar exact p = 0.125)" in report
    assert "4/4 [51.0, 100.0]%" in report  # Wilson: 4/(4 + z²) = 0.5101


# ---- whether a published contrast holds, against hand-computed tests -------------------------


def setting(label, published, without, with_noise) -> SettingResult:
    """A one-learning-rate setting whose runs (seed s) have test accuracy without[s], with_noise[s]."""
    row = SettingsRow(label, ("plain",), ("noisy",), *published)
    finished = {("plain", s): {"status": "done", "test_acc": v} for s, v in enumerate(without)}
    finished |= {("noisy", s): {"status": "done", "test_acc": v} for s, v in enumerate(with_noise)}
    layout = parse_settings_table(tiny_spec())
    planned = {"plain": len(without), "noisy": len(with_noise)}
    sides = [
        side(methods, finished, planned, "test_acc", layout, MNIST)
        for methods in (row.without, row.with_noise)
    ]
    pairs = [
        (sides[0].trained_by_run[("plain", s)], sides[1].trained_by_run[("noisy", s)])
        for s in range(len(without))
    ]
    return SettingResult(row, sides[0], sides[1], mcnemar_exact(pairs))


def two_sided_t_p(diffs: list[float]) -> float:
    import scipy.stats

    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    return 2 * scipy.stats.t.sf(abs(mean / (sd / math.sqrt(n))), n - 1)


def test_a_published_gain_holds_only_where_the_paired_difference_is_significant():
    without = [0.1, 0.1, 0.5, 0.7, 0.6]
    # d = +0.3, +0.2, +0.2, +0.1, +0.2: mean 0.2, sd √(0.02/4), t = 6.32 on 4 df
    gains = setting("gains", ((90.0, 40.0), (95.0, 50.0)), without, [0.4, 0.3, 0.7, 0.8, 0.8])
    # d = +0.2, +0.1, +0.1, 0.0 (seed 4 untrained both ways): mean 0.1, t = 2.45 on 3 df
    unclear = setting("unclear", ((90.0, 40.0), (95.0, 50.0)), without[:4], [0.3, 0.2, 0.6, 0.7])
    found = published_contrasts([gains, unclear])
    p_gains = two_sided_t_p([0.3, 0.2, 0.2, 0.1, 0.2])
    p_unclear = two_sided_t_p([0.2, 0.1, 0.1, 0.0])
    assert p_gains < 0.01 < 0.05 < p_unclear  # 0.0032 and 0.092
    # Holm over the two: the smaller ×2, the larger ×1 (at least the smaller's)
    assert found[0].adjusted_p == pytest.approx(2 * p_gains) and found[1].adjusted_p == pytest.approx(
        p_unclear
    )
    assert [c.claim for c in found] == ["helps", "helps"]
    assert [c.verdict for c in found] == ["holds", "inconclusive"]
    assert found[0].difference.mean_diff == pytest.approx(0.2) and found[0].difference.n_pairs == 5
    sentence = contrast_sentence(found[0])
    assert "published, noise raises the average test accuracy (40.0% → 50.0%)" in sentence
    assert "here noise changes it by +20.0 points" in sentence and "the claim holds" in sentence
    lowered = setting("lowered", ((90.0, 40.0), (95.0, 50.0)), [0.4, 0.3, 0.7, 0.8, 0.8], without)
    assert published_contrasts([lowered])[0].verdict == "does not hold"


def test_a_published_gain_where_every_pair_is_unchanged_does_not_hold():
    # Zero init at chance with and without noise: every paired difference is 0, so no t-test
    # is defined; the claim "noise raises the average" is contradicted by every pair.
    stuck = setting("stuck", ((11.4, 10.1), (94.5, 49.7)), [0.1] * 4, [0.1] * 4)
    (contrast,) = published_contrasts([stuck])
    assert contrast.verdict == "does not hold" and math.isnan(contrast.adjusted_p)
    (paragraph,) = answer_paragraphs([stuck])
    assert "every one of its 4 seed pairs has the same accuracy with noise as without" in paragraph
    assert "0 of 4 runs train with noise, 0 of 4 without" in paragraph


def test_the_escapes_table_counts_runs_that_left_chance_diverged_ones_included():
    finals = [
        {"method": "noisy", "status": "done", "escape_step": 500},
        {"method": "plain", "status": "done", "escape_step": None},
        {"method": "noisy", "status": "diverged", "escape_step": 300},  # left chance, then diverged
        {"method": "noisy", "status": "done", "escape_step": None},
        {"method": "noisy", "status": "done", "escape_step": 1000},
        {"method": "plain", "status": "done", "escape_step": None},
    ]
    table = escapes_table(finals)
    # noisy: 3 of 4 left, at 300, 500, 1000 (median 500); plain: none of 2
    assert table.rows == [["noisy", "3/4", "500", "300–1000"], ["plain", "0/2", "—", "—"]]


def plus(values: list[float], shifts: list[float]) -> list[float]:
    return [v + d for v, d in zip(values, shifts, strict=True)]


def test_a_published_no_change_needs_equivalence_within_one_point():
    base = [0.90, 0.91, 0.92, 0.93, 0.94, 0.95]
    tiny = [0.001, -0.002, 0.0, 0.002, -0.001, 0.001]  # |mean| ≈ 0.0002, sd 0.0015: inside ±0.01
    same = setting("same", ((97.4, 92.1), (97.5, 92.2)), base, plus(base, tiny))
    shifted = [0.05, 0.06, 0.04, 0.05, 0.05, 0.06]  # every pair ≥ 4 points better: beyond ±1
    moved = setting("moved", ((97.4, 92.1), (97.5, 92.2)), base, plus(base, shifted))
    spread = [0.03, -0.03, 0.02, -0.02, 0.01, 0.0]  # mean 0.0017, sd 0.022: CI crosses ±0.01
    unsure = setting("unsure", ((97.4, 92.1), (97.5, 92.2)), base, plus(base, spread))
    found = published_contrasts([same, moved, unsure])
    assert [c.claim for c in found] == ["changes little"] * 3
    assert [c.verdict for c in found] == ["holds", "does not hold", "inconclusive"]
    assert found[0].equivalence.p < 0.05 / 3 and "equivalent within ±1 point" in contrast_sentence(found[0])


# ---- end to end ----------------------------------------------------------------------------------


@pytest.fixture
def small_mnist(tmp_path):
    write_mnist(tmp_path / "idx", train=200, test=50)
    data.prepare(str(tmp_path / "idx"), expected_md5=md5s(tmp_path / "idx"))


def test_a_tiny_neelakantan_study_runs_reports_and_verifies(tmp_path, small_mnist, capsys):
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(json.dumps(tiny_spec()))
    study_dir = tmp_path / "study"
    assert main(["study", "run", str(spec_path), "--dir", str(study_dir), "--report", "--no-progress"]) == 0
    with Store(study_dir / STORE_FILE, readonly=True) as store:
        runs = store.runs()
    assert [r["status"] for r in runs] == ["done"] * 8
    assert all(r["code_sha256"] and r["replicas"] == 4 for r in runs)  # two groups of 4 (one per lr)
    result = json.loads((study_dir / "runs" / runs[0]["id"] / "result.json").read_text())
    assert result["provenance"]["attempts"] == 1 and result["provenance"]["consistent"] is True
    report = (study_dir / "report" / "report.md").read_text()
    assert "| simple and he |" in report and "Runs made by code: " in report
    assert (study_dir / "report" / "strip.png").is_file()
    capsys.readouterr()
    assert main(["study", "status", str(study_dir)]) == 0
    assert "8 done" in capsys.readouterr().out
    assert main(["study", "verify", str(study_dir), "--runs", "2"]) == 0
    assert "all 2 run(s) agree" in capsys.readouterr().out


# ---- the LM report's words follow the metric's direction ----------------------------------------


def test_the_reports_verdict_words_follow_the_metrics_direction():
    from gradnoise.study.report import verdict
    from gradnoise.study.report.metrics import improvement_sign, improves, metric
    from gradnoise.study.report.sentences import _closest
    from gradnoise.study.stats import paired_comparison

    # Five seeds, the method 0.05 above the control on every one (± a little): Δ ≈ +0.05.
    up = paired_comparison({s: 0.5 + 0.05 + 0.001 * s for s in range(5)}, {s: 0.5 for s in range(5)})
    assert up.mean_diff > 0 and up.t_p < 0.05
    assert (metric("test_acc").better, metric("val_loss_full").better) == ("higher", "lower")
    assert (improvement_sign("test_acc"), improvement_sign("val_loss")) == (1, -1)
    assert improves("best_test_acc", up.mean_diff) and not improves("test_loss_full", up.mean_diff)
    # An accuracy that went up is better; a loss that went up is worse.
    assert verdict._finding_cells(up, 0.001, 0.05, "test_acc")[-1] == "better"
    assert verdict._finding_cells(up, 0.001, 0.05, "val_loss_full")[-1] == "worse"

    class Row:
        comparison, t_p_holm, method = up, 0.2, "noise"

    assert _closest([Row()], "level", lambda r: r.method, improvement_sign("test_acc")).endswith("at noise")
    assert _closest([Row()], "level", lambda r: r.method) == "every level's mean is above the baseline's"


def test_a_killed_mnist_group_resumes_exactly(tmp_path, small_mnist):
    import os
    import signal
    import time
    from concurrent.futures import ThreadPoolExecutor

    from gradnoise.study.plan import group_directory, plan_groups
    from gradnoise.study.runner import run_study
    from helpers.studies import processes_with

    long = {"depth": 4, "width": 16, "batch_size": 16, "epochs": 50}
    long |= {"eval_every": 60, "checkpoint_every": 120}  # 600 steps: a checkpoint to kill after
    data = tiny_spec(seeds=1, overrides=long)
    data["methods"] = {"simple": data["methods"]["simple"], "simple-noise": data["methods"]["simple-noise"]}
    data["settings_table"]["rows"][0].update(without=["simple"], **{"with": ["simple-noise"]})
    spec = parse_spec(data)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    (group,) = plan_groups(list(spec.runs), list(spec.runs), killed, batch_models=40)
    group_dir = group_directory(killed, group.group_id)

    with ThreadPoolExecutor(1) as pool:  # the driver, in this process
        driver = pool.submit(run_study, spec, killed, progress=False)
        while not (group_dir / "checkpoints" / "LATEST").exists():
            assert not driver.done(), "the group ended before a checkpoint could be killed"
            time.sleep(0.02)
        (pid,) = processes_with("--group", str(group_dir))
        os.kill(pid, signal.SIGKILL)
        assert driver.result(timeout=120)["failed"] == 2
    assert run_study(spec, killed, progress=False)["done"] == 2
    assert run_study(spec, whole, progress=False)["done"] == 2
    finals = []
    for directory in (killed, whole):
        with Store(directory / STORE_FILE, readonly=True) as store:
            finals.append({row["id"]: (row["test_acc"], row["test_loss"]) for row in store.finals()})
            attempts = [row["attempts"] for row in store.runs()]
        assert attempts == ([2, 2] if directory == killed else [1, 1])
    assert finals[0] == finals[1]  # resumed exactly, not restarted


def test_study_run_set_values_are_typed_as_the_specs_task(tmp_path, capsys):
    from gradnoise.study.spec import spec_task
    from gradnoise.study.tasks import LM

    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(json.dumps(tiny_spec()))
    assert spec_task(spec_path) is MNIST and spec_task("quick") is LM
    assert MNIST.parse_set(["epochs=1", "lr=0.5"]) == {"epochs": 1, "lr": 0.5}
    assert LM.parse_set(["max_iters=5"]) == {"max_iters": 5}
    study_dir = tmp_path / "study"
    assert main(["study", "run", str(spec_path), "--dir", str(study_dir), "--set", "max_iters=5"]) == 2
    assert "'max_iters=5' is not KEY=VALUE with a known key" in capsys.readouterr().err
    assert not study_dir.exists()  # nothing written
    assert load_spec(spec_path, MNIST.parse_set(["epochs=1"])).runs[0].config.epochs == 1


def test_mnist_runs_alone_are_groups_of_one_in_their_own_directories(tmp_path, small_mnist):
    from gradnoise.study.runner import run_study

    data = tiny_spec(seeds=1)
    data["methods"] = {"simple": data["methods"]["simple"], "he": data["methods"]["he"]}
    data["settings_table"]["rows"][0].update(without=["simple", "he"], **{"with": []})
    data["settings_table"]["rows"][0].pop("published")
    summary = run_study(parse_spec(data), tmp_path / "study", batch_models=1, progress=False)
    assert (summary["done"], summary["ran"]) == (2, 2)
    assert not (tmp_path / "study" / "groups").exists()
    with Store(tmp_path / "study" / STORE_FILE, readonly=True) as store:
        runs = store.runs()
    assert [r["replicas"] for r in runs] == [1, 1]
    for run in runs:
        group = json.loads((tmp_path / "study" / "runs" / run["id"] / "group.json").read_text())
        assert [member["run_dir"] for member in group["runs"]] == ["."]

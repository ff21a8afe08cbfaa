"""Every spec key that names a metric or a method names one the study can produce, two
methods never compute the same thing, and what the runs could not give is said in the
report instead of a section or a family member silently missing."""

from pathlib import Path

import pytest

from gradnoise.errors import UserError
from gradnoise.lm.config import resolve_config
from gradnoise.study.report import write_report
from gradnoise.study.spec import load_spec, packaged_specs, parse_spec
from gradnoise.study.store import Store

DATASET = "shakespeare_char"
METHODS = {
    "baseline": {},
    "abs-1e-3": {"noise": "const:sigma=1e-3"},
    "rel-1": {"noise": "relative:const:sigma=1.0"},
    "dropout-0.1": {"dropout": 0.1},
}


def spec(**changes) -> dict:
    return {
        "name": "unit",
        "preset": "tiny",
        "datasets": [DATASET],
        "seeds": 2,
        "overrides": {"max_iters": 100},
        "methods": dict(METHODS),
        **changes,
    }


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"findings": {"metrics": ["steps"]}}, "findings.metrics names 'steps'"),
        ({"findings": {"metrics": ["best_val_step"]}}, "findings.metrics names 'best_val_step'"),
        ({"dose_response": {"methods": ["abs-1e-3"], "metrics": ["tokens_per_s"]}}, "'tokens_per_s'"),
        (
            {
                "findings": {"metrics": ["val_loss_full"]},
                "overrides": {"max_iters": 100, "final_eval": False},
            },
            "val_loss_full, which only the final pass computes",
        ),
        ({"findings": {"metrics": ["test_loss_full"]}}, "shakespeare_char has no test split"),
        ({"table": {"title": "T", "metrics": ["test_bpc_full"]}}, "shakespeare_char has no test split"),
        (
            {"dose_response": {"methods": ["abs-1e-3", "dropout-0.1"]}},
            "'dropout-0.1', which adds no gradient",
        ),
    ],
)
def test_report_keys_name_only_what_the_study_produces(changes, expected):
    with pytest.raises(UserError) as error:
        parse_spec(spec(**changes))
    assert expected in str(error.value)


@pytest.mark.parametrize(
    "first, second",
    [
        ({"noise": "relative:const:sigma=1.0"}, {"noise": "const:sigma=1.0", "noise_mode": "relative"}),
        ({}, {"noise": "const:sigma=0"}),
        ({}, {"noise": "linear:sigma0=0.0,total_steps=100", "noise_correlation": "anticorrelated"}),
        (
            {"noise": "const:sigma=0.01", "grad_clip": 0.0},
            {"noise": "const:sigma=0.01", "grad_clip": 0.0, "noise_placement": "before_clip"},
        ),
    ],
)
def test_two_methods_that_compute_the_same_are_refused_by_name(first, second):
    methods = {"baseline": {"max_iters": 100}, "a": first, "b": second}
    if not first:
        methods = {"baseline": {}, "b": second}
    with pytest.raises(UserError) as error:
        parse_spec(spec(methods=methods))
    named = ("a", "b") if first else ("baseline", "b")
    assert all(f"'{name}'" in str(error.value) for name in named), str(error.value)
    assert "compute the same" in str(error.value)


def test_absolute_and_relative_noise_at_one_level_are_two_computations():
    methods = {
        "baseline": {},
        "abs": {"noise": "const:sigma=1.0"},
        "rel": {"noise": "relative:const:sigma=1.0"},
    }
    assert len(parse_spec(spec(methods=methods)).runs) == 6


def test_the_committed_specs_still_parse():
    root = Path(__file__).parent.parent
    paths = [*packaged_specs().values(), *sorted(root.glob("results/*/spec.yaml"))]
    assert len(paths) >= 9
    for path in paths:
        assert load_spec(path).runs


def test_the_report_says_which_compared_methods_have_no_done_runs(tmp_path):
    """The reference's runs all diverged, one noise level has no done run: the report says so."""
    layout = spec(
        dose_response={"methods": ["abs-1e-3", "rel-1"]},
        findings={"reference": "dropout-0.1", "metrics": ["val_loss_full"]},
    )
    ended = {"dropout-0.1": "diverged", "rel-1": "diverged"}
    with Store(tmp_path / "study.sqlite") as store:
        store.create_study(layout["name"], layout)
        for method, overrides in METHODS.items():
            for seed in (0, 1, 2):
                config = resolve_config(DATASET, "tiny", {"max_iters": 100, **overrides, "seed": seed})
                run_id = f"{method}-{seed}"
                store.add_runs([(run_id, DATASET, method, seed, config.to_dict())])
                status = ended.get(method, "done")
                value = 2.5 - 0.01 * seed - (0.05 if method != "baseline" else 0.0)
                finals = {"steps": 100, "parameters": 1000, "val_loss_full": value, "best_val_loss": value}
                curve = [{"kind": "train", "step": 10, "loss": 2.0, "sigma": 1e-3, "grad_norm": 1.0}]
                store.record_result(run_id, {"status": status, "error": None, "finals": finals}, curve)
    report = (write_report(tmp_path) / "report.md").read_text()
    assert (
        "No comparison with dropout-0.1 on shakespeare_char: none of its runs is done (3 runs: 3 diverged)"
        in (report)
    )
    assert "left out of the noise levels' family" in report and "rel-1 (3 runs: 3 diverged)" in report


def test_a_set_that_skips_the_final_pass_is_accepted_and_the_report_says_so(tmp_path):
    """`--set final_eval=false` (a quick look) is the user's choice over a spec's findings."""
    assert load_spec("quick", {"final_eval": False}).runs
    layout = spec(findings={"metrics": ["val_loss_full", "best_val_loss"]}, set={"final_eval": False})
    parse_spec(layout)
    with Store(tmp_path / "study.sqlite") as store:
        store.create_study(layout["name"], layout)
        for method in ("baseline", "abs-1e-3"):
            for seed in (0, 1, 2):
                values = {"max_iters": 100, **METHODS[method], "final_eval": False, "seed": seed}
                config = resolve_config(DATASET, "tiny", values)
                store.add_runs([(f"{method}-{seed}", DATASET, method, seed, config.to_dict())])
                best = 2.5 - 0.01 * seed - (0.05 + 0.01 * seed if method != "baseline" else 0.0)
                finals = {"steps": 100, "parameters": 1000, "best_val_loss": best}
                curve = [{"kind": "train", "step": 10, "loss": 2.0, "sigma": 1e-3, "grad_norm": 1.0}]
                store.record_result(f"{method}-{seed}", {"status": "done", "finals": finals}, curve)
    report = (write_report(tmp_path) / "report.md").read_text()
    assert "final val loss, full pass: no done run on shakespeare_char has it" in report
    assert "shakespeare_char: best val loss, each method paired on seeds" in report

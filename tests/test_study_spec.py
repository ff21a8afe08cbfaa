"""Study specs: expansion to runs, stable run ids, and every validation error."""

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from gradnoise import schedules
from gradnoise.errors import UserError
from gradnoise.lm.config import CHOICES, TrainConfig, resolve_config
from gradnoise.lm.data import corpora
from gradnoise.lm.model.gpt import GPT
from gradnoise.study.layout import DoseLayout, Published
from gradnoise.study.spec import load_spec, packaged_specs, parse_spec, run_id, runs_differ


def base_spec(**changes) -> dict:
    spec = {
        "name": "unit",
        "preset": "tiny",
        "datasets": ["shakespeare_char"],
        "seeds": 2,
        "methods": {"baseline": {}, "exp": {"noise": "exp:sigma0=0.01,gamma=0.99"}},
    }
    return {**spec, **changes}


def write(tmp_path, text: str):
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# ---- expansion -------------------------------------------------------------------------


def test_expands_dataset_by_method_by_seed_in_order():
    spec = parse_spec(
        base_spec(
            datasets=["shakespeare_char", "enwik8"],
            seeds=[3, 7],
            dataset_overrides={"enwik8": {"seeds": 1}},
        )
    )
    got = [(r.dataset, r.method, r.seed) for r in spec.runs]
    assert got == [
        ("shakespeare_char", "baseline", 3),
        ("shakespeare_char", "exp", 3),
        ("shakespeare_char", "baseline", 7),
        ("shakespeare_char", "exp", 7),
        ("enwik8", "baseline", 0),
        ("enwik8", "exp", 0),
    ]
    for run in spec.runs:
        assert (run.config.dataset, run.config.seed) == (run.dataset, run.seed)
    assert len({r.run_id for r in spec.runs}) == len(spec.runs)


def test_config_layers_apply_in_order_preset_overrides_dataset_method_set():
    spec = parse_spec(
        base_spec(
            seeds=1,
            overrides={"max_iters": 30, "eval_interval": 7, "dropout": 0.1, "lr": 0.002},
            dataset_overrides={"shakespeare_char": {"max_iters": 40, "dropout": 0.2}},
            methods={"baseline": {}, "m": {"dropout": 0.3, "eval_interval": 9}},
            set={"eval_interval": 11},
        )
    )
    baseline, method = spec.runs
    tiny = resolve_config("shakespeare_char", "tiny")
    assert baseline.config.n_layer == tiny.n_layer  # from the preset
    assert baseline.config.lr == method.config.lr == 0.002  # overrides
    assert baseline.config.max_iters == method.config.max_iters == 40  # dataset beats overrides
    assert (baseline.config.dropout, method.config.dropout) == (0.2, 0.3)  # method beats dataset
    assert baseline.config.eval_interval == method.config.eval_interval == 11  # set beats all


def test_placeholders_take_the_runs_resolved_values():
    spec = parse_spec(
        base_spec(
            datasets=["shakespeare_char", "enwik8"],
            seeds=1,
            dataset_overrides={"enwik8": {"max_iters": 77}},
            overrides={"max_iters": 55},
            methods={"baseline": {}, "lin": {"noise": "linear:sigma0=0.01,total_steps={max_iters}"}},
        )
    )
    lines = {r.dataset: schedules.parse(r.config.noise) for r in spec.runs if r.method == "lin"}
    assert lines["shakespeare_char"] == schedules.Linear(sigma0=0.01, total_steps=55)
    assert lines["enwik8"] == schedules.Linear(sigma0=0.01, total_steps=77)


def test_load_spec_set_values_are_kept_in_the_stored_spec(tmp_path):
    path = write(tmp_path, yaml.safe_dump(base_spec()))
    spec = load_spec(path, {"max_iters": 5})
    assert spec.data["set"] == {"max_iters": 5}
    assert all(r.config.max_iters == 5 for r in spec.runs)


# ---- run ids ---------------------------------------------------------------------------


def test_run_id_is_sha256_of_canonical_config_without_device():
    config = resolve_config("shakespeare_char", "tiny", {"seed": 4, "device": "cpu"})
    values = dataclasses.asdict(config)
    del values["device"]
    # At the values that compute what every run did before these keys existed.
    for key in ("train_fraction", "noise_correlation", "embedding_noise_alpha"):
        del values[key]
    expected = hashlib.sha256(json.dumps(values, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[
        :12
    ]
    assert run_id(config) == expected
    assert run_id(config.replace(device="cuda:1")) == expected
    assert run_id(config.replace(train_fraction=0.5)) != expected
    assert run_id(config.replace(noise_correlation="anticorrelated")) != expected
    assert run_id(config.replace(embedding_noise_alpha=5.0)) != expected


def test_run_ids_stable_across_processes():
    here = [r.run_id for r in load_spec("quick").runs]
    code = "from gradnoise.study.spec import load_spec; print(*[r.run_id for r in load_spec('quick').runs])"
    there = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    ).stdout.split()
    assert there == here


def _another_value(name: str, value):
    """A different valid value for config field `name`."""
    if name in CHOICES:
        return next(c for c in CHOICES[name] if c != value)
    if name == "noise":
        return "const:sigma=0.1"
    if name == "lr_decay_iters" and value is None:
        return 100
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value * 2 if value else 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    raise AssertionError(f"no alternative for {name}={value!r}")


def test_run_id_changes_when_any_config_value_changes():
    config = resolve_config("shakespeare_char", "tiny")
    reference = run_id(config)
    fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "device"]
    for name in fields:
        changed = config.replace(**{name: _another_value(name, getattr(config, name))})
        assert run_id(changed) != reference, name


# ---- validation: each error is a UserError naming what is allowed -----------------------


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"colour": "red"}, ["colour", "methods", "dataset_overrides"]),
        ({"datasets": ["shakespeare", "enwik8"]}, ["shakespeare", "shakespeare_char", "text8"]),
        ({"datasets": []}, ["datasets"]),
        ({"preset": "huge"}, ["huge", "tiny", "paper"]),
        ({"name": "has space"}, ["name"]),
        ({"seeds": 0}, ["seeds", "≥ 1"]),
        ({"seeds": [1, 1]}, ["seed twice"]),
        ({"seeds": [-1]}, ["seeds"]),
        ({"baseline": "control"}, ["control", "baseline", "exp"]),
        ({"methods": {}}, ["methods", "baseline"]),
        ({"methods": {"baseline": {}, "x": {"learning_rate": 1}}}, ["learning_rate", "allowed keys", "lr"]),
        ({"methods": {"baseline": {}, "x": {"dropout": 1.5}}}, ["dropout=1.5", "[0, 1)"]),
        ({"methods": {"baseline": {}, "x": {"noise": "wiggle:a=1"}}}, ["wiggle", "exp", "neelakantan"]),
        ({"methods": {"baseline": {}, "x": {"noise": "exp:sigma0=0.1"}}}, ["missing gamma"]),
        ({"methods": {"baseline": {}, "x": {"noise": "exp:sigma0=0.1,gamma=1.5"}}}, ["gamma", "(0, 1]"]),
        (
            {"methods": {"baseline": {}, "x": {"noise": "linear:sigma0=0.1,total_steps={iters}"}}},
            ["{iters}", "max_iters"],
        ),
        ({"methods": {"baseline": {}, "x": {"seed": 3}}}, ["'seed'", "seeds"]),
        ({"methods": {"baseline": {}, "bad name!": {}}}, ["bad name!"]),
        ({"methods": {"baseline": {}, "x": 3}}, ["methods.x", "mapping"]),
        ({"overrides": {"dataset": "enwik8"}}, ["'dataset'", "datasets"]),
        ({"overrides": {"max_iter": 3}}, ["max_iter", "max_iters"]),
        ({"dataset_overrides": {"enwik8": {"max_iters": 3}}}, ["enwik8", "not in datasets"]),
        ({"dataset_overrides": {"shakespeare_char": {"seeds": "three"}}}, ["seeds", "three"]),
        ({"caveats": "one"}, ["caveats", "list of strings"]),
    ],
)
def test_bad_specs_raise_user_error_naming_what_is_allowed(changes, words):
    with pytest.raises(UserError) as caught:
        parse_spec(base_spec(**changes))
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


PUBLISHED = {"source": "a paper", "values": {"shakespeare_char": {"val_loss": 1.47}}}
TABLE = {"title": "Table 1", "metrics": ["train_loss", "val_loss"]}


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"published": [1.47]}, ["published", "mapping"]),
        ({"published": {**PUBLISHED, "year": 2020}}, ["year", "source", "values", "how"]),
        ({"published": {**PUBLISHED, "source": ""}}, ["published.source", "where the values come from"]),
        ({"published": {**PUBLISHED, "method": "exp2"}}, ["exp2", "baseline, exp"]),
        ({"published": {"source": "a paper", "values": {}}}, ["published.values is empty"]),
        (
            {"published": {"source": "x", "values": {"enwik8": {"val_loss": 1.0}}}},
            ["'enwik8'", "not in datasets", "shakespeare_char"],
        ),
        (
            {"published": {"source": "x", "values": {"shakespeare_char": {"val_los": 1.0}}}},
            ["val_los", "best_val_loss", "train_loss"],
        ),
        (
            {"published": {"source": "x", "values": {"shakespeare_char": {"val_loss": "1.4"}}}},
            ["val_loss='1.4'", "finite number"],
        ),
        (
            {"published": {"source": "x", "values": {"shakespeare_char": {"val_loss": float("nan")}}}},
            ["finite number"],
        ),
        ({"published": {**PUBLISHED, "how": {"train_loss": "in train mode"}}}, ["train_loss", "val_loss"]),
        ({"published": {**PUBLISHED, "how": {"val_loss": 3}}}, ["how.val_loss=3", "string"]),
        ({"table": {"metrics": ["val_loss"]}}, ["table.title", "required"]),
        ({"table": {**TABLE, "rows": "datasets"}}, ["rows", "title", "caption", "metrics", "labels"]),
        ({"table": {**TABLE, "metrics": []}}, ["table.metrics", "non-empty list"]),
        ({"table": {**TABLE, "metrics": ["val_loss", "val_loss"]}}, ["val_loss", "twice"]),
        ({"table": {**TABLE, "metrics": ["val_bpb"]}}, ["val_bpb", "val_bpc"]),
        ({"table": {**TABLE, "labels": {"best_val_loss": "best"}}}, ["best_val_loss", "not in metrics"]),
        ({"table": {**TABLE, "labels": {"val_loss": ""}}}, ["labels.val_loss", "non-empty string"]),
        ({"dose_response": {"methods": []}}, ["dose_response.methods=[]", "non-empty list"]),
        ({"dose_response": {"methods": ["exp2"]}}, ["exp2", "not one of the methods", "exp"]),
        ({"dose_response": {"methods": ["baseline"]}}, ["'baseline'", "compared with baseline"]),
        ({"dose_response": {"methods": ["exp", "exp"]}}, ["twice"]),
        ({"dose_response": {"methods": ["exp"], "metrics": ["val_los"]}}, ["val_los", "val_loss_full"]),
        ({"dose_response": {"methods": ["exp"], "references": ["exp"]}}, ["exp", "both"]),
        ({"dose_response": {"methods": ["exp"], "levels": [1]}}, ["levels", "methods", "references"]),
    ],
)
def test_bad_report_keys_raise_user_error_naming_what_is_allowed(changes, words):
    with pytest.raises(UserError) as caught:
        parse_spec(base_spec(**changes))
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


def test_report_keys_are_parsed_and_do_not_change_the_runs():
    plain = parse_spec(base_spec())
    spec = parse_spec(
        base_spec(
            published={**PUBLISHED, "how": {"val_loss": "the last eval"}},
            table={**TABLE, "caption": "its layout", "labels": {"val_loss": "val"}},
            dose_response={"methods": ["exp"]},
            caveats=["another"],
        )
    )
    assert spec.dose_response == DoseLayout(("exp",), ("val_loss_full", "best_val_loss"), ())
    assert (plain.published, plain.table, plain.dose_response) == (None, None, None)
    assert spec.published == Published(
        "a paper", "baseline", PUBLISHED["values"], {"val_loss": "the last eval"}
    )
    assert spec.table.metrics == ("train_loss", "val_loss")
    assert (spec.table.label("val_loss"), spec.table.label("train_loss")) == ("val", "train_loss")
    assert spec.runs == plain.runs
    assert not runs_differ(plain.data, spec.data)
    assert runs_differ(plain.data, base_spec(seeds=3))
    assert runs_differ(plain.data, base_spec(baseline="exp"))


def test_methods_resolving_to_the_same_config_are_rejected():
    methods = {"baseline": {}, "also-baseline": {"dropout": 0.0}}  # tiny's dropout is already 0
    with pytest.raises(UserError, match=r"'baseline' and 'also-baseline'.*same run"):
        parse_spec(base_spec(methods=methods))


def test_duplicate_method_names_in_yaml_are_rejected(tmp_path):
    path = write(
        tmp_path,
        """\
        name: dup
        datasets: [shakespeare_char]
        methods:
          baseline: {}
          exp: {noise: "exp:sigma0=0.01,gamma=0.99"}
          exp: {noise: "exp:sigma0=0.1,gamma=0.99"}
        """,
    )
    with pytest.raises(UserError, match=r"duplicate key 'exp'.*\n.*line 6"):
        load_spec(path)


def test_spec_that_is_not_yaml_or_not_a_mapping(tmp_path):
    with pytest.raises(UserError, match="not valid YAML"):
        load_spec(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(UserError, match="must be a mapping"):
        load_spec(write(tmp_path, "- a\n- b\n"))


def test_unknown_spec_name_lists_the_packaged_ones():
    with pytest.raises(UserError) as caught:
        load_spec("quik")
    assert all(name in str(caught.value) for name in ("quick", "paper", "paper-small"))


# ---- the packaged specs ------------------------------------------------------------------


def tiny_gradient_rms_bound() -> float:
    """RMS(g) = ‖g‖/√N of the tiny model's gradient clipped at ‖g‖ ≤ 1."""
    cfg = resolve_config("shakespeare_char", "tiny")
    model = GPT(cfg.model_config(corpora.load("shakespeare_char").vocab_size))
    return cfg.grad_clip / math.sqrt(sum(p.numel() for p in model.parameters()))


def noise_levels(spec) -> dict[str, tuple[bool, float, str]]:
    """method → (relative, σ0 or r0, the inner schedule's kind) of its noise."""
    levels = {}
    for run in spec.runs:
        schedule = schedules.parse(run.config.noise)
        if schedule is not None:
            relative = isinstance(schedule, schedules.Relative)
            inner = schedule.inner if relative else schedule
            levels[run.method] = (relative, inner(0), type(inner).__name__)
    return levels


def test_packaged_specs_are_valid_and_shaped_as_issue_4_says():
    assert set(packaged_specs()) == {
        "quick",
        "paper",
        "paper-small",
        "sweep",
        "placements",
        "confirm",
        "transfer",
        "neelakantan",
    }
    quick, paper, small = (load_spec(n) for n in ("quick", "paper", "paper-small"))
    for spec in (quick, paper, small):
        assert spec.caveats and spec.description and spec.baseline in spec.methods

    assert (quick.preset, quick.datasets) == ("tiny", ("shakespeare_char",))
    assert {r.seed for r in quick.runs} == {0, 1, 2}
    levels = noise_levels(quick)
    assert {"Exponential", "Linear"} <= {kind for _, _, kind in levels.values()}
    # Issue 11: a level well below the gradient's RMS, and a matched absolute/relative pair
    # (same schedule shape, σ0 = r0 · RMS within a factor 1.5).
    rms = tiny_gradient_rms_bound()
    assert any(not rel and level <= rms / 5 for rel, level, _ in levels.values())
    pairs = [
        (a, b)
        for a, (rel_a, level_a, kind_a) in levels.items()
        for b, (rel_b, level_b, kind_b) in levels.items()
        if not rel_a and rel_b and kind_a == kind_b and 1 / 1.5 <= level_a / (level_b * rms) <= 1.5
    ]
    assert pairs

    assert paper.preset == "paper" and set(paper.datasets) == {"shakespeare_char", "enwik8", "text8"}
    seeds = {d: {r.seed for r in paper.runs if r.dataset == d} for d in paper.datasets}
    assert seeds == {"shakespeare_char": set(range(5)), "enwik8": set(range(3)), "text8": set(range(3))}
    grid = {
        (s.sigma0, s.gamma)
        for r in paper.runs
        if isinstance(s := schedules.parse(r.config.noise), schedules.Exponential)
        and r.config.noise_placement == "after_clip"
        and r.config.optimizer == "adamw"
    }
    assert {(a, b) for a in (0.1, 0.05, 0.01) for b in (0.99, 0.95)} <= grid
    etas = {
        s.eta for r in paper.runs if isinstance(s := schedules.parse(r.config.noise), schedules.Neelakantan)
    }
    assert etas == {0.01, 1.0}
    assert {r.config.optimizer for r in paper.runs} == {"adamw", "sgd"}
    assert {r.config.noise_placement for r in paper.runs} == {"after_clip", "before_clip", "update"}
    assert {r.config.noise_correlation for r in paper.runs} == {"independent", "anticorrelated"}
    assert {r.config.embedding_noise_alpha for r in paper.runs} == {0.0, 5.0, 10.0}

    assert small.preset == "paper" and small.datasets == ("shakespeare_char",)
    assert len(small.runs) == 21 and {r.seed for r in small.runs} == {0, 1, 2}
    assert {r.config.max_iters for r in small.runs} == {5000}
    assert set(small.methods) <= set(paper.methods)

    # The seed paper's published baseline (mean of seeds, paper preset), keyed as the paper
    # measured it, and its Table 1 with the like-for-like measures beside ours.
    published = {
        "shakespeare_char": {"train_loss_last_batch": 0.8132, "best_val_loss": 1.4692},
        "enwik8": {"train_loss_last_batch": 0.9323, "best_val_loss": 1.0048},
        "text8": {"train_loss_last_batch": 0.9978, "best_val_loss": 0.9793},
    }
    for spec in (paper, small):
        assert spec.published.values == {d: published[d] for d in spec.datasets}
        assert spec.published.method == spec.baseline
        assert "train mode" in spec.published.how["train_loss_last_batch"]
        assert spec.table.metrics == ("train_loss_window", "best_val_loss", "train_loss", "val_loss_full")
    assert quick.published is None  # the tiny model's numbers are not comparable with the paper's


def test_sweep_is_a_dose_response_study_where_the_model_overfits():
    sweep = load_spec("sweep")
    assert sweep.preset == "tiny" and {r.seed for r in sweep.runs} >= set(range(5))
    assert {r.config.train_fraction for r in sweep.runs} == {0.02}
    levels = noise_levels(sweep)
    assert set(sweep.dose_response.methods) == set(levels)  # every noise level is in the family
    rms = tiny_gradient_rms_bound()
    absolute = sorted(level for rel, level, _ in levels.values() if not rel)
    relative = sorted(level * rms for rel, level, _ in levels.values() if rel)
    for family in (absolute, relative):
        assert len(family) >= 5 and math.log10(family[-1] / family[0]) >= 3 - 1e-9  # three decades
        assert family[0] < rms < family[-1]  # around the gradient's RMS
    for a, r in zip(absolute, relative, strict=True):  # at matched scales
        assert 1 / 1.5 <= a / r <= 1.5
    assert {kind for _, _, kind in levels.values()} == {"Constant"}
    dropout = {r.config.dropout for r in sweep.runs if r.method in sweep.dose_response.references}
    assert dropout and 0.0 not in dropout
    assert all(r.config.dropout == 0.0 for r in sweep.runs if r.method == sweep.baseline)


def test_placements_compares_where_the_noise_goes_in_the_sweeps_regime():
    placements, sweep = load_spec("placements"), load_spec("sweep")
    assert placements.preset == sweep.preset == "tiny" and placements.datasets == sweep.datasets
    regime = ("train_fraction", "max_iters", "eval_interval", "eval_iters", "checkpoint_interval")
    sweep_regime = {tuple(getattr(r.config, k) for k in regime) for r in sweep.runs}
    assert {tuple(getattr(r.config, k) for k in regime) for r in placements.runs} == sweep_regime
    assert {r.seed for r in placements.runs} == set(range(5))
    assert 9 <= len(placements.methods) <= 10 and len(placements.runs) == 5 * len(placements.methods)

    by_method = {r.method: r.config for r in placements.runs if r.seed == 0}
    base = by_method[placements.baseline]
    assert base.noise == "none" and base.dropout == 0.0 and base.embedding_noise_alpha == 0.0

    def methods(**match):
        return [m for m, c in by_method.items() if all(getattr(c, k) == v for k, v in match.items())]

    # Gradient noise at one of the sweep's absolute levels, independent and anticorrelated.
    gradient = [m for m in methods(noise_placement="after_clip") if by_method[m].noise != "none"]
    assert {by_method[m].noise_correlation for m in gradient} == {"independent", "anticorrelated"}
    (level,) = {schedules.parse(by_method[m].noise)(0) for m in gradient}
    sweep_levels = {
        schedules.parse(r.config.noise)(0) for r in sweep.runs if r.config.noise.startswith("const")
    }
    assert level in sweep_levels
    # Update noise: lr·σ from below to above Adam's per-element update (≈ 0.1–1 × lr).
    update = sorted(schedules.parse(by_method[m].noise)(0) for m in methods(noise_placement="update"))
    assert len(update) >= 2 and update[0] < 0.1 and update[-1] >= 1
    assert sorted(c.embedding_noise_alpha for c in by_method.values() if c.embedding_noise_alpha) == [5, 10]
    assert any(c.dropout > 0 and c.noise == "none" for c in by_method.values())
    assert placements.caveats and placements.description


def test_quick_noise_acts_during_its_run():
    """Every noisy method of quick still has σ_t ≥ 1% of σ_0 a quarter into the run."""
    for run in load_spec("quick").runs:
        schedule = schedules.parse(run.config.noise)
        if schedule is None:
            continue
        horizon = schedule.horizon(0.01)
        assert horizon is None or horizon >= run.config.max_iters // 4, run.method
        assert schedule(0) > 0


# ---- pre-registered hypotheses -----------------------------------------------------------

HYPOTHESES = {
    "metric": "val_loss_full",
    "confirmatory": [
        {"id": "a", "kind": "better", "treatment": "exp", "control": "baseline"},
        {"id": "d", "kind": "equivalent", "margin": 0.05, "treatment": "exp", "control": "baseline"},
    ],
    "contrasts": [{"id": "x", "treatment": "exp", "control": "baseline", "metric": "best_val_loss"}],
}


def test_hypotheses_are_parsed_with_the_blocks_defaults():
    spec = parse_spec(base_spec(hypotheses=HYPOTHESES))
    block = spec.hypotheses
    assert (block.metric, block.alpha, block.correction) == ("val_loss_full", 0.05, "holm")
    assert [(h.id, h.kind, h.margin, h.metric) for h in block.confirmatory] == [
        ("a", "better", None, "val_loss_full"),
        ("d", "equivalent", 0.05, "val_loss_full"),
    ]
    (contrast,) = block.contrasts
    assert (contrast.metric, contrast.versus) == ("best_val_loss", None)
    assert parse_spec(base_spec()).hypotheses is None


def _with_test(**changes) -> dict:
    test = {"id": "a", "kind": "better", "treatment": "exp", "control": "baseline", **changes}
    return {**HYPOTHESES, "confirmatory": [{k: v for k, v in test.items() if v is not None}]}


@pytest.mark.parametrize(
    ("hypotheses", "words"),
    [
        (_with_test(treatment="nope"), ["treatment='nope'", "exp"]),
        (_with_test(control="missing"), ["control='missing'"]),
        (_with_test(kind="equivalent"), ["margin=None", "margin > 0"]),
        (_with_test(kind="equivalent", margin=-0.1), ["margin=-0.1"]),
        (_with_test(margin=0.1), ["only kind equivalent"]),
        (_with_test(kind="superior"), ["kind='superior'", "better, equivalent"]),
        (_with_test(metric="val_lost"), ["val_lost", "val_loss_full"]),
        (_with_test(control="exp"), ["both 'exp'"]),
        (_with_test(id=None), ["id=None"]),
        (_with_test(colour="red"), ["colour"]),
        ({**HYPOTHESES, "metric": "accuracy"}, ["metric='accuracy'"]),
        ({**HYPOTHESES, "alpha": 0.5}, ["alpha=0.5"]),
        ({**HYPOTHESES, "correction": "bonferroni"}, ["bonferroni", "holm"]),
        ({"metric": "val_loss_full"}, ["at least one"]),
        (
            {**HYPOTHESES, "contrasts": [{"id": "a", "treatment": "exp", "control": "baseline"}]},
            ["'a'", "twice"],
        ),
        (
            {
                **HYPOTHESES,
                "contrasts": [{"id": "x", "treatment": "exp", "control": "baseline", "versus": ["exp"]}],
            },
            ["versus", "two methods"],
        ),
    ],
)
def test_hypotheses_errors_name_the_value(hypotheses, words):
    with pytest.raises(UserError) as error:
        parse_spec(base_spec(hypotheses=hypotheses))
    for word in words:
        assert word in str(error.value)


def test_changed_hypotheses_count_as_a_different_study():
    """Pre-registered: unlike the report keys, a store refuses new hypotheses."""
    stored = base_spec(hypotheses=HYPOTHESES)
    assert runs_differ(stored, base_spec(hypotheses={**HYPOTHESES, "alpha": 0.1}))
    assert not runs_differ(stored, {**stored, "caveats": ["new"]})


def test_confirm_is_the_preregistered_factorial_on_fresh_seeds():
    confirm, sweep = load_spec("confirm"), load_spec("sweep")
    regime = ("train_fraction", "max_iters", "eval_interval", "eval_iters", "checkpoint_interval")
    sweep_regime = {tuple(getattr(r.config, k) for k in regime) for r in sweep.runs}
    assert {tuple(getattr(r.config, k) for k in regime) for r in confirm.runs} == sweep_regime
    seeds = {r.seed for r in confirm.runs}
    assert seeds == set(range(100, 110)) and not seeds & {r.seed for r in sweep.runs}
    cells = {(r.config.noise, r.config.dropout) for r in confirm.runs}
    noises = {"none", "const:sigma=0.003", "relative:const:sigma=3.0"}
    assert cells == {(n, d) for n in noises for d in (0.0, 0.1, 0.2)}
    block = confirm.hypotheses
    assert (block.metric, block.alpha, block.correction) == ("val_loss_full", 0.05, "holm")
    config = {m: next(r.config for r in confirm.runs if r.method == m) for m in confirm.methods}
    tests = {
        (
            h.kind,
            config[h.treatment].noise,
            config[h.treatment].dropout,
            config[h.control].noise,
            config[h.control].dropout,
        )
        for h in block.confirmatory
    }
    relative = "relative:const:sigma=3.0"
    assert tests == {
        ("better", relative, 0.0, "none", 0.0),
        ("better", relative, 0.1, "none", 0.1),
        ("better", relative, 0.2, "none", 0.2),
        ("equivalent", relative, 0.0, "none", 0.1),
    }
    (equivalence,) = [h for h in block.confirmatory if h.kind == "equivalent"]
    assert 0 < equivalence.margin <= 0.1
    assert any(c.versus for c in block.contrasts)  # the interaction is reported


def test_transfer_varies_width_and_data_against_controls_of_the_same_condition():
    transfer = load_spec("transfer")
    assert {r.seed for r in transfer.runs} == set(range(5))
    config = {m: next(r.config for r in transfer.runs if r.method == m) for m in transfer.methods}
    assert {c.n_embd for c in config.values()} == {64, 128, 256}
    assert {c.train_fraction for c in config.values()} == {0.02, 0.1, 1.0}
    levels = {
        (c.n_embd, schedules.parse(c.noise).inner(0) if c.noise != "none" else 0.0)
        for c in config.values()
        if c.train_fraction == 0.02
    }
    assert levels == {(w, r) for w in (64, 128, 256) for r in (0.0, 1.0, 3.0, 10.0)}
    for contrast in transfer.hypotheses.contrasts:
        treated, control = config[contrast.treatment], config[contrast.control]
        assert (treated.n_embd, treated.train_fraction) == (control.n_embd, control.train_fraction)
        assert control.noise == "none" and control.dropout == 0.0


def test_transfer_repeats_the_sweeps_width_128_runs():
    sweep, transfer = load_spec("sweep"), load_spec("transfer")
    sweep_ids = {r.run_id: r.method for r in sweep.runs}
    shared = {(r.method, sweep_ids[r.run_id]) for r in transfer.runs if r.run_id in sweep_ids}
    assert shared == {
        ("w128-r0", "baseline"),
        ("w128-r1", "rel-1"),
        ("w128-r3", "rel-3"),
        ("w128-r10", "rel-10"),
    }


def test_paper_tries_noise_at_1x_and_3x_its_gradient_rms_alone_and_on_top_of_dropout():
    paper = load_spec("paper")
    cfg = resolve_config("shakespeare_char", "paper")
    model = GPT(cfg.model_config(corpora.load("shakespeare_char").vocab_size))
    rms = cfg.grad_clip / math.sqrt(sum(p.numel() for p in model.parameters()))  # ≈ 3.05e-4
    constant = {}
    for run in paper.runs:
        schedule = schedules.parse(run.config.noise)
        relative = isinstance(schedule, schedules.Relative)
        inner = schedule.inner if relative else schedule
        if isinstance(inner, schedules.Constant) and run.config.noise_correlation == "independent":
            multiple = inner(0) if relative else inner(0) / rms
            constant.setdefault((relative, round(multiple)), set()).add(run.config.dropout)
    for relative in (False, True):
        for multiple in (1, 3):
            assert constant.get((relative, multiple)) == {0.0, 0.2}, (relative, multiple)
    assert cfg.dropout == 0.2  # "on top of dropout" is the preset's own

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gradnoise import UserError, schedules
from gradnoise.schedules import (
    Constant,
    Cosine,
    Exponential,
    Linear,
    Neelakantan,
    Plateau,
    PlateauState,
    Relative,
    parse,
)

STEPS = [0, 1, 2, 10, 99, 100, 101, 1000, 4999]


@pytest.mark.parametrize("step", STEPS)
def test_values_follow_their_formulas(step):
    assert Constant(0.3)(step) == 0.3
    assert Exponential(sigma0=0.1, gamma=0.99)(step) == pytest.approx(0.1 * math.exp(step * math.log(0.99)))
    expected_linear = 0.2 - 0.15 * min(step, 100) / 100  # 0.2 → 0.05 over 100 steps
    assert Linear(sigma0=0.2, total_steps=100, sigma_end=0.05)(step) == pytest.approx(expected_linear)
    half_cosine = (1 + math.cos(math.pi * min(step, 1000) / 1000)) / 2
    assert Cosine(sigma0=0.4, total_steps=1000)(step) == pytest.approx(0.4 * half_cosine)
    # Neelakantan's η is a variance: the schedule returns the standard deviation.
    assert Neelakantan(eta=0.3)(step) ** 2 == pytest.approx(0.3 / (1 + step) ** 0.55)


def test_known_values():
    assert Exponential(sigma0=0.1, gamma=0.5)(3) == pytest.approx(0.0125)
    assert Linear(sigma0=1.0, total_steps=4)(1) == pytest.approx(0.75)
    assert Cosine(sigma0=1.0, total_steps=4)(2) == pytest.approx(0.5)
    assert Neelakantan(eta=1.0, gamma=1.0)(3) == pytest.approx(0.5)


ALL_SPECS = [
    "const:sigma=0.05",
    "exp:sigma0=0.1,gamma=0.99",
    "linear:sigma0=0.1,total_steps=5000,sigma_end=0.01",
    "cosine:sigma0=0.1,total_steps=5000,sigma_end=0.0",
    "neelakantan:eta=0.01,gamma=0.55",
    "plateau:sigma0=0.1,factor=0.5,patience=2,threshold=0.001,min_sigma=0.0",
    "relative:exp:sigma0=0.5,gamma=0.999",
]


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_spec_round_trip(spec):
    schedule = parse(spec)
    assert schedule.spec == spec
    assert parse(schedule.spec) == schedule


def test_parse_fills_defaults_and_none():
    assert parse("none") is None
    assert parse("neelakantan:eta=1.0") == Neelakantan(eta=1.0, gamma=0.55)
    assert parse("linear:sigma0=0.1,total_steps=10") == Linear(0.1, 10, 0.0)
    assert isinstance(parse("relative:const:sigma=0.1"), Relative)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("gauss:sigma=1", ["gauss", "allowed", "exp"]),
        ("exp:sigma0=0.1", ["missing", "gamma"]),
        ("exp:sigma0=0.1,gamma=0.99,beta=2", ["beta=2", "sigma0", "gamma"]),
        ("exp:sigma0=abc,gamma=0.9", ["sigma0", "abc"]),
        ("exp:sigma0=-1,gamma=0.9", ["sigma0", "-1", "≥ 0"]),
        ("exp:sigma0=0.1,gamma=1.5", ["gamma", "1.5", "(0, 1]"]),
        ("exp:sigma0=0.1,gamma=0", ["gamma", "(0, 1]"]),
        ("linear:sigma0=0.1,total_steps=0", ["total_steps", "> 0"]),
        ("linear:sigma0=0.1,total_steps=10,sigma_end=0.5", ["sigma_end", "sigma0"]),
        ("neelakantan:eta=-0.1", ["eta", "variance"]),
        ("plateau:sigma0=0.1,factor=1.0", ["factor", "(0, 1)"]),
        ("relative:none", ["relative"]),
        ("relative:relative:const:sigma=1", ["relative"]),
        # a parameter given twice is an error, not "the last one wins"
        ("exp:sigma0=0.1,sigma0=5,gamma=0.9", ["sigma0", "twice"]),
        ("plateau:sigma0=0.1,patience=2,patience=3", ["patience", "twice"]),
        # ranges under which σ_t can be computed for any t
        ("neelakantan:eta=0.01,gamma=1100", ["gamma=1100", "[0, 10]"]),
        ("neelakantan:eta=0.01,gamma=30", ["gamma=30", "[0, 10]"]),
        ("neelakantan:eta=0.01,gamma=-1", ["gamma=-1", "[0, 10]"]),
        ("neelakantan:eta=0.01,gamma=nan", ["gamma=nan"]),
        ("neelakantan:eta=inf", ["eta=inf"]),
        ("exp:sigma0=0.1,gamma=nan", ["gamma=nan"]),
        ("const:sigma=inf", ["sigma=inf"]),
        # integers: 1e3 is one, 1.5 is not
        ("linear:sigma0=0.1,total_steps=1.5", ["total_steps='1.5'", "not an integer"]),
        ("linear:sigma0=0.1,total_steps=inf", ["total_steps='inf'", "not an integer"]),
        ("plateau:sigma0=0.1,patience=two", ["patience='two'", "not an integer"]),
        ("exp:sigma0=abc,gamma=0.9", ["sigma0='abc'", "not a number"]),
    ],
)
def test_invalid_specs_name_the_problem(spec, words):
    with pytest.raises(UserError) as error:
        parse(spec)
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize(
    ("spec", "value"),
    [
        ("exp:sigma0=0.1,sigma0=5,gamma=0.9", "sigma0 is given twice"),
        ("neelakantan:eta=0.01,gamma=1100", "gamma=1100"),
        ("neelakantan:eta=0.01,gamma=30", "gamma=30"),
        ("linear:sigma0=0.1,total_steps=2.5", "total_steps='2.5'"),
    ],
)
def test_the_command_line_exits_2_on_a_bad_spec_naming_the_value(spec, value, tmp_path, capsys):
    from gradnoise.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--run-dir", str(run_dir), f"noise={spec}"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("gradnoise: error: ") and value in error and spec in error
    assert not run_dir.exists()


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError, match="sigma"):
        Constant(float("nan"))
    with pytest.raises(ValueError, match="patience"):
        Plateau(0.1, patience=-1)
    with pytest.raises(ValueError, match="an integer"):
        Plateau(0.1, patience=1.5)
    with pytest.raises(ValueError, match="an integer"):
        Linear(0.1, total_steps=10.0)


def test_integer_parameters_accept_exponent_notation():
    assert parse("linear:sigma0=0.1,total_steps=1e3") == Linear(0.1, 1000)
    assert parse("cosine:sigma0=0.1,total_steps=5E3") == Cosine(0.1, 5000)
    assert parse("plateau:sigma0=0.1,patience=2.0") == Plateau(0.1, patience=2)
    assert isinstance(parse("linear:sigma0=0.1,total_steps=1e3").total_steps, int)


@given(st.floats(0, 10), st.floats(0, 1e6), st.integers(0, 10**15))
def test_every_accepted_neelakantan_schedule_is_finite_at_any_step(gamma, eta, step):
    schedule = Neelakantan(eta=eta, gamma=gamma)
    value = schedule(step)
    assert math.isfinite(value) and 0 <= value <= math.sqrt(eta)
    schedule.horizon(0.01)  # a search over t up to 10^12, which overflowed before


def test_the_steepest_neelakantan_schedule_has_a_horizon():
    # σ_t/σ_0 = (1 + t)^-5 < 0.01 ⇔ 1 + t > 10^0.4 = 2.51
    assert Neelakantan(eta=1.0, gamma=10.0).horizon(0.01) == 2


def _first_step_below(schedule, fraction, limit):
    threshold = fraction * schedule(0)
    return next((t for t in range(limit) if schedule(t) < threshold), None)


@pytest.mark.parametrize(
    "schedule",
    [
        Exponential(0.1, 0.99),
        Exponential(0.05, 0.95),
        Linear(0.1, 3000),
        Cosine(0.1, 2000, 0.0),
        Neelakantan(0.01, 4.0),
    ],
)
def test_horizon_is_the_first_step_below_the_fraction(schedule):
    assert schedule.horizon(0.01) == _first_step_below(schedule, 0.01, 20_000)
    assert schedule.horizon(0.5) == _first_step_below(schedule, 0.5, 20_000)


def test_horizon_of_the_paper_setting_is_a_tenth_of_its_run():
    # σ0·0.99^t < σ0/100 ⇔ t > ln(100)/ln(1/0.99) = 458.2
    assert Exponential(0.1, 0.99).horizon(0.01) == 459


def test_horizon_none_where_the_noise_never_fades():
    assert Constant(0.1).horizon() is None
    assert Exponential(0.1, 1.0).horizon() is None
    assert Linear(0.1, 100, sigma_end=0.05).horizon(0.1) is None
    assert Plateau(0.1).horizon() is None
    assert Neelakantan(0.01).horizon(1e-6) is None  # (1+t)^0.275 > 1e6 needs t ≈ 1e21


def test_plateau_declares_its_state_and_needs_the_metric():
    schedule = Plateau(sigma0=0.2, factor=0.5, patience=0, threshold=0.0)
    assert schedule.needs_metric and Relative(schedule).needs_metric
    assert not Exponential(0.1, 0.9).needs_metric
    assert schedule.state == schedule.init() == PlateauState(sigma=0.2)
    # update is the pure transition; observe applies it to the declared state
    after = schedule.update(PlateauState(sigma=0.2, best=1.0), 1.0)
    assert after == PlateauState(sigma=0.1, best=1.0) and schedule.state.sigma == 0.2
    relative = Relative(schedule)
    relative.observe(1.0)
    relative.observe(1.0)  # no improvement, patience 0: decay, through the Relative wrapper
    assert relative(0) == schedule(0) == pytest.approx(0.1)
    with pytest.raises(UserError, match="number"):
        schedule.observe("low")
    schedule.observe(float("nan"))  # a NaN metric never counts as an improvement
    assert schedule(0) == pytest.approx(0.05)
    Exponential(0.1, 0.9).observe(1.0)  # other schedules do not depend on a metric
    assert parse(schedule.spec) == schedule  # the spec holds the parameters, not the state


def test_schedules_evaluate_tensor_steps_like_int_steps():
    for spec in ALL_SPECS:
        schedule = parse(spec)
        for step in (0, 1, 7, 4999, 5000, 10**6):
            on_tensor = schedule(torch.tensor(step, dtype=torch.float64))
            assert float(on_tensor) == pytest.approx(schedule(step), rel=1e-12, abs=1e-300), (spec, step)


def test_plateau_decays_after_patience_and_saves_state():
    schedule = Plateau(sigma0=0.2, factor=0.5, patience=1, threshold=0.0)
    for metric in [3.0, 2.0, 2.0]:  # improve, improve, 1 bad (≤ patience)
        schedule.observe(metric)
    assert schedule(10) == 0.2
    schedule.observe(2.5)  # 2 bad > patience → decay
    assert schedule(10) == pytest.approx(0.1)
    saved = schedule.state_dict()
    restored = Plateau(sigma0=0.2, factor=0.5, patience=1, threshold=0.0)
    restored.load_state_dict(saved)
    for s in (schedule, restored):
        s.observe(2.1)
        s.observe(2.1)
    assert restored(0) == schedule(0) == pytest.approx(0.05)


def test_relative_is_its_inner_schedule_as_a_ratio():
    relative = Relative(Exponential(0.5, 0.9))
    assert relative(7) == Exponential(0.5, 0.9)(7)
    assert relative.horizon(0.01) == Exponential(0.5, 0.9).horizon(0.01)


monotone_schedules = st.one_of(
    st.builds(Exponential, st.floats(0, 10), st.floats(0.01, 1.0)),
    st.builds(Linear, st.floats(0, 10), st.integers(1, 10_000)),
    st.builds(Cosine, st.floats(0, 10), st.integers(1, 10_000)),
    st.builds(Neelakantan, st.floats(0, 10), st.floats(0, 2)),
)


@given(monotone_schedules, st.integers(0, 10**6), st.integers(0, 10**6))
def test_monotone_schedules_are_non_negative_finite_and_non_increasing(schedule, a, b):
    early, late = sorted((a, b))
    assert 0 <= schedule(late) <= schedule(early) + 1e-12
    assert math.isfinite(schedule(early))


@given(st.floats(0, 10), st.floats(0.01, 1.0))
def test_specs_round_trip_for_any_valid_parameters(sigma0, gamma):
    schedule = Exponential(sigma0, gamma)
    assert schedules.parse(schedule.spec) == schedule

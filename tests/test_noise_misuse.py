"""The noise hooks at their edges: misuse is refused with a UserError naming the value,
before anything changed, and nothing is added twice or reported wrong."""

from __future__ import annotations

import re

import pytest
import torch

from gradnoise import GradientNoise, ReplicatedGradientNoise, UserError, add_noise_, schedules
from gradnoise.integrations import NoiseCallbackCore


def _optimizer(*shape) -> torch.optim.SGD:
    param = torch.nn.Parameter(torch.zeros(*shape))
    param.grad = torch.zeros_like(param)
    return torch.optim.SGD([param], lr=0.0)


@pytest.mark.parametrize("seed", [2**64, -1, 2**70])
def test_seeds_outside_64_bits_are_refused_not_wrapped(seed):
    # Wrapped, 2**64 would draw seed 0's noise and -1 seed 2**64 - 1's.
    with pytest.raises(UserError, match=re.escape(f"seed={seed}")):
        GradientNoise(_optimizer(4), "const:sigma=0.1", seed=seed)
    with pytest.raises(UserError, match=re.escape(f"seed={seed}")):
        ReplicatedGradientNoise(_optimizer(2, 4), "const:sigma=0.1", seed=[0, seed])
    with pytest.raises(UserError, match=re.escape(f"seed={seed}")):
        NoiseCallbackCore("const:sigma=0.1", seed=seed)


def test_the_largest_seed_is_allowed_and_differs_from_seed_zero():
    noises = []
    for seed in (0, 2**64 - 1):
        optimizer = _optimizer(1000)
        GradientNoise(optimizer, "const:sigma=1.0", seed=seed)
        optimizer.step()
        noises.append(optimizer.param_groups[0]["params"][0].grad.clone())
    assert not torch.equal(*noises)


def test_replicas_given_one_schedule_object_twice_keep_separate_states():
    shared = schedules.Plateau(sigma0=0.1, patience=0)
    gn = ReplicatedGradientNoise(_optimizer(2, 4), [shared, shared], seed=[0, 1])
    gn.observe([1.0, 1.0])
    gn.observe([2.0, 0.5])  # replica 0 got worse (its σ halves), replica 1 improved
    assert [schedule(0) for schedule in gn.schedule] == [0.05, 0.1]
    state = gn.state_dict()["replicas"]
    assert [lane["schedule_state"]["best"] for lane in state] == [1.0, 0.5]


@pytest.mark.parametrize("metrics, shown", [(1.0, "observe(1.0)"), ([1.0], "observe([1.0])")])
def test_replicated_observe_needs_one_metric_per_replica(metrics, shown):
    gn = ReplicatedGradientNoise(_optimizer(2, 4), "plateau:sigma0=0.1,patience=0", seed=[0, 1])
    with pytest.raises(UserError, match=re.escape(shown)):
        gn.observe(metrics)
    assert [s.state.best for s in gn.schedule] == [float("inf")] * 2  # nothing observed


def _state(**changes) -> dict:
    return {**GradientNoise(_optimizer(4), "const:sigma=0.1", seed=3).state_dict(), **changes}


@pytest.mark.parametrize(
    "state, shown",
    [
        ({}, "{} is not a GradientNoise state"),
        (_state(step="x"), "step='x'"),
        (_state(step=-2), "step=-2"),
        (_state(seed=2**64), f"seed={2**64}"),
        (_state(sigma="big"), "sigma='big'"),
        (_state(schedule_spec="const:sigma=0.2"), "'const:sigma=0.2'"),
    ],
)
def test_a_bad_state_is_refused_naming_the_value_and_changes_nothing(state, shown):
    gn = GradientNoise(_optimizer(4), "const:sigma=0.1", seed=7)
    before = gn.state_dict()
    with pytest.raises(UserError, match=re.escape(shown)):
        gn.load_state_dict(state)
    assert gn.state_dict() == before


def test_a_bad_plateau_state_is_refused():
    gn = GradientNoise(_optimizer(4), "plateau:sigma0=0.1", seed=7)
    state = {**gn.state_dict(), "schedule_state": {"sigma": 0.1}}
    with pytest.raises(UserError, match="schedule_state="):
        gn.load_state_dict(state)


def test_a_single_models_state_is_refused_by_a_replicated_hook():
    gn = ReplicatedGradientNoise(_optimizer(2, 4), "const:sigma=0.1", seed=[0, 1])
    before = gn.state_dict()
    with pytest.raises(UserError, match="'replicas'"):
        gn.load_state_dict(_state())
    bad_second = {"replicas": [before["replicas"][0], {**before["replicas"][1], "step": "x"}]}
    with pytest.raises(UserError, match="step='x'"):
        gn.load_state_dict(bad_second)
    assert gn.state_dict() == before


def test_apply_on_an_attached_hook_is_refused_not_added_twice():
    optimizer = _optimizer(100)
    gn = GradientNoise(optimizer, "const:sigma=0.1")
    with pytest.raises(UserError, match="attach=False"):
        gn.apply()
    assert gn.step == 0 and torch.count_nonzero(optimizer.param_groups[0]["params"][0].grad) == 0
    optimizer.step()
    assert gn.step == 1


def test_a_second_hook_on_one_optimizer_needs_stack():
    optimizer = _optimizer(100)
    first = GradientNoise(optimizer, "const:sigma=0.1", seed=1)
    with pytest.raises(UserError, match=re.escape("already has GradientNoise('const:sigma=0.1', seed=1")):
        GradientNoise(optimizer, "const:sigma=0.2", seed=2)
    second = GradientNoise(optimizer, "const:sigma=0.2", seed=2, stack=True)
    optimizer.step()
    assert first.step == second.step == 1
    first.remove()
    second.remove()
    GradientNoise(optimizer, "const:sigma=0.3")  # once removed, a new one attaches
    GradientNoise(optimizer, "const:sigma=0.3", attach=False)  # one that adds only when applied


@pytest.mark.parametrize("capturable", [False, True])
def test_relative_sigma_is_zero_when_every_group_has_noise_scale_zero(capturable):
    params = [torch.nn.Parameter(torch.zeros(50)) for _ in range(2)]
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer = torch.optim.SGD([{"params": [p], "noise_scale": 0.0} for p in params], lr=0.0)
    gn = GradientNoise(optimizer, "const:sigma=0.5", mode="relative", capturable=capturable)
    optimizer.step()
    assert gn.sigma == 0.0  # the σ used: no gradient got noise
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params)


@pytest.mark.parametrize("key", [2**64, -1])
def test_add_noise_keys_outside_64_bits_are_refused(key):
    with pytest.raises(UserError, match=re.escape(f"key={key}")):
        add_noise_([torch.zeros(10)], 0.1, key=key)


def test_a_measured_step_grad_scaler_skips_reports_no_statistics():
    optimizer = _optimizer(100)
    gn = GradientNoise(optimizer, "const:sigma=0.1", track_stats=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    param = optimizer.param_groups[0]["params"][0]
    for overflow in (False, True):
        gn.track_stats = True  # as a training loop does before each step it measures
        param.grad = scaler.scale(torch.ones_like(param))
        if overflow:
            param.grad[0] = float("inf")
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        assert bool(gn.last_stats) != overflow  # the skipped step's are not the previous step's
    assert gn.step == 1

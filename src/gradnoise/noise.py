"""Gradient noise injection: g̃_t = g_t + σ_t · s_group · ε_t, ε_t ~ N(0, I).

σ_t = schedule(t) (absolute mode) or schedule(t) · RMS(g_t) (relative mode), t the
number of noisy steps taken, s_group the param group's ``"noise_scale"`` (default 1).
ε_t is a function of the key k_t = splitmix64(seed ⊕ splitmix64(t)) alone (see
gradnoise.streams), never of the global RNG: (seed, t) is the stream's whole state, so
`state_dict()` resumes it exactly and runs with and without noise see the same initial
weights, batches and dropout masks. Anticorrelated noise (Anti-PGD, Orvieto et al. 2022)
is σ_t·ε_t − σ_{t−1}·ε_{t−1}, ε_{t−1} drawn again from k_{t−1}: the noise summed over
steps telescopes instead of growing like √t. Noise on the update goes to the
parameters after the step, p ← p + lr_group·σ_t·s_group·ε_t, which Adam's division by
√v does not renormalize away.

`GradientNoise` hooks one model's optimizer: the noise lands on exactly the gradients
the optimizer is about to use (after clip_grad_norm_ and GradScaler.unscale_, once per
step). It is a thin view of the engine gradnoise.hook over one `Lane` (gradnoise.lanes:
σ_t, the terms, their keys, the state); `ReplicatedGradientNoise` (gradnoise.replicated)
is the same engine over M models trained as one; drawing and adding the noise is
gradnoise.streams'.
"""

from __future__ import annotations

import torch

from gradnoise import lanes, schedules
from gradnoise.hook import NoiseHook
from gradnoise.lanes import CORRELATIONS, MODES, PLACEMENTS

__all__ = ["GradientNoise"]


class GradientNoise(NoiseHook):
    """Adds N(0, σ_t²) noise to the gradients of `optimizer` at every `optimizer.step()`.

    g̃ = g + σ_t · s_group · ε_t (see the module docstring). correlation="anticorrelated"
    replaces σ_t·ε_t by σ_t·ε_t − σ_{t−1}·ε_{t−1} (ε_{−1} = 0, σ_{t−1} the σ used at the
    previous step): with σ constant the noise summed over T steps has variance σ² per
    element, where independent noise has T·σ². placement="update" adds it to the
    parameters after the step instead (a step post-hook), in the units of the update:
    p ← p + lr_group·σ_t·s_group·ε_t (absolute mode), or p ← p + r_t·RMS(Δp)·s_group·ε_t
    (relative mode, Δp the optimizer's update of the parameters that get noise). Only
    parameters that have a gradient get noise.

    Args:
        optimizer: any `torch.optim.Optimizer`.
        schedule: a `gradnoise.schedules` schedule, or a spec string for `schedules.parse`.
            A schedule that follows a metric (`plateau`) needs `observe(metric)` after each
            evaluation.
        seed: with the step, determines the noise; an integer in [0, 2⁶⁴). Under DDP use
            the same seed on every replica (gradients are already averaged, so identical
            noise keeps replicas identical); for sharded gradients (FSDP, ZeRO) use
            ``seed + rank`` so every shard gets independent noise.
        mode: "absolute", or "relative": σ_t = schedule(t)·RMS(g) over the gradients that
            get noise (or a `schedules.Relative` schedule).
        track_stats: also record ‖g‖, ‖noise‖ (as added) and their ratio at each step in
            `last_stats` (a copy of the tensors that get noise, three reductions and a
            host sync). With placement="update" the noise is the one added to the parameters.
        capturable: keep t on the gradients' device and compute σ_t and the step's key
            there, so that a step on CUDA (fused kernel) needs no host sync and can be
            captured in a CUDA graph. Not for schedules that follow a metric. The noise is
            the same as without it.
        attach: register the step hooks (default). With False, call `apply()` yourself:
            for placement="gradient" before `optimizer.step()` (e.g. before gradient
            clipping), for "update" after it.
        correlation: "independent" (a fresh ε_t each step) or "anticorrelated".
        placement: "gradient" (before the update) or "update" (after it).
        stack: attach even though the optimizer already has an attached GradientNoise
            (both then add noise at every step); without it that is refused.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: schedules.Schedule | str,
        *,
        seed: int = 0,
        mode: str = "absolute",
        track_stats: bool = False,
        capturable: bool = False,
        attach: bool = True,
        correlation: str = "independent",
        placement: str = "gradient",
        stack: bool = False,
    ):
        (self._lane,) = only = [lanes.lane(schedule, seed, mode, correlation)]
        super().__init__(optimizer, only, track_stats, capturable, attach, placement, stack)

    @property
    def schedule(self) -> schedules.Schedule:
        return self._lane.schedule

    @property
    def seed(self) -> int:
        return self._lane.seed

    @seed.setter
    def seed(self, value: int) -> None:
        self._lane.seed = lanes.check_seed(value)

    @property
    def mode(self) -> str:
        return MODES[self._lane.relative]

    @property
    def correlation(self) -> str:
        return self._lane.correlation

    @property
    def sigma(self) -> float:
        """σ used at the last step (relative mode: after scaling by RMS(g)); 0 before the first."""
        return float(self._lane.sigma)

    @property
    def last_stats(self) -> dict[str, float]:
        """‖g‖, ‖noise‖ and their ratio at the last step, with track_stats ({} if that step
        drew no noise)."""
        return self._lane.stats

    def observe(self, metric: float) -> None:
        """Feed the schedule a validation metric (lower is better; see `schedules.Plateau`):
        schedules that follow a metric decay σ when it stops improving, the others ignore it."""
        self.schedule.observe(metric)

    def state_dict(self) -> dict:
        """What continuing exactly needs: (seed, step), the last step's σ (anticorrelated noise
        subtracts σ_{t−1}·ε_{t−1}) and the schedule's state; the correlation and placement
        it was made with."""
        return self._lane.state_dict(self.step, self.placement)

    def load_state_dict(self, state: dict) -> None:
        step, seed, sigma = self._lane.checked_state(state, self.placement)
        self._lane.load_state_dict(state, seed, sigma)
        self.step = step

    def __repr__(self) -> str:
        options = "".join(
            f", {name}={value!r}"
            for name, value, default in (
                ("correlation", self.correlation, CORRELATIONS[0]),
                ("placement", self.placement, PLACEMENTS[0]),
            )
            if value != default
        )
        return f"GradientNoise({self.schedule.spec!r}, seed={self.seed}, step={self.step}{options})"

"""`ReplicatedGradientNoise`: GradientNoise for M models trained as one.

Every parameter's leading dimension is the replica (gradnoise.lm's batched GPT), and
replica m's slices p[m] get exactly the noise `GradientNoise(schedule[m], seed=seed[m],
mode=mode[m], correlation=correlation[m])` would add over those slices alone: the same
keys, streams and chunks, its own σ_{t−1}, and in relative mode σ from the RMS of its
own gradients (or update). All replicas' noise goes in one call per term (on CUDA one
fused launch, on CPU one pass on every core).
"""

from __future__ import annotations

import copy
import reprlib
from collections.abc import Sequence

import torch

from gradnoise import lanes, schedules
from gradnoise.errors import UserError
from gradnoise.hook import NoiseHook

__all__ = ["ReplicatedGradientNoise"]


class ReplicatedGradientNoise(NoiseHook):
    """Adds to each replica m's slices the noise of its own `GradientNoise` (see the module
    docstring), at every `optimizer.step()`.

    Args:
        optimizer: a `torch.optim.Optimizer` whose every parameter is (M, …).
        schedule: one schedule (or spec) for every replica, or a list of M; each replica
            gets its own copy, so that none shares a schedule's state with another.
        seed: M seeds, one per replica, each an integer in [0, 2⁶⁴).
        mode, correlation: one for every replica, or a list of M.
        placement, track_stats, capturable, attach, stack: the group's, as `GradientNoise`'s.

    `schedule`, `seed`, `mode`, `correlation`, `sigma` and `last_stats` are per-replica
    lists; `observe` takes one metric per replica; `state_dict()` is
    {"replicas": [each replica's state, as its own GradientNoise's]}.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: schedules.Schedule | str | Sequence[schedules.Schedule | str],
        *,
        seed: Sequence[int],
        mode: str | Sequence[str] = "absolute",
        track_stats: bool = False,
        capturable: bool = False,
        attach: bool = True,
        correlation: str | Sequence[str] = "independent",
        placement: str = "gradient",
        stack: bool = False,
    ):
        if isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence) or not seed:
            raise UserError(f"seed={seed!r} is not allowed: give one seed per replica (a list)")
        options = {"schedule": schedule, "mode": mode, "correlation": correlation}
        per_replica = [_per_replica(name, value, len(seed)) for name, value in options.items()]
        replicas = [
            lanes.lane(s, m_seed, m, c)
            for s, m_seed, m, c in zip(per_replica[0], seed, *per_replica[1:], strict=True)
        ]
        super().__init__(optimizer, replicas, track_stats, capturable, attach, placement, stack)

    @property
    def replicas(self) -> int:
        return len(self._lanes)

    def _part(self, tensors: list[torch.Tensor], lane: int) -> list[torch.Tensor]:
        return [t[lane] for t in tensors]

    def _check_group(self, index: int, group: dict) -> None:
        super()._check_group(index, group)
        if not all(p.dim() > 0 and len(p) == self.replicas for p in group["params"]):
            raise UserError(
                f"param group {index} has a parameter whose leading dimension is not the "
                f"replica dimension of {self.replicas} replicas"
            )

    @property
    def schedule(self) -> list[schedules.Schedule]:
        return [lane.schedule for lane in self._lanes]

    @property
    def seed(self) -> list[int]:
        return [lane.seed for lane in self._lanes]

    @property
    def mode(self) -> list[str]:
        return [lanes.MODES[lane.relative] for lane in self._lanes]

    @property
    def correlation(self) -> list[str]:
        return [lane.correlation for lane in self._lanes]

    @property
    def sigma(self) -> list[float]:
        """Each replica's σ of the last step (relative mode: after scaling by its RMS)."""
        return [float(lane.sigma) for lane in self._lanes]

    @property
    def last_stats(self) -> list[dict[str, float]]:
        """Each replica's ‖g‖, ‖noise‖ and their ratio at the last step, with track_stats ({}
        if that step drew no noise)."""
        return [lane.stats for lane in self._lanes]

    def observe(self, metrics: Sequence[float | None]) -> None:
        """Feed each replica's schedule its validation metric (see `GradientNoise.observe`);
        None for a replica that was not evaluated."""
        if (
            isinstance(metrics, (str, bytes))
            or not isinstance(metrics, Sequence)
            or len(metrics) != self.replicas
        ):
            raise UserError(
                f"observe({reprlib.repr(metrics)}) is not allowed: give {self.replicas} metrics, one per "
                "replica (None for one not evaluated)"
            )
        for lane, metric in zip(self._lanes, metrics, strict=True):
            if metric is not None:
                lane.schedule.observe(metric)

    def describe(self, replica: int, step: int) -> str:
        """Replica `replica`'s schedule and its value at `step`: "SPEC, σ=…" (relative mode:
        "SPEC, σ/RMS(g)=…")."""
        lane = self._lanes[replica]
        return f"{lane.schedule.spec}, {'σ/RMS(g)' if lane.relative else 'σ'}={lane.schedule(step):.4g}"

    def state_dict(self) -> dict:
        return {"replicas": [lane.state_dict(self.step, self.placement) for lane in self._lanes]}

    def load_state_dict(self, state: dict) -> None:
        """Load a `state_dict()` of as many replicas; nothing changes if any part is refused."""
        saved = state.get("replicas") if isinstance(state, dict) else None
        if not isinstance(saved, list) or len(saved) != self.replicas:
            count = f"{len(saved)} replicas" if isinstance(saved, list) else reprlib.repr(state)
            raise UserError(
                f"GradientNoise state is for {count}, but this one has {self.replicas}: it needs "
                f"{{'replicas': [{self.replicas} states]}}, as ReplicatedGradientNoise.state_dict() makes"
            )
        checked = [
            lane.checked_state(lane_state, self.placement)
            for lane, lane_state in zip(self._lanes, saved, strict=True)
        ]
        steps = {step for step, _, _ in checked}
        if len(steps) > 1:
            raise UserError(
                f"GradientNoise state: the replicas' steps {sorted(steps)} differ; they share one"
            )
        for lane, lane_state, (_, seed, sigma) in zip(self._lanes, saved, checked, strict=True):
            lane.load_state_dict(lane_state, seed, sigma)
        self.step = steps.pop()

    def __repr__(self) -> str:
        specs, options = [s.spec for s in self.schedule], f"step={self.step}, placement={self.placement!r}"
        return f"ReplicatedGradientNoise({specs!r}, seed={self.seed}, {options})"


def _per_replica(name: str, value, replicas: int) -> list:
    """One option as M values: a single schedule, mode or correlation is every replica's.
    Schedules are copied, since they keep state (a plateau's)."""
    values = [value] * replicas if isinstance(value, (str, schedules.Schedule)) else value
    if not isinstance(values, Sequence) or len(values) != replicas:
        raise UserError(f"{name}={values!r} is not allowed: with {replicas} seeds give {replicas} of them")
    return [copy.deepcopy(v) if isinstance(v, schedules.Schedule) else v for v in values]

"""One model's noise law, the part of gradnoise's hooks that is per model: a `Lane`.

Step t adds σ'·c·ε for each term (σ', t') — (σ_t, t), and anticorrelated also
(−σ_{t−1}, t−1) — to param group i's (device, dtype) group j, with ε from stream
i·2¹⁶ + j of the key mix(seed, t') (gradnoise.streams) and c = s_group (times lr_group
on the update in absolute mode). σ_t = schedule(t), in relative mode times the RMS of
the gradients (or the update) that get noise. A lane also keeps σ of its last step
(the next step's σ_{t−1}), its last statistics, and reads and writes its state.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import reprlib
from collections.abc import Sequence
from typing import NamedTuple

import torch

from gradnoise import schedules, streams
from gradnoise.errors import UserError
from gradnoise.streams import NoiseJob

__all__ = ["CORRELATIONS", "MODES", "PLACEMENTS", "Lane", "Target", "check_choice", "check_seed"]

# The allowed values of GradientNoise's options, the default first.
MODES = ("absolute", "relative")
CORRELATIONS = ("independent", "anticorrelated")
PLACEMENTS = ("gradient", "update")


class Target(NamedTuple):
    """A param group's tensors that get noise this step: the gradients, or the parameters."""

    scale: float  # c: its noise scale s_group (times lr_group on the update in absolute mode)
    index: int  # the param group's index: its streams are index·2¹⁶ + j
    by_device: list[tuple[torch.device, torch.dtype, list[torch.Tensor]]]


@dataclasses.dataclass
class Lane:
    """One model's noise law and state (see the module docstring)."""

    schedule: schedules.Schedule
    seed: int
    correlation: str
    sigma: float | torch.Tensor = 0.0  # the last step's σ: the next step's σ_{t−1}
    stats: dict = dataclasses.field(default_factory=dict)

    @property
    def relative(self) -> bool:
        return isinstance(self.schedule, schedules.Relative)

    def sigma_at(self, step, measured: list[torch.Tensor]):
        """σ_t = schedule(t), in relative mode times RMS(measured), the gradients (or the
        update) that get noise; with none, nothing gets noise and σ_t = 0."""
        sigma = self.schedule(step.double() if isinstance(step, torch.Tensor) else step)
        if not self.relative:
            return sigma
        if not measured:
            return 0.0
        rms = global_rms(measured)
        # r_t·RMS in the RMS's fp32, whether r_t is a float or (capturable) a tensor.
        return rms * (sigma.to(rms.dtype) if isinstance(sigma, torch.Tensor) else sigma)

    def terms(self, sigma, step) -> list[tuple]:
        """Step t's (σ', t'): (σ_t, t), and anticorrelated (−σ_{t−1}, t−1) once σ_{t−1} ≠ 0."""
        terms, previous = [(sigma, step)], self.sigma
        if self.correlation == "anticorrelated" and (isinstance(previous, torch.Tensor) or previous != 0):
            if isinstance(sigma, torch.Tensor) and not isinstance(previous, torch.Tensor):
                # Resumed: σ_{t−1} was a tensor of this dtype before it was saved as a float.
                previous = torch.tensor(previous, dtype=sigma.dtype, device=sigma.device)
            terms.append((-previous, step - 1))
        return terms

    def jobs(self, targets: list[Target], sigma, step) -> list[NoiseJob]:
        """One term's noise: σ'·c to every (device, dtype) group of every target."""
        key = streams.mix(self.seed, step)
        return [
            NoiseJob(tensors, sigma * target.scale, key, (target.index << 16) + group)
            for target in targets
            for group, (_, _, tensors) in enumerate(target.by_device)
        ]

    def state_dict(self, step: int, placement: str) -> dict:
        return {
            "step": step,
            "seed": self.seed,
            "sigma": float(self.sigma),
            "correlation": self.correlation,
            "placement": placement,
            "schedule_spec": self.schedule.spec,
            "schedule_state": self.schedule.state_dict(),
        }

    def checked_state(self, state, placement: str) -> tuple[int, int, float]:
        """(step, seed, σ) of a state saved by `state_dict`, checked against this lane."""
        if not isinstance(state, dict) or not {"step", "seed", "schedule_spec", "schedule_state"} <= set(
            state
        ):
            raise UserError(
                f"{reprlib.repr(state)} is not a GradientNoise state: it needs step, seed, "
                "schedule_spec and schedule_state (GradientNoise.state_dict() makes one)"
            )
        if state["schedule_spec"] != self.schedule.spec:
            raise UserError(
                f"GradientNoise state is for schedule {state['schedule_spec']!r}, "
                f"but this one has {self.schedule.spec!r}"
            )
        for name, mine, allowed in (
            ("correlation", self.correlation, CORRELATIONS),
            ("placement", placement, PLACEMENTS),
        ):
            saved = state.get(name, allowed[0])  # states saved before the option: its default
            if saved != mine:
                raise UserError(
                    f"GradientNoise state is for {name}={saved!r}, but this one has {name}={mine!r}"
                )
        sigma = state.get("sigma", 0.0)  # states saved before σ was kept have none
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma):
            raise UserError(
                f"GradientNoise state: sigma={sigma!r} is not allowed: it must be a finite number"
            )
        try:
            copy.deepcopy(self.schedule).load_state_dict(state["schedule_state"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise UserError(
                f"GradientNoise state: schedule_state={state['schedule_state']!r} is not allowed: {error}"
            ) from None
        return _integer("step", state["step"], 63), check_seed(state["seed"]), float(sigma)

    def load_state_dict(self, state: dict, seed: int, sigma: float) -> None:
        self.seed, self.sigma = seed, sigma
        self.schedule.load_state_dict(state["schedule_state"])


def _integer(name: str, value, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise UserError(f"{name}={value!r} is not allowed: it must be an integer in [0, 2**{bits})")
    return value


def check_seed(value) -> int:
    """A seed is a 64-bit key: one outside [0, 2⁶⁴) would wrap onto another seed's noise."""
    return _integer("seed", value, 64)


def lane(schedule, seed, mode, correlation) -> Lane:
    """A lane from one model's options, checked."""
    if isinstance(schedule, str):
        schedule = schedules.parse(schedule)
    if not isinstance(schedule, schedules.Schedule):
        raise UserError(f"GradientNoise needs a schedule, got {schedule!r}")
    if mode not in MODES:
        raise UserError(f"mode={mode!r} is not allowed: use 'absolute' or 'relative'")
    if mode == "relative" and not isinstance(schedule, schedules.Relative):
        schedule = schedules.Relative(schedule)
    check_choice("correlation", correlation, CORRELATIONS)
    return Lane(schedule, check_seed(seed), correlation)


def check_choice(name: str, value, allowed: tuple[str, ...]) -> str:
    """`value` if it is one of `allowed`, the values of the option `name`."""
    if value not in allowed:
        raise UserError(f"{name}={value!r} is not allowed: use {' or '.join(map(repr, allowed))}")
    return value


def global_rms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """RMS = ‖t‖₂ / sqrt(N) over all the tensors, as a 0-d fp32 tensor."""
    norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in tensors])
    total = sum(t.numel() for t in tensors)
    return torch.linalg.vector_norm(torch.stack([n.to(tensors[0].device) for n in norms])) / math.sqrt(total)

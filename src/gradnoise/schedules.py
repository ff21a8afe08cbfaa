"""Noise schedules: σ_t, the standard deviation of the noise added at step t.

Every schedule is a small object with ``__call__(step) -> float``; ``step``
counts optimizer steps from 0 at the first one. Every schedule returns a
*standard deviation*, never a variance (Neelakantan et al. state theirs as a
variance: see `Neelakantan`).

Schedules name themselves with a spec string that `parse` reads back, so that
configs, command lines and reports all say the same thing::

    >>> parse("exp:sigma0=0.1,gamma=0.99")
    Exponential(sigma0=0.1, gamma=0.99)
    >>> parse("exp:sigma0=0.1,gamma=0.99").spec
    'exp:sigma0=0.1,gamma=0.99'

`horizon` answers "when does the noise stop mattering?": the first step at
which σ_t falls below a fraction of σ_0. The seed paper's γ = 0.99 per step
gives a horizon(0.01) of 459 steps, within the first tenth of a 5,000-step run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from gradnoise.errors import UserError

__all__ = [
    "Constant",
    "Cosine",
    "Exponential",
    "Linear",
    "Neelakantan",
    "Plateau",
    "Relative",
    "Schedule",
    "parse",
]

# horizon() searches up to this step; a schedule still above the threshold
# there is reported as never reaching it.
_HORIZON_LIMIT = 10**12


def _require(condition: bool, name: str, value, allowed: str) -> None:
    if not condition:
        raise UserError(f"{name}={value!r} is not allowed: {name} must be {allowed}")


class Schedule:
    """Base of every schedule: σ_t as a function of the optimizer step."""

    name: ClassVar[str]
    #: True if σ_t never increases with t (what `horizon`'s search relies on).
    monotone: ClassVar[bool] = True

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    @property
    def spec(self) -> str:
        """The string `parse` turns back into an equal schedule."""
        params = ",".join(f"{field.name}={getattr(self, field.name)!r}" for field in dataclasses.fields(self))
        return f"{self.name}:{params}"

    def horizon(self, fraction: float = 0.01) -> int | None:
        """First step t with σ_t < fraction·σ_0, or None if that never happens.

        None also for schedules whose σ depends on data (`Plateau`): their
        horizon is not known in advance.
        """
        _require(0 < fraction <= 1, "fraction", fraction, "in (0, 1]")
        if not self.monotone:
            return None
        threshold = fraction * self(0)
        if threshold == 0:
            return 0
        if self(_HORIZON_LIMIT) >= threshold:
            return None
        low, high = 0, _HORIZON_LIMIT  # invariant: σ(low) >= threshold > σ(high)
        while high - low > 1:
            middle = (low + high) // 2
            if self(middle) < threshold:
                high = middle
            else:
                low = middle
        return high

    # Schedules without data-driven state have nothing to save.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state


@dataclasses.dataclass(frozen=True)
class Constant(Schedule):
    """σ_t = σ."""

    sigma: float
    name: ClassVar[str] = "const"

    def __post_init__(self):
        _require(math.isfinite(self.sigma) and self.sigma >= 0, "sigma", self.sigma, "≥ 0")

    def __call__(self, step: int) -> float:
        return self.sigma


@dataclasses.dataclass(frozen=True)
class Exponential(Schedule):
    """σ_t = σ_0 · γ^t (the seed paper's schedule; γ is a per-step factor)."""

    sigma0: float
    gamma: float
    name: ClassVar[str] = "exp"

    def __post_init__(self):
        _require(math.isfinite(self.sigma0) and self.sigma0 >= 0, "sigma0", self.sigma0, "≥ 0")
        _require(0 < self.gamma <= 1, "gamma", self.gamma, "in (0, 1]")

    def __call__(self, step: int) -> float:
        return self.sigma0 * self.gamma**step


@dataclasses.dataclass(frozen=True)
class Linear(Schedule):
    """σ_t = σ_0 + (σ_end − σ_0) · min(t, T) / T: a straight line, then flat at σ_end."""

    sigma0: float
    total_steps: int
    sigma_end: float = 0.0
    name: ClassVar[str] = "linear"

    def __post_init__(self):
        _require(math.isfinite(self.sigma0) and self.sigma0 >= 0, "sigma0", self.sigma0, "≥ 0")
        _require(0 <= self.sigma_end <= self.sigma0, "sigma_end", self.sigma_end, "in [0, sigma0]")
        _require(self.total_steps > 0, "total_steps", self.total_steps, "> 0")

    def __call__(self, step: int) -> float:
        progress = min(step, self.total_steps) / self.total_steps
        return self.sigma0 + (self.sigma_end - self.sigma0) * progress


@dataclasses.dataclass(frozen=True)
class Cosine(Schedule):
    """σ_t = σ_end + (σ_0 − σ_end) · (1 + cos(π · min(t, T) / T)) / 2."""

    sigma0: float
    total_steps: int
    sigma_end: float = 0.0
    name: ClassVar[str] = "cosine"

    def __post_init__(self):
        _require(math.isfinite(self.sigma0) and self.sigma0 >= 0, "sigma0", self.sigma0, "≥ 0")
        _require(0 <= self.sigma_end <= self.sigma0, "sigma_end", self.sigma_end, "in [0, sigma0]")
        _require(self.total_steps > 0, "total_steps", self.total_steps, "> 0")

    def __call__(self, step: int) -> float:
        progress = min(step, self.total_steps) / self.total_steps
        return self.sigma_end + (self.sigma0 - self.sigma_end) * (1 + math.cos(math.pi * progress)) / 2


@dataclasses.dataclass(frozen=True)
class Neelakantan(Schedule):
    """Neelakantan et al. (2015): σ_t² = η / (1 + t)^γ, so σ_t = sqrt(η / (1 + t)^γ).

    η is a *variance* (the paper tried η ∈ {0.01, 0.3, 1.0}, γ = 0.55); this
    schedule returns its square root, the standard deviation.
    """

    eta: float
    gamma: float = 0.55
    name: ClassVar[str] = "neelakantan"

    def __post_init__(self):
        _require(math.isfinite(self.eta) and self.eta >= 0, "eta", self.eta, "≥ 0 (a variance)")
        _require(math.isfinite(self.gamma) and self.gamma >= 0, "gamma", self.gamma, "≥ 0")

    def __call__(self, step: int) -> float:
        return math.sqrt(self.eta / (1 + step) ** self.gamma)


@dataclasses.dataclass(frozen=True)
class Relative(Schedule):
    """Noise relative to the gradient: σ_t = r_t · RMS(g_t), r_t from `inner`.

    RMS(g) = ‖g‖₂ / sqrt(N) over every gradient the optimizer is about to use
    (after clipping). The noise-to-signal ratio, not the absolute size, follows
    `inner`. Calling the schedule returns r_t; `GradientNoise` multiplies by the
    RMS. Spec: ``relative:`` followed by the inner schedule's spec.
    """

    inner: Schedule
    name: ClassVar[str] = "relative"

    def __post_init__(self):
        if not isinstance(self.inner, Schedule) or isinstance(self.inner, Relative):
            raise UserError(f"relative: inner schedule {self.inner!r} must be a non-relative schedule")

    @property
    def monotone(self) -> bool:  # type: ignore[override]
        return self.inner.monotone

    def __call__(self, step: int) -> float:
        return self.inner(step)

    @property
    def spec(self) -> str:
        return f"relative:{self.inner.spec}"

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


@dataclasses.dataclass
class Plateau(Schedule):
    """Plateau-driven decay, like ReduceLROnPlateau: σ ← max(σ·factor, min_sigma) after
    more than `patience` calls of `observe(metric)` without the metric improving
    on its best by a relative `threshold` (metric < best · (1 − threshold)).

    σ_t does not depend on t; feed it the validation loss after each eval.
    """

    sigma0: float
    factor: float = 0.5
    patience: int = 2
    threshold: float = 1e-3
    min_sigma: float = 0.0
    name: ClassVar[str] = "plateau"
    monotone: ClassVar[bool] = False

    def __post_init__(self):
        _require(math.isfinite(self.sigma0) and self.sigma0 >= 0, "sigma0", self.sigma0, "≥ 0")
        _require(0 < self.factor < 1, "factor", self.factor, "in (0, 1)")
        _require(self.patience >= 0, "patience", self.patience, "≥ 0")
        _require(0 <= self.threshold < 1, "threshold", self.threshold, "in [0, 1)")
        _require(0 <= self.min_sigma <= self.sigma0, "min_sigma", self.min_sigma, "in [0, sigma0]")
        self._sigma = self.sigma0
        self._best = math.inf
        self._bad_observations = 0

    def __call__(self, step: int) -> float:
        return self._sigma

    def observe(self, metric: float) -> None:
        """Record a validation metric (lower is better); may decay σ."""
        if metric < self._best * (1 - self.threshold):
            self._best = metric
            self._bad_observations = 0
            return
        self._bad_observations += 1
        if self._bad_observations > self.patience:
            self._sigma = max(self._sigma * self.factor, self.min_sigma)
            self._bad_observations = 0

    def state_dict(self) -> dict:
        return {"sigma": self._sigma, "best": self._best, "bad_observations": self._bad_observations}

    def load_state_dict(self, state: dict) -> None:
        self._sigma = float(state["sigma"])
        self._best = float(state["best"])
        self._bad_observations = int(state["bad_observations"])


_SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls for cls in (Constant, Exponential, Linear, Cosine, Neelakantan, Plateau)
}


def parse(spec: str) -> Schedule | None:
    """Read a spec string: ``"none"`` → None, ``"NAME:key=value,..."`` → a schedule.

    Names: none, const, exp, linear, cosine, neelakantan, plateau, and
    ``relative:<spec>`` for noise relative to the gradient's RMS.
    """
    if not isinstance(spec, str):
        raise UserError(f"noise schedule spec must be a string, got {spec!r}")
    text = spec.strip()
    if text in ("none", ""):
        return None
    name, _, params = text.partition(":")
    if name == Relative.name:
        inner = parse(params)
        if inner is None:
            raise UserError(
                f"noise schedule {spec!r}: relative needs a schedule, e.g. relative:exp:sigma0=0.1,gamma=0.99"
            )
        return Relative(inner)
    if name not in _SCHEDULES:
        allowed = ", ".join(["none", *_SCHEDULES, "relative:<spec>"])
        raise UserError(f"unknown noise schedule {name!r} in {spec!r}; allowed: {allowed}")
    cls = _SCHEDULES[name]
    fields = {field.name: field for field in dataclasses.fields(cls)}
    kwargs = {}
    for item in filter(None, params.split(",")):
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or key not in fields:
            raise UserError(
                f"noise schedule {spec!r}: bad parameter {item!r}; {name} takes "
                + ", ".join(f"{k}=<{f.type}>" for k, f in fields.items())
            )
        converter = int if fields[key].type == "int" else float
        try:
            kwargs[key] = converter(value)
        except ValueError:
            raise UserError(f"noise schedule {spec!r}: {key}={value!r} is not a {fields[key].type}") from None
    missing = [k for k, f in fields.items() if f.default is dataclasses.MISSING and k not in kwargs]
    if missing:
        raise UserError(f"noise schedule {spec!r}: missing {', '.join(missing)}")
    return cls(**kwargs)

"""Noise schedules: σ_t, the standard deviation of the noise added at step t.

Every schedule is a small object with ``__call__(step) -> float``; ``step``
counts optimizer steps from 0 at the first one (it may also be a float64
tensor, for σ_t computed on the device). Every schedule returns a *standard
deviation*, never a variance (Neelakantan et al. state theirs as a variance:
see `Neelakantan`).

A schedule whose σ follows a metric (`Plateau`, like optax's
`reduce_on_plateau`) declares its state and takes the metric as an input:
``observe(val_loss)`` after each evaluation (``needs_metric`` is True). The
integrations refuse such a schedule unless told which metric to feed it.

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

import torch

from gradnoise.errors import UserError

__all__ = [
    "Constant",
    "Cosine",
    "Exponential",
    "Linear",
    "Neelakantan",
    "Plateau",
    "PlateauState",
    "Ramp",
    "Relative",
    "Schedule",
    "parse",
]

# horizon() searches up to this step; a schedule still above the threshold
# there is reported as never reaching it.
_HORIZON_LIMIT = 10**12
# Neelakantan's decay exponent: at γ = 10, σ_1 = σ_0/32 and σ_100 ≈ 1e-10·σ_0;
# a larger γ is a typo for a noise that is gone after the first step.
_NEELAKANTAN_MAX_GAMMA = 10.0


def _require(condition: bool, name: str, value, allowed: str) -> None:
    if not condition:
        raise UserError(f"{name}={value!r} is not allowed: {name} must be {allowed}")


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fraction_done(step, total_steps: int):
    """min(t, T) / T, for an int step or a tensor of steps."""
    if isinstance(step, torch.Tensor):
        return step.clamp(max=total_steps) / total_steps
    return min(step, total_steps) / total_steps


class Schedule:
    """Base of every schedule: σ_t as a function of the optimizer step."""

    name: ClassVar[str]
    #: True if σ_t never increases with t (what `horizon`'s search relies on).
    monotone: ClassVar[bool] = True
    #: True if σ follows a metric: feed it with `observe` after each evaluation.
    needs_metric: ClassVar[bool] = False

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def observe(self, metric: float) -> None:
        """Record a validation metric (lower is better). Schedules with
        ``needs_metric`` update their state; the others do not depend on it."""
        del metric

    @property
    def spec(self) -> str:
        """The string `parse` turns back into an equal schedule."""
        params = ",".join(f"{field.name}={getattr(self, field.name)!r}" for field in _parameters(self))
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

    # Schedules without a metric-driven state have nothing to save.
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
class Ramp(Schedule):
    """Base of the schedules that go from σ_0 at t = 0 to σ_end at t = T, then stay flat:
    the fields and their checks; a subclass gives the shape of the way down."""

    sigma0: float
    total_steps: int
    sigma_end: float = 0.0

    def __post_init__(self):
        _require(math.isfinite(self.sigma0) and self.sigma0 >= 0, "sigma0", self.sigma0, "≥ 0")
        _require(0 <= self.sigma_end <= self.sigma0, "sigma_end", self.sigma_end, "in [0, sigma0]")
        _require(
            _is_integer(self.total_steps) and self.total_steps > 0,
            "total_steps",
            self.total_steps,
            "an integer > 0",
        )


@dataclasses.dataclass(frozen=True)
class Linear(Ramp):
    """σ_t = σ_0 + (σ_end − σ_0) · min(t, T) / T: a straight line, then flat at σ_end."""

    name: ClassVar[str] = "linear"

    def __call__(self, step: int) -> float:
        return self.sigma0 + (self.sigma_end - self.sigma0) * _fraction_done(step, self.total_steps)


@dataclasses.dataclass(frozen=True)
class Cosine(Ramp):
    """σ_t = σ_end + (σ_0 − σ_end) · (1 + cos(π · min(t, T) / T)) / 2."""

    name: ClassVar[str] = "cosine"

    def __call__(self, step: int) -> float:
        progress = _fraction_done(step, self.total_steps)
        cos = torch.cos if isinstance(progress, torch.Tensor) else math.cos
        return self.sigma_end + (self.sigma0 - self.sigma_end) * (1 + cos(math.pi * progress)) / 2


@dataclasses.dataclass(frozen=True)
class Neelakantan(Schedule):
    """Neelakantan et al. (2015): σ_t² = η / (1 + t)^γ, so σ_t = √η · (1 + t)^(−γ/2).

    η is a *variance* (the paper tried η ∈ {0.01, 0.3, 1.0}, γ = 0.55); this
    schedule returns its square root, the standard deviation. γ ∈ [0, 10].
    Computed as √η · (1 + t)^(−γ/2), which cannot overflow for any t.
    """

    eta: float
    gamma: float = 0.55
    name: ClassVar[str] = "neelakantan"

    def __post_init__(self):
        _require(math.isfinite(self.eta) and self.eta >= 0, "eta", self.eta, "≥ 0 (a variance)")
        _require(
            0 <= self.gamma <= _NEELAKANTAN_MAX_GAMMA,
            "gamma",
            self.gamma,
            f"in [0, {_NEELAKANTAN_MAX_GAMMA:g}]",
        )

    def __call__(self, step: int) -> float:
        return math.sqrt(self.eta) * (1 + step) ** (-self.gamma / 2)


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

    @property
    def needs_metric(self) -> bool:  # type: ignore[override]
        return self.inner.needs_metric

    def __call__(self, step: int) -> float:
        return self.inner(step)

    def observe(self, metric: float) -> None:
        self.inner.observe(metric)

    @property
    def spec(self) -> str:
        return f"relative:{self.inner.spec}"

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


@dataclasses.dataclass(frozen=True)
class PlateauState:
    """`Plateau`'s state: σ now, the best metric so far, evaluations since it last improved."""

    sigma: float
    best: float = math.inf
    bad_observations: int = 0


@dataclasses.dataclass
class Plateau(Schedule):
    """Plateau-driven decay, like ReduceLROnPlateau (and optax's `reduce_on_plateau`):
    σ ← max(σ·factor, min_sigma) after more than `patience` evaluations without
    the metric improving on its best by a relative `threshold`
    (metric < best · (1 − threshold)).

    σ_t does not depend on t but on the declared `state` (a `PlateauState`),
    which only `observe(metric)` advances: feed it the validation loss after
    each evaluation. `update(state, metric)` is the same transition as a pure
    function.
    """

    sigma0: float
    factor: float = 0.5
    patience: int = 2
    threshold: float = 1e-3
    min_sigma: float = 0.0
    state: PlateauState = dataclasses.field(init=False, repr=False, compare=False)
    name: ClassVar[str] = "plateau"
    monotone: ClassVar[bool] = False
    needs_metric: ClassVar[bool] = True

    def __post_init__(self):
        _require(math.isfinite(self.sigma0) and self.sigma0 >= 0, "sigma0", self.sigma0, "≥ 0")
        _require(0 < self.factor < 1, "factor", self.factor, "in (0, 1)")
        _require(
            _is_integer(self.patience) and self.patience >= 0, "patience", self.patience, "an integer ≥ 0"
        )
        _require(0 <= self.threshold < 1, "threshold", self.threshold, "in [0, 1)")
        _require(0 <= self.min_sigma <= self.sigma0, "min_sigma", self.min_sigma, "in [0, sigma0]")
        self.state = self.init()

    def init(self) -> PlateauState:
        """The state before any evaluation: σ = σ_0."""
        return PlateauState(sigma=self.sigma0)

    def update(self, state: PlateauState, metric: float) -> PlateauState:
        """The state after an evaluation that measured `metric` (lower is better; NaN never improves)."""
        if metric < state.best * (1 - self.threshold):
            return PlateauState(state.sigma, best=metric)
        if state.bad_observations + 1 > self.patience:
            return PlateauState(max(state.sigma * self.factor, self.min_sigma), state.best)
        return PlateauState(state.sigma, state.best, state.bad_observations + 1)

    def observe(self, metric: float) -> None:
        try:
            value = float(metric)
        except (TypeError, ValueError):
            raise UserError(f"plateau schedule: the metric must be a number, got {metric!r}") from None
        self.state = self.update(self.state, value)

    def __call__(self, step: int) -> float:
        return self.state.sigma

    def state_dict(self) -> dict:
        return dataclasses.asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = PlateauState(float(state["sigma"]), float(state["best"]), int(state["bad_observations"]))


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
    fields = {field.name: field for field in _parameters(cls)}
    kwargs = {}
    for item in filter(None, params.split(",")):
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or key not in fields:
            raise UserError(
                f"noise schedule {spec!r}: bad parameter {item!r}; {name} takes "
                + ", ".join(f"{k}=<{f.type}>" for k, f in fields.items())
            )
        if key in kwargs:
            raise UserError(f"noise schedule {spec!r}: {key} is given twice; give each parameter once")
        kwargs[key] = _number(spec, key, value.strip(), fields[key].type)
    missing = [k for k, f in fields.items() if f.default is dataclasses.MISSING and k not in kwargs]
    if missing:
        raise UserError(f"noise schedule {spec!r}: missing {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except UserError as error:
        raise UserError(f"noise schedule {spec!r}: {error}") from None


def _parameters(schedule) -> list[dataclasses.Field]:
    """A schedule's parameters: the dataclass fields its constructor takes (not its state)."""
    return [field for field in dataclasses.fields(schedule) if field.init]


def _number(spec: str, key: str, text: str, kind: str) -> int | float:
    """`text` as the parameter's type: a float, or an integer (also written 1e3)."""
    try:
        number = float(text)
    except ValueError:
        number = None
    if kind == "int":
        if number is not None and math.isfinite(number) and number.is_integer():
            return int(text) if text.lstrip("+-").isdigit() else int(number)
        raise UserError(f"noise schedule {spec!r}: {key}={text!r} is not an integer")
    if number is None:
        raise UserError(f"noise schedule {spec!r}: {key}={text!r} is not a number")
    return number

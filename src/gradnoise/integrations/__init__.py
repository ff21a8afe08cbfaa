"""Attach `GradientNoise` to the optimizers of training frameworks (optional extras).

    from gradnoise.integrations.lightning import GradientNoiseCallback     # gradnoise[lightning]
    from gradnoise.integrations.transformers import GradientNoiseCallback  # gradnoise[transformers]

Each callback adds the noise to exactly the gradients the framework's
optimizer is about to use: after the framework's gradient clipping and AMP
unscaling, once per optimizer step however many batches were accumulated.
The frameworks are imported by these modules only, never by `import gradnoise`.
"""

from __future__ import annotations

import copy
import importlib
from types import ModuleType

import torch

from gradnoise import lanes, schedules
from gradnoise.errors import UserError
from gradnoise.lanes import check_choice
from gradnoise.noise import GradientNoise

__all__ = [
    "NoiseCallbackCore",
    "check_choice",
    "check_mode",
    "check_monitor",
    "import_extra",
    "noise_seed",
    "schedule_from",
]


def import_extra(module: str, extra: str) -> ModuleType:
    """Import `module`, or explain which gradnoise extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UserError(
            f"{module!r} is not installed, and this integration needs it: pip install 'gradnoise[{extra}]'"
        ) from error


def schedule_from(schedule: schedules.Schedule | str) -> schedules.Schedule:
    """A schedule object from a schedule or its spec string ("none" is refused)."""
    parsed = schedules.parse(schedule) if isinstance(schedule, str) else schedule
    if not isinstance(parsed, schedules.Schedule):
        raise UserError(
            f"schedule={schedule!r} is not allowed: give a gradnoise schedule or a spec "
            "such as 'exp:sigma0=0.1,gamma=0.99' (leave the callback out for no noise)"
        )
    return parsed


def check_mode(mode: str) -> str:
    return check_choice("mode", mode, lanes.MODES)


def check_monitor(schedule: schedules.Schedule, monitor: str | None, example: str) -> str | None:
    """`monitor` if it fits the schedule: a metric name for a schedule that follows one, else
    None. `example`: the framework's name of the validation loss, for the messages."""
    if monitor is not None and not (isinstance(monitor, str) and monitor):
        raise UserError(
            f"monitor={monitor!r} is not allowed: give the name of a logged metric, e.g. {example!r}"
        )
    if schedule.needs_metric and monitor is None:
        raise UserError(
            f"schedule {schedule.spec!r} follows a metric: pass monitor=<the validation metric to feed it>, "
            f"e.g. monitor={example!r}; without one σ would stay at σ0"
        )
    if monitor is not None and not schedule.needs_metric:
        raise UserError(
            f"monitor={monitor!r} has no effect: schedule {schedule.spec!r} does not follow a metric "
            "(only plateau schedules do); leave monitor out"
        )
    return monitor


def noise_seed(seed: int, optimizer_index: int, rank: int, world_size: int) -> int:
    """The seed of optimizer `optimizer_index` on `rank`: seed + optimizer_index · world_size + rank.

    One-to-one over (optimizer, rank), so no two streams of a run share a seed;
    with rank 0 and world size 1 (the same seed on every rank, for DDP) it is
    seed + optimizer_index.
    """
    return seed + optimizer_index * world_size + rank


class NoiseCallbackCore:
    """What both frameworks' callbacks share: their options, checked when the callback is
    built (not at fit time), and the `GradientNoise` they attach.

    Args:
        schedule: a `gradnoise.schedules` schedule or a spec string.
        seed: seeds the noise, an integer in [0, 2⁶⁴); keep it equal on every rank under
            DDP so the replicas stay identical.
        mode: "absolute" or "relative".
        monitor: the validation metric a plateau schedule follows (see each callback).
            Required for plateau schedules, refused for the others.
        per_rank_seed: give every rank a seed of its own (see each callback): for sharded
            gradients (FSDP, DeepSpeed ZeRO), where each rank holds different parameters
            and needs noise of its own.
        track_stats: also log ‖g‖, ‖noise‖ and their ratio (a copy of the gradients and a
            host sync per step; see `GradientNoise`).
        log_sigma: log σ of the last step.
        correlation: "independent", or "anticorrelated": σ_t·ε_t − σ_{t−1}·ε_{t−1}
            (see `GradientNoise`).
        placement: "gradient", or "update": the noise goes to the parameters after the
            optimizer's step, lr·σ_t·ε_t (see `GradientNoise`).
    """

    #: The framework's name of the validation loss, for the messages about `monitor`.
    MONITOR_EXAMPLE = "val_loss"

    def __init__(
        self,
        schedule: schedules.Schedule | str,
        *,
        seed: int = 0,
        mode: str = "absolute",
        monitor: str | None = None,
        per_rank_seed: bool = False,
        track_stats: bool = False,
        log_sigma: bool = True,
        correlation: str = "independent",
        placement: str = "gradient",
    ):
        self.schedule = schedule_from(schedule)
        self.seed = lanes.check_seed(seed)
        self.mode = check_mode(mode)
        self.monitor = check_monitor(self.schedule, monitor, self.MONITOR_EXAMPLE)
        self.per_rank_seed = per_rank_seed
        self.track_stats = track_stats
        self.log_sigma = log_sigma
        self.correlation = check_choice("correlation", correlation, lanes.CORRELATIONS)
        self.placement = check_choice("placement", placement, lanes.PLACEMENTS)

    def attach(self, optimizer: torch.optim.Optimizer, seed: int) -> GradientNoise:
        """A `GradientNoise` with these options on `optimizer`, with its own copy of the
        schedule (a plateau's state is per optimizer)."""
        return GradientNoise(
            optimizer,
            copy.deepcopy(self.schedule),
            seed=seed,
            mode=self.mode,
            track_stats=self.track_stats,
            correlation=self.correlation,
            placement=self.placement,
        )

    def logged(self, noise: GradientNoise) -> dict[str, float]:
        """What to log after a step: σ (log_sigma) and the statistics (track_stats)."""
        values = {"sigma": noise.sigma} if self.log_sigma else {}
        if self.track_stats:
            values.update(noise.last_stats)
        return values

    @staticmethod
    def restore(noise: GradientNoise, state: dict) -> None:
        """Load a checkpoint's noise state; frameworks save rank 0's, so every rank keeps its seed."""
        seed = noise.seed
        noise.load_state_dict(state)
        noise.seed = seed

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.schedule.spec!r}, seed={self.seed}, mode={self.mode!r})"

"""Attach `GradientNoise` to the optimizers of training frameworks (optional extras).

    from gradnoise.integrations.lightning import GradientNoiseCallback     # gradnoise[lightning]
    from gradnoise.integrations.transformers import GradientNoiseCallback  # gradnoise[transformers]

Each callback adds the noise to exactly the gradients the framework's
optimizer is about to use: after the framework's gradient clipping and AMP
unscaling, once per optimizer step however many batches were accumulated.
The frameworks are imported by these modules only, never by `import gradnoise`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from gradnoise import schedules
from gradnoise.errors import UserError

__all__ = ["check_choice", "check_mode", "check_monitor", "import_extra", "noise_seed", "schedule_from"]


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


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    """`value` if it is one of `allowed`, GradientNoise's values for the argument `name`;
    checked when the callback is built, not at fit time."""
    if value not in allowed:
        raise UserError(f"{name}={value!r} is not allowed: use {' or '.join(map(repr, allowed))}")
    return value


def check_mode(mode: str) -> str:
    return check_choice("mode", mode, ("absolute", "relative"))


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

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

__all__ = ["check_mode", "import_extra", "schedule_from"]


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
    """`mode` if GradientNoise accepts it; checked when the callback is built, not at fit time."""
    if mode not in ("absolute", "relative"):
        raise UserError(f"mode={mode!r} is not allowed: use 'absolute' or 'relative'")
    return mode

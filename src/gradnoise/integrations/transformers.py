"""Gradient noise for the Hugging Face `transformers.Trainer`: `GradientNoiseCallback`.

    trainer = Trainer(model, args, train_dataset=data,
                      callbacks=[GradientNoiseCallback("exp:sigma0=0.1,gamma=0.99")])

At `on_train_begin` the Trainer has built its optimizer and wrapped it (with
accelerate's `AcceleratedOptimizer`); the callback attaches `GradientNoise` to
the torch optimizer inside. The Trainer clips the gradients (`max_grad_norm`),
then calls `optimizer.step()` once per `gradient_accumulation_steps`
micro-batches, and under fp16 AMP through a GradScaler that has already
unscaled them: the step pre-hook therefore adds the noise after clipping and
unscaling, once per optimizer step, and a step the scaler skips draws none.

σ of the last step is added to the Trainer's logs as ``gradnoise_sigma`` (in
`on_log`, so reporters registered before this callback, such as the default
TensorBoard or W&B ones, do not see it; it is written to `log_history`).

The callback is an `ExportableState`: with
``TrainingArguments(restore_callback_states_from_checkpoint=True)`` a resumed
run continues the noise stream exactly (step count and seed are kept in
the checkpoint's trainer_state.json).
"""

from __future__ import annotations

from typing import Any

import torch

from gradnoise import schedules
from gradnoise.errors import UserError
from gradnoise.integrations import check_mode, import_extra, schedule_from
from gradnoise.noise import GradientNoise

_transformers = import_extra("transformers", "transformers")
TrainerCallback = _transformers.TrainerCallback
ExportableState = _transformers.trainer_callback.ExportableState

__all__ = ["GradientNoiseCallback"]


def _torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's (possibly nested) wrappers."""
    inner = getattr(optimizer, "optimizer", None)
    while isinstance(inner, torch.optim.Optimizer):
        optimizer, inner = inner, getattr(inner, "optimizer", None)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UserError(
            f"GradientNoiseCallback needs a torch optimizer, the Trainer has {type(optimizer).__name__}"
        )
    return optimizer


class GradientNoiseCallback(TrainerCallback, ExportableState):
    """Adds N(0, σ_t²) noise to the gradients the Trainer's optimizer uses.

    g̃ = clip(g) + σ_t·ε, ε ~ N(0, I), at every optimizer step, with σ_t =
    schedule(t) (``mode="absolute"``) or schedule(t)·RMS(clip(g))
    (``mode="relative"``); t counts optimizer steps, not micro-batches.

    Args:
        schedule: a `gradnoise.schedules` schedule or a spec string.
        seed: seeds the noise; keep it equal on every rank under DDP so the
            replicas stay identical.
        mode: "absolute" or "relative".
        log_sigma: add ``gradnoise_sigma`` to the training logs.
    """

    def __init__(
        self,
        schedule: schedules.Schedule | str,
        *,
        seed: int = 0,
        mode: str = "absolute",
        log_sigma: bool = True,
    ):
        self.schedule = schedule_from(schedule)
        self.seed = seed
        self.mode = check_mode(mode)
        self.log_sigma = log_sigma
        self.noise: GradientNoise | None = None
        # Set by the Trainer when it restores this callback from a checkpoint.
        self.noise_state: dict | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs) -> None:
        if optimizer is None:
            raise UserError("GradientNoiseCallback: the Trainer passed no optimizer to on_train_begin")
        if self.noise is not None:
            self.noise.remove()
        self.noise = GradientNoise(_torch_optimizer(optimizer), self.schedule, seed=self.seed, mode=self.mode)
        if self.noise_state is not None:
            self.noise.load_state_dict(self.noise_state)
            self.noise_state = None

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if not (self.log_sigma and self.noise is not None and logs is not None and "loss" in logs):
            return
        logs["gradnoise_sigma"] = self.noise.sigma
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["gradnoise_sigma"] = self.noise.sigma

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if self.noise is not None:
            self.noise.remove()

    def state(self) -> dict[str, Any]:
        noise_state = self.noise.state_dict() if self.noise is not None else self.noise_state
        return {
            "args": {
                "schedule": self.schedule.spec,
                "seed": self.seed,
                "mode": self.mode,
                "log_sigma": self.log_sigma,
            },
            "attributes": {"noise_state": noise_state},
        }

    def __repr__(self) -> str:
        return f"GradientNoiseCallback({self.schedule.spec!r}, seed={self.seed}, mode={self.mode!r})"

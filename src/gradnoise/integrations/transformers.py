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

Logs. σ of the last step goes into each training log as ``gradnoise_sigma``
(and, with ``track_stats``, ``gradnoise_grad_norm``, ``gradnoise_noise_norm``,
``gradnoise_noise_to_grad``), through the Trainer's own `on_log`: callbacks
registered after this one see them, as does `state.log_history`. The Trainer
puts its reporters (TensorBoard, W&B, ...) before the callbacks you pass; for
them to record these values, move this callback first::

    trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(callback))

Resuming. A resumed run continues the noise at t = `state.global_step` (the
Trainer's optimizer steps), so no step's key is used twice. With
``TrainingArguments(restore_callback_states_from_checkpoint=True)`` it
continues exactly: the callback is an `ExportableState` whose state (step, σ
and a plateau schedule's state) is kept in the checkpoint's
trainer_state.json. The Trainer then *replaces* the callback object you passed
with a new one built from the saved arguments: find it in
`trainer.callback_handler.callbacks`, not in your variable.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from gradnoise import schedules
from gradnoise.errors import UserError
from gradnoise.integrations import NoiseCallbackCore, import_extra, noise_seed
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


class GradientNoiseCallback(NoiseCallbackCore, TrainerCallback, ExportableState):
    """Adds N(0, σ_t²) noise to the gradients the Trainer's optimizer uses.

    g̃ = clip(g) + σ_t·ε, ε ~ N(0, I), at every optimizer step, with σ_t =
    schedule(t) (``mode="absolute"``) or schedule(t)·RMS(clip(g))
    (``mode="relative"``); t counts optimizer steps, not micro-batches.

    Options: see `NoiseCallbackCore`. ``per_rank_seed`` seeds rank r with ``seed + r``
    (`args.process_index`); ``monitor`` is the evaluation metric a plateau schedule
    follows, fed to it at every evaluation during training: "eval_loss", or "loss"
    (the ``eval_`` prefix is added as for ``metric_for_best_model``). The values go into
    the training logs prefixed ``gradnoise_``.
    """

    MONITOR_EXAMPLE = "eval_loss"

    def __init__(self, schedule: schedules.Schedule | str, **options):
        super().__init__(schedule, **options)
        self.noise: GradientNoise | None = None
        # Set by the Trainer when it restores this callback from a checkpoint.
        self.noise_state: dict | None = None
        self._training = False

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs) -> None:
        if optimizer is None:
            raise UserError("GradientNoiseCallback: the Trainer passed no optimizer to on_train_begin")
        if self.noise is not None:
            self.noise.remove()
        rank = args.process_index if self.per_rank_seed else 0
        self.noise = self.attach(_torch_optimizer(optimizer), noise_seed(self.seed, 0, rank, 1))
        if self.noise_state is not None:
            self.restore(self.noise, self.noise_state)
            self.noise_state = None
        elif state.global_step > 0:
            # Resumed without this callback's state: continue t, never reuse a step's key.
            self.noise.step = state.global_step
            lost = [
                *(["the plateau schedule restarts at σ0"] if self.schedule.needs_metric else []),
                *(["the first step lacks −σ_{t−1}·ε_{t−1}"] if self.correlation == "anticorrelated" else []),
            ]
            if lost:
                warnings.warn(
                    f"GradientNoiseCallback: resumed at step {state.global_step} without its saved state, so "
                    f"{' and '.join(lost)}; pass TrainingArguments("
                    "restore_callback_states_from_checkpoint=True) to continue it",
                    stacklevel=2,
                )
        self._training = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs) -> None:
        if self.monitor is None or not self._training or self.noise is None:
            return
        metrics = metrics or {}
        name = self.monitor if self.monitor in metrics else f"eval_{self.monitor}"
        if name not in metrics:
            raise UserError(
                f"GradientNoiseCallback: monitor={self.monitor!r} is not among the evaluation metrics "
                f"({', '.join(sorted(metrics)) or 'none'})"
            )
        self.noise.observe(metrics[name])

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if self.noise is None or logs is None or "loss" not in logs:
            return  # not a training log
        values = {f"gradnoise_{name}": value for name, value in self.logged(self.noise).items()}
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if self.noise is not None:
            self.noise.remove()
        self._training = False

    def state(self) -> dict[str, Any]:
        noise_state = self.noise.state_dict() if self.noise is not None else self.noise_state
        return {
            "args": {
                "schedule": self.schedule.spec,
                "seed": self.seed,
                "mode": self.mode,
                "monitor": self.monitor,
                "per_rank_seed": self.per_rank_seed,
                "track_stats": self.track_stats,
                "log_sigma": self.log_sigma,
                "correlation": self.correlation,
                "placement": self.placement,
            },
            "attributes": {"noise_state": noise_state},
        }

"""Gradient noise for PyTorch Lightning: `GradientNoiseCallback`.

    trainer = lightning.Trainer(gradient_clip_val=1.0,
                                callbacks=[GradientNoiseCallback("exp:sigma0=0.1,gamma=0.99")])

Where the noise goes. Lightning runs the training step, backward, the
`on_before_optimizer_step` hooks and gradient clipping *inside* the closure it
passes to `optimizer.step(closure)`; `GradientNoise` wraps that closure, so the
noise is added after the gradients are computed and clipped, right before the
update. With 16-bit AMP Lightning calls the closure, unscales and clips first,
then `scaler.step` without a closure; the noise is then added at the start of
the step, also after clipping, and steps the scaler skips draw no noise.

One `GradientNoise` per optimizer of the trainer (optimizer i is seeded with
`seed + i`, or `seed + i·world_size + rank` with ``per_rank_seed=True``),
attached at fit start, detached at teardown. Its state (step count, σ and a
plateau schedule's state) is saved in Lightning checkpoints, so a resumed fit
continues the noise stream exactly.

A plateau schedule follows a validation metric, as `ReduceLROnPlateau` does
in Lightning: ``monitor="val_loss"`` names the metric (logged with
``self.log``) fed to it at the end of every validation during fit.
"""

from __future__ import annotations

from typing import Any

import torch

from gradnoise import schedules
from gradnoise.errors import UserError
from gradnoise.integrations import NoiseCallbackCore, import_extra, noise_seed
from gradnoise.noise import GradientNoise

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone `pytorch_lightning` package works the same way
    Callback = import_extra("pytorch_lightning", "lightning").Callback

__all__ = ["GradientNoiseCallback"]


class GradientNoiseCallback(NoiseCallbackCore, Callback):
    """Adds N(0, σ_t²) noise to the gradients of every optimizer of the trainer.

    g̃ = clip(g) + σ_t·ε, ε ~ N(0, I), at every optimizer step, with σ_t =
    schedule(t) (``mode="absolute"``) or schedule(t)·RMS(clip(g))
    (``mode="relative"``); t counts optimizer steps, not batches.

    Options: see `NoiseCallbackCore`. ``seed`` seeds optimizer i with ``seed + i``;
    ``per_rank_seed`` seeds optimizer i on rank r with ``seed + i·world_size + r``;
    ``monitor`` names a metric logged by ``self.log`` in validation (e.g. "val_loss"),
    read from `trainer.callback_metrics` at the end of each validation and averaged
    over the ranks.

    Logged via `pl_module.log` at every training batch (the optimizer's index
    appended when there are several): ``gradnoise/sigma``, and with
    ``track_stats`` ``gradnoise/grad_norm``, ``gradnoise/noise_norm``,
    ``gradnoise/noise_to_grad``.
    """

    def __init__(self, schedule: schedules.Schedule | str, **options):
        super().__init__(schedule, **options)
        self.noises: list[GradientNoise] = []
        self._restored: list[dict] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(schedule=self.schedule.spec, seed=self.seed, mode=self.mode)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._detach()
        rank, world_size = (trainer.global_rank, trainer.world_size) if self.per_rank_seed else (0, 1)
        self.noises = [
            self.attach(optimizer, noise_seed(self.seed, index, rank, world_size))
            for index, optimizer in enumerate(trainer.optimizers)
        ]
        if self._restored is not None:
            self._load_noise_states(self._restored)
            self._restored = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        several = len(self.noises) > 1
        for index, noise in enumerate(self.noises):
            for name, value in self.logged(noise).items():
                pl_module.log(
                    f"gradnoise/{name}{index if several else ''}", value, on_step=True, on_epoch=False
                )

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.monitor is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            logged = ", ".join(sorted(trainer.callback_metrics)) or "none"
            raise UserError(
                f"GradientNoiseCallback: monitor={self.monitor!r} was not logged by validation "
                f"(logged: {logged}); log it with self.log({self.monitor!r}, ...) in validation_step"
            )
        # Every rank must take the same σ: average the metric as the ranks saw it.
        mean = trainer.strategy.reduce(
            torch.as_tensor(value, dtype=torch.float32, device=pl_module.device), reduce_op="mean"
        )
        for noise in self.noises:
            noise.observe(float(mean))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._detach()

    def _detach(self) -> None:
        for noise in self.noises:
            noise.remove()

    def state_dict(self) -> dict[str, Any]:
        if not self.noises and self._restored is not None:
            return {"noise": self._restored}
        return {"noise": [noise.state_dict() for noise in self.noises]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before it builds the optimizers (except
        # for strategies that restore after setup): keep the state until then.
        if self.noises:
            self._load_noise_states(state_dict["noise"])
        else:
            self._restored = list(state_dict["noise"])

    def _load_noise_states(self, states: list[dict]) -> None:
        if len(states) != len(self.noises):
            raise UserError(
                f"the checkpoint has gradient-noise state for {len(states)} optimizer(s), "
                f"but the trainer has {len(self.noises)}"
            )
        for noise, state in zip(self.noises, states, strict=True):
            self.restore(noise, state)

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
`seed + i`), attached at fit start, detached at teardown. Its state (step
count and seed) is saved in Lightning checkpoints, so a resumed fit
continues the noise stream exactly.
"""

from __future__ import annotations

from typing import Any

from gradnoise import schedules
from gradnoise.errors import UserError
from gradnoise.integrations import check_mode, import_extra, schedule_from
from gradnoise.noise import GradientNoise

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone `pytorch_lightning` package works the same way
    Callback = import_extra("pytorch_lightning", "lightning").Callback

__all__ = ["GradientNoiseCallback"]


class GradientNoiseCallback(Callback):
    """Adds N(0, σ_t²) noise to the gradients of every optimizer of the trainer.

    g̃ = clip(g) + σ_t·ε, ε ~ N(0, I), at every optimizer step, with σ_t =
    schedule(t) (``mode="absolute"``) or schedule(t)·RMS(clip(g))
    (``mode="relative"``); t counts optimizer steps, not batches.

    Args:
        schedule: a `gradnoise.schedules` schedule or a spec string.
        seed: seeds the noise of optimizer i with ``seed + i``. Keep it equal
            on every rank under DDP so the replicas stay identical.
        mode: "absolute" or "relative".
        log_sigma: log σ of the last step as ``gradnoise/sigma`` (with the
            optimizer's index appended when there are several) via `pl_module.log`.
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
        self.noises: list[GradientNoise] = []
        self._restored: list[dict] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(schedule=self.schedule.spec, seed=self.seed, mode=self.mode)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._detach()
        self.noises = []
        for index, optimizer in enumerate(trainer.optimizers):
            noise = GradientNoise(optimizer, self.schedule, seed=self.seed + index, mode=self.mode)
            self.noises.append(noise)
        if self._restored is not None:
            self._load_noise_states(self._restored)
            self._restored = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.log_sigma:
            return
        several = len(self.noises) > 1
        for index, noise in enumerate(self.noises):
            name = f"gradnoise/sigma{index}" if several else "gradnoise/sigma"
            pl_module.log(name, noise.sigma, on_step=True, on_epoch=False)

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
            noise.load_state_dict(state)

    def __repr__(self) -> str:
        return f"GradientNoiseCallback({self.schedule.spec!r}, seed={self.seed}, mode={self.mode!r})"

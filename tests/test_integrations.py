"""The Lightning and transformers callbacks, run with the real libraries on CPU.

Every run trains a tiny network with SGD (lr 1, no momentum) and clips the
gradient norm to 1e-6. The gradients then move a parameter by at most ~1e-6
per step, so noisy minus noiseless parameters is, to that accuracy, minus the
sum of the noise: N(0, lr²·Σ_t σ_t²) per element. Noise added before the
clipping would be clipped away; noise drawn per micro-batch would double the
variance; a wrong stream would not match the library's own.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradnoise import GradientNoise, UserError, schedules
from gradnoise.integrations import import_extra

CLIP = 1e-6
SIGMA = 0.05
ACCUMULATE = 2
BATCH = 8


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(16, 64), nn.Linear(64, 64, bias=False), nn.Tanh(), nn.Linear(64, 16, bias=False)
    )


def tiny_data(batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    n = batches * BATCH
    return torch.randint(0, 16, (n,), generator=generator), torch.randint(0, 16, (n,), generator=generator)


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def library_noise(schedule: schedules.Schedule, steps: int, seed: int = 0) -> torch.Tensor:
    """Σ_t σ_t·ε_t as GradientNoise alone adds it: SGD(lr=1) steps on zero gradients."""
    net = tiny_net()
    start = flat(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    GradientNoise(optimizer, schedule, seed=seed)
    for _ in range(steps):
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
    return flat(net) - start


def assert_noise_matches(difference: torch.Tensor, schedule: schedules.Schedule, steps: int) -> None:
    """difference = noisy − noiseless parameters after `steps` SGD(lr=1) steps."""
    expected = library_noise(schedule, steps)
    # Each step's clipped gradient moves each element by at most CLIP.
    torch.testing.assert_close(difference, expected, rtol=0, atol=4 * steps * CLIP)
    # Independently of the library's stream: the amount is consistent with σ.
    n = difference.numel()
    sd = math.sqrt(sum(schedule(t) ** 2 for t in range(steps)))
    assert abs(difference.mean().item()) < 5 * sd / math.sqrt(n)
    # sample sd of n normals: relative standard error 1/sqrt(2n)
    assert abs(difference.std().item() / sd - 1) < 5 / math.sqrt(2 * n)


def count_steps(optimizer: torch.optim.Optimizer) -> list[int]:
    calls = [0]

    def count(*_):
        calls[0] += 1

    optimizer.register_step_post_hook(count)
    return calls


# --- helpers shared by both integrations --------------------------------------------


def test_missing_extra_names_the_extra_to_install():
    with pytest.raises(UserError, match=r"gradnoise\[lightning\]"):
        import_extra("gradnoise_no_such_module", "lightning")


# --- Lightning ------------------------------------------------------------------


@pytest.fixture(scope="module")
def lightning_parts():
    lightning = pytest.importorskip("lightning")
    from gradnoise.integrations.lightning import GradientNoiseCallback

    class TinyModule(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_net()
            self.optimizer_steps: list[int] = [0]

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
            self.optimizer_steps = count_steps(optimizer)
            return optimizer

    def fit(module, steps, callbacks, batches, ckpt_path=None):
        x, y = tiny_data(batches)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
        trainer = lightning.Trainer(
            max_steps=steps,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            gradient_clip_val=CLIP,
            accumulate_grad_batches=ACCUMULATE,
            callbacks=callbacks,
        )
        trainer.fit(module, loader, ckpt_path=ckpt_path)
        return trainer

    return TinyModule, GradientNoiseCallback, fit


def test_lightning_noise_lands_after_clipping_once_per_optimizer_step(lightning_parts):
    TinyModule, GradientNoiseCallback, fit = lightning_parts
    steps = 3
    clean = TinyModule()
    fit(clean, steps, [], batches=steps * ACCUMULATE)
    noisy = TinyModule()
    callback = GradientNoiseCallback(schedules.Constant(SIGMA), seed=0)
    trainer = fit(noisy, steps, [callback], batches=steps * ACCUMULATE)

    assert callback.noises[0].step == trainer.global_step == noisy.optimizer_steps[0] == steps
    assert_noise_matches(flat(noisy) - flat(clean), schedules.Constant(SIGMA), steps)
    # detached at teardown: a later step adds nothing
    optimizer = trainer.optimizers[0]
    before = flat(noisy)
    for p in noisy.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    torch.testing.assert_close(flat(noisy), before, rtol=0, atol=0)


def test_lightning_checkpoint_resumes_the_noise_stream_and_logs_sigma(lightning_parts, tmp_path):
    TinyModule, GradientNoiseCallback, fit = lightning_parts
    schedule = schedules.Exponential(sigma0=SIGMA, gamma=0.9)
    steps, batches = 4, 2 * ACCUMULATE  # an epoch is 2 optimizer steps

    whole = TinyModule()
    whole_callback = GradientNoiseCallback(schedule, seed=3)
    trainer = fit(whole, steps, [whole_callback], batches)
    assert trainer.callback_metrics["gradnoise/sigma"].item() == pytest.approx(schedule(steps - 1))

    first = TinyModule()
    first_trainer = fit(first, steps // 2, [GradientNoiseCallback(schedule, seed=3)], batches)
    first_trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed = TinyModule()
    resumed_callback = GradientNoiseCallback(schedule, seed=3)
    fit(resumed, steps, [resumed_callback], batches, ckpt_path=tmp_path / "half.ckpt")

    assert resumed_callback.noises[0].step == steps
    # equal up to the clipped gradients (the resumed data order may differ); a
    # restarted noise stream would differ by ~σ
    torch.testing.assert_close(flat(resumed), flat(whole), rtol=0, atol=4 * steps * CLIP)


def test_lightning_callback_rejects_bad_arguments(lightning_parts):
    _, GradientNoiseCallback, _ = lightning_parts
    with pytest.raises(UserError, match="mode='loud'"):
        GradientNoiseCallback("const:sigma=0.1", mode="loud")
    with pytest.raises(UserError, match="'none'"):
        GradientNoiseCallback("none")


# --- transformers ---------------------------------------------------------------


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = tiny_net()

    def forward(self, input_ids, labels=None):
        logits = self.net(input_ids)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


@pytest.fixture(scope="module")
def transformers_parts():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from gradnoise.integrations.transformers import GradientNoiseCallback

    def train(output_dir, steps, callbacks, **overrides):
        x, y = tiny_data(16)
        dataset = [{"input_ids": int(a), "labels": int(b)} for a, b in zip(x, y, strict=True)]
        settings = dict(
            output_dir=str(output_dir),
            max_steps=steps,
            per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=ACCUMULATE,
            learning_rate=1.0,
            optim="sgd",
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=CLIP,
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            seed=0,
        )
        settings.update(overrides)
        model = TinyLM()
        trainer = transformers.Trainer(
            model=model,
            args=transformers.TrainingArguments(**settings),
            train_dataset=dataset,
            callbacks=callbacks,
        )
        counter = {}
        create_optimizer = trainer.create_optimizer

        def create_and_count(*args, **kwargs):
            optimizer = create_optimizer(*args, **kwargs)
            counter["steps"] = count_steps(optimizer)
            return optimizer

        trainer.create_optimizer = create_and_count
        trainer.train(resume_from_checkpoint=settings.get("resume_from_checkpoint"))
        return model, trainer, counter["steps"][0]

    return GradientNoiseCallback, train


def test_transformers_noise_once_per_optimizer_step_after_clipping(transformers_parts, tmp_path):
    GradientNoiseCallback, train = transformers_parts
    steps = 3
    clean, _, _ = train(tmp_path / "clean", steps, [])
    callback = GradientNoiseCallback(schedules.Constant(SIGMA), seed=0)
    noisy, trainer, optimizer_steps = train(tmp_path / "noisy", steps, [callback])

    assert callback.noise.step == trainer.state.global_step == optimizer_steps == steps
    assert_noise_matches(flat(noisy) - flat(clean), schedules.Constant(SIGMA), steps)
    logged = [entry["gradnoise_sigma"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [SIGMA] * steps


def test_transformers_resume_continues_the_noise_stream(transformers_parts, tmp_path):
    GradientNoiseCallback, train = transformers_parts
    schedule = "exp:sigma0=0.05,gamma=0.9"
    steps = 4
    whole, _, _ = train(tmp_path / "whole", steps, [GradientNoiseCallback(schedule, seed=3)])
    train(
        tmp_path / "half",
        steps // 2,
        [GradientNoiseCallback(schedule, seed=3)],
        save_strategy="steps",
        save_steps=steps // 2,
    )
    resumed, trainer, _ = train(
        tmp_path / "resumed",
        steps,
        [GradientNoiseCallback(schedule, seed=3)],
        resume_from_checkpoint=str(tmp_path / "half" / f"checkpoint-{steps // 2}"),
        restore_callback_states_from_checkpoint=True,
    )
    restored = [c for c in trainer.callback_handler.callbacks if isinstance(c, GradientNoiseCallback)]
    assert len(restored) == 1 and restored[0].noise.step == steps
    torch.testing.assert_close(flat(resumed), flat(whole), rtol=0, atol=4 * steps * CLIP)

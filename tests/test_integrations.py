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
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradnoise import GradientNoise, UserError, schedules
from gradnoise.integrations import import_extra, noise_seed

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


def library_noise(schedule: schedules.Schedule, steps: int, seed: int = 0, **options) -> torch.Tensor:
    """Σ_t σ_t·ε_t as GradientNoise alone adds it: SGD(lr=1) steps on zero gradients."""
    net = tiny_net()
    start = flat(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    GradientNoise(optimizer, schedule, seed=seed, **options)
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


def test_seeds_per_optimizer_and_rank_are_one_to_one():
    seeds = {noise_seed(7, index, rank, 4) for index in range(3) for rank in range(4)}
    assert len(seeds) == 12
    assert [noise_seed(7, index, 0, 1) for index in range(3)] == [7, 8, 9]  # DDP: the same on every rank


# A plateau schedule that decays at every evaluation after the first, whatever
# the metric does: improving would need metric < best·(1 − 0.99).
PLATEAU = schedules.Plateau(sigma0=SIGMA, factor=0.5, patience=0, threshold=0.99)


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

    class ValidatedModule(TinyModule):
        def __init__(self):
            super().__init__()
            self.validations = 0  # outside the sanity check

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self.net(x), y))

        def on_validation_epoch_end(self):
            if not self.trainer.sanity_checking:
                self.validations += 1

    def fit(module, steps, callbacks, batches, ckpt_path=None, validate=False):
        x, y = tiny_data(batches)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
        # With validate: one validation batch after every optimizer step, after a sanity check.
        validation = {"val_check_interval": ACCUMULATE, "limit_val_batches": 1} if validate else {}
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
            **validation,
        )
        trainer.fit(module, loader, val_dataloaders=loader if validate else None, ckpt_path=ckpt_path)
        return trainer

    return TinyModule, ValidatedModule, GradientNoiseCallback, fit


def test_lightning_noise_lands_after_clipping_once_per_optimizer_step(lightning_parts):
    TinyModule, _, GradientNoiseCallback, fit = lightning_parts
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
    TinyModule, _, GradientNoiseCallback, fit = lightning_parts
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


def test_lightning_passes_correlation_and_placement_on(lightning_parts):
    TinyModule, _, GradientNoiseCallback, fit = lightning_parts
    steps, schedule = 3, schedules.Exponential(sigma0=SIGMA, gamma=0.9)
    clean = TinyModule()
    fit(clean, steps, [], batches=steps * ACCUMULATE)
    noisy = TinyModule()
    options = {"correlation": "anticorrelated", "placement": "update"}
    callback = GradientNoiseCallback(schedule, seed=0, **options)
    fit(noisy, steps, [callback], batches=steps * ACCUMULATE)
    assert callback.noises[0].step == steps
    expected = library_noise(schedule, steps, **options)
    torch.testing.assert_close(flat(noisy) - flat(clean), expected, rtol=0, atol=4 * steps * CLIP)
    # anticorrelated: the sum telescopes to σ_{T−1}·ε_{T−1}, far below independent noise's spread
    assert expected.std().item() < 1.5 * schedule(steps - 1)


def test_lightning_callback_rejects_bad_arguments(lightning_parts):
    _, _, GradientNoiseCallback, _ = lightning_parts
    with pytest.raises(UserError, match="mode='loud'"):
        GradientNoiseCallback("const:sigma=0.1", mode="loud")
    with pytest.raises(UserError, match=r"correlation='pink'.*'anticorrelated'"):
        GradientNoiseCallback("const:sigma=0.1", correlation="pink")
    with pytest.raises(UserError, match=r"placement='weights'.*'update'"):
        GradientNoiseCallback("const:sigma=0.1", placement="weights")
    with pytest.raises(UserError, match="'none'"):
        GradientNoiseCallback("none")
    # a plateau schedule left without a metric would stay at σ0 forever
    with pytest.raises(UserError, match="monitor="):
        GradientNoiseCallback("plateau:sigma0=0.1")
    with pytest.raises(UserError, match="monitor="):
        GradientNoiseCallback("relative:plateau:sigma0=0.1")
    with pytest.raises(UserError, match="monitor='val_loss' has no effect"):
        GradientNoiseCallback("const:sigma=0.1", monitor="val_loss")


def test_lightning_plateau_decays_on_the_monitored_metric(lightning_parts, tmp_path):
    _, ValidatedModule, GradientNoiseCallback, fit = lightning_parts
    steps, batches = 6, 6 * ACCUMULATE
    module = ValidatedModule()
    callback = GradientNoiseCallback(PLATEAU, monitor="val_loss")
    trainer = fit(module, steps, [callback], batches, validate=True)

    schedule = callback.noises[0].schedule
    assert module.validations == steps
    # the first validation sets the best; each later one halves σ (the sanity check does not count)
    assert schedule(0) == pytest.approx(SIGMA * 0.5 ** (steps - 1))
    assert callback.noises[0].sigma == pytest.approx(SIGMA * 0.5 ** (steps - 2))  # σ of the last step
    assert PLATEAU.state.sigma == SIGMA  # the callback's schedule is a template, left untouched
    # the decayed state goes into checkpoints
    trainer.save_checkpoint(tmp_path / "plateau.ckpt")
    resumed = GradientNoiseCallback(PLATEAU, monitor="val_loss")
    fit(
        ValidatedModule(),
        steps + 1,
        [resumed],
        batches,
        ckpt_path=tmp_path / "plateau.ckpt",
        validate=True,
    )
    assert resumed.noises[0].sigma == pytest.approx(SIGMA * 0.5 ** (steps - 1))


def test_lightning_names_a_monitored_metric_that_was_not_logged(lightning_parts):
    _, ValidatedModule, GradientNoiseCallback, fit = lightning_parts
    with pytest.raises(UserError, match=r"monitor='val_los'.*val_loss"):
        fit(ValidatedModule(), 2, [GradientNoiseCallback(PLATEAU, monitor="val_los")], 4, validate=True)


def test_lightning_logs_the_noise_statistics(lightning_parts):
    TinyModule, _, GradientNoiseCallback, fit = lightning_parts
    callback = GradientNoiseCallback(schedules.Constant(SIGMA), track_stats=True)
    trainer = fit(TinyModule(), 2, [callback], 2 * ACCUMULATE)
    logged = {name: value.item() for name, value in trainer.callback_metrics.items()}
    n = sum(p.numel() for p in tiny_net().parameters())
    # ‖σε‖²/σ² ~ χ²_n; the clipped gradient's norm is at most CLIP
    assert abs(logged["gradnoise/noise_norm"] ** 2 / SIGMA**2 - n) < 5 * math.sqrt(2 * n)
    assert logged["gradnoise/grad_norm"] <= CLIP * (1 + 1e-3)
    assert logged["gradnoise/noise_to_grad"] == pytest.approx(
        logged["gradnoise/noise_norm"] / logged["gradnoise/grad_norm"], rel=1e-4
    )
    assert logged["gradnoise/sigma"] == pytest.approx(SIGMA)


def test_lightning_per_rank_seeds(lightning_parts):
    """Sharded gradients: each rank and optimizer gets a seed of its own; DDP shares them across ranks."""
    _, _, GradientNoiseCallback, _ = lightning_parts
    optimizers = [torch.optim.SGD(tiny_net().parameters(), lr=1.0) for _ in range(2)]
    trainer = SimpleNamespace(global_rank=1, world_size=2, optimizers=optimizers)
    sharded = GradientNoiseCallback("const:sigma=0.1", seed=10, per_rank_seed=True)
    sharded.on_fit_start(trainer, None)
    assert [noise.seed for noise in sharded.noises] == [11, 13]
    sharded.teardown(trainer, None, "fit")  # one noise hook per optimizer at a time
    replicated = GradientNoiseCallback("const:sigma=0.1", seed=10)
    replicated.on_fit_start(trainer, None)
    assert [noise.seed for noise in replicated.noises] == [10, 11]
    # a checkpoint saved by rank 0 does not overwrite this rank's seeds
    sharded.load_state_dict(
        {"noise": [{**noise.state_dict(), "seed": 10 + i} for i, noise in enumerate(sharded.noises)]}
    )
    assert [noise.seed for noise in sharded.noises] == [11, 13]


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

    def train(output_dir, steps, callbacks, setup=None, **overrides):
        """Train TinyLM; `setup(trainer)` runs before `trainer.train()`."""
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
            eval_dataset=dataset[:BATCH],
            callbacks=callbacks,
        )
        if setup is not None:
            setup(trainer)
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


@pytest.fixture(scope="module")
def Recorder(transformers_parts):
    transformers = pytest.importorskip("transformers")

    class Recorder(transformers.TrainerCallback):
        """Keeps every log it is shown, as a reporter (TensorBoard, W&B) would send it."""

        def __init__(self):
            self.logs: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    return Recorder


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


def test_transformers_passes_correlation_and_placement_on_and_restores_them(transformers_parts, tmp_path):
    GradientNoiseCallback, train = transformers_parts
    schedule, steps = schedules.Exponential(sigma0=SIGMA, gamma=0.9), 4
    options = {"correlation": "anticorrelated", "placement": "update"}
    clean, _, _ = train(tmp_path / "clean", steps, [])
    whole, _, _ = train(tmp_path / "whole", steps, [GradientNoiseCallback(schedule, seed=0, **options)])
    expected = library_noise(schedule, steps, **options)
    torch.testing.assert_close(flat(whole) - flat(clean), expected, rtol=0, atol=4 * steps * CLIP)
    train(
        tmp_path / "half",
        steps // 2,
        [GradientNoiseCallback(schedule, seed=0, **options)],
        save_strategy="steps",
        save_steps=steps // 2,
    )
    resumed, trainer, _ = train(
        tmp_path / "resumed",
        steps,
        [GradientNoiseCallback(schedule, seed=0)],  # replaced by one built from the saved arguments
        resume_from_checkpoint=str(tmp_path / "half" / f"checkpoint-{steps // 2}"),
        restore_callback_states_from_checkpoint=True,
    )
    (restored,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, GradientNoiseCallback)]
    assert (restored.noise.correlation, restored.noise.placement) == ("anticorrelated", "update")
    torch.testing.assert_close(flat(resumed), flat(whole), rtol=0, atol=4 * steps * CLIP)


def test_transformers_resume_without_restored_state_continues_t(transformers_parts, tmp_path):
    """Default TrainingArguments do not restore callback states: t comes from global_step."""
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
    callback = GradientNoiseCallback(schedule, seed=3)
    resumed, _, _ = train(
        tmp_path / "resumed",
        steps,
        [callback],
        resume_from_checkpoint=str(tmp_path / "half" / f"checkpoint-{steps // 2}"),
    )
    assert callback.noise.step == steps
    # σ_t and the keys depend on t alone: restarting at t = 0 would differ by ~σ
    torch.testing.assert_close(flat(resumed), flat(whole), rtol=0, atol=4 * steps * CLIP)


def test_transformers_plateau_decays_on_the_monitored_metric(transformers_parts, tmp_path):
    GradientNoiseCallback, train = transformers_parts
    steps = 4
    callback = GradientNoiseCallback(PLATEAU, monitor="loss")  # the Trainer names it eval_loss
    _, trainer, _ = train(tmp_path / "plateau", steps, [callback], eval_strategy="steps", eval_steps=1)
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(evaluations) == steps
    # the first evaluation sets the best; each later one halves σ
    assert callback.noise.schedule(0) == pytest.approx(SIGMA * 0.5 ** (steps - 1))
    assert callback.noise.sigma == pytest.approx(SIGMA * 0.5 ** (steps - 2))  # σ of the last step
    assert callback.state()["attributes"]["noise_state"]["schedule_state"]["sigma"] == pytest.approx(
        SIGMA * 0.5 ** (steps - 1)
    )


def test_transformers_callback_refuses_a_plateau_without_its_metric(transformers_parts, tmp_path):
    GradientNoiseCallback, train = transformers_parts
    with pytest.raises(UserError, match="monitor="):
        GradientNoiseCallback("plateau:sigma0=0.1")
    with pytest.raises(UserError, match="has no effect"):
        GradientNoiseCallback("const:sigma=0.1", monitor="eval_loss")
    with pytest.raises(UserError, match=r"monitor='eval_accuracy'.*eval_loss"):
        train(
            tmp_path / "typo",
            2,
            [GradientNoiseCallback(PLATEAU, monitor="eval_accuracy")],
            eval_strategy="steps",
            eval_steps=1,
        )


def test_transformers_logs_the_noise_statistics_for_reporters(transformers_parts, Recorder, tmp_path):
    GradientNoiseCallback, train = transformers_parts
    steps = 2
    reporter, callback = Recorder(), GradientNoiseCallback(schedules.Constant(SIGMA), track_stats=True)

    def noise_first(trainer):  # the README's recipe: reporters come before user callbacks
        trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(callback))

    _, trainer, _ = train(tmp_path / "stats", steps, [reporter, callback], setup=noise_first)
    training_logs = [logs for logs in reporter.logs if "loss" in logs]
    assert len(training_logs) == steps
    n = sum(p.numel() for p in tiny_net().parameters())
    for logs in training_logs:
        assert logs["gradnoise_sigma"] == SIGMA
        assert abs(logs["gradnoise_noise_norm"] ** 2 / SIGMA**2 - n) < 5 * math.sqrt(2 * n)
        assert logs["gradnoise_noise_to_grad"] == pytest.approx(
            logs["gradnoise_noise_norm"] / logs["gradnoise_grad_norm"]
        )
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["gradnoise_noise_norm"] for entry in history] == [
        logs["gradnoise_noise_norm"] for logs in training_logs
    ]
    # Left after the reporter, the values reach log_history but not the reporter.
    late_reporter = Recorder()
    train(tmp_path / "late", 1, [late_reporter, GradientNoiseCallback(schedules.Constant(SIGMA))])
    assert not any("gradnoise_sigma" in logs for logs in late_reporter.logs)


def test_transformers_per_rank_seeds(transformers_parts):
    """Sharded gradients: rank r seeds with seed + r; a restored state (rank 0's) keeps this rank's seed."""
    GradientNoiseCallback, _ = transformers_parts
    optimizer = torch.optim.SGD(tiny_net().parameters(), lr=1.0)
    rank_one, fresh = SimpleNamespace(process_index=1), SimpleNamespace(global_step=0)
    sharded = GradientNoiseCallback("const:sigma=0.1", seed=10, per_rank_seed=True)
    sharded.on_train_begin(rank_one, fresh, None, optimizer=optimizer)
    sharded.on_train_end(rank_one, fresh, None)  # one noise hook per optimizer at a time
    replicated = GradientNoiseCallback("const:sigma=0.1", seed=10)
    replicated.on_train_begin(rank_one, fresh, None, optimizer=optimizer)
    replicated.on_train_end(rank_one, fresh, None)
    assert (sharded.noise.seed, replicated.noise.seed) == (11, 10)
    restored = GradientNoiseCallback("const:sigma=0.1", seed=10, per_rank_seed=True)
    restored.noise_state = {**replicated.noise.state_dict(), "step": 5}  # as rank 0 saved it
    restored.on_train_begin(rank_one, SimpleNamespace(global_step=5), None, optimizer=optimizer)
    assert (restored.noise.seed, restored.noise.step) == (11, 5)

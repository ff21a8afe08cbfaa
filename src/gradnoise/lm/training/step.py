"""One optimizer step of the loop (see trainer's docstring for what it does, in order): the
learning rate, the global batch of every run, forward and backward over the micro-batches,
noise, clipping and the update; and what a step leaves to log (‖g‖, ‖noise‖, σ).
"""

from __future__ import annotations

import math

import torch

from gradnoise.lm.config import TrainConfig
from gradnoise.lm.data import augment, batches
from gradnoise.lm.devices import to_device
from gradnoise.lm.training import replicas, setup
from gradnoise.lm.training.state import Replica, RunState


def active(run: RunState) -> list[tuple[int, Replica]]:
    """(index, replica) of the runs that have not diverged."""
    return [(m, r) for m, r in enumerate(run.replicas) if r.progress.diverged is None]


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr at decay_iters, then min_lr (nanoGPT).

    lr_t = lr · (t+1)/(warmup+1)                                      t < warmup
    lr_t = min_lr + ½(1 + cos(π (t - warmup)/(decay - warmup))) (lr - min_lr)   warmup ≤ t ≤ decay
    lr_t = min_lr                                                     t > decay
    """
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if step > cfg.decay_iters:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / max(1, cfg.decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (cfg.lr - cfg.min_lr)


def global_batch(
    run: RunState, tokens, cfgs: list[TrainConfig], vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next global batch of every run, (M, batch_size · world_size, T) on the CPU: each
    from its own generators, inputs augmented with its own char_substitution."""
    xs, ys = [], []
    for replica, cfg in zip(run.replicas, cfgs, strict=True):
        x, y = batches.get_batch(
            tokens, cfg.batch_size * run.dist_env.world_size, cfg.block_size, replica.batch_generator
        )
        if cfg.char_substitution > 0:
            x = augment.substitute_characters(x, cfg.char_substitution, vocab_size, replica.augment_generator)
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def train_step(run: RunState, model, step: int, cfg: TrainConfig, hyper: setup.Hyper, next_batch, autocast):
    """One optimizer step from `step` to step + 1 (see the module docstring).

    Returns each run's loss, (M,) (mean over micro-batches, on the device: not read back),
    the global micro-batches [(inputs, targets)] it drew, (M, N, T) each, and, for the
    last step of a log window, each run's gradient statistics (see gradient_stats; else None).
    """
    measure = (step + 1) % cfg.log_interval == 0
    if run.noise is not None:
        run.noise.track_stats = measure
    lr = learning_rate(step, cfg)
    for group_ in run.optimizer.param_groups:
        group_["lr"] = lr
    step_loss = torch.zeros(len(run.replicas), device=run.device)
    rows = run.dist_env.rows(cfg.batch_size)
    batches = []
    for micro_step in range(cfg.grad_accum):
        x, y = next_batch()
        batches.append((x, y))
        if run.dist_env.world_size > 1:
            # Average gradients across ranks only once, after the last micro-batch.
            model.require_backward_grad_sync = micro_step == cfg.grad_accum - 1
        with autocast:
            _, losses = model(
                to_device(x[:, rows], run.device),
                to_device(y[:, rows], run.device),
                label_smoothing=hyper.label_smoothing,
                embedding_noise_alpha=hyper.embedding_noise_alpha,
            )
            losses = losses / cfg.grad_accum
        # The sum's gradient in replica m's weights is loss_m's alone.
        run.scaler.scale(losses.sum()).backward()
        step_loss += losses.detach()
    run.scaler.unscale_(run.optimizer)  # no-op unless fp16: noise and clipping see true gradients
    if run.noise is not None and cfg.noise_placement == "before_clip":
        run.noise.apply()
    norms = None
    if hyper.clipping or (measure and run.noise is None):
        norms = replicas.replica_norms([p.grad for p in run.params if p.grad is not None])
        run.nonfinite_norms |= ~torch.isfinite(norms) & (hyper.grad_clip > 0)
    if hyper.clipping:
        replicas.clip_grad_norms_(run.params, hyper.grad_clip, norms)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.freezer.restore()
    return step_loss, batches, gradient_stats(run, norms, hyper) if measure else None


def gradient_stats(run: RunState, norms: torch.Tensor | None, hyper: setup.Hyper) -> list[dict]:
    """runlog.GRADIENT_FIELDS of the step just taken, per run: GradientNoise's own
    measurement (it tracked this step), or without noise ‖g‖ after clipping and no noise."""
    if run.noise is not None:
        return [dict(stats) for stats in run.noise.last_stats]
    clipped = replicas.clipped_norms(norms, hyper.grad_clip)
    return [{"grad_norm": norm, "noise_norm": 0.0, "noise_to_grad": 0.0} for norm in clipped]


def sigmas(run: RunState) -> list[float]:
    """σ of each run's last step (0 without noise)."""
    if run.noise is None:
        return [0.0] * len(run.replicas)
    return run.noise.sigma

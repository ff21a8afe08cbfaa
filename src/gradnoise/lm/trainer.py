"""The training loop, nanoGPT style: `train(cfg, run_dir)` reads top to bottom.

Per optimizer step (`step` counts completed steps, from 0):

    lr_t = warmup / cosine schedule (learning_rate)
    for each of grad_accum micro-batches: x, y = next batch; loss(x, y) / grad_accum → backward
    GradScaler.unscale_ (fp16 only) → [noise, if placed before clipping] → clip_grad_norm_
    optimizer.step()   ← GradientNoise's pre-hook adds N(0, σ_t²) here (placement "after_clip")

Randomness, and why each source has its own stream (the study pairs methods by seed):
    init          torch.manual_seed(seed) right before the model is built
    dropout       the global torch RNG, re-seeded with seed + rank after init
    batches       a torch.Generator seeded from (seed, "batches")
    augmentation  a torch.Generator seeded from (seed, "augmentation"): turning character
                  substitution on does not shift the batch stream
    noise         GradientNoise's own generator, seeded from (seed, "noise")
    eval batches  a fixed generator per split, seeded from a constant: every method and
                  every eval is scored on the same batches (drawn once, kept on the device)
So for a seed, every method sees the same init, batches and dropout masks.

Data parallel (torchrun sets RANK / WORLD_SIZE): every rank draws the *global* batch of
batch_size · world_size sequences from the shared batch generator and takes its own slice
(rank r: rows r·batch_size … (r+1)·batch_size - 1). The data stream therefore equals a
single process's with batch_size · world_size; DDP averages the gradients, and
GradientNoise uses the same seed on every rank, so the replicas stay identical. Rank 0
logs and checkpoints.

Outputs in run_dir: config.json, log.jsonl (one JSON object per logged step / eval),
checkpoints/ (see gradnoise.lm.checkpoint) and result.json (written last, atomically).
Timings (`time_s`, train_s) count training only, not evaluation or checkpointing, so
time-to-target is comparable across methods.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import socket
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import gradnoise
from gradnoise.errors import UserError
from gradnoise.lm import atomic, checkpoint, data, devices, runlog
from gradnoise.lm.config import TrainConfig
from gradnoise.lm.devices import describe_device, resolve_dtype, sync, to_device
from gradnoise.lm.model import GPT, load_weights, weights_for_saving

EVAL_SEED = 1337
EVAL_CHUNK = 8  # eval batches per forward pass
# Settings a resumed run may change: they do not alter the computation.
RESUMABLE_CHANGES = {"checkpoint_interval", "tensorboard", "wandb", "compile", "final_eval"}
LN2 = math.log(2)


def train(
    cfg: TrainConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, torch.Tensor, torch.Tensor], bool | None] | None = None,
) -> dict:
    """Train a GPT as `cfg` says; write outputs to run_dir; return the result dict.

    resume: continue from run_dir's latest checkpoint if there is one (else start afresh);
        a run that already finished returns its result without training again.
    on_step(step, inputs, targets): called after every optimizer step with the step
        number and that step's global batch (all micro-batches and ranks; CPU tensors,
        inputs after augmentation). Returning True stops the run like SIGTERM does:
        checkpoint, status "interrupted".

    Result: {"status": "done" | "diverged" | "interrupted", "error", "device", "host",
    "world_size", "finals": {...}} (finals listed in `_finals`).
    """
    run_dir = Path(run_dir)
    dist_env = DistributedEnv.from_environment()
    finished = False
    try:
        result = _train(cfg, run_dir, dist_env, resume=resume, progress=progress, on_step=on_step)
        finished = True
        return result
    finally:
        dist_env.close(wait_for_peers=finished)


def _train(cfg, run_dir, dist_env, *, resume, progress, on_step) -> dict:
    wall_start = time.perf_counter()
    rank, world = dist_env.rank, dist_env.world_size
    device = dist_env.resolve_device(cfg.device)
    ptdtype = resolve_dtype(cfg.dtype, device)
    use_compile = cfg.compile is True or (cfg.compile == "auto" and device.type == "cuda")
    if resume and (finished := _finished_result(run_dir, cfg)) is not None:
        return finished
    if not resume:
        _refuse_existing_run(run_dir)
    corpus = data.load(cfg.dataset)
    splits = {name: corpus.splits[name] for name in ("train", "val", "test") if name in corpus.splits}
    for name, tokens in splits.items():
        if len(tokens) <= cfg.block_size:
            raise UserError(
                f"the {name} split of {cfg.dataset} has {len(tokens):,} tokens, too few for "
                f"block_size={cfg.block_size}"
            )
    loggers = runlog.RunLog(run_dir, cfg, enabled=rank == 0)

    # Model: the init depends on the seed alone; dropout then draws from seed + rank.
    torch.manual_seed(cfg.seed)
    raw_model = GPT(cfg.model_config(corpus.vocab_size)).to(device)
    torch.manual_seed(cfg.seed + rank)

    optimizer = build_optimizer(raw_model, cfg, device)
    schedule = gradnoise.schedules.parse(cfg.noise)
    noise = None
    if schedule is not None:
        noise = gradnoise.GradientNoise(
            optimizer,
            schedule,
            seed=derive_seed(cfg.seed, "noise"),
            mode=cfg.noise_mode,
            attach=cfg.noise_placement == "after_clip",
        )
    scaler = torch.amp.GradScaler(device.type, enabled=ptdtype == torch.float16)
    batch_generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "batches"))
    augment_generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "augmentation"))

    book = Bookkeeping()
    latest = checkpoint.latest(run_dir) if resume else None
    if latest is not None:
        weights, state = checkpoint.load(latest)
        _check_resumable(state["config"], cfg)
        load_weights(raw_model, weights)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if noise is not None:
            noise.load_state_dict(state["noise"])
        batch_generator.set_state(state["batch_generator"])
        augment_generator.set_state(state["augment_generator"])
        _restore_rng(state["rng_per_rank"], rank, device)
        book = Bookkeeping(**state["book"])
    loggers.start(keep_through_step=book.step if latest is not None else None)
    if rank == 0:
        atomic.write_text(run_dir / runlog.CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n")

    model = torch.compile(raw_model) if use_compile else raw_model
    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    autocast = torch.autocast(device.type, dtype=ptdtype, enabled=ptdtype != torch.float32)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    tokens_per_step = cfg.batch_size * world * cfg.grad_accum * cfg.block_size

    def next_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The global batch (CPU) and this rank's slice of it (on the device)."""
        x, y = data.get_batch(splits["train"], cfg.batch_size * world, cfg.block_size, batch_generator)
        if cfg.char_substitution > 0:
            x = substitute_characters(x, cfg.char_substitution, corpus.vocab_size, augment_generator)
        rows = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
        return x, y, to_device(x[rows], device), to_device(y[rows], device)

    eval_batches = None
    stop = StopRequest()
    window = LossWindow()
    clock = TrainClock(book.train_s)
    bar = _progress_bar(cfg, book.step, enabled=progress and rank == 0)
    status, error = "done", None
    step = start_step = book.step
    evaluated_step = step if latest is not None else None

    with stop.on_sigterm():
        clock.start()
        while True:
            eval_due = step != evaluated_step and (step % cfg.eval_interval == 0 or step == cfg.max_iters)
            stopping = step == cfg.max_iters or stop.agreed(dist_env, step, cfg.log_interval)
            checkpoint_due = stopping or (
                cfg.checkpoint_interval > 0 and step % cfg.checkpoint_interval == 0 and step != start_step
            )
            log_due = step % cfg.log_interval == 0 and step != start_step
            if eval_due or checkpoint_due or log_due:
                # One host sync per event: read back the losses kept on the device.
                sync(device)
                clock.stop()
                bad = book.absorb(window.flush(dist_env))
                if bad is None and (eval_due or checkpoint_due) and not _all_finite(params):
                    # The last update broke the weights; its loss was still finite. Catch it
                    # before evaluating or checkpointing them.
                    bad = (step, "non-finite weights")
                if bad is not None:
                    status = "diverged"
                    error = _divergence_message(bad, noise, book)
                    break
                if log_due:
                    record = book.log_record(step, optimizer, noise, clock.elapsed, tokens_per_step)
                    loggers.log(record)
                    bar.set_postfix(
                        loss=f"{record['loss']:.4f}",
                        lr=f"{record['lr']:.2e}",
                        sigma=f"{record['sigma']:.3g}",
                        tok_s=f"{record['tokens_per_s']:.0f}",
                    )
                if eval_due:
                    if eval_batches is None:
                        eval_batches = draw_eval_batches(splits, cfg, dist_env, device)
                    losses = estimate_losses(model, eval_batches, autocast, dist_env)
                    book.record_eval(step, losses)
                    loggers.log({"kind": "eval", "step": step, **losses, "time_s": clock.elapsed})
                    if noise is not None and hasattr(noise.schedule, "observe"):
                        noise.schedule.observe(losses["val_loss"])
                    evaluated_step = step
                if checkpoint_due:
                    book.checkpoint_step = step
                    book.train_s = clock.elapsed
                    book.wall_s += time.perf_counter() - wall_start
                    wall_start = time.perf_counter()
                    save_run_state = {
                        "config": cfg.to_dict(),
                        "vocab": corpus.meta["vocab"],
                        "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(),
                        "noise": noise.state_dict() if noise is not None else None,
                        "batch_generator": batch_generator.get_state(),
                        "augment_generator": augment_generator.get_state(),
                        "rng_per_rank": _gather_rng(dist_env, device),
                        "book": book.state_dict(),
                    }
                    if rank == 0:
                        checkpoint.save(run_dir, step, weights_for_saving(raw_model), save_run_state)
                if stopping:
                    if step != cfg.max_iters:
                        status = "interrupted"
                    break
                clock.start()

            # One optimizer step.
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            seen_inputs, seen_targets = [], []
            for micro_step in range(cfg.grad_accum):
                x_all, y_all, x, y = next_batch()
                if on_step is not None:
                    seen_inputs.append(x_all)
                    seen_targets.append(y_all)
                if world > 1:
                    # Average gradients across ranks only once, after the last micro-batch.
                    train_model.require_backward_grad_sync = micro_step == cfg.grad_accum - 1
                with autocast:
                    _, loss = train_model(x, y, label_smoothing=cfg.label_smoothing)
                    loss = loss / cfg.grad_accum
                scaler.scale(loss).backward()
                step_loss += loss.detach()
            scaler.unscale_(optimizer)  # no-op unless fp16: noise and clipping see true gradients
            if noise is not None and cfg.noise_placement == "before_clip":
                noise.apply()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window.add(step, step_loss)
            bar.update(1)
            if on_step is not None and on_step(step, torch.cat(seen_inputs), torch.cat(seen_targets)):
                stop.request()
    bar.close()

    finals = _finals(book, clock, tokens_per_step, noise)
    if status == "done" and cfg.final_eval:
        for split in ("val", "test"):
            if split in splits:
                nats = exact_loss(raw_model, splits[split], cfg, autocast, dist_env, device)
                finals[f"{split}_loss_full"] = nats
                finals[f"{split}_bpc_full"] = nats / LN2
    finals["wall_s"] = book.wall_s + time.perf_counter() - wall_start
    result = {
        "status": status,
        "error": error,
        "device": describe_device(device),
        "host": socket.gethostname(),
        "world_size": world,
        "finals": finals,
    }
    if rank == 0:
        atomic.write_text(run_dir / runlog.RESULT_FILE, json.dumps(result, indent=2) + "\n")
    loggers.close()
    return result


# --- pieces of the loop -------------------------------------------------------------


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


def build_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum; weight decay on the 2-D weights (matmuls, embeddings) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def substitute_characters(
    x: torch.Tensor, probability: float, vocab_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Replace each input token, independently with probability p, by one drawn uniformly
    from the vocabulary (which may be the same token). Targets are left untouched."""
    replace = torch.rand(x.shape, generator=generator) < probability
    random_tokens = torch.randint(vocab_size, x.shape, generator=generator)
    return torch.where(replace, random_tokens, x)


def draw_eval_batches(splits, cfg: TrainConfig, dist_env, device) -> dict:
    """eval_iters batches per split from a constant-seeded generator: the same for every
    method, seed and eval. Drawn once and kept on the device (this rank's rows), regrouped
    into chunks of EVAL_CHUNK batches: fewer, larger forward passes, the same mean."""
    rows = slice(dist_env.rank * cfg.batch_size, (dist_env.rank + 1) * cfg.batch_size)
    batches = {}
    for split, tokens in splits.items():
        generator = torch.Generator().manual_seed(derive_seed(EVAL_SEED, split))
        draws = [
            data.get_batch(tokens, cfg.batch_size * dist_env.world_size, cfg.block_size, generator)
            for _ in range(cfg.eval_iters)
        ]
        x = torch.cat([x[rows] for x, _ in draws]).split(EVAL_CHUNK * cfg.batch_size)
        y = torch.cat([y[rows] for _, y in draws]).split(EVAL_CHUNK * cfg.batch_size)
        batches[split] = [(to_device(xc, device), to_device(yc, device)) for xc, yc in zip(x, y, strict=True)]
    return batches


@torch.no_grad()
def estimate_losses(model, eval_batches: dict, autocast, dist_env) -> dict[str, float]:
    """Mean cross-entropy (nats) per split over the eval batches, in eval mode (no dropout)."""
    model.eval()
    losses = {}
    for split, chunks in eval_batches.items():
        total = torch.zeros((), device=chunks[0][0].device)
        for x, y in chunks:
            with autocast:
                _, loss = model(x, y)
            total += loss.float() * len(x)
        rows = sum(len(x) for x, _ in chunks)
        losses[f"{split}_loss"] = dist_env.mean(total / rows).item()
    model.train()
    return losses


@torch.no_grad()
def exact_loss(model: GPT, tokens: np.ndarray, cfg: TrainConfig, autocast, dist_env, device) -> float:
    """Mean cross-entropy (nats) over a whole split: non-overlapping windows of block_size,
    every token but the first predicted once. Windows are dealt round-robin to the ranks."""
    model.eval()
    block = cfg.block_size
    predicted = len(tokens) - 1
    starts = np.arange(0, predicted, block)[dist_env.rank :: dist_env.world_size]
    total = torch.zeros((), dtype=torch.float64, device=device)
    batch_windows = 4 * cfg.batch_size
    for begin in range(0, len(starts), batch_windows):
        chunk = starts[begin : begin + batch_windows]
        full = chunk[chunk + block <= predicted]
        batches = [(full, block)] if len(full) else []
        batches += [(np.array([s]), predicted - s) for s in chunk[chunk + block > predicted]]
        for window_starts, length in batches:
            windows = np.asarray(tokens[window_starts[:, None] + np.arange(length + 1)], np.int64)
            windows = torch.from_numpy(windows)
            x, y = to_device(windows[:, :-1], device), to_device(windows[:, 1:], device)
            with autocast:
                _, loss = model(x, y)
            total += loss.double() * y.numel()
    model.train()
    return (dist_env.sum(total) / predicted).item()


class LossWindow:
    """Per-step training losses kept on the device until the next sync point, so the loop
    never waits for the device just to look for a non-finite loss."""

    def __init__(self):
        self.steps: list[int] = []
        self.losses: list[torch.Tensor] = []

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.steps.append(step)
        self.losses.append(loss)

    def flush(self, dist_env) -> list[tuple[int, float]]:
        """[(step, loss)] since the last flush, averaged over ranks."""
        if not self.steps:
            return []
        losses = dist_env.mean(torch.stack(self.losses).float()).tolist()
        flushed = list(zip(self.steps, losses, strict=True))
        self.steps, self.losses = [], []
        return flushed


@dataclasses.dataclass
class Bookkeeping:
    """The run's scalar progress, saved in every checkpoint so a resumed run continues
    its logs and final metrics exactly."""

    step: int = 0  # optimizer steps whose loss has been read back (and was finite)
    checkpoint_step: int | None = None
    best_val_loss: float | None = None
    best_val_step: int | None = None
    last_eval: dict = dataclasses.field(default_factory=dict)
    train_s: float = 0.0
    wall_s: float = 0.0
    # The log window: training losses since the previous "train" log line.
    window_loss_sum: float = 0.0
    window_steps: int = 0
    window_start_s: float = 0.0
    step_times: list = dataclasses.field(default_factory=list)  # mean step time per window

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def absorb(self, losses: list[tuple[int, float]]) -> tuple[int, float] | None:
        """Add flushed step losses to the log window; the first non-finite one, if any."""
        for step, loss in losses:
            if not math.isfinite(loss):
                return step, loss
            self.step = step
            self.window_loss_sum += loss
            self.window_steps += 1
        return None

    def log_record(self, step, optimizer, noise, elapsed_s: float, tokens_per_step: int) -> dict:
        """The "train" log line for the steps since the previous one; resets the window."""
        window_s = elapsed_s - self.window_start_s
        self.step_times.append(window_s / self.window_steps)
        record = {
            "kind": "train",
            "step": step,
            "loss": self.window_loss_sum / self.window_steps,
            "lr": optimizer.param_groups[0]["lr"],
            "sigma": noise.sigma if noise is not None else 0.0,
            "time_s": elapsed_s,
            "tokens_per_s": tokens_per_step * self.window_steps / window_s if window_s > 0 else 0.0,
        }
        self.window_loss_sum, self.window_steps, self.window_start_s = 0.0, 0, elapsed_s
        return record

    def record_eval(self, step: int, losses: dict) -> None:
        self.last_eval = {"step": step, **losses}
        if self.best_val_loss is None or losses["val_loss"] < self.best_val_loss:
            self.best_val_loss, self.best_val_step = losses["val_loss"], step


def _finals(book: Bookkeeping, clock, tokens_per_step: int, noise) -> dict:
    """The result's metrics. Losses in nats per character, *_bpc = nats / ln 2.

    train_loss, val_loss (, test_loss): the last eval (eval mode, eval_iters batches);
    best_val_loss / best_val_step: the lowest eval val_loss and its step; *_full: the
    exact pass over the whole split (final_eval); train_s: training seconds without
    evaluation and checkpointing; step_time_median_s: median over log windows of the
    window's mean step time (a window ends with a host sync, so device time is counted);
    final_sigma: σ used at the last step (0 without noise).
    """

    def bpc(nats):
        return None if nats is None else nats / LN2

    train_s = clock.elapsed
    last = book.last_eval
    if book.step_times:
        step_time = statistics.median(book.step_times)
    else:
        step_time = train_s / book.step if book.step else None
    return {
        "steps": book.step,
        "train_loss": last.get("train_loss"),
        "val_loss": last.get("val_loss"),
        "test_loss": last.get("test_loss"),
        "best_val_loss": book.best_val_loss,
        "best_val_step": book.best_val_step,
        "val_loss_full": None,
        "test_loss_full": None,
        "train_bpc": bpc(last.get("train_loss")),
        "val_bpc": bpc(last.get("val_loss")),
        "test_bpc": bpc(last.get("test_loss")),
        "best_val_bpc": bpc(book.best_val_loss),
        "val_bpc_full": None,
        "test_bpc_full": None,
        "wall_s": None,
        "train_s": train_s,
        "step_time_median_s": step_time,
        "tokens_per_s": tokens_per_step * book.step / train_s if train_s > 0 else None,
        "final_sigma": noise.sigma if noise is not None else 0.0,
    }


def _all_finite(params: list[torch.Tensor]) -> bool:
    return bool(torch.stack([torch.isfinite(p.detach()).all() for p in params]).all())


def _divergence_message(bad: tuple[int, float | str], noise, book: Bookkeeping) -> str:
    step, what = bad
    what = what if isinstance(what, str) else f"loss is {what}"
    if noise is None:
        sigma = "no gradient noise"
    elif noise.mode == "relative":
        sigma = f"noise {noise.schedule.spec}, σ/RMS(g)={noise.schedule(step - 1):.4g}"
    else:
        sigma = f"noise {noise.schedule.spec}, σ={noise.schedule(step - 1):.4g}"
    if book.checkpoint_step is None:
        kept = "no checkpoint was written before"
    else:
        kept = f"the last good checkpoint is step {book.checkpoint_step}"
    return f"training diverged: {what} at step {step} ({sigma}); {kept}"


# --- environment: devices, distributed, RNG ----------------------------------------


class DistributedEnv:
    """Rank and world size from torchrun's environment; a process group when world > 1."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.backend: str | None = None

    @classmethod
    def from_environment(cls) -> DistributedEnv:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    def resolve_device(self, requested: str) -> torch.device:
        device = devices.resolve_device(requested, self.local_rank)
        if self.world_size > 1 and self.backend is None:
            self.backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size)
        self.device = device
        return device

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def close(self, wait_for_peers: bool) -> None:
        """Leave the process group; after a normal finish, only once every rank is done
        (tearing down while a peer still talks to us can abort it). After an error, at
        once: the peers may never arrive."""
        if self.backend is not None:
            if wait_for_peers:
                dist.barrier()
            dist.destroy_process_group()
            self.backend = None


def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one purpose, so the run's random streams are unrelated to each other."""
    digest = hashlib.sha256(f"{seed}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _gather_rng(dist_env: DistributedEnv, device: torch.device) -> list[dict]:
    """Every rank's dropout RNG state (rank-dependent), gathered for rank 0's checkpoint."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if dist_env.world_size == 1:
        return [state]
    gathered = [None] * dist_env.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def _restore_rng(states: list[dict], rank: int, device: torch.device) -> None:
    if rank >= len(states):
        return  # resumed with more ranks than saved: the new ranks keep their fresh seeds
    torch.set_rng_state(states[rank]["cpu"])
    if device.type == "cuda" and "cuda" in states[rank]:
        torch.cuda.set_rng_state(states[rank]["cuda"], device)


class TrainClock:
    """Seconds spent training: start/stop around everything that is not evaluation or I/O."""

    def __init__(self, elapsed: float = 0.0):
        self._elapsed = elapsed
        self._since: float | None = None

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> None:
        if self._since is not None:
            self._elapsed += time.perf_counter() - self._since
            self._since = None

    @property
    def elapsed(self) -> float:
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        return self._elapsed + running


class StopRequest:
    """A graceful stop: SIGTERM (cluster pre-emption) or on_step asks; the loop finishes
    the current step, checkpoints and returns status "interrupted"."""

    def __init__(self):
        self._requested = False

    def request(self) -> None:
        self._requested = True

    def agreed(self, dist_env: DistributedEnv, step: int, every: int) -> bool:
        """Whether to stop now. Alone: as soon as asked. Under DDP the ranks must stop at
        the same step or the next collective would hang, so they vote (an all-reduce)
        every `every` steps rather than pay a host sync at every step."""
        if dist_env.world_size == 1:
            return self._requested
        return step % every == 0 and dist_env.any(self._requested)

    @contextlib.contextmanager
    def on_sigterm(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.request())
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)


# --- outputs ------------------------------------------------------------------------


def _progress_bar(cfg: TrainConfig, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=cfg.max_iters,
        initial=initial,
        disable=not enabled,
        desc=cfg.dataset,
        unit="step",
        dynamic_ncols=True,
    )


def _finished_result(run_dir: Path, cfg: TrainConfig) -> dict | None:
    """The result of a run that already finished with this config, else None."""
    try:
        result = json.loads((run_dir / runlog.RESULT_FILE).read_text())
        saved = TrainConfig.from_dict(json.loads((run_dir / runlog.CONFIG_FILE).read_text()))
    except (OSError, ValueError):
        return None
    if result.get("status") == "done" and _differences(saved.to_dict(), cfg) <= RESUMABLE_CHANGES:
        return result
    return None


def _refuse_existing_run(run_dir: Path) -> None:
    outputs = (runlog.LOG_FILE, runlog.RESULT_FILE, checkpoint.CHECKPOINTS)
    existing = [name for name in outputs if (run_dir / name).exists()]
    if existing:
        raise UserError(
            f"{run_dir} already holds a run ({', '.join(existing)}); pass --resume to continue "
            "it, or choose another --run-dir"
        )


def _differences(saved: dict, cfg: TrainConfig) -> set[str]:
    current = cfg.to_dict()
    return {key for key in current if saved.get(key) != current[key]}


def _check_resumable(saved: dict, cfg: TrainConfig) -> None:
    changed = sorted(_differences(saved, cfg) - RESUMABLE_CHANGES)
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} → {getattr(cfg, k)!r}" for k in changed)
        raise UserError(
            f"cannot resume with a different config ({detail}); only "
            f"{', '.join(sorted(RESUMABLE_CHANGES))} may change on resume"
        )

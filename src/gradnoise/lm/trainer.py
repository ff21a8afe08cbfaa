"""The training loop, nanoGPT style: `train(cfg, run_dir)` reads top to bottom.

Per optimizer step (`step` counts completed steps, from 0):

    lr_t = warmup / cosine schedule (learning_rate)
    for each of grad_accum micro-batches: x, y = next batch; loss(x, y) / grad_accum → backward
        (NEFTune noise on the token embeddings inside the forward, if embedding_noise_alpha > 0)
    GradScaler.unscale_ (fp16 only) → [noise, if placed before clipping] → clip_grad_norm_
    optimizer.step()   ← GradientNoise's pre-hook adds N(0, σ_t²) here (placement "after_clip"),
                         or its post-hook lr_t·σ_t·ε to the weights after it (placement "update")

noise_correlation "anticorrelated" makes each step's noise σ_t·ε_t − σ_{t−1}·ε_{t−1}
wherever it is placed (see gradnoise.GradientNoise).

The last step of every log window also measures ‖g‖ and ‖noise‖ (runlog.GRADIENT_FIELDS):
GradientNoise's track_stats for that step alone, or, without noise, clip_grad_norm_'s
norm; kept on the device until the log line's sync reads them back.

Randomness, and why each source has its own stream (the study pairs methods by seed):
    init          torch.manual_seed(seed) right before the model is built
    dropout       the global torch RNG, re-seeded with seed + rank after init
    embedding     NEFTune's uniform noise: the global torch RNG too, drawn in each forward
      noise       before its dropout masks (so with both on, the masks differ from a run
                  without it; with embedding_noise_alpha = 0 nothing is drawn)
    batches       a torch.Generator seeded from (seed, "batches")
    augmentation  a torch.Generator seeded from (seed, "augmentation"): turning character
                  substitution on does not shift the batch stream
    noise         GradientNoise's own generator, seeded from (seed, "noise")
    eval batches  fixed for every method and seed (see gradnoise.lm.evaluation)
So for a seed, every method sees the same init, batches and dropout masks.

Data parallel (torchrun sets RANK / WORLD_SIZE): every rank draws the *global* batch of
batch_size · world_size sequences from the shared batch generator and takes its own slice
(rank r: rows r·batch_size … (r+1)·batch_size - 1). The data stream therefore equals a
single process's with batch_size · world_size; DDP averages the gradients, and
GradientNoise uses the same seed on every rank, so the replicas stay identical. Rank 0
logs and checkpoints.

The pieces: what a resume needs is a `RunState` (gradnoise.lm.state), scoring is
`Evaluator` (gradnoise.lm.evaluation), ranks and the stop vote are in
gradnoise.lm.distributed, the outputs (config.json, log.jsonl, result.json) are
gradnoise.lm.runlog's and checkpoints/ gradnoise.lm.checkpoint's. Timings (`time_s`,
train_s) count training only, not evaluation or checkpointing, so time-to-target is
comparable across methods.
"""

from __future__ import annotations

import functools
import math
import socket
from collections.abc import Callable
from pathlib import Path

import torch

import gradnoise
from gradnoise.errors import UserError
from gradnoise.lm import checkpoint, data, finite, rundir, runlog
from gradnoise.lm.config import TrainConfig
from gradnoise.lm.devices import describe_device, resolve_dtype, sync, to_device
from gradnoise.lm.distributed import DistributedEnv, StopRequest
from gradnoise.lm.evaluation import Evaluator
from gradnoise.lm.model import GPT
from gradnoise.lm.state import (
    Clock,
    PendingLosses,
    RunState,
    check_resumable,
    finished_result,
    refuse_existing_run,
)


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
    "world_size", "finals": {...}} (finals: see gradnoise.lm.runlog.final_metrics).
    """
    run_dir = Path(run_dir)
    dist_env = DistributedEnv.from_environment()
    finished = False
    try:
        with rundir.claim(run_dir, enabled=dist_env.is_main):  # locked: one process trains in it
            result = _train(cfg, run_dir, dist_env, resume=resume, progress=progress, on_step=on_step)
        finished = True
        return result
    finally:
        dist_env.close(wait_for_peers=finished)


def train_group(
    configs: list[TrainConfig],
    run_dirs: list[Path],
    group_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Train a group of runs (see gradnoise.lm.group): their configs differ only in
    config.PER_REPLICA_KEYS. Each run writes its own run directory exactly as `train`
    does; returns their results in order.

    Today the members train one after the other; the batched trainer (one model with a
    replica dimension, one optimizer step for all) replaces this body.
    """
    from gradnoise.lm.group import Member, check_members

    check_members([Member(str(d), Path(d), c) for c, d in zip(configs, run_dirs, strict=True)])
    del group_dir  # the members' own run directories hold their checkpoints for now
    return [
        train(c, Path(d), resume=resume, progress=progress) for c, d in zip(configs, run_dirs, strict=True)
    ]


def _train(cfg, run_dir, dist_env, *, resume, progress, on_step) -> dict:
    clock = Clock()
    device = dist_env.resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if resume and (finished := finished_result(run_dir, cfg)) is not None:
        return finished
    if not resume:
        refuse_existing_run(run_dir)
    corpus = data.load(cfg.dataset)
    splits = _splits(corpus, cfg)
    log = runlog.RunLog(run_dir, cfg, enabled=dist_env.is_main, progress_bar=progress)

    run = new_run(cfg, corpus.vocab_size, device, dtype, dist_env, clock)
    latest = checkpoint.latest(run_dir) if resume else None
    if latest is not None:
        weights, saved = checkpoint.load(latest)
        with checkpoint.restoring(latest):  # a damaged checkpoint is a UserError naming it
            check_resumable(saved["config"], cfg)
            run.load_state_dict({"model": weights, **saved})
        checkpoint.warn_if_threads_changed(saved, latest)
    log.start(keep_through_step=run.progress.step if latest is not None else None)
    if dist_env.is_main:
        runlog.write_config(run_dir, cfg)

    use_compile = cfg.compile is True or (cfg.compile == "auto" and device.type == "cuda")
    model = torch.compile(run.model) if use_compile else run.model
    train_model = model
    if dist_env.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    evaluator = Evaluator(splits, cfg, dist_env, device, autocast)
    next_batch = functools.partial(global_batch, run, splits["train"], cfg, corpus.vocab_size)
    tokens_per_step = cfg.batch_size * dist_env.world_size * cfg.grad_accum * cfg.block_size

    stop, pending = StopRequest(), PendingLosses()
    gradient: dict = {}  # the last measured step's ‖g‖ and ‖noise‖ (see gradient_stats)
    status, error = "done", None
    step = start_step = run.progress.step
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
                error = divergence(run, pending.read_back(dist_env), step)
                if error is not None:
                    status = "diverged"
                    break
                if log_due:
                    lr = run.optimizer.param_groups[0]["lr"]
                    record = run.progress.log_record(step, lr, _sigma(run), clock.train_s, tokens_per_step)
                    log.log({**record, **runlog.gradient_fields(gradient)})
                if eval_due:
                    evaluate(run, model, evaluator, step, log)
                    evaluated_step = step
                if checkpoint_due:
                    save_checkpoint(run, run_dir, step, cfg, corpus.meta["vocab"])
                if stopping:
                    status = "done" if step == cfg.max_iters else "interrupted"
                    break
                clock.start()

            loss, batches, measured = train_step(run, train_model, step, cfg, next_batch, autocast)
            gradient = measured if measured is not None else gradient
            step += 1
            pending.add(step, loss)
            log.tick()
            if on_step is not None and on_step(
                step, *(torch.cat(part) for part in zip(*batches, strict=True))
            ):
                stop.request()

    exact = {}
    if status == "done" and cfg.final_eval:
        exact = {
            split: evaluator.exact(run.model, split, log.exact_pass(split))
            for split in ("val", "test")
            if split in splits
        }
    result = {
        "status": status,
        "error": error,
        "device": describe_device(device),
        "host": socket.gethostname(),
        "world_size": dist_env.world_size,
        "finals": runlog.final_metrics(
            run.progress,
            run.clock,
            tokens_per_step,
            final_sigma=_sigma(run),
            exact=exact,
            parameters=sum(p.numel() for p in run.params),
        ),
    }
    if dist_env.is_main:
        runlog.write_result(run_dir, result)
    log.close()
    return result


# --- set-up ------------------------------------------------------------------------


def new_run(cfg: TrainConfig, vocab_size: int, device, dtype, dist_env, clock: Clock) -> RunState:
    """A run at step 0: the model initialized from the seed alone (dropout then draws from
    seed + rank), its optimizer, noise and GradScaler, and the run's data streams."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model_config(vocab_size)).to(device)
    torch.manual_seed(cfg.seed + dist_env.rank)
    optimizer = build_optimizer(model, cfg, device)
    return RunState(
        model=model,
        optimizer=optimizer,
        noise=build_noise(optimizer, cfg),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        batch_generator=torch.Generator().manual_seed(data.derive_seed(cfg.seed, "batches")),
        augment_generator=torch.Generator().manual_seed(data.derive_seed(cfg.seed, "augmentation")),
        dist_env=dist_env,
        device=device,
        clock=clock,
    )


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


def build_noise(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> gradnoise.GradientNoise | None:
    """The config's noise on `optimizer` (None for noise=none). Placed "after_clip" it hooks
    optimizer.step() before the update, "update" after it; "before_clip" the loop calls
    apply() itself."""
    schedule = gradnoise.schedules.parse(cfg.noise)
    if schedule is None:
        return None
    return gradnoise.GradientNoise(
        optimizer,
        schedule,
        seed=data.derive_seed(cfg.seed, "noise"),
        mode=cfg.noise_mode,
        attach=cfg.noise_placement != "before_clip",
        correlation=cfg.noise_correlation,
        placement="update" if cfg.noise_placement == "update" else "gradient",
    )


def _splits(corpus: data.Corpus, cfg: TrainConfig) -> dict:
    """The corpus's splits; of the train split only its first train_fraction."""
    splits = {name: corpus.splits[name] for name in ("train", "val", "test") if name in corpus.splits}
    splits["train"] = splits["train"][: int(len(splits["train"]) * cfg.train_fraction)]
    for name, tokens in splits.items():
        if len(tokens) <= cfg.block_size:
            fraction = f" (train_fraction={cfg.train_fraction})" if name == "train" else ""
            raise UserError(
                f"the {name} split of {cfg.dataset} has {len(tokens):,} tokens{fraction}, too few "
                f"for block_size={cfg.block_size}"
            )
    return splits


# --- one step ----------------------------------------------------------------------


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
    run: RunState, tokens, cfg: TrainConfig, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next global batch (batch_size · world_size sequences, CPU), inputs augmented."""
    x, y = data.get_batch(
        tokens, cfg.batch_size * run.dist_env.world_size, cfg.block_size, run.batch_generator
    )
    if cfg.char_substitution > 0:
        x = data.substitute_characters(x, cfg.char_substitution, vocab_size, run.augment_generator)
    return x, y


def train_step(run: RunState, model, step: int, cfg: TrainConfig, next_batch, autocast):
    """One optimizer step from `step` to step + 1 (see the module docstring).

    Returns the step's loss (mean over micro-batches, on the device: not read back), the
    global micro-batches [(inputs, targets)] it drew, and, for the last step of a log
    window, its gradient statistics (see gradient_stats; else None).
    """
    measure = (step + 1) % cfg.log_interval == 0
    if run.noise is not None:
        run.noise.track_stats, run.noise.last_stats = measure, {}
    lr = learning_rate(step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    step_loss = torch.zeros((), device=run.device)
    rows = run.dist_env.rows(cfg.batch_size)
    batches = []
    for micro_step in range(cfg.grad_accum):
        x, y = next_batch()
        batches.append((x, y))
        if run.dist_env.world_size > 1:
            # Average gradients across ranks only once, after the last micro-batch.
            model.require_backward_grad_sync = micro_step == cfg.grad_accum - 1
        with autocast:
            _, loss = model(
                to_device(x[rows], run.device),
                to_device(y[rows], run.device),
                label_smoothing=cfg.label_smoothing,
                embedding_noise_alpha=cfg.embedding_noise_alpha,
            )
            loss = loss / cfg.grad_accum
        run.scaler.scale(loss).backward()
        step_loss += loss.detach()
    run.scaler.unscale_(run.optimizer)  # no-op unless fp16: noise and clipping see true gradients
    if run.noise is not None and cfg.noise_placement == "before_clip":
        run.noise.apply()
    norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip) if cfg.grad_clip > 0 else None
    if measure and run.noise is None:
        norm = clipped_norm(run.params, norm, cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return step_loss, batches, gradient_stats(run, norm) if measure else None


def clipped_norm(params, norm: torch.Tensor | None, grad_clip: float) -> torch.Tensor:
    """‖g‖ after clipping, on the device: clip_grad_norm_ returned `norm` (before it
    scaled g by min(1, clip / (norm + 1e-6))); without clipping, ‖g‖ itself."""
    if norm is None:
        return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return norm * torch.clamp(grad_clip / (norm + 1e-6), max=1.0)


def gradient_stats(run: RunState, norm: torch.Tensor | None) -> dict:
    """runlog.GRADIENT_FIELDS of the step just taken: GradientNoise's own measurement
    (it tracked this step), or without noise ‖g‖ after clipping and no noise."""
    if run.noise is not None:
        return dict(run.noise.last_stats)
    return {"grad_norm": norm, "noise_norm": 0.0, "noise_to_grad": 0.0}


# --- events ------------------------------------------------------------------------


def save_checkpoint(run: RunState, run_dir: Path, step: int, cfg: TrainConfig, vocab) -> None:
    """Checkpoint `step`: the run state, its config and the vocabulary (for sampling)."""
    run.progress.checkpoint_step = step
    state = run.state_dict()  # on every rank: it gathers the ranks' RNG states
    if run.dist_env.is_main:
        weights = state.pop("model")
        threads = torch.get_num_threads()  # a resume on another count is not bit-identical
        checkpoint.save(
            run_dir, step, weights, {"config": cfg.to_dict(), "vocab": vocab, "threads": threads, **state}
        )


def _sigma(run: RunState) -> float:
    return run.noise.sigma if run.noise is not None else 0.0


def evaluate(run: RunState, model, evaluator: Evaluator, step: int, log: runlog.RunLog) -> None:
    """Estimate the losses at `step`, log them, and give a plateau schedule the val loss."""
    losses = evaluator.estimate(model)
    run.progress.record_eval(step, losses)
    log.log({"kind": "eval", "step": step, **losses, "time_s": run.clock.train_s})
    if run.noise is not None and hasattr(run.noise.schedule, "observe"):
        run.noise.schedule.observe(losses["val_loss"])


def divergence(run: RunState, losses: list[tuple[int, float]], step: int) -> str | None:
    """Add the read-back step losses to the run's progress; the error message if one is not
    finite, or if a weight or the optimizer's state is not (gradnoise.lm.finite): an update
    can break them while its loss is still finite, and they must not be evaluated,
    checkpointed or reported as done."""
    bad = run.progress.absorb(losses)
    if bad is None and (broken := finite.nonfinite(run.optimizer, run.params)) is not None:
        bad = (step, broken)
    if bad is None:
        return None
    step, what = bad
    what = what if isinstance(what, str) else f"loss is {what}"
    noise = run.noise
    if noise is None:
        sigma = "no gradient noise"
    elif noise.mode == "relative":
        sigma = f"noise {noise.schedule.spec}, σ/RMS(g)={noise.schedule(step - 1):.4g}"
    else:
        sigma = f"noise {noise.schedule.spec}, σ={noise.schedule(step - 1):.4g}"
    if run.progress.checkpoint_step is None:
        kept = "no checkpoint was written before"
    else:
        kept = f"the last good checkpoint is step {run.progress.checkpoint_step}"
    return f"training diverged: {what} at step {step} ({sigma}); {kept}"

"""The training loop, nanoGPT style: `train(cfg, run_dir)` reads top to bottom.

One loop trains M ≥ 1 runs at once (`train_group`): a group's runs differ only in
config.PER_REPLICA_KEYS, and train as one GPT whose weights have a leading replica
dimension (gradnoise.lm.model.gpt), with one optimizer step for all. A plain run is the
group of one. Per optimizer step (`step` counts completed steps, from 0):

    lr_t = warmup / cosine schedule (learning_rate)
    for each of grad_accum micro-batches: x, y = next batch, (M, B, T): each run's own;
        Σ_m loss_m(x[m], y[m]) / grad_accum → backward    (replica m's gradient is its run's;
        NEFTune noise on replica m's token embeddings inside the forward, if its
        embedding_noise_alpha > 0)
    GradScaler.unscale_ (fp16 only) → [noise, if placed before clipping]
    → clip each replica's gradient to its own grad_clip (replicas.clip_grad_norms_)
    optimizer.step()   ← pre-hooks: GradientNoise adds N(0, σ_t²) to each replica's gradient
                         (its own schedule and seed; placement "after_clip"), then each
                         replica's own weight decay (replicas.WeightDecay); or, placement
                         "update", GradientNoise's post-hook adds lr_t·σ_t·ε to each
                         replica's weights after the update

noise_correlation "anticorrelated" makes a replica's noise σ_t·ε_t − σ_{t−1}·ε_{t−1}
wherever the group places it (see gradnoise.GradientNoise): the correlation is per
replica, the placement the group's.

A run whose loss, weights or optimizer state goes non-finite (checked at each sync point)
is diverged: its replica is frozen (replicas.Freezer) and the others go on; the loop ends
when every run has diverged or max_iters is reached.

The last step of every log window also measures ‖g‖ and ‖noise‖ (runlog.GRADIENT_FIELDS):
GradientNoise's track_stats for that step alone, or, without noise, the clipping's
per-replica norms; kept on the device until the log line's sync reads them back.

Randomness, and why each source has its own stream (the study pairs methods by seed):
    init          torch.manual_seed(seed) right before the model (its replica) is drawn
    dropout       the global torch RNG, re-seeded with seed + rank after init
    embedding     NEFTune's uniform noise: the global torch RNG too, drawn in each forward
      noise       before its dropout masks (so with both on, the masks differ from a run
                  without it; with embedding_noise_alpha = 0 nothing is drawn)
    batches       a torch.Generator seeded from (seed, "batches")
    augmentation  a torch.Generator seeded from (seed, "augmentation"): turning character
                  substitution on does not shift the batch stream
    noise         GradientNoise's own generator, seeded from (seed, "noise")
    eval batches  fixed for every method and seed (see gradnoise.lm.training.evaluation)
So for a seed, every method sees the same init, batches and dropout masks. In a group each
run has its own init, batch, augmentation and noise streams, seeded as above from its own
seed; replica m therefore starts from its run alone's weights, sees its batches and gets
its noise. The dropout masks and NEFTune's embedding noise come from the one global RNG,
seeded from the first run's seed: they are independent across replicas but not those of
the runs alone (with dropout 0 and embedding_noise_alpha 0 nothing is drawn from it).

Data parallel (torchrun sets RANK / WORLD_SIZE): every rank draws the *global* batch of
batch_size · world_size sequences from the shared batch generator and takes its own slice
(rank r: rows r·batch_size … (r+1)·batch_size - 1). The data stream therefore equals a
single process's with batch_size · world_size; DDP averages the gradients, and
GradientNoise uses the same seed on every rank, so the replicas stay identical. Rank 0
logs and checkpoints.

The pieces: the group at step 0 (model, optimizer, noise, data streams) is built by
gradnoise.lm.training.setup, what a resume needs is a `RunState` (gradnoise.lm.training.state), scoring is
`Evaluator` (gradnoise.lm.training.evaluation), ranks and the stop vote are in
gradnoise.lm.training.distributed, the outputs (config.json, log.jsonl, result.json) are
gradnoise.lm.storage.runlog's and checkpoints/ gradnoise.lm.storage.checkpoint's. Timings (`time_s`,
train_s) count training only, not evaluation or checkpointing, so time-to-target is
comparable across methods.

Outputs: every run writes its own run directory (config.json, provenance.json, log.jsonl,
result.json) exactly as alone; a group's checkpoints (all replicas in one) go to its group directory,
and each member's run directory gets a replica.json pointing there (gradnoise.lm.training.group),
through which export and sample find its weights.
"""

from __future__ import annotations

import contextlib
import math
import socket
from collections.abc import Callable
from pathlib import Path

import torch

from gradnoise.errors import UserError
from gradnoise.lm.config import TrainConfig
from gradnoise.lm.data import augment, batches, corpora
from gradnoise.lm.devices import describe_device, resolve_dtype, sync, to_device
from gradnoise.lm.storage import checkpoint, rundir, runlog
from gradnoise.lm.training import finite, group, provenance, replicas, setup
from gradnoise.lm.training.distributed import DistributedEnv, StopRequest
from gradnoise.lm.training.evaluation import Evaluator
from gradnoise.lm.training.progress import Clock, PendingLosses
from gradnoise.lm.training.resume import (
    check_group_members,
    check_owner,
    check_resumable,
    finished_result,
    refuse_existing_run,
)
from gradnoise.lm.training.state import Replica, RunState


def train(
    cfg: TrainConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, torch.Tensor, torch.Tensor], bool | None] | None = None,
    threads: int | None = None,
) -> dict:
    """Train a GPT as `cfg` says; write outputs to run_dir; return the result dict.

    resume: continue from run_dir's latest checkpoint if there is one (else start afresh);
        a run that already finished returns its result without training again.
    on_step(step, inputs, targets): called after every optimizer step with the step
        number and that step's global batch (all micro-batches and ranks; CPU tensors,
        inputs after augmentation). Returning True stops the run like SIGTERM does:
        checkpoint, status "interrupted".
    threads: torch's CPU thread count for this run (None: a resumed run takes its
        checkpoint's, so that it continues as the uninterrupted run would; a fresh run
        this process's). torch's count is put back when the run returns.

    Result: {"status": "done" | "diverged" | "interrupted", "error", "device", "host",
    "world_size", "finals": {...}, "provenance": {...}} (finals: see
    gradnoise.lm.storage.runlog.final_metrics; provenance: gradnoise.lm.training.provenance, and
    runlog.write_provenance for "attempts" and "consistent").
    """

    def one_run(step, inputs, targets):
        return on_step(step, inputs[0], targets[0])

    results = _run([cfg], [Path(run_dir)], None, resume, progress, one_run if on_step else None, threads)
    return results[0]


def train_group(
    configs: list[TrainConfig],
    run_dirs: list[Path],
    group_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, torch.Tensor, torch.Tensor], bool | None] | None = None,
    threads: int | None = None,
) -> list[dict]:
    """Train a group of runs (see gradnoise.lm.training.group) as one batched model: their configs
    differ only in config.PER_REPLICA_KEYS. Each run writes its own run directory exactly
    as `train` does (its result as its run alone's, up to floating-point reassociation);
    the group's checkpoints go to group_dir. Returns their results in order.

    on_step(step, inputs, targets) as for `train`, with every run's batch: (M, N, T);
    threads as for `train`.
    """
    group.check_members([group.Member(str(d), Path(d), c) for c, d in zip(configs, run_dirs, strict=True)])
    group.check_directories(Path(group_dir), [Path(d) for d in run_dirs])
    return _run(
        list(configs), [Path(d) for d in run_dirs], Path(group_dir), resume, progress, on_step, threads
    )


def _run(cfgs, run_dirs, group_dir, resume, progress, on_step, threads=None) -> list[dict]:
    """Claim the directories (locked: one process trains in them), train, leave the process group."""
    dist_env = DistributedEnv.from_environment()
    finished = False
    threads_before = torch.get_num_threads()
    if threads is not None:
        checkpoint.check_threads(threads)
        torch.set_num_threads(threads)
    try:
        with contextlib.ExitStack() as claims:
            for directory in ([group_dir] if group_dir is not None else []) + run_dirs:
                claims.enter_context(rundir.claim(directory, enabled=dist_env.is_main))
            results = _train(
                cfgs,
                run_dirs,
                group_dir,
                dist_env,
                resume=resume,
                progress=progress,
                on_step=on_step,
                threads_given=threads is not None,
            )
        finished = True
        return results
    finally:
        torch.set_num_threads(threads_before)
        dist_env.close(wait_for_peers=finished)


def _train(cfgs, run_dirs, group_dir, dist_env, *, resume, progress, on_step, threads_given) -> list[dict]:
    clock = Clock()
    cfg = cfgs[0]  # the settings the group shares (config.group_key)
    checkpoint_dir = group_dir if group_dir is not None else run_dirs[0]
    device = dist_env.resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    check_directories(cfgs, run_dirs, group_dir, resume)
    # The runs that ended before (resume only): they are trained no further, their results
    # are returned as they were and not written again (the study runner recorded them).
    ended = [finished_result(d, c) if resume else None for c, d in zip(cfgs, run_dirs, strict=True)]
    if all(result is not None for result in ended):
        return ended
    corpus = corpora.load(cfg.dataset)
    splits = setup.splits(corpus, cfg)
    logs = [
        runlog.RunLog(
            d,
            c,
            enabled=dist_env.is_main,
            progress_bar=progress and m == 0,
            label=f"{d.name}: " if len(cfgs) > 1 else "",
        )
        for m, (c, d) in enumerate(zip(cfgs, run_dirs, strict=True))
    ]

    run = setup.new_run(cfgs, corpus.vocab_size, device, dtype, dist_env, clock)
    latest = checkpoint.latest(checkpoint_dir) if resume else None
    if latest is not None:
        weights, saved = checkpoint.load(latest)
        with checkpoint.restoring(latest):  # a damaged checkpoint is a UserError naming it
            saved_configs = saved["configs"] if "configs" in saved else [saved["config"]]
            if len(saved_configs) != len(cfgs):
                raise UserError(f"the checkpoint holds {len(saved_configs)} runs, not these {len(cfgs)}")
            for saved_config, c in zip(saved_configs, cfgs, strict=True):
                check_resumable(saved_config, c)
            if group_dir is not None:
                check_group_members(saved["run_dirs"], run_dirs, group_dir, latest)
            run.load_state_dict({"model": weights, **saved})
        checkpoint.resume_threads(saved, latest, keep_current=threads_given)
    start_step = checkpoint.step_of(latest) if latest is not None else 0
    use_compile = cfg.compile is True or (cfg.compile == "auto" and device.type == "cuda")
    made_by = provenance.current(device, dtype, use_compile, replicas=len(cfgs))
    attempts = [made_by] * len(cfgs)
    if dist_env.is_main:
        write_identities(cfgs, run_dirs, group_dir)
        for m, d in enumerate(run_dirs):
            if ended[m] is None:  # an ended member's files stay as they are
                attempts[m] = runlog.write_provenance(d, made_by, start_step if latest is not None else None)
    for log in logs:
        log.start(keep_through_step=start_step if latest is not None else None)

    model = torch.compile(run.model) if use_compile else run.model
    train_model = model
    if dist_env.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    evaluator = Evaluator(splits, cfg, dist_env, device, autocast, replicas=len(cfgs))
    hyper = setup.Hyper.of(cfgs, device)

    def next_batch():
        return global_batch(run, splits["train"], cfgs, corpus.vocab_size)

    tokens_per_step = cfg.batch_size * dist_env.world_size * cfg.grad_accum * cfg.block_size

    stop, pending = StopRequest(), PendingLosses()
    gradients: list[dict] = [{} for _ in cfgs]  # the last measured step's ‖g‖ and ‖noise‖ per run
    status = "done"
    step = start_step
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
                check_divergence(run, cfgs, pending.read_back(dist_env), step)
                if not active(run):
                    status = "diverged"
                    break
                if log_due:
                    lr = run.optimizer.param_groups[0]["lr"]
                    for m, replica in active(run):
                        record = replica.progress.log_record(
                            step, lr, sigmas(run)[m], clock.train_s, tokens_per_step
                        )
                        logs[m].log({**record, **runlog.gradient_fields(gradients[m])})
                if eval_due:
                    evaluate(run, model, evaluator, step, logs)
                    evaluated_step = step
                if checkpoint_due:
                    vocab = corpus.meta["vocab"]
                    save_checkpoint(run, checkpoint_dir, step, cfgs, run_dirs, group_dir, vocab)
                if stopping:
                    status = "done" if step == cfg.max_iters else "interrupted"
                    break
                clock.start()

            losses, batches, measured = train_step(run, train_model, step, cfg, hyper, next_batch, autocast)
            gradients = measured if measured is not None else gradients
            step += 1
            pending.add(step, losses)
            for log in logs:
                log.tick()
            if on_step is not None and on_step(
                step, *(torch.cat(part, dim=1) for part in zip(*batches, strict=True))
            ):
                stop.request()

    exact = [{} for _ in cfgs]
    if status == "done" and cfg.final_eval:
        report_to = next(m for m, _ in active(run))
        for split in ("val", "test"):
            if split in splits:
                losses = evaluator.exact(run.model, split, logs[report_to].exact_pass(split))
                for m, loss in enumerate(losses):
                    exact[m][split] = loss
    parameters = sum(p.numel() for p in run.params) // len(cfgs)
    results = []
    for m, (replica, log, run_dir) in enumerate(zip(run.replicas, logs, run_dirs, strict=True)):
        log.close()
        if ended[m] is not None:
            results.append(ended[m])
            continue
        diverged = replica.progress.diverged
        result = {
            "status": "diverged" if diverged is not None else status,
            "error": diverged,
            "device": describe_device(device),
            "host": socket.gethostname(),
            "world_size": dist_env.world_size,
            "provenance": attempts[m],
            "finals": runlog.final_metrics(
                replica.progress,
                run.clock,
                tokens_per_step,
                final_sigma=sigmas(run)[m],
                exact=exact[m] if diverged is None else {},
                parameters=parameters,
            ),
        }
        if dist_env.is_main:
            runlog.write_result(run_dir, result)
        results.append(result)
    return results


def check_directories(cfgs, run_dirs: list[Path], group_dir: Path | None, resume: bool) -> None:
    """UserError unless every directory may be written: a fresh run's hold no run, and each
    run's holds nothing but its own (resume.check_owner)."""
    if not resume:
        for directory in run_dirs + ([group_dir] if group_dir is not None else []):
            refuse_existing_run(directory)
    for m, (cfg, run_dir) in enumerate(zip(cfgs, run_dirs, strict=True)):
        check_owner(run_dir, cfg, (group_dir, m) if group_dir is not None else None)


def write_identities(cfgs, run_dirs: list[Path], group_dir: Path | None) -> None:
    """Each run directory's replica.json (a member) and config.json: whose run it holds,
    written before anything else, so that every later file is known to be this run's."""
    for m, (cfg, run_dir) in enumerate(zip(cfgs, run_dirs, strict=True)):
        if group_dir is not None:
            group.write_replica_link(run_dir, group_dir, m)
        else:  # a link left by a group whose directory is gone (check_owner)
            (run_dir / group.REPLICA_FILE).unlink(missing_ok=True)
        runlog.write_config(run_dir, cfg)


def active(run: RunState) -> list[tuple[int, Replica]]:
    """(index, replica) of the runs that have not diverged."""
    return [(m, r) for m, r in enumerate(run.replicas) if r.progress.diverged is None]


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


# --- events ------------------------------------------------------------------------


def save_checkpoint(run: RunState, directory: Path, step: int, cfgs, run_dirs, group_dir, vocab) -> None:
    """Checkpoint `step` in `directory`: the run state, the config(s) and the vocabulary (for
    sampling); a group's also lists its runs' directories (relative to the group's)."""
    for _, replica in active(run):
        replica.progress.checkpoint_step = step
    state = run.state_dict()  # on every rank: it gathers the ranks' RNG states
    if run.dist_env.is_main:
        weights = keep_last_good_weights(run, state.pop("model"), directory)
        threads = torch.get_num_threads()  # a resume on another count is not bit-identical
        if group_dir is None:
            configs = {"config": cfgs[0].to_dict()}
        else:
            configs = {
                "configs": [c.to_dict() for c in cfgs],
                "run_dirs": [group.relative(d, group_dir) for d in run_dirs],
            }
        checkpoint.save(directory, step, weights, {**configs, "vocab": vocab, "threads": threads, **state})


def keep_last_good_weights(run: RunState, weights: dict, directory: Path) -> dict:
    """The weights to checkpoint: a diverged replica's slices are those of its last good
    checkpoint (the latest one holds them: every checkpoint since carried them on), not
    the frozen, possibly non-finite ones, so that export and sample find what the result
    names. A plain run stops at its divergence and never checkpoints it."""
    kept = [
        m
        for m, r in enumerate(run.replicas)
        if r.progress.diverged is not None and r.progress.checkpoint_step is not None
    ]
    previous = checkpoint.latest(directory) if kept and len(run.replicas) > 1 else None
    if previous is None:
        return weights
    good = checkpoint.load(previous)[0]
    weights = {name: value.clone() for name, value in weights.items()}
    for name, value in weights.items():
        for m in kept:
            value[m].copy_(good[name][m])
    return weights


def evaluate(run: RunState, model, evaluator: Evaluator, step: int, logs: list[runlog.RunLog]) -> None:
    """Estimate each run's losses at `step`, log them, and give a plateau schedule its val loss."""
    losses = evaluator.estimate(model)
    evaluated = [None] * len(run.replicas)
    for m, replica in active(run):
        replica.progress.record_eval(step, losses[m])
        logs[m].log({"kind": "eval", "step": step, **losses[m], "time_s": run.clock.train_s})
        evaluated[m] = losses[m]["val_loss"]
    if run.noise is not None:
        run.noise.observe(evaluated)


def check_divergence(run: RunState, cfgs, losses: list[tuple[int, list[float]]], step: int) -> None:
    """Add the read-back step losses to each run's progress; a run whose loss is not finite,
    or whose weights, optimizer state (gradnoise.lm.training.finite) or clipped gradient norm are not
    (an update can break them while its loss is still finite, and they must not be
    evaluated, checkpointed or reported as done) is marked diverged and frozen."""
    broken = finite.nonfinite_by_replica(run.optimizer, run.params, len(run.replicas))
    bad_norms = run.nonfinite_norms.tolist()
    for m, replica in active(run):
        bad = replica.progress.absorb([(s, values[m]) for s, values in losses])
        if bad is None and broken[m] is not None:
            bad = (step, broken[m])
        if bad is None and bad_norms[m]:
            bad = (step, "non-finite gradient norm")
        if bad is not None:
            replica.progress.diverged = divergence_message(run, cfgs[m], m, *bad)
            run.freezer.freeze(m)


def divergence_message(run: RunState, cfg: TrainConfig, m: int, step: int, what) -> str:
    what = what if isinstance(what, str) else f"loss is {what}"
    sigma = "no gradient noise" if cfg.noise == "none" else f"noise {run.noise.describe(m, step - 1)}"
    if cfg.embedding_noise_alpha > 0:
        sigma += f"; embedding noise α={cfg.embedding_noise_alpha:.4g}"
    checkpoint_step = run.replicas[m].progress.checkpoint_step
    if checkpoint_step is None:
        kept = "no checkpoint was written before"
    else:
        kept = f"the last good checkpoint is step {checkpoint_step}"
    return f"training diverged: {what} at step {step} ({sigma}); {kept}"

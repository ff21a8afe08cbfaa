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

The pieces: the loop below reads top to bottom, its events (log, evaluate, checkpoint,
divergence) as named steps; one optimizer step is gradnoise.lm.training.step's; the group at
step 0 (members, model, optimizer, noise, data streams, logs) is a `Session`
(gradnoise.lm.training.session, built by gradnoise.lm.training.setup), what a resume needs
is a `RunState` (gradnoise.lm.training.state), scoring is `Evaluator`
(gradnoise.lm.training.evaluation), ranks and the stop vote are in
gradnoise.lm.training.distributed, the outputs (config.json, log.jsonl, result.json) are
gradnoise.lm.storage.runlog's and checkpoints/ gradnoise.lm.storage.checkpoint's. Timings
(`time_s`, train_s) count training only, not evaluation or checkpointing, so time-to-target
is comparable across methods.

Outputs: every run writes its own run directory (config.json, provenance.json, log.jsonl,
result.json) exactly as alone; a group's checkpoints (all replicas in one) go to its group directory,
and each member's run directory gets a replica.json pointing there (gradnoise.lm.training.group),
through which export and sample find its weights.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from pathlib import Path

import torch

from gradnoise.lm.config import TrainConfig
from gradnoise.lm.devices import describe_device, sync
from gradnoise.lm.storage import checkpoint, rundir, runlog
from gradnoise.lm.training import finite, group
from gradnoise.lm.training.distributed import DistributedEnv, StopRequest
from gradnoise.lm.training.resume import finished_result
from gradnoise.lm.training.session import (
    Session,
    check_directories,
    compile_model,
    record_provenance,
    restore,
    start,
)
from gradnoise.lm.training.state import RunState
from gradnoise.lm.training.step import active, global_batch, sigmas, train_step


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

    member = group.Member(str(run_dir), Path(run_dir), cfg)
    return _run([member], None, resume, progress, one_run if on_step else None, threads)[0]


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
    members = [group.Member(str(d), Path(d), c) for c, d in zip(configs, run_dirs, strict=True)]
    group.check_members(members)
    group.check_directories(Path(group_dir), [m.run_dir for m in members])
    return _run(members, Path(group_dir), resume, progress, on_step, threads)


def _run(members, group_dir, resume, progress, on_step, threads=None) -> list[dict]:
    """Claim the directories (locked: one process trains in them), train, leave the process group."""
    dist_env = DistributedEnv.from_environment()
    finished = False
    threads_before = torch.get_num_threads()
    if threads is not None:
        checkpoint.check_threads(threads)
        torch.set_num_threads(threads)
    try:
        with contextlib.ExitStack() as claims:
            for directory in ([group_dir] if group_dir is not None else []) + [m.run_dir for m in members]:
                claims.enter_context(rundir.claim(directory, enabled=dist_env.is_main))
            results = _train(
                members,
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


def _train(members, group_dir, dist_env, *, resume, progress, on_step, threads_given) -> list[dict]:
    check_directories(members, group_dir, resume)
    # The runs that ended before (resume only): they are trained no further, their results
    # are returned as they were and not written again (the study runner recorded them).
    ended = [finished_result(m.run_dir, m.config) if resume else None for m in members]
    if all(result is not None for result in ended):
        return ended
    session = start(members, group_dir, dist_env, progress=progress)
    if resume:
        restore(session, threads_given)
    record_provenance(session, ended)
    compile_model(session)
    status = loop(session, on_step)
    exact = final_eval(session) if status == "done" and session.cfg.final_eval else [{} for _ in members]
    return results(session, status, exact, ended)


def loop(s: Session, on_step) -> str:
    """nanoGPT's loop: at each step boundary the events that are due, then one optimizer step.
    Returns the status: "done", "interrupted" (SIGTERM or on_step) or "diverged" (every run)."""
    cfg, clock, stop, step = s.cfg, s.run.clock, StopRequest(), s.start_step

    def next_batch():
        return global_batch(s.run, s.splits["train"], s.cfgs, s.vocab_size)

    with stop.on_sigterm():
        clock.start()
        while True:
            eval_due = step != s.evaluated_step and (step % cfg.eval_interval == 0 or step == cfg.max_iters)
            stopping = step == cfg.max_iters or stop.agreed(s.dist_env, step, cfg.log_interval)
            checkpoint_due = stopping or (
                cfg.checkpoint_interval > 0 and step % cfg.checkpoint_interval == 0 and step != s.start_step
            )
            log_due = step % cfg.log_interval == 0 and step != s.start_step
            if eval_due or checkpoint_due or log_due:
                # One host sync per event: read back the losses kept on the device.
                sync(s.device)
                clock.stop()
                if not check_divergence(s, step):
                    return "diverged"
                if log_due:
                    log_step(s, step)
                if eval_due:
                    evaluate(s, step)
                if checkpoint_due:
                    save_checkpoint(s, step)
                if stopping:
                    return "done" if step == cfg.max_iters else "interrupted"
                clock.start()
            losses, drawn, measured = train_step(
                s.run, s.train_model, step, cfg, s.hyper, next_batch, s.autocast
            )
            s.gradients = measured if measured is not None else s.gradients
            step += 1
            s.pending.add(step, losses)
            for log in s.logs:
                log.tick()
            if on_step is not None and on_step(
                step, *(torch.cat(part, dim=1) for part in zip(*drawn, strict=True))
            ):
                stop.request()


def final_eval(s: Session) -> list[dict]:
    """Each run's exact losses on val (and test) after its last step."""
    exact = [{} for _ in s.members]
    report_to = next(m for m, _ in active(s.run))
    for split in ("val", "test"):
        if split in s.splits:
            losses = s.evaluator.exact(s.run.model, split, s.logs[report_to].exact_pass(split))
            for m, loss in enumerate(losses):
                exact[m][split] = loss
    return exact


def results(s: Session, status: str, exact: list[dict], ended: list) -> list[dict]:
    """Each run's result (written to its result.json); an ended run's as it was."""
    run = s.run
    parameters = sum(p.numel() for p in run.params) // len(s.members)
    out = []
    for m, (replica, log, member) in enumerate(zip(run.replicas, s.logs, s.members, strict=True)):
        log.close()
        if ended[m] is not None:
            out.append(ended[m])
            continue
        diverged = replica.progress.diverged
        result = {
            "status": "diverged" if diverged is not None else status,
            "error": diverged,
            "device": describe_device(s.device),
            "host": socket.gethostname(),
            "world_size": s.dist_env.world_size,
            "provenance": s.attempts[m],
            "finals": runlog.final_metrics(
                replica.progress,
                run.clock,
                s.tokens_per_step,
                final_sigma=sigmas(run)[m],
                exact=exact[m] if diverged is None else {},
                parameters=parameters,
            ),
        }
        if s.dist_env.is_main:
            runlog.write_result(member.run_dir, result)
        out.append(result)
    return out


# --- events ------------------------------------------------------------------------


def log_step(s: Session, step: int) -> None:
    """A log line per active run: its loss over the window, lr, σ, ‖g‖ and ‖noise‖, time."""
    lr = s.run.optimizer.param_groups[0]["lr"]
    for m, replica in active(s.run):
        record = replica.progress.log_record(
            step, lr, sigmas(s.run)[m], s.run.clock.train_s, s.tokens_per_step
        )
        s.logs[m].log({**record, **runlog.gradient_fields(s.gradients[m])})


def save_checkpoint(s: Session, step: int) -> None:
    """Checkpoint `step`: the run state, the config(s) and the vocabulary (for sampling); a
    group's also lists its runs' directories (relative to the group's)."""
    run = s.run
    for _, replica in active(run):
        replica.progress.checkpoint_step = step
    state = run.state_dict()  # on every rank: it gathers the ranks' RNG states
    if run.dist_env.is_main:
        weights = keep_last_good_weights(run, state.pop("model"), s.checkpoint_dir)
        threads = torch.get_num_threads()  # a resume on another count is not bit-identical
        if s.group_dir is None:
            configs = {"config": s.cfg.to_dict()}
        else:
            configs = {
                "configs": [c.to_dict() for c in s.cfgs],
                "run_dirs": [group.relative(m.run_dir, s.group_dir) for m in s.members],
            }
        state = {**configs, "vocab": s.vocab, "threads": threads, **state}
        checkpoint.save(s.checkpoint_dir, step, weights, state)


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


def evaluate(s: Session, step: int) -> None:
    """Estimate each run's losses at `step`, log them, and give a plateau schedule its val loss."""
    run = s.run
    losses = s.evaluator.estimate(s.model)
    evaluated = [None] * len(run.replicas)
    for m, replica in active(run):
        replica.progress.record_eval(step, losses[m])
        s.logs[m].log({"kind": "eval", "step": step, **losses[m], "time_s": run.clock.train_s})
        evaluated[m] = losses[m]["val_loss"]
    if run.noise is not None:
        run.noise.observe(evaluated)
    s.evaluated_step = step


def check_divergence(s: Session, step: int) -> bool:
    """Add the read-back step losses to each run's progress; a run whose loss is not finite,
    or whose weights, optimizer state (gradnoise.lm.training.finite) or clipped gradient norm are not
    (an update can break them while its loss is still finite, and they must not be
    evaluated, checkpointed or reported as done) is marked diverged and frozen. Whether any
    run is still active."""
    run = s.run
    losses = s.pending.read_back(s.dist_env)
    broken = finite.nonfinite_by_replica(run.optimizer, run.params, len(run.replicas))
    bad_norms = run.nonfinite_norms.tolist()
    for m, replica in active(run):
        bad = replica.progress.absorb([(step_, values[m]) for step_, values in losses])
        if bad is None and broken[m] is not None:
            bad = (step, broken[m])
        if bad is None and bad_norms[m]:
            bad = (step, "non-finite gradient norm")
        if bad is not None:
            replica.progress.diverged = divergence_message(run, s.cfgs[m], m, *bad)
            run.freezer.freeze(m)
    return bool(active(run))


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

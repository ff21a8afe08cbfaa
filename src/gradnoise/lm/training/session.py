"""A group's training session as the loop sees it: its members and their run state, the model
as trained and as evaluated, the data and the run logs; built at step 0 (`start`), put back
from the latest checkpoint (`restore`), and recorded in each run directory before the first
step (`record_provenance`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gradnoise.errors import UserError
from gradnoise.lm.config import TrainConfig
from gradnoise.lm.data import corpora
from gradnoise.lm.devices import resolve_dtype
from gradnoise.lm.storage import checkpoint, runlog
from gradnoise.lm.training import group, provenance, setup
from gradnoise.lm.training.distributed import DistributedEnv
from gradnoise.lm.training.evaluation import Evaluator
from gradnoise.lm.training.progress import Clock, PendingLosses
from gradnoise.lm.training.resume import (
    check_group_members,
    check_owner,
    check_resumable,
    refuse_existing_run,
)
from gradnoise.lm.training.state import RunState


@dataclass
class Session:
    """What the loop's steps share: the group's members and their run state, the model as
    trained (DDP-wrapped on several ranks) and as evaluated, the data and the run logs."""

    members: list[group.Member]
    group_dir: Path | None
    dist_env: DistributedEnv
    run: RunState
    splits: dict
    vocab: list[str] | str  # as the corpus's meta.json records it
    vocab_size: int
    logs: list[runlog.RunLog]
    device: torch.device
    dtype: torch.dtype
    model: torch.nn.Module | None = None
    train_model: torch.nn.Module | None = None
    evaluator: Evaluator | None = None
    hyper: setup.Hyper | None = None
    autocast: contextlib.AbstractContextManager | None = None
    start_step: int = 0
    resumed: bool = False  # from a checkpoint (a resume that finds none starts afresh)
    attempts: list = field(default_factory=list)
    pending: PendingLosses = field(default_factory=PendingLosses)
    gradients: list[dict] = field(default_factory=list)  # the last measured step's ‖g‖, ‖noise‖
    evaluated_step: int | None = None

    @property
    def cfg(self) -> TrainConfig:
        """The settings the group shares (config.group_key)."""
        return self.members[0].config

    @property
    def cfgs(self) -> list[TrainConfig]:
        return [m.config for m in self.members]

    @property
    def checkpoint_dir(self) -> Path:
        return self.group_dir if self.group_dir is not None else self.members[0].run_dir

    @property
    def use_compile(self) -> bool:
        return self.cfg.compile is True or (self.cfg.compile == "auto" and self.device.type == "cuda")

    @property
    def tokens_per_step(self) -> int:
        cfg = self.cfg
        return cfg.batch_size * self.dist_env.world_size * cfg.grad_accum * cfg.block_size


def start(members, group_dir, dist_env, *, progress: bool) -> Session:
    """The group at step 0: corpus, run logs, model, optimizer, noise, data streams."""
    cfg, cfgs = members[0].config, [m.config for m in members]
    device = dist_env.resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    corpus = corpora.load(cfg.dataset)
    logs = [
        runlog.RunLog(
            m.run_dir,
            m.config,
            enabled=dist_env.is_main,
            progress_bar=progress and index == 0,
            label=f"{m.run_dir.name}: " if len(members) > 1 else "",
        )
        for index, m in enumerate(members)
    ]
    return Session(
        members=members,
        group_dir=group_dir,
        dist_env=dist_env,
        run=setup.new_run(cfgs, corpus.vocab_size, device, dtype, dist_env, Clock()),
        splits=setup.splits(corpus, cfg),
        vocab=corpus.meta["vocab"],
        vocab_size=corpus.vocab_size,
        logs=logs,
        device=device,
        dtype=dtype,
    )


def restore(s: Session, threads_given: bool) -> None:
    """Put the latest checkpoint's state back into the run, if there is one."""
    latest = checkpoint.latest(s.checkpoint_dir)
    if latest is None:
        return
    weights, saved = checkpoint.load(latest)
    with checkpoint.restoring(latest):  # a damaged checkpoint is a UserError naming it
        saved_configs = saved["configs"] if "configs" in saved else [saved["config"]]
        if len(saved_configs) != len(s.members):
            raise UserError(f"the checkpoint holds {len(saved_configs)} runs, not these {len(s.members)}")
        for saved_config, member in zip(saved_configs, s.members, strict=True):
            check_resumable(saved_config, member.config)
        if s.group_dir is not None:
            check_group_members(saved["run_dirs"], [m.run_dir for m in s.members], s.group_dir, latest)
        s.run.load_state_dict({"model": weights, **saved})
    checkpoint.resume_threads(saved, latest, keep_current=threads_given)
    s.start_step, s.resumed, s.evaluated_step = checkpoint.step_of(latest), True, checkpoint.step_of(latest)


def record_provenance(s: Session, ended: list) -> None:
    """Write each run's identity (config.json, replica.json) and what made it
    (provenance.json), then open the run logs."""
    made_by = provenance.current(s.device, s.dtype, s.use_compile, replicas=len(s.members))
    s.attempts = [made_by] * len(s.members)
    keep_through = s.start_step if s.resumed else None
    if s.dist_env.is_main:
        write_identities(s.members, s.group_dir)
        for index, member in enumerate(s.members):
            if ended[index] is None:  # an ended member's files stay as they are
                s.attempts[index] = runlog.write_provenance(member.run_dir, made_by, keep_through)
    for log in s.logs:
        log.start(keep_through_step=keep_through)


def compile_model(s: Session) -> None:
    """The model as trained (compiled where cfg.compile says, DDP-wrapped on several ranks) and
    as evaluated, the autocast, the evaluator and the per-replica hyper-parameters."""
    cfg, device = s.cfg, s.device
    s.model = torch.compile(s.run.model) if s.use_compile else s.run.model
    s.train_model = s.model
    if s.dist_env.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        s.train_model = DistributedDataParallel(s.model, device_ids=ids)
    s.autocast = torch.autocast(device.type, dtype=s.dtype, enabled=s.dtype != torch.float32)
    s.evaluator = Evaluator(s.splits, cfg, s.dist_env, device, s.autocast, replicas=len(s.members))
    s.hyper = setup.Hyper.of(s.cfgs, device)
    s.gradients = [{} for _ in s.members]


def check_directories(members, group_dir: Path | None, resume: bool) -> None:
    """UserError unless every directory may be written: a fresh run's hold no run, and each
    run's holds nothing but its own (resume.check_owner)."""
    if not resume:
        for directory in [m.run_dir for m in members] + ([group_dir] if group_dir is not None else []):
            refuse_existing_run(directory)
    for index, member in enumerate(members):
        check_owner(member.run_dir, member.config, (group_dir, index) if group_dir is not None else None)


def write_identities(members, group_dir: Path | None) -> None:
    """Each run directory's replica.json (a member) and config.json: whose run it holds,
    written before anything else, so that every later file is known to be this run's."""
    for index, member in enumerate(members):
        if group_dir is not None:
            group.write_replica_link(member.run_dir, group_dir, index)
        else:  # a link left by a group whose directory is gone (check_owner)
            (member.run_dir / group.REPLICA_FILE).unlink(missing_ok=True)
        runlog.write_config(member.run_dir, member.config)

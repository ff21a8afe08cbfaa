"""The rules for starting or resuming a run in a directory: a run may be resumed only with
the same config, except the RESUMABLE_CHANGES, which do not alter the computation; a directory
holds one run (or one member of a group) and nothing is started over another's files."""

from __future__ import annotations

from pathlib import Path

from gradnoise.errors import UserError
from gradnoise.lm.config import LATER_KEYS, TrainConfig, read_config
from gradnoise.lm.storage import checkpoint, runlog
from gradnoise.lm.storage.files import read_json
from gradnoise.lm.training.group import GROUP_FILE, REPLICA_FILE, read_replica_link

# Settings a resumed run may change: they do not alter the computation.
RESUMABLE_CHANGES = {"checkpoint_interval", "tensorboard", "wandb", "compile", "final_eval"}


def check_resumable(saved: dict, cfg: TrainConfig) -> None:
    """UserError unless `cfg` differs from the saved config only in RESUMABLE_CHANGES."""
    changed = sorted(_differences(saved, cfg) - RESUMABLE_CHANGES)
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} → {getattr(cfg, k)!r}" for k in changed)
        raise UserError(
            f"cannot resume with a different config ({detail}); only "
            f"{', '.join(sorted(RESUMABLE_CHANGES))} may change on resume"
        )


def finished_result(run_dir: Path, cfg: TrainConfig) -> dict | None:
    """The result of a run in run_dir that ended with this config (runlog.FINISHED: it trained
    to the end, or diverged), else None."""
    result = runlog.read_result(run_dir)
    try:
        saved = read_config(run_dir / runlog.CONFIG_FILE)
    except UserError:
        return None
    if result is not None and _differences(saved.to_dict(), cfg) <= RESUMABLE_CHANGES:
        return result
    return None


#: Every file a run writes in its directory: present, the directory holds a run.
RUN_FILES = (runlog.CONFIG_FILE, runlog.LOG_FILE, runlog.RESULT_FILE, REPLICA_FILE, checkpoint.CHECKPOINTS)


def refuse_existing_run(run_dir: Path) -> None:
    """UserError if run_dir already holds a run's outputs (a fresh run would overwrite them)."""
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if existing:
        raise UserError(
            f"{run_dir} already holds a run ({', '.join(existing)}); pass --resume to continue "
            "it, or choose another --run-dir"
        )


def check_owner(run_dir: Path, cfg: TrainConfig, member: tuple[Path, int] | None) -> None:
    """UserError unless what run_dir holds is this run's, so that resuming it may write there:
    its config.json equals `cfg` (up to RESUMABLE_CHANGES), and its replica.json names the
    group and replica `member` (group directory, index), or is absent for a plain run.

    A member's directory without replica.json (or one naming a group directory that is gone)
    may hold what a run without a checkpoint left (config.json, log.jsonl: the study may
    group a run it had launched alone), never a finished result or checkpoints of its own.
    Nothing but the trainer writes log.jsonl, results or checkpoints, and it writes
    config.json first."""
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not existing:
        return
    config_path = run_dir / runlog.CONFIG_FILE
    if not config_path.exists() and set(existing) - {REPLICA_FILE}:
        raise UserError(
            f"{run_dir} holds {', '.join(existing)} but no {runlog.CONFIG_FILE}: not a run "
            "this command can continue; choose another directory"
        )
    _check_link(run_dir, member, existing)
    if config_path.exists():
        try:
            check_resumable(read_json(config_path, "run config"), cfg)
        except UserError as error:
            raise UserError(f"{run_dir} holds another run: {error}") from None


def check_group_members(saved_dirs, run_dirs: list[Path], group_dir: Path, directory: Path) -> None:
    """UserError unless the group checkpoint `directory` was trained for these run
    directories, in this order (`saved_dirs`: relative to the group directory)."""
    saved = [(Path(group_dir) / d).resolve() for d in saved_dirs]
    if saved != [Path(d).resolve() for d in run_dirs]:
        moved = [
            f"run {m}: {Path(group_dir) / s} → {d}"
            for m, (s, d) in enumerate(zip(saved_dirs, run_dirs, strict=False))
            if (Path(group_dir) / s).resolve() != Path(d).resolve()
        ]
        raise UserError(
            f"the group checkpoint {directory} was trained for other run directories than "
            f"{Path(group_dir) / GROUP_FILE} lists ({'; '.join(moved) or 'another count'}); "
            "restore group.json as it was"
        )


def _check_link(run_dir: Path, member: tuple[Path, int] | None, existing: list[str]) -> None:
    """The replica.json part of check_owner."""
    link = read_replica_link(run_dir)
    if link is not None and not link[0].exists():
        link = None  # its group directory is gone: there is nothing of it to continue
    if member is None:
        if link is not None:
            raise UserError(
                f"{run_dir} is run {link[1]} of the batched group {link[0]}, whose checkpoints hold its "
                f"weights; continue it with: gradnoise train --group {link[0]} --resume"
            )
        return
    group_dir, index = member
    if link is None:
        if runlog.read_result(run_dir) is not None or checkpoint.CHECKPOINTS in existing:
            raise UserError(
                f"{run_dir} holds a run that is not a member of the group {group_dir} "
                f"({', '.join(existing)}); give each of the group's runs a directory of its own"
            )
    elif link[0].resolve() != Path(group_dir).resolve() or link[1] != index:
        raise UserError(
            f"{run_dir} is run {link[1]} of the group {link[0]}, not run {index} of {group_dir}; "
            "give each of the group's runs a directory of its own"
        )


def _differences(saved: dict, cfg: TrainConfig) -> set[str]:
    """The keys whose values differ; a key the saved config predates has its LATER_KEYS value."""
    current = cfg.to_dict()
    return {key for key in current if saved.get(key, LATER_KEYS.get(key)) != current[key]}

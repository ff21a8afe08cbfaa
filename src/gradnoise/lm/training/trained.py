"""A run's trained model: loaded from its run directory (its latest checkpoint; a member of a
batched group: its replica of the group's) or from an export, and exported as a saved model
that `GPT.from_pretrained` reads."""

from __future__ import annotations

from pathlib import Path

from gradnoise.errors import UserError
from gradnoise.lm.config import read_config
from gradnoise.lm.data.corpora import vocabulary_size
from gradnoise.lm.model.gpt import GPT
from gradnoise.lm.model.weights import (
    SAVED_FILES,
    holds_only_saved_model,
    is_saved_model,
    load_weights,
    read_vocab,
    replica_weights,
)
from gradnoise.lm.storage import runlog
from gradnoise.lm.storage.checkpoint import CHECKPOINTS, LATEST, WEIGHTS, latest, load, restoring
from gradnoise.lm.training.finite import all_finite
from gradnoise.lm.training.group import REPLICA_FILE, read_replica_link


def load_trained(path: Path, map_location="cpu"):
    """(GPT, vocab) from a run directory (its latest checkpoint; a member of a batched group:
    its replica of the group's latest checkpoint) or an export directory."""
    path = Path(path)
    if is_saved_model(path):
        return GPT.from_pretrained(path, map_location), read_vocab(path)
    link = read_replica_link(path)
    directory = latest(path if link is None else link[0])
    if link is not None and directory is None:
        own = " (its own checkpoints/ are not the group's)" if latest(path) is not None else ""
        raise UserError(
            f"{path} is run {link[1]} of the batched group {link[0]} ({REPLICA_FILE}), whose "
            f"weights are in the group's checkpoints, and that directory holds none{own}; "
            "put the group directory back where replica.json says"
        )
    if directory is None or not (path / runlog.CONFIG_FILE).is_file():
        raise UserError(
            f"{path} is neither a run directory with a checkpoint ({runlog.CONFIG_FILE}, "
            f"{CHECKPOINTS}/{LATEST}) nor an export ({', '.join(SAVED_FILES)})"
        )
    cfg = read_config(path / runlog.CONFIG_FILE)
    weights, state = load(directory)
    with restoring(directory):
        if link is not None:
            weights = _member_weights(path, directory, weights, state, link[1])
        model = GPT(cfg.model_config(vocab_size=vocabulary_size(state["vocab"])))
        load_weights(model, weights, f"the weights in {directory / WEIGHTS}")
    if not all_finite(list(weights.values())):
        raise UserError(
            f"the weights of {path} in {directory} are not finite (the run diverged before "
            "its first checkpoint); there is no model to use"
        )
    return model.to(map_location), state["vocab"]


def _member_weights(run_dir: Path, directory: Path, weights: dict, state: dict, index: int) -> dict:
    """Replica `index` of a group checkpoint's weights; UserError unless it is run_dir's."""
    run_dirs = state["run_dirs"]
    group_dir = directory.parent.parent
    if not 0 <= index < len(run_dirs) or (group_dir / run_dirs[index]).resolve() != run_dir.resolve():
        raise UserError(f"the group checkpoint {directory} does not hold {run_dir} as replica {index}")
    return replica_weights(weights, index)


def export(run_dir: Path, out_dir: Path, *, force: bool = False) -> Path:
    """Write the run's latest weights, model config and vocabulary for GPT.from_pretrained.

    out_dir must be new or empty; with force it may also be an earlier export, which is
    replaced. Anything else (a file, other data, the run itself or a directory around or
    inside it) is a UserError, checked before anything is written.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if is_saved_model(run_dir):
        raise UserError(f"{run_dir} is already an export, not a run directory")
    check_export_destination(run_dir, out_dir, force=force)
    model, vocab = load_trained(run_dir)
    model.save_pretrained(out_dir, vocab)
    return out_dir


def check_export_destination(run_dir: Path, out_dir: Path, *, force: bool) -> None:
    """UserError unless `export` may write out_dir (see there)."""
    run, out = run_dir.resolve(), out_dir.resolve()
    relation = (
        "is the run directory itself"
        if out == run
        else f"contains the run directory {run_dir}"
        if out in run.parents
        else f"is inside the run directory {run_dir}"
        if run in out.parents
        else None
    )
    if relation is not None:
        raise UserError(f"cannot export to {out_dir}: it {relation}; export to a directory outside the run")
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    if not out_dir.is_dir():
        raise UserError(f"cannot export to {out_dir}: it exists and is not a directory")
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    if not force:
        raise UserError(
            f"cannot export to {out_dir}: it is not empty; give a new or empty directory, or "
            "--force to replace an earlier export there"
        )
    if not holds_only_saved_model(out_dir):
        shown = ", ".join(entries[:5]) + (", …" if len(entries) > 5 else "")
        raise UserError(
            f"cannot export to {out_dir}: it holds {shown}, not an earlier export "
            f"({', '.join(SAVED_FILES)} and nothing else); --force replaces only an export"
        )

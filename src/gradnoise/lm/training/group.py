"""A group: runs of one architecture trained together, in one process, as one batched model.

    group_dir/group.json          {"runs": [{"run_id", "run_dir", "config"}, ...]}
    group_dir/checkpoints/        the group's checkpoints: every member's state in one
    run_dir/replica.json          {"group_dir", "index"}: where a member's weights are

`run_dir` is relative to the group directory and `group_dir` to the run directory (so a
study directory can move); each member keeps its own run directory (config.json,
log.jsonl, result.json), so everything that reads a run reads a member the same way.
The members' configs differ only in `config.PER_REPLICA_KEYS`. A group of one is an
ordinary run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from gradnoise.errors import UserError
from gradnoise.lm.config import PER_REPLICA_KEYS, TrainConfig, group_key
from gradnoise.lm.storage import atomic, files

GROUP_FILE = "group.json"
REPLICA_FILE = "replica.json"


@dataclass(frozen=True)
class Member:
    """One run of a group."""

    run_id: str
    run_dir: Path
    config: TrainConfig


def check_members(members: list[Member]) -> None:
    """UserError unless the members may share one batched model (equal shared settings)."""
    if not members:
        raise UserError("a group needs at least one run")
    ids = [m.run_id for m in members]
    if len(set(ids)) != len(ids):
        raise UserError(f"a group lists a run twice: {ids}")
    first = group_key(members[0].config)
    for member in members[1:]:
        if group_key(member.config) != first:
            theirs, first_values = member.config.to_dict(), members[0].config.to_dict()
            shared = {k for k, v in theirs.items() if first_values[k] != v} - set(PER_REPLICA_KEYS)
            raise UserError(
                f"runs {members[0].run_id} and {member.run_id} cannot share a batched model: "
                f"they differ in {', '.join(sorted(shared))}, which every run of a group shares"
            )


def check_directories(group_dir: Path, run_dirs: list[Path]) -> None:
    """UserError unless every run has a directory of its own, apart from the group's (one
    process locks each; a run in the group directory would mix its files with the group's)."""
    seen = {Path(group_dir).resolve(): "the group directory"}
    for index, run_dir in enumerate(run_dirs):
        where = Path(run_dir).resolve()
        if where in seen:
            raise UserError(
                f"run {index}'s run_dir {run_dir} is {seen[where]}; give each run a directory of its own"
            )
        seen[where] = f"run {index}'s run_dir too"


def write_group(group_dir: Path, members: list[Member]) -> None:
    """Write group_dir/group.json (atomically); run directories are stored relative to it."""
    check_members(members)
    group_dir = Path(group_dir)
    check_directories(group_dir, [m.run_dir for m in members])

    runs = [
        {"run_id": m.run_id, "run_dir": relative(m.run_dir, group_dir), "config": m.config.to_dict()}
        for m in members
    ]
    atomic.write_text(group_dir / GROUP_FILE, json.dumps({"runs": runs}, indent=2) + "\n")


def read_group(group_dir: Path) -> list[Member]:
    """The members recorded in group_dir/group.json; UserError if it is missing or malformed."""
    path = Path(group_dir) / GROUP_FILE
    document = files.read_json(path, "group file")
    try:
        members = [
            Member(str(r["run_id"]), _join(group_dir, r["run_dir"]), TrainConfig.from_dict(r["config"]))
            for r in document["runs"]
        ]
    except (KeyError, TypeError) as error:
        raise UserError(
            f"{path} is not a group file ({{'runs': [{{run_id, run_dir, config}}]}}): {error}"
        ) from None
    check_members(members)
    check_directories(Path(group_dir), [m.run_dir for m in members])
    return members


def relative(path: Path, start: Path) -> str:
    """`path` relative to the directory `start` (both resolved)."""
    return os.path.relpath(Path(path).resolve(), Path(start).resolve())


def write_replica_link(run_dir: Path, group_dir: Path, index: int) -> None:
    """Record in a member's run directory that its weights are replica `index` of the group's checkpoints."""
    link = {"group_dir": relative(group_dir, run_dir), "index": index}
    atomic.write_text(Path(run_dir) / REPLICA_FILE, json.dumps(link, indent=2) + "\n")


def read_replica_link(run_dir: Path) -> tuple[Path, int] | None:
    """(group directory, replica index) of a member's run directory; None for a plain run."""
    path = Path(run_dir) / REPLICA_FILE
    if not path.is_file():
        return None
    link = files.read_json(path, "replica file")
    if not (
        isinstance(link, dict)
        and isinstance(link.get("group_dir"), str)
        and isinstance(link.get("index"), int)
        and not isinstance(link["index"], bool)
    ):
        raise UserError(f"{path} is not a replica file ({{'group_dir': str, 'index': int}})")
    return _join(run_dir, link["group_dir"]), link["index"]


def _join(directory: Path, relative_path: str) -> Path:
    """directory / relative_path with its `..` folded (for messages; symlinks aside, the same place)."""
    return Path(os.path.normpath(Path(directory) / relative_path))

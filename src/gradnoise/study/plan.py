"""Which of a study's runs train together: groups of up to M runs as one batched model.

    groups = plan_groups(todo, study_dir, batch_models=8)

Runs may share a group when their configs differ only in per-replica settings
(seed, noise, dropout, ...: equal `group_key` of their task, which includes the dataset).
Rules, in this order:

1. A group launched before (study_dir/groups/<id>/group.json exists, written when the
   group was first prepared) is launched again, whole and unchanged, while any of its
   runs is unfinished: the batched trainer checkpoints the whole group in the group
   directory, so only the same members can resume it. Its members that finished
   earlier are trained no further (the trainer returns their result) and are not
   recorded again; `--batch-models` does not change a group once launched.
2. A run that is in no such group but has a checkpoint of its own (it was trained
   alone before) resumes alone, from that checkpoint.
3. The other runs, in the spec's order (dataset, seed, method: every method of a seed
   before the next seed, so paired comparisons complete early), fill groups of
   equal `group_key`, M at a time.

A group of one is an ordinary run (`gradnoise train --run-dir`, as with M = 1);
larger ones train with `gradnoise train --group` (MNIST runs: `gradnoise train-mnist
--group`, a run alone being a group of one in its own directory). The plan depends only on the
runs still to do and what is on disk, so a resumed study forms the same groups.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from gradnoise.errors import UserError
from gradnoise.lm.storage import checkpoint, files, runlog
from gradnoise.study.spec import Run

#: A group's file, in either harness: {"runs": [{"run_id", "run_dir", "config"}, ...], ...}.
GROUP_FILE = "group.json"

GROUPS_DIR = "groups"


@dataclass(frozen=True)
class Group:
    """Runs trained in one process. `group_id` None: one run trained alone."""

    group_id: str | None
    #: every run the process trains, in group.json's order
    members: tuple[Run, ...]
    #: the members this study still waits for (the others finished before)
    todo: tuple[Run, ...]


def run_directory(study_dir: Path, run_id: str) -> Path:
    """A run's own directory in its study: config.json, log.jsonl, checkpoints, result.json."""
    return Path(study_dir) / "runs" / run_id


def last_step(run_dir: Path) -> int:
    """The step of the run's last train log line, or, for a run that logs evals alone (the
    MNIST task), of its last eval line (0 if none)."""
    train, evaluation = runlog.read_log_tail(run_dir)
    line = train or evaluation
    return int(line["step"]) if line else 0


def group_directory(study_dir: Path, group_id: str) -> Path:
    """A group's directory in its study: group.json, the group's checkpoints and logs."""
    return Path(study_dir) / GROUPS_DIR / group_id


def new_group_id(runs: list[Run]) -> str:
    """sha256[:12] of the members' run ids, in order: the same runs give the same id."""
    return hashlib.sha256("\n".join(r.run_id for r in runs).encode()).hexdigest()[:12]


def launched_groups(study_dir: Path) -> dict[str, list[str]]:
    """Group id → member run ids, for every group.json in the study's groups directory."""
    root = Path(study_dir) / GROUPS_DIR
    if not root.is_dir():
        return {}
    return {
        directory.name: _member_ids(directory / GROUP_FILE)
        for directory in sorted(root.iterdir())
        if (directory / GROUP_FILE).is_file()
    }


def _member_ids(path: Path) -> list[str]:
    """The run ids a group file lists (the LM and the MNIST harness write the same "runs")."""
    document = files.read_json(path, "group file")
    try:
        return [str(run["run_id"]) for run in document["runs"]]
    except (KeyError, TypeError):
        raise UserError(f"{path} is not a group file ({{'runs': [{{'run_id', ...}}]}})") from None


def plan_groups(todo: list[Run], all_runs: list[Run], study_dir: Path, batch_models: int) -> list[Group]:
    """The groups that train `todo` (runs in spec order; `all_runs` is every run of the
    spec, as launched groups may hold runs that finished): see the module docstring."""
    by_id = {run.run_id: run for run in all_runs}
    waiting = {run.run_id for run in todo}
    groups, grouped = [], set()
    for group_id, member_ids in launched_groups(study_dir).items():
        grouped.update(member_ids)
        if waiting.intersection(member_ids):
            unknown = [i for i in member_ids if i not in by_id]
            if unknown:
                raise UserError(
                    f"{group_directory(study_dir, group_id) / GROUP_FILE} lists runs {unknown} "
                    "that are not in this study's spec; move that group directory away"
                )
            members = tuple(by_id[i] for i in member_ids)
            groups.append(Group(group_id, members, tuple(r for r in members if r.run_id in waiting)))

    open_groups: dict[str, list[Run]] = {}
    formed: list[list[Run]] = []
    for run in todo:
        if run.run_id in grouped:
            continue
        if batch_models == 1 or checkpoint.latest(run_directory(study_dir, run.run_id)) is not None:
            formed.append([run])
            continue
        key = run.task.group_key(run.config)
        members = open_groups.setdefault(key, [])
        if not members:
            formed.append(members)  # in the order of its first member
        members.append(run)
        if len(members) == batch_models:
            del open_groups[key]
    for members in formed:
        group_id = new_group_id(members) if len(members) > 1 else None
        groups.append(Group(group_id, tuple(members), tuple(members)))
    return groups

"""Writing a tiny study's spec, and watching the processes and files of a study as it runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from helpers.configs import STUDY


def write_spec(directory: Path, name: str, methods: dict, seeds=1, overrides=None) -> Path:
    """A spec of the tiny study (configs.STUDY, with `overrides`) at directory/name.yaml."""
    spec = {
        "name": name,
        "preset": "tiny",
        "datasets": ["shakespeare_char"],
        "seeds": seeds,
        "overrides": {**STUDY, **(overrides or {})},
        "methods": methods,
        "caveats": ["a test study"],
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def log_lines(run_dir: Path, through_step: int | None = None) -> list[str]:
    """The lines of a run's log.jsonl (none yet: []), those of steps ≤ through_step if given."""
    path = run_dir / "log.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    if through_step is None:
        return lines
    return [line for line in lines if json.loads(line)["step"] <= through_step]


def latest_checkpoint_step(directory: Path) -> int | None:
    """The step of the checkpoint LATEST names in directory/checkpoints (None: no checkpoint)."""
    latest = directory / "checkpoints" / "LATEST"
    return int(latest.read_text().strip().rsplit("_", 1)[-1]) if latest.exists() else None


def processes_with(*arguments: str) -> list[int]:
    """Processes whose command line holds every one of `arguments` (from /proc)."""
    wanted = [argument.encode() for argument in arguments]
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if all(argument in command for argument in wanted):
                pids.append(int(entry.name))
    return pids


def wait_for(condition, timeout: float = 120.0, what: str = "condition"):
    """condition()'s first true value, polled every 20 ms; AssertionError after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")

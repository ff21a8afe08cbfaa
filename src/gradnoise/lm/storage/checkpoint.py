"""Checkpoints of a training run, written atomically and loaded without pickle code.

Layout inside a run directory:

    checkpoints/step_000500/model.safetensors   weights (safetensors: tensors only)
    checkpoints/step_000500/state.pt            the rest of RunState.state_dict() (optimizer,
                                                GradScaler, noise, RNG states, progress,
                                                clock), the config, the vocabulary and the
                                                CPU thread count it was trained on
    checkpoints/LATEST                          the name of the newest complete one

A checkpoint directory is built under a temporary name and renamed into place
when both files are complete; LATEST is then replaced (os.replace) to point at
it, and older checkpoints are removed. A crash at any moment leaves LATEST
pointing at a complete, consistent pair.

state.pt is read with `torch.load(weights_only=True)`, which only rebuilds
tensors and plain containers: a file that would run code on load is refused. A
damaged file (truncated, random bytes, a tensor of the wrong shape or dtype, an
entry missing) is a UserError naming it, never a traceback or a silent cast.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import shutil
import zipfile
from pathlib import Path

import torch

from gradnoise.errors import UserError
from gradnoise.lm.storage import atomic, files

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
WEIGHTS = files.WEIGHTS_FILE  # as a saved model holds them: safetensors, the tied matrix once
STATE = "state.pt"


def save(run_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict) -> Path:
    """Write checkpoint `step` of a run (weights + state) and make it the latest."""
    root = Path(run_dir) / CHECKPOINTS
    name = f"step_{step:07d}"

    def write(tmp: Path) -> None:
        files.write_weights({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / WEIGHTS)
        torch.save(state, tmp / STATE)

    atomic.build_directory(root / name, write, replace=True)
    atomic.write_text(root / LATEST, name + "\n")
    for old in root.glob("step_*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return root / name


def latest(run_dir: Path) -> Path | None:
    """The directory of the run's newest complete checkpoint, or None."""
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    directory = pointer.parent / pointer.read_text().strip()
    return directory if (directory / WEIGHTS).is_file() and (directory / STATE).is_file() else None


def step_of(directory: Path) -> int:
    """The step a checkpoint directory (step_0000500) holds."""
    return int(Path(directory).name.removeprefix("step_"))


def load(directory: Path, map_location="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, state) of one checkpoint directory, loaded without executing code."""
    directory = Path(directory)
    return files.read_weights(directory / WEIGHTS, map_location), load_state(directory / STATE)


def load_state(path: Path) -> dict:
    """torch.load(weights_only=True): a pickle that would run code is refused, and a file
    that is not a checkpoint state (truncated, random bytes) is reported as damaged."""
    damaged = f"checkpoint state {path} is damaged"
    if not Path(path).is_file():
        raise UserError(f"checkpoint state {path} is missing")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise UserError(f"{damaged}: it is not a torch.save archive")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # The weights-only unpickler refuses every GLOBAL: a reference to code to call.
        if "global" not in str(error).lower():
            raise UserError(f"{damaged}: {_last_line(error)}") from None
        raise UserError(
            f"refusing to load {path}: it is not a plain-tensor checkpoint "
            f"(loading it would run code: {_last_line(error)})"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        raise UserError(f"{damaged}: {_last_line(error)}") from None
    if not isinstance(state, dict):
        raise UserError(f"{damaged}: it holds a {type(state).__name__}, not a dict of entries")
    return state


def _last_line(error: BaseException) -> str:
    """The line of a (long, multi-line) torch error that says what was wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines if "global" in line.lower() or "operand" in line.lower()]
    return (telling or lines or [type(error).__name__])[0][:300]


def check_threads(threads) -> int:
    """`threads` if it is a thread count (an integer ≥ 1), else a UserError."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserError(f"threads={threads!r}: give an integer ≥ 1 (torch's CPU threads)")
    return threads


def resume_threads(state: dict, directory: Path, *, keep_current: bool) -> None:
    """Resume on the CPU thread count the checkpoint was written with (CPU kernels sum in
    another order on another count, and the continuation would then differ from the
    uninterrupted run in the last bits, which training amplifies). keep_current: the
    caller chose the count (`--threads`); keep it, and warn where it differs."""
    saved, now = state.get("threads"), torch.get_num_threads()
    if saved is None or saved == now:
        return
    if keep_current:
        log.warning(
            f"resuming {directory} on {now} CPU thread(s) as asked; it was checkpointed on {saved}, "
            "so the run will not be bit-identical to an uninterrupted one (leave out --threads "
            "to resume on the checkpoint's count)"
        )
        return
    log.info(f"resuming {directory} on {saved} CPU thread(s), the count it was checkpointed on (not {now})")
    torch.set_num_threads(saved)


@contextlib.contextmanager
def restoring(directory: Path):
    """Around restoring a run from checkpoint `directory`: whatever a damaged or foreign
    checkpoint raises there (an entry missing, a state of the wrong shape) becomes a
    UserError naming it."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except UserError as error:
        if str(directory) in str(error):
            raise
        raise UserError(f"{error} (checkpoint {directory})") from None
    except KeyError as error:
        raise UserError(
            f"checkpoint {directory} is damaged or from another version: its state has no "
            f"entry {error.args[0]!r}"
        ) from None
    except (ValueError, RuntimeError, TypeError, IndexError, AttributeError) as error:
        raise UserError(
            f"checkpoint {directory} is damaged or from another version: {_last_line(error)}"
        ) from None

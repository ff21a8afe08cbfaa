"""Checkpoints of a training run, written atomically and loaded without pickle code.

Layout inside a run directory:

    checkpoints/step_000500/model.safetensors   weights (safetensors: tensors only)
    checkpoints/step_000500/state.pt            the rest of RunState.state_dict() (optimizer,
                                                GradScaler, noise, RNG states, progress,
                                                clock), the config and the vocabulary
    checkpoints/LATEST                          the name of the newest complete one

A checkpoint directory is built under a temporary name and renamed into place
when both files are complete; LATEST is then replaced (os.replace) to point at
it, and older checkpoints are removed. A crash at any moment leaves LATEST
pointing at a complete, consistent pair.

state.pt is read with `torch.load(weights_only=True)`, which only rebuilds
tensors and plain containers: a file that would run code on load is refused.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import torch

from gradnoise.errors import UserError
from gradnoise.lm import atomic, runlog
from gradnoise.lm.config import read_config
from gradnoise.lm.model import GPT, SAVED_FILES, WEIGHTS_FILE, is_saved_model, load_weights, read_vocab

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
WEIGHTS = WEIGHTS_FILE  # as a saved model holds them: safetensors, the tied matrix once
STATE = "state.pt"


def save(run_dir: Path, step: int, weights: dict[str, torch.Tensor], state: dict) -> Path:
    """Write checkpoint `step` of a run (weights + state) and make it the latest."""
    from safetensors.torch import save_file

    root = Path(run_dir) / CHECKPOINTS
    name = f"step_{step:07d}"

    def write(tmp: Path) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
        save_file(tensors, str(tmp / WEIGHTS))
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


def load(directory: Path, map_location="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, state) of one checkpoint directory, loaded without executing code."""
    from safetensors.torch import load_file

    directory = Path(directory)
    weights = load_file(str(directory / WEIGHTS), device=str(map_location))
    return weights, load_state(directory / STATE)


def load_state(path: Path) -> dict:
    """torch.load(weights_only=True): a pickle that would run code is refused with a UserError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(
            f"refusing to load {path}: it is not a plain-tensor checkpoint "
            f"(loading it would run code: {str(error).splitlines()[0]})"
        ) from None
    except (OSError, RuntimeError, EOFError) as error:
        raise UserError(f"cannot read checkpoint state {path}: {error}") from None


def load_trained(path: Path, map_location="cpu"):
    """(GPT, vocab) from a run directory (its latest checkpoint) or an export directory."""
    path = Path(path)
    if is_saved_model(path):
        return GPT.from_pretrained(path, map_location), read_vocab(path)
    directory = latest(path)
    if directory is None or not (path / runlog.CONFIG_FILE).is_file():
        raise UserError(
            f"{path} is neither a run directory with a checkpoint ({runlog.CONFIG_FILE}, "
            f"{CHECKPOINTS}/{LATEST}) nor an export ({', '.join(SAVED_FILES)})"
        )
    cfg = read_config(path / runlog.CONFIG_FILE)
    weights, state = load(directory)
    model = GPT(cfg.model_config(vocab_size=weights["transformer.wte.weight"].shape[0]))
    load_weights(model, weights)
    return model.to(map_location), state["vocab"]


def export(run_dir: Path, out_dir: Path) -> Path:
    """Write the run's latest weights, model config and vocabulary for GPT.from_pretrained."""
    if is_saved_model(run_dir):
        raise UserError(f"{run_dir} is already an export, not a run directory")
    model, vocab = load_trained(run_dir)
    model.save_pretrained(out_dir, vocab)
    return Path(out_dir)

"""The files of runs and exports, read so that a damaged one is a UserError naming it.

    read_json(path, what)                  a JSON document (config.json, vocab.json, meta.json)
    read_weights(path)                     a safetensors file: {name: tensor}
    write_weights(tensors, path)           … written with the user's umask (safetensors makes 0600)
    check_tensors(given, expected, source) names, shapes and dtypes match a model's own tensors

A truncated file, a tensor of the wrong shape or dtype (int64 weights would be cast
and loaded silently by load_state_dict), or a missing one is reported as such,
before any of it is used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from gradnoise.errors import UserError
from gradnoise.lm.storage import atomic

# Where weights are kept, in a checkpoint and in a saved model alike (safetensors).
WEIGHTS_FILE = "model.safetensors"


def read_json(path: Path, what: str):
    """The JSON document in `path`; UserError if it cannot be read or is not JSON text."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise UserError(f"cannot read the {what} {path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"the {what} {path} is damaged: not valid JSON ({error})") from None


def read_weights(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; UserError if it is missing, truncated or not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except FileNotFoundError:
        raise UserError(f"weights file {path} is missing") from None
    except (SafetensorError, OSError) as error:
        raise UserError(
            f"weights file {path} is damaged or not a safetensors file ({error}); "
            "if a run wrote it, train it again (a run keeps only its latest checkpoint)"
        ) from None


def write_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, the file then given the user's umask like every other output."""
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    os.chmod(path, atomic.file_mode())


def check_tensors(given: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    """UserError unless `given` has exactly `expected`'s names, each with its shape and dtype."""
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{source} do not match the model: missing {missing or 'none'}, unexpected {unexpected or 'none'}"
        )
    for name, want in expected.items():
        have = given[name]
        if not isinstance(have, torch.Tensor) or have.shape != want.shape or have.dtype != want.dtype:
            found = type(have).__name__
            if isinstance(have, torch.Tensor):
                found = f"{tuple(have.shape)} {have.dtype}"
            raise UserError(
                f"{source} do not match the model: {name} is {found}, the model needs "
                f"{tuple(want.shape)} {want.dtype}"
            )

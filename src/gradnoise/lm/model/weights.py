"""A model's weights on disk: safetensors without the tied duplicate, a plain model's without the
replica dimension (nanoGPT's names and shapes), and the files a saved model is made of."""

from pathlib import Path

import torch
from torch import nn

from gradnoise.lm.storage import files
from gradnoise.lm.storage.files import WEIGHTS_FILE

# A saved model (save_pretrained): its GPTConfig, its weights and its vocabulary.
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
SAVED_FILES = (CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE)


def is_saved_model(directory) -> bool:
    """Whether `directory` holds what save_pretrained writes."""
    return all((Path(directory) / name).is_file() for name in SAVED_FILES)


def holds_only_saved_model(directory) -> bool:
    """Whether `directory` holds what save_pretrained writes and nothing else."""
    directory = Path(directory)
    return (
        directory.is_dir()
        and sorted(p.name for p in directory.iterdir()) == sorted(SAVED_FILES)
        and is_saved_model(directory)
    )


def read_vocab(directory) -> list[str] | str:
    """The vocabulary save_pretrained stored beside the weights."""
    return files.read_json(Path(directory) / VOCAB_FILE, "vocabulary")


def weights_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without the tied duplicate (safetensors refuses shared storage). A plain
    model's (replicas = 1) without the replica dimension: nanoGPT's names and shapes."""
    state = model.state_dict()
    state.pop("lm_head.weight")
    if model.replicas == 1:
        state = {k: v[0] for k, v in state.items()}
    return {k: v.detach().contiguous() for k, v in state.items()}


def replica_weights(weights: dict[str, torch.Tensor], replica: int) -> dict[str, torch.Tensor]:
    """Replica `replica` of a batched model's weights_for_saving: a plain model's weights."""
    return {k: v[replica].contiguous() for k, v in weights.items()}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str = "the weights") -> None:
    """Load what weights_for_saving gives into `model`; UserError if a name, shape or dtype differs."""
    files.check_tensors(state, weights_for_saving(model), source)
    if model.replicas == 1:
        state = {k: v.unsqueeze(0) for k, v in state.items()}
    model.load_state_dict({**state, "lm_head.weight": state["transformer.wte.weight"]})

"""Sampling text from a model, with the corpus's codec turning characters into tokens and back."""

import torch

from gradnoise.errors import UserError
from gradnoise.lm.data.corpora import Corpus
from gradnoise.lm.model.gpt import GPT


def sample_text(
    model: GPT,
    vocab: list[str] | str,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """prompt + max_new_tokens generated characters; the same seed gives the same text."""
    if not prompt:
        raise UserError("the prompt is empty; give at least one character, e.g. a newline")
    codec = Corpus.of_vocabulary(vocab)
    device = next(model.parameters()).device
    idx = torch.from_numpy(codec.encode(prompt).astype("int64"))[None].to(device)
    model.eval()
    out = model.generate(idx, max_new_tokens, temperature, top_k, torch.Generator().manual_seed(seed))
    return codec.decode(out[0].cpu())

"""The input augmentation: character substitution (targets are left untouched)."""

import torch


def substitute_characters(
    x: torch.Tensor, probability: float, vocab_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Replace each input token, independently with probability p, by one drawn uniformly
    from the vocabulary (which may be the same token). Targets are left untouched."""
    replace = torch.rand(x.shape, generator=generator) < probability
    random_tokens = torch.randint(vocab_size, x.shape, generator=generator)
    return torch.where(replace, random_tokens, x)

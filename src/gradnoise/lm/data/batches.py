"""A batch of training windows drawn from a split with a generator the run owns."""

import numpy as np
import torch

from gradnoise.errors import UserError


def get_batch(
    tokens: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size random windows of a split: x = tokens[i : i+T], y = tokens[i+1 : i+T+1].

    Offsets i ~ U{0, …, len(tokens) - T - 1} come from `generator` (a CPU
    torch.Generator owned by the run), never from the global RNG. Returns int64
    CPU tensors of shape (batch_size, block_size); the caller moves them.
    """
    if len(tokens) <= block_size:
        raise UserError(
            f"a split of {len(tokens):,} tokens is too short for block_size={block_size}; "
            f"it needs at least block_size + 1 = {block_size + 1} tokens"
        )
    offsets = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)
    windows = np.array(tokens[offsets.numpy()[:, None] + np.arange(block_size + 1)], np.int64)
    windows = torch.from_numpy(windows)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

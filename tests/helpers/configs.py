"""The tiny harness configs the tests train: small enough that a step takes milliseconds."""

from __future__ import annotations


def tiny(
    max_iters: int,
    eval_interval: int,
    log_interval: int,
    checkpoint_interval: int | None = None,
    *,
    wide: bool = False,
    eval_iters: int = 1,
    final_eval: bool | None = False,
    device: str | None = "cpu",
) -> dict:
    """One layer of 16 (wide: two heads, 32 wide, blocks of 32), batches of 4, trained
    max_iters steps with the intervals given; a setting given as None is left to the preset."""
    settings = {
        "n_layer": 1,
        "n_head": 2 if wide else 1,
        "n_embd": 32 if wide else 16,
        "block_size": 32 if wide else 16,
        "batch_size": 4,
        "max_iters": max_iters,
        "eval_interval": eval_interval,
        "eval_iters": eval_iters,
        "log_interval": log_interval,
        "checkpoint_interval": checkpoint_interval,
        "final_eval": final_eval,
        "device": device,
    }
    return {key: value for key, value in settings.items() if value is not None}


# The tiny study the study tests run (no device: a study places its runs itself).
STUDY = tiny(20, 10, 5, 10, wide=True, eval_iters=2, device=None)


def two_layers(
    batch_size: int,
    max_iters: int,
    eval_interval: int,
    log_interval: int,
    checkpoint_interval: int,
    **more,
) -> dict:
    """Two layers of 32 wide (a step still takes milliseconds on one CPU thread), trained on
    the CPU max_iters steps with the intervals given, no final exact pass; then `more`."""
    return {
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 32,
        "block_size": 32,
        "batch_size": batch_size,
        "max_iters": max_iters,
        "eval_interval": eval_interval,
        "log_interval": log_interval,
        "checkpoint_interval": checkpoint_interval,
        "final_eval": False,
        "device": "cpu",
        **more,
    }

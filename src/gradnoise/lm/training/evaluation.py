"""Scoring a model: the quick estimate at every eval, and the exact pass at the end.

    evaluator = Evaluator(splits, cfg, dist_env, device, autocast, replicas=M)
    evaluator.estimate(model)      per replica {"train_loss", "val_loss"[, "test_loss"]}: mean over
                                   eval_iters batches
    evaluator.exact(model, "val")  per replica, the mean over every token of the split

Losses are mean cross-entropies in nats per token, computed in eval mode (no
dropout), without label smoothing.

The estimate's batches are drawn once, from a generator per split seeded from a
constant (not from the run's seed): every method, seed and eval of a study is
scored on the same batches. They stay on the device as this rank's rows,
regrouped into chunks of EVAL_CHUNK batches: fewer, larger forward passes, the
same mean. A batched model (M replicas, gradnoise.lm.model.gpt) scores every replica on
the same batches in the same forward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from gradnoise.lm import seeding
from gradnoise.lm.data import batches
from gradnoise.lm.devices import to_device

EVAL_SEED = 1337
EVAL_CHUNK = 8  # eval batches per forward pass


class Evaluator:
    """The fixed eval batches of a run, and the two ways it scores a model."""

    def __init__(
        self, splits: dict[str, np.ndarray], cfg, dist_env, device: torch.device, autocast, replicas: int = 1
    ):
        self.splits, self.cfg, self.dist_env = splits, cfg, dist_env
        self.device, self.autocast, self.replicas = device, autocast, replicas
        self.batches = {split: self._draw(split) for split in splits}

    def _draw(self, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """eval_iters global batches of one split; this rank's rows, in chunks, on the device."""
        cfg, world = self.cfg, self.dist_env.world_size
        tokens = self.splits[split]
        generator = torch.Generator().manual_seed(seeding.derive_seed(EVAL_SEED, split))
        rows = self.dist_env.rows(cfg.batch_size)
        draws = [
            batches.get_batch(tokens, cfg.batch_size * world, cfg.block_size, generator)
            for _ in range(cfg.eval_iters)
        ]
        x = torch.cat([x[rows] for x, _ in draws]).split(EVAL_CHUNK * cfg.batch_size)
        y = torch.cat([y[rows] for _, y in draws]).split(EVAL_CHUNK * cfg.batch_size)
        return [(to_device(xc, self.device), to_device(yc, self.device)) for xc, yc in zip(x, y, strict=True)]

    def _score(self, model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each replica's mean loss on the same batch: (M,)."""
        with self.autocast:
            _, loss = model(x.expand(self.replicas, *x.shape), y.expand(self.replicas, *y.shape))
        return loss

    @torch.no_grad()
    def estimate(self, model) -> list[dict[str, float]]:
        """Per replica, {"<split>_loss": mean loss over the split's eval batches}, averaged over ranks."""
        model.eval()
        losses = [{} for _ in range(self.replicas)]
        for split, chunks in self.batches.items():
            total = torch.zeros(self.replicas, device=self.device)
            for x, y in chunks:
                total += self._score(model, x, y).float() * len(x)
            rows = sum(len(x) for x, _ in chunks)
            for m, loss in enumerate(self.dist_env.mean(total / rows).tolist()):
                losses[m][f"{split}_loss"] = loss
        model.train()
        return losses

    @torch.no_grad()
    def exact(self, model, split: str, report: Callable[[int, int], None] | None = None) -> list[float]:
        """Each replica's mean loss over a whole split: non-overlapping windows of block_size, every token
        but the first predicted once. Windows are dealt round-robin to the ranks.

            loss = Σ_windows Σ_t −log p(x_{t+1} | window up to t) / (len(split) − 1)

        report(done, total): called with this rank's windows done so far, from 0 to total.
        """
        tokens, block, device = self.splits[split], self.cfg.block_size, self.device
        model.eval()
        predicted = len(tokens) - 1
        starts = np.arange(0, predicted, block)[self.dist_env.rank :: self.dist_env.world_size]
        total = torch.zeros(self.replicas, dtype=torch.float64, device=device)
        batch_windows = 4 * self.cfg.batch_size
        if report is not None:
            report(0, len(starts))
        for begin in range(0, len(starts), batch_windows):
            chunk = starts[begin : begin + batch_windows]
            full = chunk[chunk + block <= predicted]
            batches = [(full, block)] if len(full) else []
            batches += [(np.array([s]), predicted - s) for s in chunk[chunk + block > predicted]]
            for window_starts, length in batches:
                windows = np.asarray(tokens[window_starts[:, None] + np.arange(length + 1)], np.int64)
                windows = torch.from_numpy(windows)
                x, y = to_device(windows[:, :-1], device), to_device(windows[:, 1:], device)
                total += self._score(model, x, y).double() * y.numel()
            if report is not None:
                report(begin + len(chunk), len(starts))
        model.train()
        return (self.dist_env.sum(total) / predicted).tolist()

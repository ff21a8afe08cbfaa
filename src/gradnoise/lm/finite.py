"""Is a run's state still finite? Checked where the trainer syncs with the device anyway.

A non-finite gradient need not show in the loss. AdamW turns g = 1e30 into a second
moment v = inf, and its update m̂ / (√v̂ + ε) is then 0: the weights and the loss freeze
while the run looks healthy. So at every log, eval and checkpoint the trainer checks,
besides the loss, the weights and every floating-point tensor of the optimizer's state
(moments, momentum buffers). The gradients are gone by then (zero_grad(set_to_none)); a
non-finite one has gone into the state or the weights.

Cost: one sum per tensor and one host sync (`all_finite`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def nonfinite(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> str | None:
    """None if the weights and the optimizer's state are finite, else what is not:
    "non-finite weights" or "non-finite optimizer state (exp_avg_sq)"."""
    if not all_finite([p.detach() for p in params]):
        return "non-finite weights"
    by_key: dict[str, list[torch.Tensor]] = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                by_key.setdefault(key, []).append(value)
    if all_finite([t for tensors in by_key.values() for t in tensors]):
        return None
    bad = [key for key, tensors in by_key.items() if not all_finite(tensors)]
    return f"non-finite optimizer state ({', '.join(bad)})"


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite, with one host sync.

    A sum is finite when every element is (inf and NaN propagate through it); a sum that
    is not may also be an overflow of large finite values, which the elementwise check
    then rules out. (A max |x| would be exact at once, but torch._foreach_norm(ord=inf)
    is an order of magnitude slower than a sum on CPU.)
    """
    if not tensors:
        return True
    sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors])
    if bool(torch.isfinite(sums).all()):
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())

"""Is a run's state still finite? Checked where the trainer syncs with the device anyway.

A non-finite gradient need not show in the loss. AdamW turns g = 1e30 into a second
moment v = inf, and its update m̂ / (√v̂ + ε) is then 0: the weights and the loss freeze
while the run looks healthy. So at every log, eval and checkpoint the trainer checks,
besides the loss, the weights and every floating-point tensor of the optimizer's state
(moments, momentum buffers). The gradients are gone by then (zero_grad(set_to_none)); a
non-finite one has gone into the state or the weights.

Cost: one max |x| per tensor (torch._foreach_norm with ord=inf, which cannot overflow
and propagates NaN) and one host sync.
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
    """Whether every element of every tensor is finite (one host sync)."""
    if not tensors:
        return True
    largest = torch._foreach_norm(tensors, float("inf"))
    return bool(torch.isfinite(torch.stack([m.float() for m in largest])).all())

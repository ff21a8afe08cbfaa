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
    return nonfinite_by_replica(optimizer, params, None)[0]


def nonfinite_by_replica(
    optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], replicas: int | None
) -> list[str | None]:
    """`nonfinite` for each replica of a batched model: every tensor's leading dimension is
    the replica (a 0-d state such as AdamW's step count is every replica's). replicas=None:
    whole tensors, one answer."""
    weights = [p.detach() for p in params]
    by_key: dict[str, list[torch.Tensor]] = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                by_key.setdefault(key, []).append(value)
    weights_ok = finite_by_replica(weights, replicas)
    state_ok = finite_by_replica([t for tensors in by_key.values() for t in tensors], replicas)
    if all(weights_ok) and all(state_ok):
        return [None] * len(weights_ok)
    keys_ok = {key: finite_by_replica(tensors, replicas) for key, tensors in by_key.items()}
    answers = []
    for m, (weight_ok, ok) in enumerate(zip(weights_ok, state_ok, strict=True)):
        bad = [key for key, fine in keys_ok.items() if not fine[m]]
        answers.append(
            None
            if weight_ok and ok
            else "non-finite weights"
            if not weight_ok
            else f"non-finite optimizer state ({', '.join(bad)})"
        )
    return answers


def finite_by_replica(tensors: list[torch.Tensor], replicas: int | None) -> list[bool]:
    """Per replica (see nonfinite_by_replica), whether every element of its slices is finite,
    with one host sync.

    A sum is finite when every element is (inf and NaN propagate through it); a sum that
    is not may also be an overflow of large finite values, which the elementwise check
    then rules out. (A max |x| would be exact at once, but torch._foreach_norm(ord=inf)
    is an order of magnitude slower than a sum on CPU.)
    """
    rows = 1 if replicas is None else replicas
    if not tensors:
        return [True] * rows

    def by_replica(values: torch.Tensor) -> torch.Tensor:
        if replicas is None or values.dim() == 0:
            return values.reshape(1, -1).expand(rows, -1)
        return values.flatten(1)

    sums = torch.stack([by_replica(t).sum(dim=1, dtype=torch.float32) for t in tensors])
    finite = torch.isfinite(sums).all(dim=0)
    if bool(finite.all()):
        return [True] * rows
    exact = torch.stack([torch.isfinite(by_replica(t)).all(dim=1) for t in tensors]).all(dim=0)
    return exact.tolist()


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite, with one host sync (see finite_by_replica)."""
    return finite_by_replica(tensors, None)[0]

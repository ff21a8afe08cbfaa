"""What each replica of a batched model has for itself inside one optimizer step.

The model's parameters are stacked (M, …) (gradnoise.lm.model.gpt), so the optimizer sees one
tensor per weight for all replicas: AdamW and SGD update element by element, and their
moments stay per replica by themselves. What torch computes over a whole parameter list
is done here per replica instead, with each replica's own setting:

    clip_grad_norms_   gradient clipping: replica m's global norm over its slices alone
    WeightDecay        weight decay λ_m (param groups cannot hold a stacked tensor per replica)
    Freezer            a diverged replica keeps its weights and optimizer state from then on

A plain run is M = 1 and goes through the same code.
"""

from __future__ import annotations

import torch

from gradnoise.lm.model.gpt import per_replica

#: clip_grad_norm_'s guard against dividing by a zero norm.
CLIP_EPS = 1e-6


def rows(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every tensor's replica slices t[0], …, t[M−1], tensor by tensor: views, contiguous when
    the tensor is, for one fused foreach op over all replicas."""
    return [t[m] for t in tensors for m in range(t.shape[0])]


def replica_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """‖g[m]‖₂ over every gradient's replica-m slice: (M,) fp32.

    One fused norm kernel gives each slice's norm; replica m's are then combined as one
    contiguous vector of their own, which is what a run alone (M = 1) reduces, so a
    replica's norm, and its clipping, is bit for bit its run's alone (reducing the (T, M)
    block along dim 0 sums in another order once M > 1).
    """
    norms = torch.stack(torch._foreach_norm(rows(grads))).float().view(len(grads), -1)
    return torch.stack([torch.linalg.vector_norm(column) for column in norms.T.contiguous()])


@torch.no_grad()
def clip_grad_norms_(params, max_norms: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
    """Clip each replica's gradient to its own max norm (0: that replica is not clipped);
    returns the norms before clipping, (M,).

        g[m] ← g[m] · min(1, c_m / (‖g[m]‖ + 1e-6))      (torch.nn.utils.clip_grad_norm_'s formula)
    """
    grads = [p.grad for p in params if p.grad is not None]
    if norms is None:
        norms = replica_norms(grads)
    scale = torch.where(max_norms > 0, torch.clamp(max_norms / (norms + CLIP_EPS), max=1.0), 1.0)
    for g in grads:
        g.mul_(per_replica(scale, g).to(g.dtype))
    return norms


def clipped_norms(norms: torch.Tensor, max_norms: torch.Tensor) -> torch.Tensor:
    """‖g[m]‖ after clip_grad_norms_ scaled it, from the norms before: (M,)."""
    return torch.where(max_norms > 0, norms * torch.clamp(max_norms / (norms + CLIP_EPS), max=1.0), norms)


class WeightDecay:
    """Per-replica weight decay λ_m on the params of the param groups marked "decay",
    applied in an optimizer step pre-hook as torch's optimizers apply theirs in step()
    (the optimizer itself gets weight_decay = 0):

        decoupled (AdamW):  p[m] ← p[m] · (1 − lr · λ_m), before the update
        coupled (SGD):      g[m] ← g[m] + λ_m · p[m]

    Register it after GradientNoise's hook: SGD's decay then follows the noise, as in
    torch's SGD. A step GradScaler skips (a fused optimizer's found_inf) is not decayed.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, decays: list[float], *, decoupled: bool):
        self.decays = [float(decay) for decay in decays]
        self.decoupled = decoupled
        self.handle = optimizer.register_step_pre_hook(self)

    @torch.no_grad()
    def __call__(self, optimizer, args, kwargs) -> None:
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            return
        for group in optimizer.param_groups:
            if not group.get("decay"):
                continue
            params = [p for p in group["params"] if p.grad is not None]
            # The slices of the replicas that decay, each with its λ_m: one fused foreach op.
            chosen = [(p, m) for p in params for m, decay in enumerate(self.decays) if decay > 0]
            if not chosen:
                continue
            weights = [p.data[m] for p, m in chosen]
            if self.decoupled:
                torch._foreach_mul_(weights, [1 - group["lr"] * self.decays[m] for _, m in chosen])
            else:
                decay_terms = torch._foreach_mul(weights, [self.decays[m] for _, m in chosen])
                torch._foreach_add_([p.grad[m] for p, m in chosen], decay_terms)


class Freezer:
    """Replicas that diverged: after every optimizer step their slices of the weights and
    of the optimizer's state are put back as they were when they froze, so a broken replica
    neither changes nor grows (the others never see its values: every op is per replica)."""

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer):
        self.params, self.optimizer = params, optimizer
        self.frozen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def freeze(self, replica: int) -> None:
        if replica not in self.frozen:
            self.frozen[replica] = [(t, t[replica].clone()) for t in self._tensors()]

    @torch.no_grad()
    def restore(self) -> None:
        for replica, saved in self.frozen.items():
            for tensor, value in saved:
                tensor[replica].copy_(value)

    def _tensors(self) -> list[torch.Tensor]:
        """The weights and the optimizer's per-replica state tensors (a scalar such as
        AdamW's step count is shared by the replicas)."""
        state = [
            value
            for p in self.params
            for value in self.optimizer.state.get(p, {}).values()
            if isinstance(value, torch.Tensor) and value.dim() > 0
        ]
        return [p.data for p in self.params] + state

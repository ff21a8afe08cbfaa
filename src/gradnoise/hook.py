"""The engine of gradnoise's hooks, `NoiseHook`: when a step counts, where the noise goes,
and one step's noise for every lane (gradnoise.lanes) in one call per term.

It registers an optimizer step pre-hook, so the noise lands on exactly the gradients the
optimizer is about to use: after clip_grad_norm_ and GradScaler.unscale_, once per step
however many micro-batches were accumulated, and a step GradScaler skips draws no noise
and is not counted (fused optimizers included). With placement="update" a step
post-hook adds the noise to the parameters after the step instead. `GradientNoise`
(gradnoise.noise) is this engine over one lane; `ReplicatedGradientNoise`
(gradnoise.replicated) over M, each lane seeing its replica's slices.
"""

from __future__ import annotations

import math
import warnings
import weakref

import torch

from gradnoise import lanes, streams
from gradnoise.errors import UserError
from gradnoise.lanes import PLACEMENTS, Lane, Target
from gradnoise.streams import NoiseJob

__all__ = ["NoiseHook"]


def _norm(tensors: list[torch.Tensor]) -> float:
    """‖t‖₂ over all the tensors (0 for none), on the host."""
    if not tensors:
        return 0.0
    norms = torch._foreach_norm(tensors)
    return float(torch.linalg.vector_norm(torch.stack([n.float().cpu() for n in norms])))


def _flat(targets: list[Target]) -> list[torch.Tensor]:
    return [t for target in targets for _, _, tensors in target.by_device for t in tensors]


def _on(value, device: torch.device) -> torch.Tensor:
    """A σ as a tensor on `device` (a Python float as float64, as exact as it was)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return torch.tensor(value, dtype=torch.float64, device=device)


def _noise_scale(group: dict, index: int, *, warn: bool = False) -> float:
    """The param group's ``"noise_scale"`` (default 1), or its deprecated ``"noise_multiplier"``."""
    if "noise_multiplier" in group:
        if "noise_scale" in group:
            raise UserError(
                f"param group {index} has both noise_scale and noise_multiplier; "
                "keep noise_scale (noise_multiplier is its deprecated name)"
            )
        if warn:
            warnings.warn(
                "the param group key 'noise_multiplier' is deprecated: use 'noise_scale' (in Opacus "
                "noise_multiplier means σ / clipping norm; here it scales this group's σ)",
                DeprecationWarning,
                stacklevel=6,  # the caller of GradientNoise(...)
            )
        name, scale = "noise_multiplier", group["noise_multiplier"]
    else:
        name, scale = "noise_scale", group.get("noise_scale", 1.0)
    if isinstance(scale, bool) or not (
        isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0
    ):
        raise UserError(f"param group {index}: {name}={scale!r} must be a number ≥ 0")
    return float(scale)


# The attached hooks of each optimizer: a second one adds noise too, so it must be asked for.
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class NoiseHook:
    """The engine of both hooks: the optimizer's step hooks, the step count t, the param
    groups, and a step's noise for every lane. A lane sees its part of each tensor
    (`_part`): the whole tensor for one model, the slice t[m] for replica m."""

    def __init__(self, optimizer, models: list[Lane], track_stats, capturable, attach, placement, stack):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UserError(f"GradientNoise needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        lanes.check_choice("placement", placement, PLACEMENTS)
        for lane in models:
            if placement == "update" and lane.relative and not attach:
                raise UserError(
                    "placement='update' in relative mode needs attach=True: σ follows the optimizer's "
                    "update, which only the step hooks see"
                )
            if capturable and lane.schedule.needs_metric:
                raise UserError(
                    f"capturable=True cannot follow a metric: schedule {lane.schedule.spec!r} changes σ on "
                    "the host at each observe(); use a schedule of the step alone"
                )
        self.optimizer, self.placement, self._lanes = optimizer, placement, models
        self.track_stats, self.capturable = track_stats, capturable  # track_stats: see its setter
        self._step: int | torch.Tensor = 0
        self._workspace: dict = {}
        self._plan: list | None = None
        self._params_before: dict[int, torch.Tensor] = {}  # update placement, relative mode
        self._groups()  # validates the param groups' noise scales (and replica dimensions) now
        self._handles = []
        if attach:
            attached = _ATTACHED.setdefault(optimizer, weakref.WeakSet())
            if attached and not stack:
                raise UserError(
                    f"the optimizer already has {next(iter(attached))!r}, which adds noise at every step: "
                    "remove() it first, or pass stack=True to add both"
                )
            attached.add(self)
            self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
            if placement == "update":
                self._handles.append(optimizer.register_step_post_hook(self._post_step))

    @property
    def track_stats(self) -> bool:
        return self._track_stats

    @track_stats.setter
    def track_stats(self, value: bool) -> None:
        """Measure ‖g‖ and ‖noise‖ at the steps from now on (or not); the statistics start
        afresh ({} until a step measures them), so that a step that draws no noise (GradScaler
        skips it) is not reported with an earlier step's."""
        self._track_stats = bool(value)
        for lane in self._lanes:
            lane.stats = {}

    @property
    def step(self) -> int:
        """Noisy steps taken so far: the t of the next step (a host sync when capturable)."""
        return int(self._step)

    @step.setter
    def step(self, value: int) -> None:
        if isinstance(self._step, torch.Tensor):
            self._step.fill_(value)
        else:
            self._step = int(value)

    def apply(self) -> None:
        """Add this step's noise and advance t, for a hook made with attach=False.

        placement="gradient": to the gradients; call it before `optimizer.step()`.
        placement="update": to the parameters, p ← p + lr_group·σ_t·s_group·ε_t;
        call it after `optimizer.step()` and before a learning-rate scheduler's step
        (absolute mode only: relative mode needs the hooks to see the update).
        """
        if self._handles:
            raise UserError(
                "apply() is for a GradientNoise made with attach=False: this one's hooks already add "
                "the noise at every optimizer.step(), and apply() would add it twice"
            )
        self._apply(None)

    def remove(self) -> None:
        """Detach from the optimizer: later steps get no noise."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        _ATTACHED.get(self.optimizer, set()).discard(self)

    def _part(self, tensors: list[torch.Tensor], lane: int) -> list[torch.Tensor]:
        return tensors

    def _check_group(self, index: int, group: dict) -> None:
        _noise_scale(group, index, warn=True)

    def _pre_step(self, optimizer, args, kwargs):
        """Add the noise once the step's gradients are final (placement "gradient").

        GradScaler hands a fused optimizer (``_step_supports_amp_scaling``) the
        attributes ``grad_scale`` (gradients still scaled) and ``found_inf``
        (the optimizer will skip this step). `opt.step(closure)` computes the
        gradients inside the closure (after which Lightning, for one, clips
        them), so the closure is wrapped and the noise follows it; with no
        closure they are final now. Placement "update": only keep the
        parameters (when some lane is in relative mode), to measure the update.
        """
        if "grad_scaler" in kwargs:
            raise UserError(
                "GradientNoise: optimizers whose step() takes grad_scaler= (a protocol torch deprecated) "
                "are not supported: the noise cannot tell whether GradScaler skips the step"
            )
        if self.placement == "update":
            if any(lane.relative for lane in self._lanes):
                noised = [target for target in self._targets() if target.scale > 0]
                self._params_before = {id(p): p.detach().clone() for p in _flat(noised)}
            return None
        if getattr(optimizer, "grad_scale", None) is not None:
            raise UserError(
                "GradientNoise: the optimizer got still-scaled gradients from GradScaler; "
                "call scaler.unscale_(optimizer) before scaler.step(optimizer)"
            )
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and not self.capturable and bool(found_inf):
            return None  # the optimizer skips this step: no noise, t unchanged
        # `args` starts with the optimizer itself: step(closure) passes (optimizer, closure).
        closure = kwargs["closure"] if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        if closure is None:
            self._apply(found_inf)
            return None

        def noisy_closure():
            result = closure()
            self._apply(found_inf)
            return result

        if "closure" in kwargs:
            return args, {**kwargs, "closure": noisy_closure}
        return (args[0], noisy_closure, *args[2:]), kwargs

    def _post_step(self, optimizer, args, kwargs) -> None:
        """Placement "update": add the noise to the parameters the step has just updated.
        A step GradScaler skips gets none (a fused optimizer's is called with found_inf set)."""
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and not self.capturable and bool(found_inf):
            return  # the optimizer skipped this step: no noise, t unchanged
        self._apply(found_inf)

    def _groups(self) -> list[tuple[dict, list]]:
        """Per param group: the group and its params by (device, dtype), cached (a gradient
        has its parameter's device and dtype, so the grouping is the parameters')."""
        groups = self.optimizer.param_groups
        if self._plan is None or len(self._plan) != len(groups):
            for index, group in enumerate(groups):
                self._check_group(index, group)
            self._plan = [(group, streams.group_by_device_dtype(group["params"])) for group in groups]
        return self._plan

    def _targets(self) -> list[Target]:
        """Per param group (noise scale 0 included), the tensors this step's noise is for: its
        gradients, or with placement "update" the parameters that have one."""
        on_update, result = self.placement == "update", []
        for index, (group, by_device) in enumerate(self._groups()):
            present = []
            for device, dtype, params in by_device:
                tensors = [p if on_update else p.grad for p in params if p.grad is not None]
                if tensors:
                    present.append((device, dtype, tensors))
            if present:
                result.append(Target(_noise_scale(group, index), index, present))
        return result

    @torch.no_grad()
    def _apply(self, found_inf: torch.Tensor | None) -> None:
        """Step t for every lane: its σ_t, then all lanes' noise in one call per term (one
        fused launch on CUDA), the statistics measured around it."""
        targets = self._targets()
        step = self._step_counter(targets)
        noised = [target for target in targets if target.scale > 0]
        updates = self._update(noised) if self._params_before else None
        parts = [self._part_targets(noised, m) for m in range(len(self._lanes))]
        sigmas = [
            lane.sigma_at(step, _flat(part) if updates is None else self._part(updates, m))
            for m, (lane, part) in enumerate(zip(self._lanes, parts, strict=True))
        ]
        if self.track_stats:
            grads = _flat(targets) if self.placement == "gradient" else [p.grad for p in _flat(targets)]
            grad_norms = [_norm(self._part(grads, m)) for m in range(len(self._lanes))]
            before = [t.clone() for t in _flat(noised)]
        rounds: list[list[NoiseJob]] = []  # round r: every lane's r-th term, no tensor twice
        for lane, part, sigma in zip(self._lanes, parts, sigmas, strict=True):
            for term, jobs in enumerate(self._jobs(lane, part, sigma, step, found_inf)):
                if term == len(rounds):
                    rounds.append([])
                rounds[term].extend(jobs)
        for jobs in rounds:
            streams.add_noise_jobs(jobs, self._workspace)
        for m, (lane, part, sigma) in enumerate(zip(self._lanes, parts, sigmas, strict=True)):
            if self.track_stats:
                lane.stats = _stats(grad_norms[m], _flat(part), self._part(before, m))
            lane.sigma = self._kept_sigma(lane, sigma, found_inf, step)
        if isinstance(self._step, torch.Tensor):
            # A step a fused optimizer skips (GradScaler found inf) is not counted, without a sync.
            self._step += 1 if found_inf is None else (found_inf == 0).to(torch.int64)
        else:
            self._step += 1

    def _part_targets(self, targets: list[Target], lane: int) -> list[Target]:
        return [
            target._replace(
                by_device=[(d, t, self._part(tensors, lane)) for d, t, tensors in target.by_device]
            )
            for target in targets
        ]

    def _jobs(self, lane: Lane, targets, sigma, step, found_inf) -> list[list[NoiseJob]]:
        """The lane's noise records of step t, per term (see `Lane`)."""
        terms = lane.terms(sigma, step)
        on_update = self.placement == "update"
        if on_update and self.capturable and found_inf is not None:
            # A step the fused optimizer skips gets 0·ε on the update, without a sync.
            terms = [(term_sigma * (found_inf == 0), term_step) for term_sigma, term_step in terms]
        if on_update and not lane.relative:
            lrs = [group["lr"] for group in self.optimizer.param_groups]
            targets = [target._replace(scale=target.scale * lrs[target.index]) for target in targets]
        return [
            lane.jobs(targets, term_sigma, term_step)
            for term_sigma, term_step in terms
            if isinstance(term_sigma, torch.Tensor) or term_sigma != 0
        ]

    def _kept_sigma(self, lane: Lane, sigma, found_inf, step):
        """σ_t as the lane keeps it: a step a fused optimizer skips keeps σ_{t−1}, without a sync."""
        if isinstance(step, torch.Tensor) and found_inf is not None:
            device = found_inf.device
            return torch.where(found_inf == 0, _on(sigma, device), _on(lane.sigma, device))
        return sigma

    def _update(self, noised: list[Target]) -> list[torch.Tensor]:
        """Δp = p − p_before of the parameters that get noise (placement "update")."""
        params = _flat(noised)
        before, self._params_before = self._params_before, {}
        return torch._foreach_sub(params, [before[id(p)] for p in params]) if params else []

    def _step_counter(self, targets: list[Target]) -> int | torch.Tensor:
        """t, moved to the targets' device on the first capturable step."""
        if self.capturable and not isinstance(self._step, torch.Tensor) and targets:
            self._step = torch.tensor(self._step, dtype=torch.int64, device=_flat(targets)[0].device)
        return self._step


def _stats(grad_norm: float, noised: list[torch.Tensor], before: list[torch.Tensor]) -> dict[str, float]:
    """‖g‖ over every gradient (taken before the noise), ‖noise‖ over the tensors that got it,
    and their ratio."""
    noise_norm = _norm(torch._foreach_sub(noised, before) if noised else [])
    return {
        "grad_norm": grad_norm,
        "noise_norm": noise_norm,
        "noise_to_grad": noise_norm / grad_norm if grad_norm > 0 else math.inf,
    }

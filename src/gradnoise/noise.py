"""Gradient noise injection: g̃_t = g_t + σ_t · ε_t, ε_t ~ N(0, I).

`GradientNoise` attaches to any `torch.optim.Optimizer` through a step
pre-hook, so the noise lands on exactly the gradients the optimizer is about to
use: after `clip_grad_norm_`, after `GradScaler.unscale_`, once per optimizer
step however many micro-batches were accumulated. A step that GradScaler skips
draws no noise and is not counted, with fused optimizers too.

Beyond the gradient (`correlation`, `placement`). Anticorrelated noise (Anti-PGD,
Orvieto et al. 2022) adds σ_t·ε_t − σ_{t−1}·ε_{t−1} at step t: ε_{t−1} is
regenerated from step t−1's key, so it needs no memory beyond σ_{t−1}, and the
noise summed over steps telescopes instead of growing like √t. Noise on the
update goes to the parameters after the optimizer's step (a step post-hook),
in the units of its update: lr·σ_t·ε, which Adam's division by √v does not
renormalize away.

The noise has its own random stream, never the global RNG. Its state is
explicit, as in optax: (seed, step). Step t's noise is a function of the key
k_t = splitmix64(seed ⊕ splitmix64(t)) alone, so `state_dict()` resumes the
stream exactly and runs with and without noise see the same initial weights,
batches and dropout masks.

Drawing and adding the noise — the keyed streams and the batched op `add_noise_`
on CPU, CUDA (fused Triton kernel) and other devices — is gradnoise.streams'.
This file is one idea, the hook: what σ_t is for each replica, where the noise
goes, when a step counts, and the state a resume needs.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence

import torch

from gradnoise import schedules
from gradnoise.errors import UserError
from gradnoise.streams import _add_noise_jobs, _group_by_device_dtype, _mix

__all__ = ["GradientNoise"]

# The allowed values of GradientNoise's options, the default first.
CORRELATIONS = ("independent", "anticorrelated")
PLACEMENTS = ("gradient", "update")


def _global_rms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """RMS(g) = ‖g‖₂ / sqrt(N) over all gradients, as a 0-d fp32 tensor."""
    norms = torch._foreach_norm([g.float() if g.dtype != torch.float32 else g for g in grads])
    total = sum(g.numel() for g in grads)
    return torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms])) / math.sqrt(total)


def _flat(gradients) -> list[torch.Tensor]:
    """The tensors of [(noise scale, param group index, [(device, dtype, gradients)])]."""
    return [g for _, _, groups in gradients for _, _, grads in groups for g in grads]


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
                stacklevel=4,
            )
        name, scale = "noise_multiplier", group["noise_multiplier"]
    else:
        name, scale = "noise_scale", group.get("noise_scale", 1.0)
    if isinstance(scale, bool) or not (
        isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0
    ):
        raise UserError(f"param group {index}: {name}={scale!r} must be a number ≥ 0")
    return float(scale)


def _replica_lists(replicas: int, **options) -> dict[str, list]:
    """Each option as a list of `replicas` values; a single schedule, mode or correlation
    is every replica's (a schedule object copied, since schedules keep state)."""
    if isinstance(options["seed"], int):
        raise UserError(
            f"seed={options['seed']!r}: with replicas={replicas} give one seed per replica (a list)"
        )
    lists = {}
    for name, values in options.items():
        if isinstance(values, (str, schedules.Schedule)):
            values = [copy.deepcopy(values) for _ in range(replicas)]
        if not isinstance(values, Sequence) or len(values) != replicas:
            raise UserError(
                f"{name}={values!r} is not allowed: with replicas={replicas} give {replicas} of them"
            )
        lists[name] = list(values)
    return lists


def _replica_slices(targets, replica: int):
    """_targets()'s structure with every tensor t replaced by its replica's slice t[replica]."""
    return [
        (scale, index, [(device, dtype, [t[replica] for t in tensors]) for device, dtype, tensors in groups])
        for scale, index, groups in targets
    ]


def _cut(tensors, replica: int | None):
    """Replica `replica`'s slices t[replica] of stacked tensors (None: the tensors themselves)."""
    return tensors if replica is None or tensors is None else [t[replica] for t in tensors]


def _norm(tensors: list[torch.Tensor]) -> float:
    """‖t‖₂ over all the tensors (0 for none), on the host."""
    if not tensors:
        return 0.0
    norms = torch._foreach_norm(tensors)
    return float(torch.linalg.vector_norm(torch.stack([n.float().cpu() for n in norms])))


class GradientNoise:
    """Adds N(0, σ_t²) noise to the gradients of `optimizer` at every `optimizer.step()`.

    g̃ = g + σ_t · s_group · ε_t, ε_t ~ N(0, I), where σ_t = schedule(t)
    (absolute mode) or σ_t = schedule(t) · RMS(g) (relative mode, or a
    `schedules.Relative` schedule; the RMS over the gradients that get noise),
    t is the number of noisy steps taken so far and s_group is the param
    group's ``"noise_scale"`` (default 1; 0 turns noise off for that group).

    correlation="anticorrelated" (Anti-PGD) replaces σ_t·ε_t by
    ξ_t = σ_t·ε_t − σ_{t−1}·ε_{t−1} (ε_{−1} = 0), with σ_{t−1} the σ used at the
    previous step (relative mode: after scaling by its RMS). ε_{t−1} is drawn
    again from step t−1's key: no noise is stored. With σ constant the noise
    summed over T steps is σ·(ε_{T−1} − ε_{−1}): variance σ² per element, where
    independent noise has T·σ².

    placement="update" adds the noise to the parameters after the optimizer's
    step instead, in the units of the update (a step post-hook):
    p ← p + lr_group · σ_t · s_group · ε_t (absolute mode, lr_group the param
    group's current learning rate), or p ← p + r_t · RMS(Δp) · s_group · ε_t
    (relative mode: r_t = schedule(t), Δp the optimizer's update of the
    parameters that get noise, measured from a copy taken before the step).
    With correlation="anticorrelated" ε_t becomes ξ_t, both terms at the
    current lr. Only parameters that have a gradient get noise (the ones the
    optimizer updates).

    Args:
        optimizer: any `torch.optim.Optimizer`.
        schedule: a `gradnoise.schedules` schedule, or a spec string for `schedules.parse`.
            A schedule that follows a metric (`plateau`) needs `observe(metric)`
            after each evaluation.
        seed: with the step, determines the noise. Under DDP use the same seed on every
            replica (gradients are already averaged, so identical noise keeps
            replicas identical); for sharded gradients (FSDP, ZeRO) use
            ``seed + rank`` so every shard gets independent noise.
        mode: "absolute" or "relative".
        track_stats: also record ‖g‖, ‖noise‖ (as added) and their ratio at
            each step in `last_stats` (costs a copy of the tensors that get
            noise, three reductions and a host sync). With placement="update"
            the noise is the one added to the parameters, in their units.
        capturable: keep t on the gradients' device and compute σ_t and the
            step's key there, so that a step on CUDA (fused kernel) needs no
            host sync and can be captured in a CUDA graph (replays advance t
            on the device; a step GradScaler skips is not counted). Not for
            schedules that follow a metric. The noise is the same as without
            it; eager, it costs a few more small kernels per step.
        attach: register the step hooks (default). With False, call `apply()`
            yourself: for placement="gradient" before `optimizer.step()` (e.g.
            before gradient clipping, for that ablation), for "update" after it.
        correlation: "independent" (a fresh ε_t each step) or "anticorrelated".
        placement: "gradient" (before the update) or "update" (after it).
        replicas: M > 1 models trained as one, every parameter's leading dimension
            being the replica (gradnoise.lm's batched GPT). `schedule`, `seed`, `mode`
            and `correlation` are then lists of M (a single schedule, mode or
            correlation is used by every replica; the seeds must be given one per
            replica); `placement` is the group's. Replica m's slices p[m] get exactly
            the noise `GradientNoise(schedule[m], seed=seed[m], mode=mode[m],
            correlation=correlation[m])` would add over those slices alone: the same
            keys, streams and chunks, its own σ_{t−1}, and in relative mode σ from
            the RMS of its own gradients (or update). `sigma`, `seed`, `mode`,
            `schedule`, `correlation` and `last_stats` are then per-replica lists.
            All replicas' noise goes in one call per term (on CUDA one fused launch,
            on CPU one pass on every core).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: schedules.Schedule | str | Sequence[schedules.Schedule | str],
        *,
        seed: int | Sequence[int] = 0,
        mode: str | Sequence[str] = "absolute",
        track_stats: bool = False,
        capturable: bool = False,
        attach: bool = True,
        correlation: str | Sequence[str] = "independent",
        placement: str = "gradient",
        replicas: int = 1,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UserError(f"GradientNoise needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise UserError(f"replicas={replicas!r} is not allowed: it must be an integer ≥ 1")
        if placement not in PLACEMENTS:
            raise UserError(
                f"placement={placement!r} is not allowed: use {' or '.join(map(repr, PLACEMENTS))}"
            )
        self.replicas = replicas
        self.placement = placement
        if replicas > 1:
            options = _replica_lists(
                replicas, schedule=schedule, seed=seed, mode=mode, correlation=correlation
            )
            lanes = [
                self._check_lane(*lane, capturable=capturable, attach=attach)
                for lane in zip(*options.values(), strict=True)
            ]
            schedule, seed, correlation = ([lane[i] for lane in lanes] for i in range(3))
        else:
            schedule, seed, correlation = self._check_lane(
                schedule, seed, mode, correlation, capturable=capturable, attach=attach
            )
        self.optimizer = optimizer
        self.schedule = schedule
        self.seed = seed
        self.correlation = correlation
        self.track_stats = track_stats
        self.capturable = capturable
        self.last_stats: dict[str, float] | list[dict[str, float]] = {}
        self._step: int | torch.Tensor = 0
        self._sigma: float | torch.Tensor | list = 0.0 if replicas == 1 else [0.0] * replicas
        self._workspace: dict = {}
        self._plan: list | None = None
        self._params_before: dict[int, torch.Tensor] = {}  # update placement, relative mode
        self._groups()  # validates the param groups' noise scales (and replica dimensions) now
        self._handles = []
        if attach:
            self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
            if placement == "update":
                self._handles.append(optimizer.register_step_post_hook(self._post_step))

    def _check_lane(self, schedule, seed, mode, correlation, *, capturable, attach) -> tuple:
        """One replica's (schedule, seed, correlation), checked (a single model has one)."""
        if isinstance(schedule, str):
            schedule = schedules.parse(schedule)
        if not isinstance(schedule, schedules.Schedule):
            raise UserError(f"GradientNoise needs a schedule, got {schedule!r}")
        if mode not in ("absolute", "relative"):
            raise UserError(f"mode={mode!r} is not allowed: use 'absolute' or 'relative'")
        if mode == "relative" and not isinstance(schedule, schedules.Relative):
            schedule = schedules.Relative(schedule)
        if correlation not in CORRELATIONS:
            raise UserError(
                f"correlation={correlation!r} is not allowed: use {' or '.join(map(repr, CORRELATIONS))}"
            )
        if self.placement == "update" and mode == "relative" and not attach:
            raise UserError(
                "placement='update' in relative mode needs attach=True: σ follows the optimizer's "
                "update, which only the step hooks see"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserError(f"seed={seed!r} is not allowed: the seed must be an integer")
        if capturable and schedule.needs_metric:
            raise UserError(
                f"capturable=True cannot follow a metric: schedule {schedule.spec!r} changes σ on the host "
                "at each observe(); use a schedule of the step alone"
            )
        return schedule, seed, correlation

    @staticmethod
    def _lane(values, replica: int | None):
        """Replica `replica`'s value of a per-replica attribute (None: the single model's)."""
        return values if replica is None else values[replica]

    def _lanes(self) -> list[int | None]:
        return [None] if self.replicas == 1 else list(range(self.replicas))

    @property
    def mode(self) -> str | list[str]:
        def mode(schedule) -> str:
            return "relative" if isinstance(schedule, schedules.Relative) else "absolute"

        return mode(self.schedule) if self.replicas == 1 else [mode(s) for s in self.schedule]

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

    @property
    def sigma(self) -> float | list[float]:
        """σ used at the last step (relative mode: after scaling by RMS(g)); 0 before the first.
        With replicas, one per replica."""
        return float(self._sigma) if self.replicas == 1 else [float(s) for s in self._sigma]

    def observe(self, metric: float) -> None:
        """Feed the schedule a validation metric (lower is better); see `schedules.Plateau`.

        Call it after each evaluation: schedules that follow a metric decay σ
        when it stops improving; the others ignore it. With replicas, one metric per replica.
        """
        if self.replicas == 1:
            self.schedule.observe(metric)
        else:
            for schedule, value in zip(self.schedule, metric, strict=True):
                schedule.observe(value)

    def _pre_step(self, optimizer, args, kwargs):
        """Add the noise once the step's gradients are final (placement "gradient").

        GradScaler hands a fused optimizer (``_step_supports_amp_scaling``) the
        attributes ``grad_scale`` (gradients still scaled) and ``found_inf``
        (the optimizer will skip this step). `opt.step(closure)` computes the
        gradients inside the closure (after which Lightning, for one, clips
        them), so the closure is wrapped and the noise follows it; with no
        closure they are final now. Placement "update": only keep the
        parameters (when some replica is in relative mode), to measure the update
        after the step.
        """
        if "grad_scaler" in kwargs:
            raise UserError(
                "GradientNoise: optimizers whose step() takes grad_scaler= (a protocol torch deprecated) "
                "are not supported: the noise cannot tell whether GradScaler skips the step"
            )
        if self.placement == "update":
            if "relative" in self._modes():
                self._params_before = {
                    id(p): p.detach().clone()
                    for index, (group, _) in enumerate(self._groups())
                    if _noise_scale(group, index) > 0
                    for p in group["params"]
                }
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

        A non-fused optimizer's step that GradScaler skips is never called; a
        fused one's is, with ``found_inf`` set, and gets no noise either.
        """
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and not self.capturable and bool(found_inf):
            return  # the optimizer skipped this step: no noise, t unchanged
        self._apply(found_inf)

    def _modes(self) -> list[str]:
        return [self.mode] if self.replicas == 1 else self.mode

    def _groups(self) -> list[tuple[dict, list]]:
        """Per param group: the group and its params by (device, dtype), cached.

        A gradient always has its parameter's device and dtype, so the
        grouping is computed once from the parameters, not every step.
        """
        groups = self.optimizer.param_groups
        if self._plan is None or len(self._plan) != len(groups):
            for index, group in enumerate(groups):
                _noise_scale(group, index, warn=True)
                stacked = all(p.dim() > 0 and len(p) == self.replicas for p in group["params"])
                if self.replicas > 1 and not stacked:
                    raise UserError(
                        f"param group {index} has a parameter whose leading dimension is not the "
                        f"replica dimension of replicas={self.replicas}"
                    )
            self._plan = [(group, _group_by_device_dtype(group["params"])) for group in groups]
        return self._plan

    def _targets(self) -> list[tuple[float, int, list]]:
        """This step's (noise scale, param group index, [(device, dtype, tensors)]) per param
        group: the tensors are the gradients, or with placement "update" the parameters
        that have one."""
        on_update = self.placement == "update"
        result = []
        for index, (group, by_device) in enumerate(self._groups()):
            present = []
            for device, dtype, params in by_device:
                tensors = [p if on_update else p.grad for p in params if p.grad is not None]
                if tensors:
                    present.append((device, dtype, tensors))
            if present:
                result.append((_noise_scale(group, index), index, present))
        return result

    def apply(self) -> None:
        """Add this step's noise and advance the step count.

        placement="gradient": to the gradients; call it before `optimizer.step()`.
        placement="update": to the parameters, p ← p + lr_group·σ_t·s_group·ε_t;
        call it after `optimizer.step()` and before a learning-rate scheduler's step
        (absolute mode only: relative mode needs the hooks to see the update).
        """
        self._apply(None)

    @torch.no_grad()
    def _apply(self, found_inf: torch.Tensor | None) -> None:
        """Step t for every replica: each one's σ_t, then all their noise in one call per
        term (one fused launch on CUDA), the statistics measured around it."""
        targets = self._targets()
        step = self._step_counter(targets)
        noised = [(scale, index, groups) for scale, index, groups in targets if scale > 0]
        # What a replica's slices are cut from: the gradients (for the stats), and Δp
        # (relative update noise), both in the order of _flat(targets) and _flat(noised).
        grads = [p.grad for p in _flat(targets)] if self.placement == "update" else _flat(targets)
        updates = self._update(noised) if self._params_before else None
        lanes = []
        for replica in self._lanes():
            lane_noised = noised if replica is None else _replica_slices(noised, replica)
            lane_updates = _cut(updates, replica)
            lanes.append((replica, lane_noised, self._lane_sigma(replica, lane_noised, lane_updates, step)))
        if self.track_stats:
            grad_norms = [_norm(_cut(grads, replica)) for replica in self._lanes()]
            before = self._snapshot(noised)
        # Round r holds every replica's r-th term: no tensor twice in one call.
        rounds: list[list] = []
        for replica, lane_noised, sigma in lanes:
            for term, jobs in enumerate(self._jobs(replica, lane_noised, sigma, step, found_inf)):
                if term == len(rounds):
                    rounds.append([])
                rounds[term].extend(jobs)
        for jobs in rounds:
            _add_noise_jobs(jobs, self._workspace)
        if self.track_stats:
            stats = [
                self._stats(norm, lane_noised, _cut(before, replica))
                for norm, (replica, lane_noised, _) in zip(grad_norms, lanes, strict=True)
            ]
            self.last_stats = stats[0] if self.replicas == 1 else stats
        sigmas = [self._kept_sigma(replica, sigma, found_inf, step) for replica, _, sigma in lanes]
        if isinstance(self._step, torch.Tensor):
            # A step a fused optimizer skips (GradScaler found inf) is not counted, without a sync.
            self._step += 1 if found_inf is None else (found_inf == 0).to(torch.int64)
        else:
            self._step += 1
        self._sigma = sigmas[0] if self.replicas == 1 else sigmas

    def _lane_sigma(self, replica, noised, updates, step):
        """One replica's σ_t (a single model is one): from its schedule; relative mode,
        times the RMS of its gradients, or of its update Δp."""
        schedule = self._lane(self.schedule, replica)
        sigma = schedule(step.double() if isinstance(step, torch.Tensor) else step)
        if noised and isinstance(schedule, schedules.Relative):
            rms = _global_rms(updates if updates is not None else _flat(noised))
            # r_t·RMS in the RMS's fp32, whether r_t is a float or (capturable) a tensor.
            sigma = rms * (sigma.to(rms.dtype) if isinstance(sigma, torch.Tensor) else sigma)
        return sigma

    def _kept_sigma(self, replica, sigma, found_inf, step):
        """σ_t as the state keeps it: a step a fused optimizer skips keeps σ_{t−1}, without a sync."""
        if isinstance(step, torch.Tensor) and found_inf is not None:
            device = found_inf.device
            previous = self._lane(self._sigma, replica)
            return torch.where(found_inf == 0, _on(sigma, device), _on(previous, device))
        return sigma

    def _jobs(self, replica, noised, sigma, step, found_inf: torch.Tensor | None) -> list[list]:
        """The one way noise is added: σ_t·c·ε_t to each group's tensors, ε_t from the key
        of (seed, t); anticorrelated, also −σ_{t−1}·c·ε_{t−1} from the key of (seed, t−1).
        Per term, its jobs (device, dtype, tensors, σ, key, stream) for `_add_noise_jobs`.

        c = s_group, times lr_group in absolute mode on the update. Param group i's
        (device, dtype) group j is stream i·2¹⁶ + j of the step's key.
        """
        seed, previous = self._lane(self.seed, replica), self._lane(self._sigma, replica)
        terms = [(sigma, step)]
        if self._lane(self.correlation, replica) == "anticorrelated" and (
            isinstance(previous, torch.Tensor) or previous != 0
        ):
            if isinstance(sigma, torch.Tensor) and not isinstance(previous, torch.Tensor):
                # Resumed: σ_{t−1} was a tensor of this dtype before it was saved as a float.
                previous = torch.tensor(previous, dtype=sigma.dtype, device=sigma.device)
            terms.append((-previous, step - 1))
        on_update = self.placement == "update"
        if on_update and self.capturable and found_inf is not None:
            # A step the fused optimizer skips gets 0·ε on the update, without a sync.
            terms = [(term_sigma * (found_inf == 0), term_step) for term_sigma, term_step in terms]
        per_lr = on_update and not isinstance(self._lane(self.schedule, replica), schedules.Relative)
        rounds = []
        for term_sigma, term_step in terms:
            if not isinstance(term_sigma, torch.Tensor) and term_sigma == 0:
                continue
            key = _mix(seed, term_step)
            jobs = []
            for scale, index, groups in noised:
                if per_lr:
                    scale = scale * self.optimizer.param_groups[index]["lr"]
                jobs.extend(
                    (device, dtype, tensors, term_sigma * scale, key, (index << 16) + group)
                    for group, (device, dtype, tensors) in enumerate(groups)
                )
            rounds.append(jobs)
        return rounds

    def _update(self, noised) -> list[torch.Tensor]:
        """Δp = p − p_before of the parameters that get noise (placement "update")."""
        params = _flat(noised)
        before, self._params_before = self._params_before, {}
        return torch._foreach_sub(params, [before[id(p)] for p in params]) if params else []

    def _step_counter(self, targets) -> int | torch.Tensor:
        """t, moved to the targets' device on the first capturable step."""
        if self.capturable and not isinstance(self._step, torch.Tensor) and targets:
            device = targets[0][2][0][0]
            self._step = torch.tensor(self._step, dtype=torch.int64, device=device)
        return self._step

    @staticmethod
    def _snapshot(noised) -> list[torch.Tensor]:
        return [t.clone() for t in _flat(noised)]

    @staticmethod
    def _stats(grad_norm: float, noised, before: list[torch.Tensor]) -> dict[str, float]:
        """‖g‖ over every gradient (taken before the noise), ‖noise‖ over the tensors that
        got it, and their ratio."""
        after = _flat(noised)
        noise_norm = _norm(torch._foreach_sub(after, before) if after else [])
        return {
            "grad_norm": grad_norm,
            "noise_norm": noise_norm,
            "noise_to_grad": noise_norm / grad_norm if grad_norm > 0 else math.inf,
        }

    def state_dict(self) -> dict:
        """What continuing exactly needs: (seed, step), the last step's σ (anticorrelated noise
        subtracts σ_{t−1}·ε_{t−1}) and the schedule's state; the correlation and placement
        it was made with. With replicas: {"replicas": [each replica's, as its own
        GradientNoise's]}."""
        if self.replicas > 1:
            return {"replicas": [self._lane_state(m) for m in range(self.replicas)]}
        return self._lane_state(None)

    def _lane_state(self, replica: int | None) -> dict:
        schedule = self._lane(self.schedule, replica)
        return {
            "step": self.step,
            "seed": self._lane(self.seed, replica),
            "sigma": float(self._lane(self._sigma, replica)),
            "correlation": self._lane(self.correlation, replica),
            "placement": self.placement,
            "schedule_spec": schedule.spec,
            "schedule_state": schedule.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        lanes = state["replicas"] if self.replicas > 1 else [state]
        if self.replicas > 1 and len(lanes) != self.replicas:
            raise UserError(
                f"GradientNoise state is for {len(lanes)} replicas, but this one has {self.replicas}"
            )
        for replica, lane in zip(self._lanes(), lanes, strict=True):
            schedule = self._lane(self.schedule, replica)
            if lane["schedule_spec"] != schedule.spec:
                raise UserError(
                    f"GradientNoise state is for schedule {lane['schedule_spec']!r}, "
                    f"but this one has {schedule.spec!r}"
                )
            for name, mine, allowed in (
                ("correlation", self._lane(self.correlation, replica), CORRELATIONS),
                ("placement", self.placement, PLACEMENTS),
            ):
                saved = lane.get(name, allowed[0])  # states saved before the option: its default
                if saved != mine:
                    raise UserError(
                        f"GradientNoise state is for {name}={saved!r}, but this one has {name}={mine!r}"
                    )
        self.step = int(lanes[0]["step"])
        seeds = [int(lane["seed"]) for lane in lanes]
        # States saved before σ was kept have none.
        sigmas = [float(lane.get("sigma", 0.0)) for lane in lanes]
        self.seed, self._sigma = (seeds, sigmas) if self.replicas > 1 else (seeds[0], sigmas[0])
        for replica, lane in zip(self._lanes(), lanes, strict=True):
            self._lane(self.schedule, replica).load_state_dict(lane["schedule_state"])

    def remove(self) -> None:
        """Detach from the optimizer: later steps get no noise."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __repr__(self) -> str:
        specs = self.schedule.spec if self.replicas == 1 else [s.spec for s in self.schedule]
        options = "".join(
            f", {name}={value!r}"
            for name, value, default in (
                ("correlation", self.correlation, CORRELATIONS[0]),
                ("placement", self.placement, PLACEMENTS[0]),
            )
            if value not in (default, [default] * self.replicas)
        )
        return f"GradientNoise({specs!r}, seed={self.seed}, step={self.step}{options})"

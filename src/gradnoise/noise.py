"""Gradient noise injection: g̃_t = g_t + σ_t · ε_t, ε_t ~ N(0, I).

`GradientNoise` attaches to any `torch.optim.Optimizer` through a step
pre-hook, so the noise lands on exactly the gradients the optimizer is about to
use: after `clip_grad_norm_`, after `GradScaler.unscale_`, once per optimizer
step however many micro-batches were accumulated. A step that GradScaler skips
never calls `optimizer.step()`, so it draws no noise and is not counted.

The noise has its own random stream. Each step draws one 63-bit key from a
private CPU `torch.Generator`; every batch of noise that step is generated from
that key, so the stream depends only on the seed and the step (optax-style
explicit state), never on the global RNG, and `state_dict()` resumes it exactly.
Runs with and without noise therefore see the same initial weights, batches and
dropout masks.

`add_noise_` is the batched kernel: on CUDA one fused Triton kernel generates
and adds the noise for every tensor in a single pass over the gradients (8 bytes
per fp32 element); elsewhere one flat buffer per (device, dtype), filled in
parallel chunks, and one `torch._foreach_add_`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from gradnoise import schedules
from gradnoise.errors import UserError

__all__ = ["GradientNoise", "add_noise_"]

# CPU noise is generated in fixed-size chunks, each from its own generator
# seeded from the step key and the chunk index. Fixed chunks keep the stream
# independent of the number of threads; several chunks let the threads share
# the work (torch's CPU normal_ is single-threaded, and the RNG, not the add,
# is the cost on CPU).
_CPU_CHUNK = 1 << 18
_KEY_LIMIT = 2**63 - 1
_thread_pool: ThreadPoolExecutor | None = None
# One reusable generator per accelerator device: re-seeded from the key at every use.
_device_generators: dict[torch.device, torch.Generator] = {}


def _pool() -> ThreadPoolExecutor:
    global _thread_pool
    if _thread_pool is None:
        _thread_pool = ThreadPoolExecutor(max(1, torch.get_num_threads()), "gradnoise")
    return _thread_pool


def _mix(key: int, *indices: int) -> int:
    """A distinct seed for (key, indices), deterministic across processes."""
    for index in indices:
        key = (key * 6364136223846793005 + 1442695040888963407 + index) % _KEY_LIMIT
    return key


def _draw_key(generator: torch.Generator | None) -> int:
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, _KEY_LIMIT, (1,), generator=generator, device=device).item())


def _group_by_device_dtype(tensors: Sequence[torch.Tensor]) -> dict:
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        if not tensor.dtype.is_floating_point:
            raise UserError(f"add_noise_: tensors must be floating point, got {tensor.dtype}")
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    return groups


def _fill_standard_normal(buffer: torch.Tensor, key: int) -> None:
    """buffer ← N(0, 1) samples determined by `key` alone."""
    if buffer.device.type != "cpu":
        generator = _device_generators.get(buffer.device)
        if generator is None:
            generator = _device_generators[buffer.device] = torch.Generator(buffer.device)
        generator.manual_seed(key)
        buffer.normal_(generator=generator)
        return

    def fill(index_and_chunk):
        index, chunk = index_and_chunk
        generator = torch.Generator()
        generator.manual_seed(_mix(key, index))
        chunk.normal_(generator=generator)

    chunks = list(enumerate(buffer.split(_CPU_CHUNK)))
    if len(chunks) == 1:
        fill(chunks[0])
    else:
        list(_pool().map(fill, chunks))


def _use_triton(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cuda" or os.environ.get("GRADNOISE_DISABLE_TRITON") == "1":
        return False
    from gradnoise import _triton

    return _triton.available() and dtype in _triton.DTYPES


def draw_noise(
    tensors: Sequence[torch.Tensor], key: int, workspace: dict | None = None
) -> list[torch.Tensor]:
    """Standard-normal noise shaped like `tensors` (views into one flat buffer
    per (device, dtype)); the same `key` always gives the same noise."""
    noise: list[torch.Tensor | None] = [None] * len(tensors)
    position = {id(t): i for i, t in enumerate(tensors)}
    for group_index, ((device, dtype), group) in enumerate(_group_by_device_dtype(tensors).items()):
        total = sum(t.numel() for t in group)
        buffer = None if workspace is None else workspace.get((device, dtype))
        if buffer is None or buffer.numel() != total:
            buffer = torch.empty(total, device=device, dtype=dtype)
            if workspace is not None:
                workspace[(device, dtype)] = buffer
        _fill_standard_normal(buffer, _mix(key, group_index))
        for tensor, view in zip(group, buffer.split([t.numel() for t in group]), strict=True):
            noise[position[id(tensor)]] = view.view_as(tensor)
    return noise  # type: ignore[return-value]


@torch.no_grad()
def add_noise_(
    tensors: Iterable[torch.Tensor],
    sigma: float | torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    workspace: dict | None = None,
) -> None:
    """In place: t ← t + σ · ε for every tensor, ε ~ N(0, I) independent across elements.

    Batched: one fused kernel (CUDA, Triton) or one RNG fill and one
    `_foreach_add_` per (device, dtype), never a random and an add kernel per
    tensor. fp32, bf16 and fp16 tensors; the noise is drawn in each tensor's
    own dtype. `sigma` is a float or a 0-d tensor on the tensors' device (a
    tensor avoids a host sync when σ is computed on the device). The noise
    comes from `generator` (one key drawn from it per call; the default
    generator if None). `workspace` (a dict owned by the caller) keeps the flat
    buffers between calls.
    """
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return
    if isinstance(sigma, (int, float)):
        if not math.isfinite(sigma) or sigma < 0:
            raise UserError(f"add_noise_: sigma={sigma!r} must be a finite number ≥ 0")
        if sigma == 0:
            return
    _add_noise_with_key(tensors, sigma, _draw_key(generator), workspace)


def _add_noise_with_key(tensors, sigma, key: int, workspace: dict | None) -> None:
    groups = _group_by_device_dtype(tensors)
    fallback = []
    for group_index, ((device, dtype), group) in enumerate(groups.items()):
        if _use_triton(device, dtype):
            from gradnoise import _triton

            _triton.add_noise_(group, sigma, _mix(key, group_index, 1))
        else:
            fallback.extend(group)
    if fallback:
        noise = draw_noise(fallback, key, workspace)
        if isinstance(sigma, torch.Tensor):
            torch._foreach_mul_(noise, sigma)
            torch._foreach_add_(fallback, noise)
        else:
            torch._foreach_add_(fallback, noise, alpha=sigma)


def _global_rms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """RMS(g) = ‖g‖₂ / sqrt(N) over all gradients, as a 0-d fp32 tensor."""
    norms = torch._foreach_norm([g.float() if g.dtype != torch.float32 else g for g in grads])
    total = sum(g.numel() for g in grads)
    return torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms])) / math.sqrt(total)


class GradientNoise:
    """Adds N(0, σ_t²) noise to the gradients of `optimizer` at every `optimizer.step()`.

    g̃ = g + σ_t · m_group · ε, ε ~ N(0, I), where σ_t = schedule(t) (absolute
    mode) or σ_t = schedule(t) · RMS(g) (relative mode, or a
    `schedules.Relative` schedule), t is the number of noisy steps taken so
    far and m_group is the param group's ``"noise_multiplier"`` (default 1; 0
    turns noise off for that group).

    Args:
        optimizer: any `torch.optim.Optimizer`.
        schedule: a `gradnoise.schedules` schedule, or a spec string for `schedules.parse`.
        seed: seeds the private generator. Under DDP use the same seed on every
            replica (gradients are already averaged, so identical noise keeps
            replicas identical); for sharded gradients (FSDP, ZeRO) use
            ``seed + rank`` so every shard gets independent noise.
        mode: "absolute" or "relative".
        track_stats: also record ‖g‖, ‖noise‖ and their ratio at each step in
            `last_stats` (costs a reduction and a host sync).
        attach: register the step pre-hook (default). With False, call `apply()`
            yourself, e.g. before gradient clipping for that ablation.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: schedules.Schedule | str,
        *,
        seed: int = 0,
        mode: str = "absolute",
        track_stats: bool = False,
        attach: bool = True,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UserError(
                f"GradientNoise needs a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(schedule, str):
            schedule = schedules.parse(schedule)
        if not isinstance(schedule, schedules.Schedule):
            raise UserError(f"GradientNoise needs a schedule, got {schedule!r}")
        if mode not in ("absolute", "relative"):
            raise UserError(f"mode={mode!r} is not allowed: use 'absolute' or 'relative'")
        if mode == "relative" and not isinstance(schedule, schedules.Relative):
            schedule = schedules.Relative(schedule)
        for index, group in enumerate(optimizer.param_groups):
            multiplier = group.get("noise_multiplier", 1.0)
            if not (isinstance(multiplier, (int, float)) and math.isfinite(multiplier) and multiplier >= 0):
                raise UserError(f"param group {index}: noise_multiplier={multiplier!r} must be a number ≥ 0")
        self.optimizer = optimizer
        self.schedule = schedule
        self.seed = seed
        self.track_stats = track_stats
        self.step = 0
        self.last_stats: dict[str, float] = {}
        self._sigma: float | torch.Tensor = 0.0
        self._generator = torch.Generator().manual_seed(seed)
        self._workspace: dict = {}
        self._handle = optimizer.register_step_pre_hook(self._pre_step) if attach else None

    @property
    def mode(self) -> str:
        return "relative" if isinstance(self.schedule, schedules.Relative) else "absolute"

    @property
    def sigma(self) -> float:
        """σ used at the last step (relative mode: after scaling by RMS(g)); 0 before the first."""
        return float(self._sigma)

    def _pre_step(self, optimizer, args, kwargs) -> None:
        if kwargs.get("grad_scale") is not None:
            raise UserError(
                "GradientNoise: the optimizer got still-scaled gradients from GradScaler; "
                "call scaler.unscale_(optimizer) before scaler.step(optimizer)"
            )
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        """Add this step's noise to the gradients and advance the step count."""
        by_multiplier: dict[float, list[torch.Tensor]] = {}
        for group in self.optimizer.param_groups:
            multiplier = float(group.get("noise_multiplier", 1.0))
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if grads:
                by_multiplier.setdefault(multiplier, []).extend(grads)
        all_grads = [g for grads in by_multiplier.values() for g in grads]
        key = _draw_key(self._generator)
        sigma: float | torch.Tensor = self.schedule(self.step)
        if all_grads and isinstance(self.schedule, schedules.Relative):
            sigma = sigma * _global_rms(all_grads)
        self._sigma = sigma
        if self.track_stats:
            self._record_stats(by_multiplier, sigma, key)
        else:
            for index, (multiplier, grads) in enumerate(by_multiplier.items()):
                if multiplier > 0 and (isinstance(sigma, torch.Tensor) or sigma > 0):
                    _add_noise_with_key(grads, sigma * multiplier, _mix(key, index), self._workspace)
        self.step += 1

    def _record_stats(self, by_multiplier, sigma, key) -> None:
        all_grads = [g for grads in by_multiplier.values() for g in grads]
        grad_norm = float(torch.linalg.vector_norm(torch.stack(
            [n.float() for n in torch._foreach_norm(all_grads)]))) if all_grads else 0.0
        noise_squared = 0.0
        for index, (multiplier, grads) in enumerate(by_multiplier.items()):
            if multiplier == 0:
                continue
            noise = draw_noise(grads, _mix(key, index), self._workspace)
            torch._foreach_mul_(noise, sigma * multiplier)
            noise_squared += sum(float(n.float().square().sum()) for n in noise)
            torch._foreach_add_(grads, noise)
        noise_norm = math.sqrt(noise_squared)
        self.last_stats = {
            "grad_norm": grad_norm,
            "noise_norm": noise_norm,
            "noise_to_grad": noise_norm / grad_norm if grad_norm > 0 else math.inf,
        }

    def state_dict(self) -> dict:
        """Everything needed to continue the noise stream exactly."""
        return {
            "step": self.step,
            "seed": self.seed,
            "generator": self._generator.get_state(),
            "schedule_spec": self.schedule.spec,
            "schedule_state": self.schedule.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["schedule_spec"] != self.schedule.spec:
            raise UserError(
                f"GradientNoise state is for schedule {state['schedule_spec']!r}, "
                f"but this one has {self.schedule.spec!r}"
            )
        self.step = int(state["step"])
        self.seed = int(state["seed"])
        self._generator.set_state(state["generator"])
        self.schedule.load_state_dict(state["schedule_state"])

    def remove(self) -> None:
        """Detach from the optimizer: later steps get no noise."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __repr__(self) -> str:
        return f"GradientNoise({self.schedule.spec!r}, seed={self.seed}, step={self.step})"

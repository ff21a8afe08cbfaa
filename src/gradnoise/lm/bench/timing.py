"""What the benchmarks share: the presets they time, warm-up steps per device, a timer that
waits for the device, variants timed in turns (interleaved), and quartiles of the samples."""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable

import torch

from gradnoise.errors import UserError
from gradnoise.lm import config
from gradnoise.lm.devices import resolve_device

PRESETS = tuple(config.PRESETS)


WARMUP_STEPS = {"cpu": 1, "cuda": 5}  # CUDA: torch.compile and autotuning happen here


class Timer:
    """Seconds per call of a function: perf_counter on CPU; on CUDA events around
    `repeat` back-to-back calls, then a synchronize (the device starts idle)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, function: Callable[[], object], repeat: int = 1) -> float:
        if self.device.type != "cuda":
            start = time.perf_counter()
            for _ in range(repeat):
                function()
            return (time.perf_counter() - start) / repeat
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            function()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / repeat


def interleaved(measures: dict[str, Callable[[], float]], repetitions: int) -> dict[str, list[float]]:
    """Run every measure once per repetition, the order rotating so none is always first."""
    names = list(measures)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repetition in range(repetitions):
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(measures[name]())
    return samples


@contextlib.contextmanager
def environment(name: str, value: str):
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def quartiles_ms(samples: list[float]) -> list[float]:
    if len(samples) < 2:
        return [1e3 * samples[0]] * 2
    low, _, high = statistics.quantiles(samples, n=4)
    return [1e3 * low, 1e3 * high]


def timed_device(device: str, steps: int | None) -> tuple[torch.device, torch.dtype]:
    """The device to time on and the dtype its steps train in (bf16 on a CUDA device that
    has it); UserError unless steps, when given, is at least 1."""
    if steps is not None and steps < 1:
        raise UserError(f"steps={steps} is not allowed: steps must be an integer ≥ 1")
    torch_device = resolve_device(device)
    cuda = torch_device.type == "cuda"
    return torch_device, torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32

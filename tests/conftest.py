"""The tests' environment: a private data home, one thread where two cores are shared, and
without a GPU Triton's interpreter, so that the fused CUDA kernel runs on the CPU; and the
helpers that several test modules share (no test module imports another)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from gradnoise import GradientNoise, ReplicatedGradientNoise

if not torch.cuda.is_available():
    # Read when triton is first imported, which must come after this (test_triton_kernel.py).
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def private_data_home(tmp_path_factory):
    """Every test (and every process it starts) prepares and reads corpora under a private
    $GRADNOISE_HOME, never the user's; and child processes train on one thread each, since
    several run at once on a 2-core machine."""
    saved = {key: os.environ.get(key) for key in ("GRADNOISE_HOME", "OMP_NUM_THREADS")}
    home = tmp_path_factory.mktemp("gradnoise_home")
    os.environ["GRADNOISE_HOME"] = str(home)
    os.environ["OMP_NUM_THREADS"] = "1"
    from gradnoise.lm.data import corpora

    corpora.load("shakespeare_char")  # prepared once, before concurrent workers could race to it
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def one_thread():
    """torch on one thread in this process: results that depend on the thread count are
    bit-identical across machines, and concurrent tests do not oversubscribe the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_standard_normal_scaled(sample: torch.Tensor, sigma: float):
    """mean ≈ 0 and std ≈ σ within 5 standard errors of each estimator."""
    x = sample.double().flatten()
    n = x.numel()
    # For a normal sample: se(mean) = σ/√n, se(sd) ≈ σ/√(2(n−1)).
    assert abs(x.mean().item()) < 5 * sigma / math.sqrt(n)
    # bf16/fp16 round each sample (relative error ≤ 2^-8): allow that too.
    assert abs(x.std().item() - sigma) < 5 * sigma / math.sqrt(2 * (n - 1)) + sigma * 2**-8


def trained_params(sizes, replica, steps: int, optimizer_name: str, **noise_kwargs):
    """Params trained `steps` steps with GradientNoise(**noise_kwargs) on a gradient that
    depends on the params (g = cos(3·p)), so each replica follows its own path. `replica`
    None: the batched params (M, …), replica m starting from (1 + m)·base; else that replica's
    params alone, from the same start. Returns (params, gn)."""
    bases = [torch.linspace(-1, 1, math.prod(size[1:])).view(size[1:]) for size in sizes]
    if replica is None:
        scale = torch.arange(1.0, sizes[0][0] + 1)
        starts = [base * scale.view(-1, *[1] * base.dim()) for base in bases]
    else:
        starts = [base * (1 + replica) for base in bases]
    params = [torch.nn.Parameter(start.clone()) for start in starts]
    groups = [{"params": params[:2]}, {"params": params[2:], "noise_scale": 0.5}]
    if optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1)
    else:
        optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    gn = (GradientNoise if replica is not None else ReplicatedGradientNoise)(optimizer, **noise_kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.cos(3 * p.detach())
        optimizer.step()
    return params, gn


def count_jobs(monkeypatch, module, name: str) -> list[int]:
    """Wrap module.name(jobs) to record how many jobs each call gets."""
    calls = []
    original = getattr(module, name)

    def counted(jobs):
        calls.append(len(jobs))
        original(jobs)

    monkeypatch.setattr(module, name, counted)
    return calls

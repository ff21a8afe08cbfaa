"""The fused CUDA kernel: compiled on a GPU, and without one run on the CPU by Triton's
interpreter (conftest.py sets TRITON_INTERPRET=1 before triton is imported).

The interpreter executes the kernel's own code, program by program, with NumPy: the
table of pointers, the per-job keys, σ's and streams, Philox and Box–Muller. So the
kernel's logic is tested on machines without a GPU; compiling it for one is tested
where there is one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradnoise
from conftest import assert_standard_normal_scaled, count_jobs, trained_params
from gradnoise import ReplicatedGradientNoise, streams

pytest.importorskip("triton")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def kernel():
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU, and triton was imported before TRITON_INTERPRET=1 was set")
    from gradnoise import _triton

    return _triton


def _zeros(*sizes, dtype=torch.float32):
    return [torch.zeros(size, dtype=dtype, device=DEVICE) for size in sizes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_adds_sigma_times_standard_normal_noise(kernel, dtype):
    tensors = _zeros(20_000, 7, 4097, dtype=dtype)
    kernel.add_noise_([(tensors, 0.25, streams._signed(2**63 + 5), 3)])
    assert_standard_normal_scaled(torch.cat([t.flatten() for t in tensors]).cpu(), 0.25)
    if dtype == torch.float32:
        # Every element got its own draw: of the largest tensor's 20,000 values only a few
        # agree by chance (fp32 rounding), not the thousands a repeated block would give.
        assert torch.unique(tensors[0]).numel() > 19_900


def test_kernel_noise_is_a_function_of_the_whole_key_and_the_stream(kernel):
    def drawn(key: int, stream: int) -> torch.Tensor:
        (tensor,) = _zeros(5000)
        kernel.add_noise_([([tensor], 1.0, streams._signed(key), stream)])
        return tensor

    first = drawn(7, 0)
    assert torch.equal(first, drawn(7, 0))
    for other in (drawn(7 + (1 << 32), 0), drawn(7 + (1 << 62), 0), drawn(7, 1), drawn(7, 1 << 32)):
        assert torch.count_nonzero(first == other) < 5


def test_one_launch_of_many_jobs_equals_each_job_launched_alone(kernel):
    jobs = [
        (_zeros(3000, 10), 0.7, streams._signed(2**64 - 3), 65537),
        (_zeros(5000), 0.5, 42, 7),
        (
            _zeros(3000, 10),
            torch.tensor(0.2, device=DEVICE),
            torch.tensor(42, device=DEVICE),
            8,
        ),  # σ and key as tensors
    ]
    kernel.add_noise_(jobs)
    for tensors, sigma, key, stream in jobs:
        alone = [torch.zeros_like(t) for t in tensors]
        kernel.add_noise_([(alone, float(sigma), int(key), stream)])
        for together, single in zip(tensors, alone, strict=True):
            assert torch.equal(together, single)
    # The first and last jobs differ only in their stream, so in their noise.
    assert torch.count_nonzero(jobs[0][0][0] == jobs[2][0][0]) < 5


def test_kernel_noises_a_non_contiguous_tensor_through_a_copy(kernel):
    (matrix,) = _zeros((300, 40))
    view = matrix.t()
    kernel.add_noise_([([view], 1.0, 11, 0)])
    (expected,) = _zeros((40, 300))
    kernel.add_noise_([([expected], 1.0, 11, 0)])
    assert torch.equal(view, expected)


def test_batched_gradient_noise_is_one_launch_per_term_and_each_replicas_run_alone(kernel, monkeypatch):
    monkeypatch.setattr(streams, "_use_triton", lambda device, dtype: dtype in kernel.DTYPES)
    launches = count_jobs(monkeypatch, kernel, "add_noise_")
    sizes, specs, seeds = (
        ((3, 60, 40), (3, 40), (3, 30, 20)),
        ["const:sigma=0.2", "exp:sigma0=0.3,gamma=0.5", "const:sigma=0.05"],
        [4, 9, 4],
    )
    correlations = ["anticorrelated", "independent", "independent"]
    options = {"mode": ["absolute", "relative", "absolute"], "placement": "gradient"}
    batched, gn = trained_params(
        sizes, None, 2, "adamw", schedule=specs, seed=seeds, correlation=correlations, **options
    )
    # Step 0: one launch for 3 replicas × 2 param groups; step 1: that, and replica 0's −σ₀·ε₀.
    assert launches == [6, 6, 2]
    for m in range(3):
        alone, _ = trained_params(
            sizes,
            m,
            2,
            "adamw",
            schedule=specs[m],
            seed=seeds[m],
            correlation=correlations[m],
            mode=options["mode"][m],
            placement="gradient",
        )
        for p, q in zip(batched, alone, strict=True):
            assert torch.equal(p[m], q), m
    assert isinstance(gn, ReplicatedGradientNoise)


COMPILE_FOR_H100 = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gradnoise import _triton

signature = {"table": "*i64", "n_tensors": "i32", "n_jobs": "i32", "keys": "*i64", "sigmas": "*fp32",
             "DTYPE": "constexpr", "BLOCK": "constexpr"}
for dtype in (tl.float32, tl.bfloat16, tl.float16):
    source = ASTSource(_triton._add_noise_kernel, signature, {"DTYPE": dtype, "BLOCK": _triton._BLOCK})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"], dtype
"""


def test_kernel_compiles_for_an_h100_on_any_machine():
    """What the interpreter cannot check: that Triton compiles the kernel (to sm_90 machine
    code, with the ptxas Triton ships; no GPU needed), for every dtype it is used with."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    # The gradnoise under test, wherever the installed one points.
    source = str(Path(gradnoise.__file__).parents[1])
    environment["PYTHONPATH"] = os.pathsep.join([source, environment.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_H100], env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]

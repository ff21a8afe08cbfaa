"""The tests' environment: a private data home, one thread where two cores are shared, and
without a GPU Triton's interpreter, so that the fused CUDA kernel runs on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

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
    from gradnoise.lm import data

    data.load("shakespeare_char")  # prepared once, before concurrent workers could race to it
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

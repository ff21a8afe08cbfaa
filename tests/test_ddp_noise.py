"""Under DDP every replica must add the same noise, or the replicas drift apart.

Two CPU processes (gloo) train a small model wrapped in DistributedDataParallel
with noisy AdamW steps, each rank on its own batches (DDP averages the
gradients). Every rank seeds its global RNG differently, as nanoGPT does
(``torch.manual_seed(1337 + rank)``). GradientNoise with the same seed on every
rank keeps the replicas bit-identical; noise drawn from the per-rank global RNG
(the naive way) makes them diverge.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gradnoise import GradientNoise, schedules

WORLD_SIZE = 2
STEPS = 5
SIGMA = 0.01
VARIANTS = ("none", "gradnoise", "naive")


def naive_noise(optimizer: torch.optim.Optimizer, sigma: float) -> None:
    """The per-rank way: noise from the global RNG, one kernel pair per tensor."""

    def add(*_):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.add_(torch.randn_like(p.grad) * sigma)

    optimizer.register_step_pre_hook(add)


def train_replica(rank: int, variant: str) -> torch.Tensor:
    torch.manual_seed(1337 + rank)
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4))
    replica = nn.parallel.DistributedDataParallel(model)  # broadcasts rank 0's weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    if variant == "gradnoise":
        GradientNoise(optimizer, schedules.Constant(SIGMA), seed=0)
    elif variant == "naive":
        naive_noise(optimizer, SIGMA)
    data = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        x = torch.randn(16, 8, generator=data)
        y = torch.randn(16, 4, generator=data)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(replica(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def leave_without_interpreter_teardown() -> None:
    """End a spawned rank that has finished and written its results.

    torch 2.13's gloo keeps its transport threads after `destroy_process_group`, and
    tearing the interpreter down around them aborts the process now and then
    ("terminate called without an active exception", SIGABRT), which `mp.spawn`
    reports as a failed rank. `os._exit` skips that teardown; nothing is lost,
    since every result is on disk already.
    """
    os._exit(0)


def worker(rank: int, rendezvous: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD_SIZE)
    try:
        gathered = {}
        for variant in VARIANTS:
            params = train_replica(rank, variant)
            everyone = [torch.empty_like(params) for _ in range(WORLD_SIZE)]
            dist.all_gather(everyone, params)
            gathered[variant] = torch.stack(everyone)
        if rank == 0:
            torch.save(gathered, results)
    finally:
        dist.destroy_process_group()
    leave_without_interpreter_teardown()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> dict[str, torch.Tensor]:
    """variant → (rank, parameter) tensor of every replica's final parameters."""
    directory = tmp_path_factory.mktemp("ddp")
    results = directory / "params.pt"
    mp.spawn(worker, args=(str(directory / "rendezvous"), str(results)), nprocs=WORLD_SIZE, join=True)
    return torch.load(results, weights_only=True)


def test_gradnoise_keeps_ddp_replicas_bit_identical(replicas):
    torch.testing.assert_close(replicas["gradnoise"][0], replicas["gradnoise"][1], rtol=0, atol=0)
    # and the noise did act: the noisy run left the noiseless one
    assert not torch.equal(replicas["gradnoise"][0], replicas["none"][0])


def test_naive_per_rank_global_rng_noise_makes_replicas_diverge(replicas):
    torch.testing.assert_close(replicas["none"][0], replicas["none"][1], rtol=0, atol=0)
    difference = (replicas["naive"][0] - replicas["naive"][1]).abs()
    # AdamW moves each weight by up to lr per step; different noise on each rank
    # turns that into differences of the order of lr, far above float rounding.
    assert difference.max().item() > 1e-3


def plateau_worker(rank: int, rendezvous: str, results: str) -> None:
    """The Lightning callback's plateau update on two ranks that see different validation losses."""
    from lightning.pytorch.strategies import DDPStrategy

    from gradnoise.integrations.lightning import GradientNoiseCallback

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD_SIZE)
    try:
        callback = GradientNoiseCallback("plateau:sigma0=0.1,patience=0", monitor="val_loss")
        optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
        trainer = SimpleNamespace(
            optimizers=[optimizer],
            global_rank=rank,
            world_size=WORLD_SIZE,
            strategy=DDPStrategy(),
            sanity_checking=False,
            state=SimpleNamespace(fn="fit"),
            callback_metrics={},
        )
        module = SimpleNamespace(device=torch.device("cpu"))
        callback.on_fit_start(trainer, module)
        # Rank r sees losses[r]: the mean is 2.0 both times (improve, then a plateau);
        # rank 0 alone would decay at once, rank 1 alone would improve twice.
        for losses in ([1.0, 3.0], [2.5, 1.5]):
            trainer.callback_metrics = {"val_loss": torch.tensor(losses[rank])}
            callback.on_validation_end(trainer, module)
        state = callback.noises[0].schedule.state
        mine = torch.tensor([state.sigma, state.best], dtype=torch.float64)
        everyone = [torch.empty_like(mine) for _ in range(WORLD_SIZE)]
        dist.all_gather(everyone, mine)
        if rank == 0:
            torch.save(torch.stack(everyone), results)
    finally:
        dist.destroy_process_group()
    leave_without_interpreter_teardown()


def test_lightning_plateau_takes_the_same_sigma_on_every_rank(tmp_path):
    pytest.importorskip("lightning")
    results = tmp_path / "plateau.pt"
    mp.spawn(plateau_worker, args=(str(tmp_path / "rendezvous"), str(results)), nprocs=WORLD_SIZE, join=True)
    states = torch.load(results, weights_only=True)  # (rank, [sigma, best])
    assert states.tolist() == [[0.05, 2.0], [0.05, 2.0]]

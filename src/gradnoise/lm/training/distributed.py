"""Data parallel set-up: ranks, the collectives the trainer needs, per-rank RNG, the stop vote.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `DistributedEnv.from_environment()`
reads them, and `resolve_device` joins the process group (NCCL on CUDA, gloo on
CPU) once the device is known. Alone (world size 1) every collective is the
identity, so the trainer calls them unconditionally.

Each rank draws dropout masks from its own global RNG (seeded seed + rank), so a
checkpoint holds every rank's RNG state: `gather_rng_states` collects them on
every rank (rank 0 writes them), `restore_rng_state` gives a rank back its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import torch
import torch.distributed as dist

from gradnoise.lm import devices


class DistributedEnv:
    """Rank and world size from torchrun's environment; a process group when world > 1."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.backend: str | None = None
        self.device: torch.device | None = None

    @classmethod
    def from_environment(cls) -> DistributedEnv:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes checkpoints and results."""
        return self.rank == 0

    def resolve_device(self, requested: str) -> torch.device:
        """The device ("cuda" means cuda:LOCAL_RANK); joins the process group when world > 1."""
        device = devices.resolve_device(requested, self.local_rank)
        if self.world_size > 1 and self.backend is None:
            self.backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size)
        self.device = device
        return device

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of batch_size · world_size sequences."""
        return slice(self.rank * batch_size, (self.rank + 1) * batch_size)

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over ranks (a new tensor; `tensor` itself when alone)."""
        if self.world_size > 1:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank."""
        if self.world_size == 1:
            return flag
        tensor = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def close(self, wait_for_peers: bool) -> None:
        """Leave the process group; after a normal finish, only once every rank is done
        (tearing down while a peer still talks to us can abort it). After an error, at
        once: the peers may never arrive."""
        if self.backend is not None:
            if wait_for_peers:
                dist.barrier()
            dist.destroy_process_group()
            self.backend = None


def gather_rng_states(dist_env: DistributedEnv, device: torch.device) -> list[dict]:
    """Every rank's global RNG state (CPU, and CUDA on a CUDA device), in rank order."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if dist_env.world_size == 1:
        return [state]
    gathered = [None] * dist_env.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def restore_rng_state(states: list[dict], rank: int, device: torch.device) -> None:
    """Give `rank` its saved global RNG state back."""
    if rank >= len(states):
        return  # resumed with more ranks than saved: the new ranks keep their fresh seeds
    torch.set_rng_state(states[rank]["cpu"])
    if device.type == "cuda" and "cuda" in states[rank]:
        torch.cuda.set_rng_state(states[rank]["cuda"], device)


class StopRequest:
    """A graceful stop: SIGTERM (cluster pre-emption) or on_step asks; the loop finishes
    the current step, checkpoints and returns status "interrupted"."""

    def __init__(self):
        self._requested = False

    def request(self) -> None:
        self._requested = True

    def agreed(self, dist_env: DistributedEnv, step: int, every: int) -> bool:
        """Whether to stop now. Alone: as soon as asked. Under DDP the ranks must stop at
        the same step or the next collective would hang, so they vote (an all-reduce)
        every `every` steps rather than pay a host sync at every step."""
        if dist_env.world_size == 1:
            return self._requested
        return step % every == 0 and dist_env.any(self._requested)

    @contextlib.contextmanager
    def on_sigterm(self):
        """SIGTERM requests the stop while inside (main thread only: signals go there)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.request())
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

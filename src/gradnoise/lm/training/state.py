"""What a run (or a group of runs trained as one batched model) is between two steps.

`RunState` holds everything a resume needs, with torch's state_dict protocol:

    model, optimizer, scaler     weights, AdamW/SGD moments, GradScaler's scale (every replica's)
    noise                        GradientNoise (seeds, step; a plateau schedule's memory)
    rng_per_rank                 each rank's global RNG: its dropout masks
    clock                        training and wall seconds so far
    replicas                     per run of the group (`Replica`):
      batch_generator              the training batches' stream
      augment_generator            character substitution's stream
      progress                     steps done, best val so far, the log window, divergence

A checkpoint is `RunState.state_dict()` (its "model" entry goes to
model.safetensors, the rest to state.pt) plus the config(s) it was trained with;
`load_state_dict` puts every piece back, and the run continues bit for bit as
if it had not stopped (on CPU; CUDA kernels may not be deterministic). A plain
run's (one replica) holds its replica's entries at the top level, as checkpoints
did before batching; a group's holds them in a list, "replicas".

The rules for resuming it are in `resume`, its clock and progress in `progress`.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from gradnoise.errors import UserError
from gradnoise.lm.model.weights import load_weights, weights_for_saving
from gradnoise.lm.training.distributed import DistributedEnv, gather_rng_states, restore_rng_state
from gradnoise.lm.training.progress import Clock, Progress
from gradnoise.lm.training.replicas import Freezer
from gradnoise.replicated import ReplicatedGradientNoise


@dataclasses.dataclass
class Replica:
    """One run of a (batched) group: its data streams and its progress."""

    batch_generator: torch.Generator
    augment_generator: torch.Generator
    progress: Progress = dataclasses.field(default_factory=Progress)

    def state_dict(self) -> dict:
        return {
            "batch_generator": self.batch_generator.get_state(),
            "augment_generator": self.augment_generator.get_state(),
            "progress": self.progress.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.batch_generator.set_state(state["batch_generator"])
        self.augment_generator.set_state(state["augment_generator"])
        self.progress = Progress(**state["progress"])


@dataclasses.dataclass
class RunState:
    """Everything a resume needs (see the module docstring), on one rank."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    noise: ReplicatedGradientNoise | None
    replicas: list[Replica]
    dist_env: DistributedEnv
    device: torch.device
    clock: Clock = dataclasses.field(default_factory=Clock)

    @functools.cached_property
    def params(self) -> list[torch.nn.Parameter]:
        """The trained parameters: clipped, and checked for non-finite values."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @functools.cached_property
    def freezer(self) -> Freezer:
        return Freezer(self.params, self.optimizer)

    @functools.cached_property
    def nonfinite_norms(self) -> torch.Tensor:
        """(M,) bool on the device: whether a replica's gradient norm was not finite at a step
        since it was last checked (it is clipped with it: the update is broken)."""
        return torch.zeros(len(self.replicas), dtype=torch.bool, device=self.device)

    def state_dict(self) -> dict:
        """The whole state. Under DDP every rank must call it: it gathers the RNG states."""
        state = {
            "model": weights_for_saving(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "noise": self._noise_state(),
            "rng_per_rank": gather_rng_states(self.dist_env, self.device),
            "clock": self.clock.state_dict(),
            "replica_dim": True,  # the optimizer's state has the replica dimension
        }
        replicas = [replica.state_dict() for replica in self.replicas]
        if len(replicas) == 1:
            return {**state, **replicas[0]}
        return {**state, "replicas": replicas}

    def _noise_state(self) -> dict | None:
        if self.noise is None:
            return None
        replicas = self.noise.state_dict()["replicas"]
        return replicas[0] if len(replicas) == 1 else {"replicas": replicas}

    def load_state_dict(self, state: dict) -> None:
        if "book" in state:  # written before RunState existed: progress and clock in one entry
            book = dict(state["book"])
            state = {**state, "clock": {k: book.pop(k) for k in ("train_s", "wall_s")}, "progress": book}
        if "replica_dim" not in state:
            state = _with_replica_dim(state)
        replicas = state.get("replicas", [state])
        if len(replicas) != len(self.replicas):
            raise UserError(f"the checkpoint holds {len(replicas)} runs, this group {len(self.replicas)}")
        load_weights(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.noise is not None:
            noise = state["noise"]  # a plain run's holds its one replica's, as its other entries
            self.noise.load_state_dict(noise if "replicas" in noise else {"replicas": [noise]})
        restore_rng_state(state["rng_per_rank"], self.dist_env.rank, self.device)
        self.clock.load_state_dict(state["clock"])
        for replica, saved in zip(self.replicas, replicas, strict=True):
            replica.load_state_dict(saved)
        for index, replica in enumerate(self.replicas):
            if replica.progress.diverged is not None:
                self.freezer.freeze(index)


def _with_replica_dim(state: dict) -> dict:
    """A plain run's checkpoint from before the replica dimension: its optimizer's state
    gains it, and its weight decay moves from the optimizer to WeightDecay (param group 0,
    the matrices, is the decayed one)."""
    optimizer = state["optimizer"]
    per_param = {
        key: {
            name: value.unsqueeze(0) if isinstance(value, torch.Tensor) and value.dim() > 0 else value
            for name, value in entry.items()
        }
        for key, entry in optimizer["state"].items()
    }
    groups = [
        {**group, "weight_decay": 0.0, "decay": index == 0}
        for index, group in enumerate(optimizer["param_groups"])
    ]
    return {**state, "optimizer": {"state": per_param, "param_groups": groups}}


# --- resuming ----------------------------------------------------------------------

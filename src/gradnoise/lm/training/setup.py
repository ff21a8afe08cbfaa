"""Set-up: a group of runs at step 0, built from their configs (gradnoise.lm.training.trainer trains it).

`new_run` draws each replica's weights from its own seed and builds the optimizer,
each run's weight decay and noise, the GradScaler and each run's data streams;
`Hyper` holds the per-replica settings the step reads as (M,) tensors; `splits` cuts
the corpus as the config says.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import gradnoise
from gradnoise.errors import UserError
from gradnoise.lm import seeding
from gradnoise.lm.config import TrainConfig
from gradnoise.lm.data import corpora
from gradnoise.lm.model.gpt import GPT
from gradnoise.lm.training import replicas
from gradnoise.lm.training.progress import Clock
from gradnoise.lm.training.state import Replica, RunState


@dataclass
class Hyper:
    """The per-replica settings the step needs, as (M,) tensors on the device."""

    label_smoothing: torch.Tensor | float  # 0.0 when no replica smooths: no extra work
    embedding_noise_alpha: torch.Tensor | float  # a float (0.0: nothing drawn) unless the replicas differ
    grad_clip: torch.Tensor  # 0: that replica is not clipped
    clipping: bool  # any replica clips

    @classmethod
    def of(cls, cfgs: list[TrainConfig], device: torch.device) -> Hyper:
        smoothing = [c.label_smoothing for c in cfgs]
        alphas = [c.embedding_noise_alpha for c in cfgs]
        return cls(
            label_smoothing=torch.tensor(smoothing, device=device) if any(smoothing) else 0.0,
            # A plain run's α as a float: its draw is uniform(−b, b), as before groups existed.
            embedding_noise_alpha=(
                alphas[0] if len(alphas) == 1 else torch.tensor(alphas, device=device) if any(alphas) else 0.0
            ),
            grad_clip=torch.tensor([c.grad_clip for c in cfgs], device=device),
            clipping=any(c.grad_clip > 0 for c in cfgs),
        )


def new_run(cfgs: list[TrainConfig], vocab_size: int, device, dtype, dist_env, clock: Clock) -> RunState:
    """A group of runs at step 0: replica m's weights initialized from its seed alone
    (dropout then draws from the first run's seed + rank), the optimizer, each run's weight
    decay and noise, the GradScaler, and each run's data streams."""
    cfg = cfgs[0]
    model = GPT(
        cfg.model_config(vocab_size),
        replicas=len(cfgs),
        seeds=[c.seed for c in cfgs],
        dropout=[c.dropout for c in cfgs],
    ).to(device)
    torch.manual_seed(cfg.seed + dist_env.rank)
    optimizer = build_optimizer(model, cfg, device)
    noise = build_noise(optimizer, *cfgs)
    if any(c.weight_decay > 0 for c in cfgs):  # after the noise's hook: SGD decays after the noise
        replicas.WeightDecay(optimizer, [c.weight_decay for c in cfgs], decoupled=cfg.optimizer == "adamw")
    return RunState(
        model=model,
        optimizer=optimizer,
        noise=noise,
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        replicas=[
            Replica(
                batch_generator=torch.Generator().manual_seed(seeding.derive_seed(c.seed, "batches")),
                augment_generator=torch.Generator().manual_seed(seeding.derive_seed(c.seed, "augmentation")),
            )
            for c in cfgs
        ],
        dist_env=dist_env,
        device=device,
        clock=clock,
    )


def build_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum. Weight decay goes to the matrices and embeddings (param
    group 0, marked "decay"), not to LayerNorm weights or biases; it is applied per replica by
    replicas.WeightDecay, so the optimizer's own weight_decay is 0."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [  # a parameter is (replicas, …): a matrix has three dimensions
        {"params": [p for p in params if p.dim() >= 3], "weight_decay": 0.0, "decay": True},
        {"params": [p for p in params if p.dim() < 3], "weight_decay": 0.0, "decay": False},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def build_noise(
    optimizer: torch.optim.Optimizer, *cfgs: TrainConfig
) -> gradnoise.ReplicatedGradientNoise | None:
    """The configs' noise on `optimizer` (None when every run has noise=none): one per replica,
    a plain run being M = 1 (a run with noise=none gets σ = 0 there). Placed "after_clip" it hooks
    optimizer.step() before the update, "update" after it; "before_clip" the loop calls
    apply() itself."""
    parsed = [gradnoise.schedules.parse(c.noise) for c in cfgs]
    if all(schedule is None for schedule in parsed):
        return None
    lanes = [schedule or gradnoise.schedules.Constant(0.0) for schedule in parsed]
    seeds = [seeding.derive_seed(c.seed, "noise") for c in cfgs]
    modes = [c.noise_mode for c in cfgs]
    correlations = [c.noise_correlation for c in cfgs]
    return gradnoise.ReplicatedGradientNoise(
        optimizer,
        lanes,
        seed=seeds,
        mode=modes,
        attach=cfgs[0].noise_placement != "before_clip",
        correlation=correlations,
        placement="update" if cfgs[0].noise_placement == "update" else "gradient",
    )


def splits(corpus: corpora.Corpus, cfg: TrainConfig) -> dict:
    """The corpus's splits; of the train split only its first train_fraction."""
    splits = {name: corpus.splits[name] for name in ("train", "val", "test") if name in corpus.splits}
    splits["train"] = splits["train"][: int(len(splits["train"]) * cfg.train_fraction)]
    for name, tokens in splits.items():
        if len(tokens) <= cfg.block_size:
            fraction = f" (train_fraction={cfg.train_fraction})" if name == "train" else ""
            raise UserError(
                f"the {name} split of {cfg.dataset} has {len(tokens):,} tokens{fraction}, too few "
                f"for block_size={cfg.block_size}"
            )
    return splits

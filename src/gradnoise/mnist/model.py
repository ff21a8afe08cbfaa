"""A very deep MLP (Neelakantan et al. 2015, Section 4.1: 20 hidden layers of 50 ReLU
units, softmax output) with a leading replica dimension: M networks as one model.

Layer l of replica m computes h_l[m] = ReLU(h_{l−1}[m] · W_l[m]ᵀ + b_l[m]), for all
replicas in one `torch.baddbmm`; W_l is (M, out, in), b_l (M, out), activations
(M, B, features). The output layer is linear (its softmax is in the loss). Dropout,
when a replica has a rate, acts on every hidden layer's output, after the ReLU.

Initializations (`INITS`), applied to every weight matrix, output layer included, with
fan_in the matrix's input width; the biases always start at 0:

    simple        W ~ N(0, 0.1²)                                   (the paper's "Simple Init")
    random_walk   W ~ N(0, g²/fan_in), g = √2 · exp(1.2 / (max(fan_in, 6) − 2.4))
                  Sussillo & Abbott (2014), "Random walk initialization for training very
                  deep feedforward networks" (arXiv:1412.6558): the ReLU gain that keeps
                  the log of the back-propagated norm an unbiased random walk ("Good Init 1").
                  The gain and std = g/√fan_in as TensorFlow's early random-walk
                  initializer computes them (its num_inputs is our fan_in)
    he            W ~ N(0, 2/fan_in)        He et al. (2015) ("Good Init 2")
    zero          W = 0

Replica m's weights are drawn from a generator seeded by its own seed alone, layer by
layer, so that replica m of a group equals its run trained alone.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

from gradnoise.errors import UserError

INITS = ("simple", "random_walk", "he", "zero")
SIMPLE_STD = 0.1


def init_std(init: str, fan_in: int) -> float:
    """The standard deviation of a weight of a fan_in-input layer under `init` (docstring)."""
    if init == "simple":
        return SIMPLE_STD
    if init == "random_walk":
        gain = math.sqrt(2.0) * math.exp(1.2 / (max(fan_in, 6) - 2.4))
        return gain / math.sqrt(fan_in)
    if init == "he":
        return math.sqrt(2.0 / fan_in)
    if init == "zero":
        return 0.0
    raise UserError(f"init={init!r} is not allowed; use {', '.join(INITS)}")


class DeepMLP(nn.Module):
    """M replicas of an MLP inputs → depth × width ReLU → classes, as one module.

    inits[m] and seeds[m] give replica m's initialization (its generator draws layer after
    layer, W then nothing for b: biases are 0). forward takes (M, B, inputs) or (B, inputs)
    and returns logits (M, B, classes); `dropout` is an (M,) tensor of rates or None, and
    `generators` the replicas' own mask generators (see `drop`).
    """

    def __init__(
        self,
        inits: Sequence[str],
        seeds: Sequence[int],
        *,
        depth: int = 20,
        width: int = 50,
        inputs: int = 784,
        classes: int = 10,
    ):
        super().__init__()
        if len(inits) != len(seeds) or not inits:
            raise UserError(f"DeepMLP needs one init per seed, got {len(inits)} and {len(seeds)}")
        if depth < 1 or width < 1:
            raise UserError(f"depth={depth} and width={width} must both be ≥ 1")
        sizes = [inputs] + [width] * depth + [classes]
        self.replicas = len(seeds)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.zeros(self.replicas, out, fan_in)) for fan_in, out in itertools.pairwise(sizes)
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(self.replicas, out)) for out in sizes[1:])
        for m, (init, seed) in enumerate(zip(inits, seeds, strict=True)):
            self.initialize(m, init, seed)

    @torch.no_grad()
    def initialize(self, replica: int, init: str, seed: int) -> None:
        """Draw replica `replica`'s weights under `init` from a generator seeded with `seed`."""
        generator = torch.Generator().manual_seed(seed)
        for weight in self.weights:
            std = init_std(init, weight.shape[2])
            if std == 0.0:
                weight[replica].zero_()
            else:
                weight[replica].copy_(torch.randn(weight.shape[1:], generator=generator) * std)

    def forward(
        self,
        x: torch.Tensor,
        dropout: torch.Tensor | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> torch.Tensor:
        """x: (M, B, inputs), each replica its own batch, or (B, inputs), one batch for all
        (the test split: its first layer is then one matmul, without M copies of x)."""
        last = len(self.weights) - 1
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            if x.dim() == 2:
                replicas, out, fan_in = weight.shape
                shared = x @ weight.reshape(replicas * out, fan_in).T  # (B, M·out)
                x = shared.view(len(x), replicas, out).transpose(0, 1).contiguous() + bias.unsqueeze(1)
            else:
                x = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
            if layer < last:
                x = torch.relu(x)
                if dropout is not None and self.training:
                    x = drop(x, dropout, generators)
        return x


def drop(x: torch.Tensor, rates: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Inverted dropout with replica m's rate p[m]: x · mask / (1 − p[m]), mask ~ Bernoulli(1 − p[m]).

    Replica m's mask is drawn from generators[m] alone (None where p[m] = 0: it keeps x
    exactly), so a run's masks are the same whether it trains alone or in any group.
    """
    keep = 1.0 - rates.to(x.dtype)
    masks = [
        torch.ones(x.shape[1:], dtype=torch.bool, device=x.device)
        if generator is None
        else torch.rand(x.shape[1:], generator=generator, device=x.device) < keep[m]
        for m, generator in enumerate(generators)
    ]
    keep = keep.view(-1, 1, 1)
    return torch.where(torch.stack(masks), x / keep, torch.zeros_like(x))

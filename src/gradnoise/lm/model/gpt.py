"""A small GPT language model, nanoGPT style: read it top to bottom.

    tokens → token embeddings (+ NEFTune noise, in training) + position embeddings → dropout
           → n_layer × Block(x = x + Attn(LN(x)); x = x + MLP(LN(x)))
           → LN → logits = h · Wteᵀ   (output projection tied to the token embedding)

Attention is causal scaled dot-product attention (`F.scaled_dot_product_attention`,
flash / memory-efficient kernels where available). The MLP is Linear(4·d) → GELU →
Linear(d). Linear layers and LayerNorms carry no bias unless `bias=True`.

Replicas. `GPT(config, replicas=M)` is M independent models of one architecture in one
module: every weight has a leading replica dimension (nn.Linear's (out, in) weight is
(M, out, in) here), activations are (M, B, T, C), and each layer is one batched op over
the replicas (`torch.bmm`, an embedding gather with per-replica offsets, one attention
call over M·B sequences). Replica m computes exactly what a model of its own would; the
replicas share nothing but the kernel launches. A plain model is M = 1: it takes and
returns (B, T) tensors, and its saved weights (`weights_for_saving`) drop the replica
dimension, so they have nanoGPT's names and shapes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

from gradnoise.errors import UserError
from gradnoise.lm.model.weights import (
    CONFIG_FILE,
    SAVED_FILES,
    VOCAB_FILE,
    WEIGHTS_FILE,
    holds_only_saved_model,
    load_weights,
    weights_for_saving,
)
from gradnoise.lm.storage import atomic, files

INIT_STD = 0.02  # GPT-2's N(0, 0.02) for every matrix


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.n_embd % self.n_head:
            raise UserError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "the width must split evenly across the heads"
            )
        check_dropout(self.dropout)


def check_dropout(rate: float) -> None:
    if not 0.0 <= rate < 1.0:
        raise UserError(f"dropout={rate} must lie in [0, 1)")


def per_replica(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values (M, …) reshaped to broadcast over like (M, …, C) from the left: (M, 1, …, 1, …)."""
    return values.view(values.shape[0], *([1] * (like.dim() - values.dim())), *values.shape[1:])


class Linear(nn.Module):
    """y[m] = x[m] · W[m]ᵀ + b[m]: an nn.Linear per replica, as one batched matmul.

    weight (M, out, in) and bias (M, out) are nn.Linear's with a replica dimension in front.
    """

    def __init__(self, replicas: int, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(replicas, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(replicas, out_features)) if bias else None

    def forward(self, x):
        """x (M, …, in) → (M, …, out)."""
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        if self.bias is None:
            y = torch.bmm(rows, self.weight.transpose(1, 2))
        else:
            y = torch.baddbmm(self.bias.unsqueeze(1), rows, self.weight.transpose(1, 2))
        return y.view(*x.shape[:-1], y.shape[-1])


class Embedding(nn.Module):
    """weight (M, V, C); idx (M, …) → (M, …, C): replica m looks its tokens up in weight[m].

    One gather over the replicas' tables laid end to end (token i of replica m is row m·V + i).
    """

    def __init__(self, replicas: int, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(replicas, num_embeddings, embedding_dim))

    def forward(self, idx):
        replicas, rows, width = self.weight.shape
        offsets = torch.arange(replicas, device=idx.device) * rows
        return F.embedding(idx + per_replica(offsets, idx), self.weight.reshape(replicas * rows, width))


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias and a weight (and bias) per replica:
    y[m] = (x[m] − mean) / √(var + 1e-5) · w[m] + b[m]."""

    def __init__(self, replicas: int, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(replicas, ndim))
        self.bias = nn.Parameter(torch.zeros(replicas, ndim)) if bias else None

    def forward(self, x):
        y = F.layer_norm(x, x.shape[-1:], None, None, 1e-5) * per_replica(self.weight, x)
        return y if self.bias is None else y + per_replica(self.bias, x)


class Dropout(nn.Module):
    """Dropout with its own rate p[m] per replica: x · mask / (1 − p[m]), mask ~ Bernoulli(1 − p[m]).

    Equal rates (a plain model's one rate among them) take F.dropout itself, which draws the
    same masks a model alone would; the identity in eval mode or when every rate is 0.
    """

    def __init__(self, rates: Sequence[float]):
        super().__init__()
        self.rates = tuple(float(rate) for rate in rates)

    def forward(self, x):
        if not self.training or not any(self.rates):
            return x
        if len(set(self.rates)) == 1:
            return F.dropout(x, self.rates[0], training=True)
        keep = torch.tensor([1.0 - rate for rate in self.rates], device=x.device, dtype=x.dtype)
        keep = per_replica(keep, x)
        return x * torch.bernoulli(keep.expand(x.shape)) / keep


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, rates: Sequence[float]):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = Linear(len(rates), config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(len(rates), config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = Dropout(rates)
        self.resid_dropout = Dropout(rates)

    def forward(self, x):
        M, B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=-1)
        # (M, B, T, C) → (M·B, n_head, T, head_dim): one attention call for every replica
        q, k, v = (t.reshape(M * B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        rates = self.attn_dropout.rates
        if not self.training or len(set(rates)) == 1:
            dropout_p = rates[0] if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            # Per-replica dropout rates on the attention weights: SDPA takes one rate only.
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = F.softmax(att.masked_fill(~causal, float("-inf")), dim=-1)
            y = self.attn_dropout(att.view(M, B, *att.shape[1:])).view_as(att) @ v
        y = y.transpose(1, 2).reshape(M, B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, rates: Sequence[float]):
        super().__init__()
        self.c_fc = Linear(len(rates), config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(len(rates), 4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(rates)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, rates: Sequence[float]):
        super().__init__()
        self.ln_1 = LayerNorm(len(rates), config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, rates)
        self.ln_2 = LayerNorm(len(rates), config.n_embd, bias=config.bias)
        self.mlp = MLP(config, rates)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The GPT; with replicas=M, M of them (see the module docstring).

    seeds: replica m's weights are drawn under torch.manual_seed(seeds[m]), exactly as a
        model of its own built with that seed (default: from the global RNG as it stands).
    dropout: replica m's dropout rate (default: config.dropout for every replica).
    """

    def __init__(
        self,
        config: GPTConfig,
        replicas: int = 1,
        *,
        seeds: Sequence[int] | None = None,
        dropout: Sequence[float] | None = None,
    ):
        super().__init__()
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise UserError(f"replicas={replicas!r} must be a positive integer")
        rates = tuple(dropout) if dropout is not None else (config.dropout,) * replicas
        for name, values in (("seeds", seeds), ("dropout", rates)):
            if values is not None and len(values) != replicas:
                raise UserError(
                    f"{name} has {len(values)} values for replicas={replicas}; give one per replica"
                )
        for rate in rates:
            check_dropout(rate)
        self.config = config
        self.replicas = replicas
        self.transformer = nn.ModuleDict(
            dict(
                wte=Embedding(replicas, config.vocab_size, config.n_embd),
                wpe=Embedding(replicas, config.block_size, config.n_embd),
                drop=Dropout(rates),
                h=nn.ModuleList([Block(config, rates) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(replicas, config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = Linear(replicas, config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): one matrix embeds tokens and scores them.
        self.transformer.wte.weight = self.lm_head.weight
        for replica in range(replicas):
            if seeds is not None:
                torch.manual_seed(seeds[replica])
            self._init_weights(replica)

    @torch.no_grad()
    def _init_weights(self, replica: int) -> None:
        """GPT-2 init of one replica: matrices N(0, 0.02), residual projections N(0, 0.02/√(2·n_layer))
        so the residual stream's variance does not grow with depth; LayerNorms 1, biases 0
        (set at construction). Drawn in parameter order, the replica's alone."""
        for name, p in self.named_parameters():
            if p.dim() == 3:  # (replicas, rows, columns): a matrix of each replica
                residual = name.endswith("c_proj.weight")
                std = INIT_STD / math.sqrt(2 * self.config.n_layer) if residual else INIT_STD
                p[replica].normal_(mean=0.0, std=std)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count of all replicas; position embeddings excluded by default (as nanoGPT)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(
        self,
        idx,
        targets=None,
        label_smoothing: float | torch.Tensor = 0.0,
        embedding_noise_alpha: float | torch.Tensor = 0.0,
    ):
        """idx (M, B, T) int64 → (logits, loss); a plain model (M = 1) also takes idx (B, T)
        and then returns logits and loss without the replica dimension.

        With targets: logits (M, B, T, vocab) and each replica's mean cross-entropy in nats,
        loss (M,), optionally label-smoothed with ε (a float, or one per replica: (M,)):

            loss[m] = (1 − ε[m]) · mean(−log p(target)) + ε[m] · mean over tokens and vocab (−log p)

        (F.cross_entropy's label_smoothing: target distribution (1 − ε)·onehot + ε/vocab).
        Without targets: logits of the last position only, (M, B, 1, vocab), for generation.

        embedding_noise_alpha = α > 0 (NEFTune, Jain et al. 2024; a float, or one per
        replica: (M,)), in training mode only: replica m's token embeddings get
        u·α[m]/√(L·d), u ~ Uniform(−1, 1) per element, L = T the sequence length and
        d = n_embd; drawn from the global torch RNG, as dropout is (one draw for all
        replicas; a replica with α = 0 gets exactly none of it).
        """
        single = idx.dim() == 2
        if single:
            if self.replicas != 1:
                raise UserError(f"a model of {self.replicas} replicas takes idx of shape (M, B, T)")
            idx = idx.unsqueeze(0)
            targets = None if targets is None else targets.unsqueeze(0)
        replicas, _, seq_len = idx.shape
        if replicas != self.replicas:
            raise UserError(f"idx has {replicas} replicas, the model {self.replicas}")
        if seq_len > self.config.block_size:
            raise UserError(
                f"sequence length {seq_len} exceeds the model's block_size={self.config.block_size}"
            )
        positions = self.transformer.wpe.weight[:, :seq_len].unsqueeze(1)  # (M, 1, T, C)
        tokens = self.transformer.wte(idx)
        if self.training and (isinstance(embedding_noise_alpha, torch.Tensor) or embedding_noise_alpha > 0):
            bound = embedding_noise_alpha / math.sqrt(seq_len * self.config.n_embd)
            if isinstance(bound, torch.Tensor):  # (M,): one per replica
                noise = torch.empty_like(tokens).uniform_(-1, 1) * bound.to(tokens.dtype).view(-1, 1, 1, 1)
            else:
                noise = torch.empty_like(tokens).uniform_(-bound, bound)
            tokens = tokens + noise
        x = self.transformer.drop(tokens + positions)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)

        if targets is None:
            logits, loss = self.lm_head(x[:, :, [-1], :]), None
        else:
            logits = self.lm_head(x)
            loss = cross_entropy(logits, targets, label_smoothing)
        if single:
            return logits[0], None if loss is None else loss[0]
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ):
        """Append max_new_tokens sampled tokens to idx (B, T).

        p(next) = softmax(logits / temperature), restricted to the top_k most likely
        tokens when top_k is given; temperature 0 picks the argmax. Sampling draws
        from `generator` only, so a seeded generator gives the same text every time.
        """
        if not (math.isfinite(temperature) and temperature >= 0):
            raise UserError(f"temperature={temperature} is not allowed; it must be a finite number ≥ 0")
        if top_k is not None and top_k < 1:
            raise UserError(f"top_k={top_k} must be a positive integer (or None for no cut)")
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size :]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float()
            if not torch.isfinite(logits).all():
                raise UserError(
                    "the model's next-character scores are not finite (its weights are too large: "
                    "the run that trained them diverged); there is no text to sample"
                )
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits[logits < kth] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                # Draw on the generator's device, so CPU generators work for CUDA models.
                gen_device = generator.device if generator is not None else probs.device
                idx_next = torch.multinomial(probs.to(gen_device), 1, generator=generator)
                idx_next = idx_next.to(idx.device)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    def save_pretrained(self, directory, vocab: list[str] | str) -> None:
        """Write SAVED_FILES (config.json, model.safetensors, vocab.json) to `directory` atomically.

        `directory` is new, empty, or an earlier save_pretrained output (which is replaced);
        anything else is left untouched and is a UserError. `vocab` is the corpus's
        vocabulary as its metadata records it (a list of characters, or "bytes");
        from_pretrained hands it back unchanged.
        """

        def write(tmp: Path) -> None:
            (tmp / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
            (tmp / VOCAB_FILE).write_text(json.dumps(vocab) + "\n")
            files.write_weights(weights_for_saving(self), tmp / WEIGHTS_FILE)

        if not atomic.build_directory(Path(directory), write, replace=holds_only_saved_model(directory)):
            raise UserError(f"{directory} exists and is not an earlier export; not replacing it")

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu") -> GPT:
        """Load a model written by save_pretrained (its vocabulary: `read_vocab`)."""
        directory = Path(directory)
        missing = [name for name in SAVED_FILES if not (directory / name).is_file()]
        if missing:
            raise UserError(
                f"{directory} is not a saved model: missing {', '.join(missing)} "
                f"(expected {', '.join(SAVED_FILES)})"
            )
        model = cls(gpt_config_from_dict(files.read_json(directory / CONFIG_FILE, "model config")))
        load_weights(model, files.read_weights(directory / WEIGHTS_FILE), f"the weights in {directory}")
        return model.to(map_location)


def gpt_config_from_dict(values: dict) -> GPTConfig:
    if not isinstance(values, dict):
        raise UserError(f"a model config must be a JSON object, got {values!r:.80}")
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown model config keys {unknown}; allowed: {sorted(known)}")
    for name, value in values.items():
        kind = type(getattr(GPTConfig, name))  # the default's type: int, float or bool
        if not (type(value) is kind or (kind is float and type(value) is int)):
            allowed = {int: "an integer", float: "a number", bool: "true or false"}[kind]
            raise UserError(f"model config {name}={value!r} is not allowed; it must be {allowed}")
    return GPTConfig(**values)


def cross_entropy(logits, targets, label_smoothing: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Each replica's mean cross-entropy (M,) of logits (M, …, vocab), label-smoothed with ε
    (a float or (M,)): (1 − ε) · mean(−log p(target)) + ε · mean(−log p), computed in fp32."""
    replicas, vocab = logits.shape[0], logits.shape[-1]
    logits = logits.float()
    nll = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), reduction="none")
    loss = nll.view(replicas, -1).mean(dim=1)
    if isinstance(label_smoothing, torch.Tensor) or label_smoothing > 0:
        uniform = -F.log_softmax(logits, dim=-1).mean(dim=-1).view(replicas, -1).mean(dim=1)
        loss = (1 - label_smoothing) * loss + label_smoothing * uniform
    return loss

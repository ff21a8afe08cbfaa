"""A small GPT language model, nanoGPT style: read it top to bottom.

    tokens → token embeddings (+ NEFTune noise, in training) + position embeddings → dropout
           → n_layer × Block(x = x + Attn(LN(x)); x = x + MLP(LN(x)))
           → LN → logits = h · Wteᵀ   (output projection tied to the token embedding)

Attention is causal scaled dot-product attention (`F.scaled_dot_product_attention`,
flash / memory-efficient kernels where available). The MLP is Linear(4·d) → GELU →
Linear(d). Linear layers and LayerNorms carry no bias unless `bias=True`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

from gradnoise.errors import UserError
from gradnoise.lm import atomic, files

# A saved model (save_pretrained): its GPTConfig, its weights and its vocabulary.
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
VOCAB_FILE = "vocab.json"
SAVED_FILES = (CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE)


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
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout={self.dropout} must lie in [0, 1)")


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch's has no bias=False before 2.1)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) → (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): one matrix embeds tokens and scores them.
        self.transformer.wte.weight = self.lm_head.weight

        # GPT-2 init: N(0, 0.02), residual projections scaled by 1/√(2·n_layer)
        # so the residual stream's variance does not grow with depth.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings excluded by default (as nanoGPT)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, label_smoothing: float = 0.0, embedding_noise_alpha: float = 0.0):
        """idx (B, T) int64 → (logits, loss).

        With targets: logits (B, T, vocab) and the mean cross-entropy in nats,
        optionally label-smoothed (target distribution (1-ε)·onehot + ε/vocab).
        Without: logits of the last position only, (B, 1, vocab), for generation.

        embedding_noise_alpha = α > 0 (NEFTune, Jain et al. 2024), in training mode
        only: the token embeddings get u·α/√(L·d), u ~ Uniform(−1, 1) per element,
        L = T the sequence length and d = n_embd; drawn from the global torch RNG,
        as dropout is.
        """
        seq_len = idx.size(1)
        if seq_len > self.config.block_size:
            raise UserError(
                f"sequence length {seq_len} exceeds the model's block_size={self.config.block_size}"
            )
        pos = torch.arange(seq_len, dtype=torch.long, device=idx.device)
        tokens = self.transformer.wte(idx)
        if self.training and embedding_noise_alpha > 0:
            bound = embedding_noise_alpha / math.sqrt(seq_len * self.config.n_embd)
            tokens = tokens + torch.empty_like(tokens).uniform_(-bound, bound)
        x = self.transformer.drop(tokens + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)

        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)).float(),
            targets.reshape(-1),
            label_smoothing=label_smoothing,
        )
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


def is_saved_model(directory) -> bool:
    """Whether `directory` holds what save_pretrained writes."""
    return all((Path(directory) / name).is_file() for name in SAVED_FILES)


def holds_only_saved_model(directory) -> bool:
    """Whether `directory` holds what save_pretrained writes and nothing else."""
    directory = Path(directory)
    return (
        directory.is_dir()
        and sorted(p.name for p in directory.iterdir()) == sorted(SAVED_FILES)
        and is_saved_model(directory)
    )


def read_vocab(directory) -> list[str] | str:
    """The vocabulary save_pretrained stored beside the weights."""
    return files.read_json(Path(directory) / VOCAB_FILE, "vocabulary")


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


def weights_for_saving(model: GPT) -> dict[str, torch.Tensor]:
    """state_dict without the tied duplicate (safetensors refuses shared storage)."""
    state = model.state_dict()
    state.pop("lm_head.weight")
    return {k: v.detach().contiguous() for k, v in state.items()}


def load_weights(model: GPT, state: dict[str, torch.Tensor], source: str = "the weights") -> None:
    """Load what weights_for_saving gives into `model`; UserError if a name, shape or dtype differs."""
    files.check_tensors(state, weights_for_saving(model), source)
    model.load_state_dict({**state, "lm_head.weight": state["transformer.wte.weight"]})


def sample_text(
    model: GPT,
    vocab: list[str] | str,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """prompt + max_new_tokens generated characters; the same seed gives the same text."""
    from gradnoise.lm.data import Corpus

    if not prompt:
        raise UserError("the prompt is empty; give at least one character, e.g. a newline")
    codec = Corpus.of_vocabulary(vocab)
    device = next(model.parameters()).device
    idx = torch.from_numpy(codec.encode(prompt).astype("int64"))[None].to(device)
    model.eval()
    out = model.generate(idx, max_new_tokens, temperature, top_k, torch.Generator().manual_seed(seed))
    return codec.decode(out[0].cpu())

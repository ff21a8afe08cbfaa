"""Training configuration: one flat dataclass of plain values, and its presets.

    overrides = parse_overrides(["lr=3e-4", "noise=exp:sigma0=0.1,gamma=0.99"])
    cfg = resolve_config("shakespeare_char", "paper", overrides)

Presets (the registry: PRESETS):
    paper  the seed paper's setup, which is the AI-Scientist nanoGPT template's (see
           docs/design.md): GPT 6×6×384, block 256, dropout 0.2, AdamW β=(0.9, 0.99),
           weight decay 0.1, grad clip 1.0, linear warmup + cosine decay; per-dataset
           batch, lr and length.
    tiny   a 4×4×128 GPT with block 64 that a 2-core CPU trains on shakespeare_char to
           a val loss below 2.0 (≈ 1.93) in about a minute.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from gradnoise import schedules
from gradnoise.errors import UserError
from gradnoise.lm.data.sources import CORPORA
from gradnoise.lm.devices import DTYPES, check_device_name
from gradnoise.lm.model.gpt import GPTConfig
from gradnoise.lm.storage import files

DATASETS = tuple(CORPORA)
#: The largest seed: torch.manual_seed and SQLite's INTEGER take 64-bit signed values.
MAX_SEED = 2**63 - 1
CHOICES = {
    "dataset": DATASETS,
    "optimizer": ("adamw", "sgd"),
    "noise_mode": ("absolute", "relative"),
    "noise_correlation": ("independent", "anticorrelated"),
    "noise_placement": ("after_clip", "before_clip", "update"),
    "dtype": ("auto", *DTYPES),
    "compile": ("auto", True, False),
}


def _key(default, meaning: str):
    """A TrainConfig field and its one-line meaning (what `gradnoise train --help` lists)."""
    return dataclasses.field(default=default, metadata={"help": meaning})


@dataclass
class TrainConfig:
    # data and seed
    dataset: str = _key("shakespeare_char", "the corpus: shakespeare_char, enwik8 or text8")
    seed: int = _key(0, "seed of the init, batches, dropout and noise, in [0, 2**63 - 1]")
    train_fraction: float = _key(1.0, "train on this first fraction of the train split (val, test: whole)")
    # model
    n_layer: int = _key(4, "transformer blocks")
    n_head: int = _key(4, "attention heads per block")
    n_embd: int = _key(128, "width of the residual stream (divisible by n_head)")
    block_size: int = _key(64, "context length in tokens")
    dropout: float = _key(0.0, "dropout probability, in [0, 1)")
    bias: bool = _key(False, "biases in the Linear layers and LayerNorms")
    # optimization; the global batch is batch_size · grad_accum · world_size sequences
    batch_size: int = _key(12, "sequences per micro-batch and process")
    grad_accum: int = _key(1, "micro-batches per optimizer step")
    max_iters: int = _key(1000, "optimizer steps")
    optimizer: str = _key("adamw", "adamw or sgd")
    lr: float = _key(1e-3, "peak learning rate (after warmup)")
    min_lr: float = _key(1e-4, "learning rate at the end of the cosine decay, in [0, lr]")
    warmup_iters: int = _key(50, "steps of linear warmup")
    lr_decay_iters: int | None = _key(None, "step at which the cosine decay ends (none: max_iters)")
    weight_decay: float = _key(0.1, "AdamW/SGD weight decay of the matrices and embeddings")
    beta1: float = _key(0.9, "AdamW β1")
    beta2: float = _key(0.99, "AdamW β2")
    momentum: float = _key(0.9, "SGD momentum")
    grad_clip: float = _key(1.0, "clip the global gradient norm to this (0: no clipping)")
    # gradient noise (a gradnoise.schedules spec) and the other regularizers
    noise: str = _key("none", "gradient noise schedule, e.g. exp:sigma0=0.1,gamma=0.99 (gradnoise.schedules)")
    noise_mode: str = _key("absolute", "absolute: σ_t is the noise's std; relative: σ_t · RMS(g)")
    noise_correlation: str = _key(
        "independent", "independent: σ_t·ε_t; anticorrelated: σ_t·ε_t − σ_{t−1}·ε_{t−1} (Anti-PGD)"
    )
    noise_placement: str = _key(
        "after_clip", "after_clip, before_clip (on the gradient) or update (lr_t·σ_t·ε on the weights)"
    )
    label_smoothing: float = _key(0.0, "label smoothing ε of the training loss, in [0, 1)")
    char_substitution: float = _key(0.0, "P(an input character is replaced by a uniform random token)")
    embedding_noise_alpha: float = _key(
        0.0, "NEFTune's α: Uniform(±α/√(L·d)) noise on the token embeddings in training (0: off)"
    )
    # evaluation, logging, checkpoints
    eval_interval: int = _key(250, "steps between evaluations")
    eval_iters: int = _key(50, "batches per split in each evaluation")
    log_interval: int = _key(10, "steps between training log lines")
    final_eval: bool = _key(True, "exact loss over the whole val (and test) split at the end")
    checkpoint_interval: int = _key(500, "steps between checkpoints (0: only at the end and on SIGTERM)")
    tensorboard: bool = _key(False, "also log to TensorBoard (RUN_DIR/tensorboard)")
    wandb: bool = _key(False, "also log to Weights & Biases")
    # hardware
    device: str = _key("auto", "auto, cpu, cuda or cuda:N (auto: cuda if there is one)")
    dtype: str = _key(
        "auto", "auto (bfloat16 on CUDA when supported, else float32), float32, bfloat16, float16"
    )
    compile: str | bool = _key("auto", "torch.compile the model: auto (on CUDA), true or false")

    def __post_init__(self):
        hints = typing.get_type_hints(TrainConfig)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            setattr(self, field.name, _checked_type(field.name, value, hints[field.name]))
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise UserError(
                    f"{name}={getattr(self, name)!r} is not allowed; allowed: {_listing(allowed)}"
                )
        for name, (ok, allowed) in _RULES.items():
            value = getattr(self, name)
            if not ok(value, self):
                raise UserError(f"{name}={value!r} is not allowed; {name} must be {allowed}")
        check_device_name(self.device)
        self.model_config(vocab_size=1)  # the model's own checks (n_embd divisible by n_head)
        schedule = schedules.parse(self.noise)
        # The canonical spec, so configs, logs and reports name a schedule one way.
        self.noise = "none" if schedule is None else schedule.spec

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(
            vocab_size=vocab_size,
            block_size=self.block_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            dropout=self.dropout,
            bias=self.bias,
        )

    @property
    def decay_iters(self) -> int:
        return self.max_iters if self.lr_decay_iters is None else self.lr_decay_iters

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        if not isinstance(values, dict):
            raise UserError(f"a training config must be a JSON object, got {values!r}")
        for key in values:
            _check_key(key)
        return cls(**values)

    def replace(self, **changes) -> TrainConfig:
        for key in changes:
            _check_key(key)
        return dataclasses.replace(self, **changes)


#: The settings each replica of a batched group has for itself (see gradnoise.lm.training.group);
#: every other key is shared by the group: architecture, optimizer and learning-rate
#: schedule, batch, iterations, evaluation, device, dtype, compile, noise placement.
#: The placement is shared because it is where in the step the noise goes (the loop's
#: apply() before clipping, or the optimizer's hooks before or after its update), and a
#: group takes each step once for all its replicas.
PER_REPLICA_KEYS = (
    "seed",
    "noise",
    "noise_mode",
    "noise_correlation",
    "dropout",
    "weight_decay",
    "label_smoothing",
    "char_substitution",
    "embedding_noise_alpha",
    "grad_clip",
)

#: Config keys added after runs were stored, with the value that computes what runs did
#: before the key existed: a stored config without the key means this value. Run ids
#: (gradnoise.study.spec.run_id) leave a key at this value out, so stored studies keep
#: their ids, and a checkpoint written before the key existed resumes.
LATER_KEYS = {"train_fraction": 1.0, "noise_correlation": "independent", "embedding_noise_alpha": 0.0}


def group_key(cfg: TrainConfig) -> str:
    """Runs with equal keys may train together as one batched model: the config without
    its per-replica settings, as canonical JSON."""
    shared = {k: v for k, v in cfg.to_dict().items() if k not in PER_REPLICA_KEYS}
    return json.dumps(shared, sort_keys=True, separators=(",", ":"))


def _at_least(low: int):
    return lambda value, cfg: value >= low


def _unit(value, cfg) -> bool:
    return 0 <= value < 1


# field → (check(value, cfg), what is allowed); types and CHOICES are checked before.
_RULES = {
    "seed": (lambda v, cfg: 0 <= v <= MAX_SEED, "an integer in [0, 2**63 - 1]"),
    **{
        name: (_at_least(1), "an integer ≥ 1")
        for name in (
            "n_layer",
            "n_head",
            "n_embd",
            "block_size",
            "batch_size",
            "grad_accum",
            "eval_interval",
            "eval_iters",
            "log_interval",
        )
    },
    **{
        name: (_at_least(0), "an integer ≥ 0")
        for name in ("max_iters", "warmup_iters", "checkpoint_interval")
    },
    "lr_decay_iters": (lambda v, cfg: v is None or v >= 0, "an integer ≥ 0, or none (= max_iters)"),
    "lr": (lambda v, cfg: v > 0, "a number > 0"),
    "min_lr": (lambda v, cfg: 0 <= v <= cfg.lr, "a number in [0, lr]"),
    "weight_decay": (lambda v, cfg: v >= 0, "a number ≥ 0"),
    "grad_clip": (lambda v, cfg: v >= 0, "a number ≥ 0 (0 turns clipping off)"),
    **{
        name: (_unit, "a number in [0, 1)")
        for name in ("beta1", "beta2", "momentum", "dropout", "label_smoothing")
    },
    "char_substitution": (lambda v, cfg: 0 <= v <= 1, "a probability in [0, 1]"),
    "embedding_noise_alpha": (lambda v, cfg: v >= 0, "a number ≥ 0 (0 turns it off)"),
    "train_fraction": (lambda v, cfg: 0 < v <= 1, "a fraction in (0, 1]"),
}


def _paper(dataset: str) -> dict:
    """The seed paper's setup (the AI-Scientist nanoGPT template's values), per dataset."""
    common = dict(
        n_layer=6,
        n_head=6,
        n_embd=384,
        block_size=256,
        dropout=0.2,
        bias=False,
        optimizer="adamw",
        beta1=0.9,
        beta2=0.99,
        weight_decay=0.1,
        grad_clip=1.0,
        grad_accum=1,
        eval_iters=200,
        log_interval=10,
    )
    if dataset == "shakespeare_char":
        return common | dict(
            batch_size=64,
            lr=1e-3,
            min_lr=1e-4,
            warmup_iters=100,
            max_iters=5000,
            lr_decay_iters=5000,
            eval_interval=250,
            checkpoint_interval=1000,
        )
    return common | dict(
        batch_size=32,
        lr=5e-4,
        min_lr=5e-5,
        warmup_iters=200,
        max_iters=100_000,
        lr_decay_iters=100_000,
        eval_interval=1000,
        log_interval=100,
        checkpoint_interval=5000,
    )


def _tiny(dataset: str) -> dict:
    """nanoGPT's CPU recipe with a 3× learning rate and half the steps: on 2 cores
    (Xeon, 4 runs side by side) shakespeare_char reaches val < 2.0 at step 800 after
    ~32 s of training and ends at ≈ 1.93 after 1,000 steps (~60 s including evals)."""
    return dict(
        n_layer=4,
        n_head=4,
        n_embd=128,
        block_size=64,
        dropout=0.0,
        batch_size=12,
        lr=3e-3,
        min_lr=1e-4,
        warmup_iters=50,
        max_iters=1000,
        lr_decay_iters=None,
        eval_interval=250,
        eval_iters=50,
        log_interval=10,
        checkpoint_interval=500,
    )


PRESETS = {"paper": _paper, "tiny": _tiny}


def resolve_config(dataset: str, preset: str = "tiny", overrides: dict | None = None) -> TrainConfig:
    """The preset's values for `dataset`, then `overrides` (already typed: see parse_overrides)."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; allowed: {_listing(PRESETS)}")
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; allowed: {_listing(DATASETS)}")
    overrides = dict(overrides or {})
    for key in overrides:
        _check_key(key)
    return TrainConfig(**(dict(dataset=dataset) | PRESETS[preset](dataset) | overrides))


def read_config(path: Path) -> TrainConfig:
    """The TrainConfig in a JSON file (a run's config.json); UserError if unreadable or invalid."""
    try:
        return TrainConfig.from_dict(files.read_json(path, "config file"))
    except UserError as error:
        if str(path) in str(error):
            raise
        raise UserError(f"the config file {path}: {error}") from None


def describe_keys(preset: str = "tiny", dataset: str = "shakespeare_char") -> str:
    """Every config key, its value in `preset` for `dataset`, and its meaning: one per line."""
    values = resolve_config(dataset, preset).to_dict()
    shown = {name: _listing([value]) if value is not None else "none" for name, value in values.items()}
    width = max(map(len, shown)) + 2
    value_width = max(map(len, shown.values())) + 2
    return "\n".join(
        f"  {field.name:<{width}}{shown[field.name]:<{value_width}}{field.metadata['help']}"
        for field in dataclasses.fields(TrainConfig)
    )


def parse_overrides(items: list[str]) -> dict:
    """["key=value", ...] → {key: value typed as TrainConfig's field}.

    Booleans: true/false (also 1/0, yes/no, on/off); integers also as 1e5;
    "none" for optional values; `compile` takes auto, true or false.
    """
    hints = typing.get_type_hints(TrainConfig)
    overrides, given = {}, {}
    for item in items:
        key, equals, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not equals:
            raise UserError(f"override {item!r} is not key=value; e.g. lr=3e-4 or noise=none")
        _check_key(key)
        if key in given:
            raise UserError(f"{key} is given twice ({given[key]}, then {item}); give each key once")
        given[key] = item
        overrides[key] = _parse_value(key, text.strip(), hints[key])
    return overrides


# --- typing and messages --------------------------------------------------------

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _type_options(annotation) -> tuple:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def _type_name(annotation) -> str:
    return " or ".join("none" if t is type(None) else t.__name__ for t in _type_options(annotation))


def _parse_value(key: str, text: str, annotation):
    options = _type_options(annotation)
    lowered = text.lower()
    if type(None) in options and lowered in ("none", "null"):
        return None
    if bool in options and lowered in _TRUE + _FALSE:
        return lowered in _TRUE
    if int in options:
        try:
            return int(text)
        except ValueError:
            number = _float_or_none(text)
            if number is not None and number.is_integer():
                return int(number)
    if float in options:
        number = _float_or_none(text)
        if number is not None:
            return number
    if str in options:
        return text
    raise UserError(f"{key}={text!r} is not a valid {_type_name(annotation)}")


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _checked_type(name: str, value, annotation):
    """value if it has the field's type (an int where a float is wanted becomes a float)."""
    options = _type_options(annotation)
    if value is None and type(None) in options:
        return value
    if isinstance(value, bool):
        if bool in options:
            return value
    elif isinstance(value, int) and int in options:
        return value
    elif isinstance(value, (int, float)) and float in options:
        if math.isfinite(value):
            return float(value)
    elif isinstance(value, str) and str in options:
        return value
    raise UserError(f"{name}={value!r} is not a valid {_type_name(annotation)}")


def _check_key(key: str) -> None:
    known = [field.name for field in dataclasses.fields(TrainConfig)]
    if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"unknown config key {key!r}{hint}; allowed keys: {', '.join(known)}")


def _listing(allowed) -> str:
    return ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in allowed)

"""The training config and the trainer: presets, overrides, learning, pairing of seeds,
exact resume, SIGTERM, divergence, outputs, sampling and export through the CLI."""

import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from gradnoise.cli import main
from gradnoise.errors import UserError
from gradnoise.lm.config import TrainConfig, parse_overrides, resolve_config
from gradnoise.lm.data import corpora
from gradnoise.lm.storage import checkpoint
from gradnoise.lm.storage.runlog import FINAL_METRICS
from gradnoise.lm.training import trained
from gradnoise.lm.training.setup import build_noise, build_optimizer
from gradnoise.lm.training.step import learning_rate
from gradnoise.lm.training.trainer import train
from helpers import configs

pytestmark = pytest.mark.usefixtures("one_thread")

# A model small enough that a step takes milliseconds on one CPU thread.
SMALL = configs.two_layers(8, 30, eval_interval=10, log_interval=5, checkpoint_interval=10, eval_iters=3)
SMALL |= dict(warmup_iters=5, dropout=0.1, lr=1e-3, min_lr=1e-4)
LOSS_KEYS = (
    "steps",
    "train_loss",
    "train_loss_last_batch",
    "train_loss_window",
    "val_loss",
    "best_val_loss",
    "best_val_step",
    "final_sigma",
)


def small(**changes) -> TrainConfig:
    return resolve_config("shakespeare_char", "tiny", {**SMALL, **changes})


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in ("time_s", "tokens_per_s")} for r in records]


def assert_resumed_as_whole(whole: dict, resumed: dict, whole_dir: Path, parts_dir: Path, *, weights=True):
    """The run stopped and resumed in parts_dir ended as the uninterrupted one in whole_dir:
    the same final losses, the same log (no duplicates), and (weights) the same last checkpoint."""
    for key in LOSS_KEYS:
        assert resumed["finals"][key] == whole["finals"][key], key
    assert without_timing(read_log(parts_dir)) == without_timing(read_log(whole_dir))
    if weights:
        final_whole, _ = checkpoint.load(checkpoint.latest(whole_dir))
        final_parts, _ = checkpoint.load(checkpoint.latest(parts_dir))
        for key, value in final_whole.items():
            assert torch.equal(final_parts[key], value), key


# --- config -------------------------------------------------------------------------


def test_paper_presets_are_the_papers_setup():
    # The seed paper's setup (docs/design.md): the AI-Scientist nanoGPT template's values.
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
    )
    expected = {
        "shakespeare_char": dict(
            batch_size=64,
            lr=1e-3,
            min_lr=1e-4,
            warmup_iters=100,
            max_iters=5000,
            eval_interval=250,
            eval_iters=200,
        ),
        "enwik8": dict(
            batch_size=32, lr=5e-4, min_lr=5e-5, warmup_iters=200, max_iters=100_000, eval_interval=1000
        ),
        "text8": dict(
            batch_size=32, lr=5e-4, min_lr=5e-5, warmup_iters=200, max_iters=100_000, eval_interval=1000
        ),
    }
    for dataset, values in expected.items():
        cfg = resolve_config(dataset, "paper")
        assert cfg.dataset == dataset
        for key, value in {**common, **values}.items():
            assert getattr(cfg, key) == value, (dataset, key)
        assert cfg.decay_iters == cfg.max_iters  # cosine decay over the whole run
        assert cfg.grad_accum == 1 and cfg.noise == "none" and cfg.label_smoothing == 0


def test_tiny_preset_is_tiny():
    cfg = resolve_config("shakespeare_char")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (4, 4, 128, 64)
    assert cfg.dropout == 0.0


def test_overrides_are_typed_by_field():
    overrides = parse_overrides(
        [
            "lr=3e-4",
            "max_iters=1e4",
            "bias=true",
            "final_eval=no",
            "lr_decay_iters=none",
            "compile=false",
            "noise=exp:sigma0=0.1,gamma=0.99",
            "optimizer=sgd",
            "seed=7",
        ]
    )
    assert overrides == {
        "lr": 3e-4,
        "max_iters": 10_000,
        "bias": True,
        "final_eval": False,
        "lr_decay_iters": None,
        "compile": False,
        "noise": "exp:sigma0=0.1,gamma=0.99",
        "optimizer": "sgd",
        "seed": 7,
    }
    assert type(overrides["max_iters"]) is int
    cfg = resolve_config("enwik8", "paper", overrides)
    assert cfg.lr == 3e-4 and cfg.decay_iters == 10_000 and cfg.weight_decay == 0.1
    assert parse_overrides(["compile=auto"]) == {"compile": "auto"}


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["lrr=1e-3"], r"unknown config key 'lrr' \(did you mean 'lr'\?\); allowed keys: .*max_iters"),
        (["lr=fast"], r"lr='fast'.*float"),
        (["max_iters=2.5"], r"max_iters='2.5'.*int"),
        (["bias=maybe"], r"bias='maybe'.*bool"),
        (["optimizer=adam"], r"optimizer='adam'.*allowed: adamw, sgd"),
        (["noise_placement=middle"], r"after_clip, before_clip, update"),
        (["noise_correlation=bogus"], r"noise_correlation='bogus'.*allowed: independent, anticorrelated"),
        (["embedding_noise_alpha=-1"], r"embedding_noise_alpha=-1\.0.*≥ 0"),
        (["dropout=1.5"], r"dropout=1.5.*\[0, 1\)"),
        (["train_fraction=0"], r"train_fraction=0.0.*\(0, 1\]"),
        (["train_fraction=1.5"], r"train_fraction=1.5.*\(0, 1\]"),
        (["min_lr=1"], r"min_lr=1.0.*\[0, lr\]"),
        (["device=tpu"], r"device='tpu'.*cuda:N"),
        (["noise=exp:sigma0=0.1"], r"missing gamma"),
        (["n_head=3"], r"n_embd=128 is not divisible by n_head=3"),
        (["lr"], r"not key=value"),
    ],
)
def test_bad_overrides_are_user_errors(items, message):
    with pytest.raises(UserError, match=message):
        resolve_config("shakespeare_char", "tiny", parse_overrides(items))


def test_config_round_trip_and_bad_names():
    cfg = small(noise="exp:gamma=0.99,sigma0=0.1")
    assert cfg.noise == "exp:sigma0=0.1,gamma=0.99"  # canonical spec
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(UserError, match="unknown config key 'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(UserError, match=r"lr='0\.1'"):
        TrainConfig.from_dict({"lr": "0.1"})
    with pytest.raises(UserError, match=r"unknown dataset 'wiki'.*shakespeare_char, enwik8, text8"):
        resolve_config("wiki")
    with pytest.raises(UserError, match=r"unknown preset 'huge'.*paper, tiny"):
        resolve_config("enwik8", "huge")


def test_learning_rate_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=9, max_iters=109)
    assert learning_rate(0, cfg) == pytest.approx(0.1)  # (0+1)/(9+1)
    assert learning_rate(4, cfg) == pytest.approx(0.5)
    assert learning_rate(9, cfg) == pytest.approx(1.0)  # cosine starts at the peak
    assert learning_rate(59, cfg) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert learning_rate(109, cfg) == pytest.approx(0.1)
    assert learning_rate(500, cfg) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    from gradnoise.lm import GPT

    cfg = small(bias=True)
    model = GPT(cfg.model_config(vocab_size=20))
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    decayed, plain = optimizer.param_groups
    # The decay itself is each replica's own (lm.training.replicas.WeightDecay), not the optimizer's.
    assert decayed["decay"] and not plain["decay"]
    assert decayed["weight_decay"] == plain["weight_decay"] == 0.0
    # Parameters are (replicas, …): matrices (and embeddings) have three dimensions.
    assert all(p.dim() == 3 for p in decayed["params"]) and all(p.dim() == 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    sgd = build_optimizer(model, small(optimizer="sgd", momentum=0.8), torch.device("cpu"))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.8


# --- training -----------------------------------------------------------------------


def test_tiny_preset_learns(tmp_path):
    corpus = corpora.load("shakespeare_char")
    # The best a model without context can do: the unigram entropy of val under train's counts.
    counts = np.bincount(corpus.splits["train"], minlength=corpus.vocab_size) + 1
    unigram = float(-np.log(counts / counts.sum())[np.asarray(corpus.splits["val"])].mean())
    cfg = resolve_config(
        "shakespeare_char",
        "tiny",
        dict(max_iters=30, warmup_iters=10, eval_interval=30, eval_iters=8, final_eval=False, device="cpu"),
    )
    result = train(cfg, tmp_path / "run", progress=False)
    assert result["status"] == "done"
    # 30 steps reach ≈ 2.73 nats; uniform guessing is ln 65 ≈ 4.17, the unigram ≈ 3.35.
    assert result["finals"]["val_loss"] < math.log(corpus.vocab_size) - 1.2
    assert result["finals"]["val_loss"] < unigram - 0.4  # it uses the context


def test_outputs_logs_and_exact_final_eval(tmp_path):
    run = tmp_path / "run"
    cfg = small(final_eval=True, noise="exp:sigma0=0.01,gamma=0.9")
    result = train(cfg, run, progress=False)
    assert json.loads((run / "result.json").read_text()) == result
    assert TrainConfig.from_dict(json.loads((run / "config.json").read_text())) == cfg
    assert result["status"] == "done" and result["error"] is None and result["device"] == "cpu"

    log = read_log(run)
    evals = [r for r in log if r["kind"] == "eval"]
    trains = [r for r in log if r["kind"] == "train"]
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    assert [r["step"] for r in trains] == [5, 10, 15, 20, 25, 30]
    assert set(trains[0]) == {
        *("kind", "step", "loss", "lr", "sigma", "time_s", "tokens_per_s"),
        *("grad_norm", "noise_norm", "noise_to_grad"),  # measured at each line's step
    }
    assert set(evals[0]) == {"kind", "step", "train_loss", "val_loss", "time_s"}
    assert trains[-1]["lr"] == pytest.approx(learning_rate(29, cfg))
    assert trains[-1]["sigma"] == pytest.approx(0.01 * 0.9**29)
    times = [r["time_s"] for r in log]
    assert times == sorted(times)

    finals = result["finals"]
    assert set(finals) == {
        *FINAL_METRICS,
        "test_loss",
        "test_bpc",
    }  # the study's columns, and the test split's
    best = min(evals, key=lambda r: r["val_loss"])
    assert (finals["best_val_loss"], finals["best_val_step"]) == (best["val_loss"], best["step"])
    assert finals["val_loss"] == evals[-1]["val_loss"] and finals["train_loss"] == evals[-1]["train_loss"]
    assert finals["val_bpc"] == pytest.approx(finals["val_loss"] / math.log(2))
    assert finals["steps"] == 30 and finals["test_loss_full"] is None
    assert finals["train_loss_window"] == trains[-1]["loss"]  # the last window's train-mode mean
    model_parameters = sum(p.numel() for p in trained.load_trained(run)[0].parameters())
    assert finals["parameters"] == model_parameters

    # The exact pass, recomputed here from the saved model: whole windows, then the tail.
    model, _ = trained.load_trained(run)
    model.eval()
    val = torch.from_numpy(np.asarray(corpora.load("shakespeare_char").splits["val"], dtype=np.int64))
    whole = (len(val) - 1) // 32
    inputs, targets = val[: whole * 32].view(whole, 32), val[1 : whole * 32 + 1].view(whole, 32)
    tail_x, tail_y = val[whole * 32 : -1], val[whole * 32 + 1 :]
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in [*zip(inputs.split(256), targets.split(256), strict=True), (tail_x[None], tail_y[None])]:
            logits, _ = model(x, y)
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
    assert count == len(val) - 1
    assert finals["val_loss_full"] == pytest.approx(total / count, rel=1e-5)
    assert finals["val_bpc_full"] == pytest.approx(total / count / math.log(2), rel=1e-5)


def test_last_batch_loss_is_the_last_steps_own(tmp_path):
    # With a log window of one step, the last train line's loss is the last step's alone.
    result = train(small(max_iters=12, log_interval=1), tmp_path / "run", progress=False)
    trains = [r for r in read_log(tmp_path / "run") if r["kind"] == "train"]
    assert trains[-1]["step"] == 12
    assert result["finals"]["train_loss_last_batch"] == trains[-1]["loss"]
    assert result["finals"]["train_loss_window"] == trains[-1]["loss"]
    windowed = train(small(max_iters=12, log_interval=4), tmp_path / "windowed", progress=False)
    assert windowed["finals"]["train_loss_last_batch"] == result["finals"]["train_loss_last_batch"]
    last_window = [r["loss"] for r in trains[-4:]]
    assert windowed["finals"]["train_loss_window"] == pytest.approx(sum(last_window) / 4, rel=1e-12)


def gradient_lines(cfg: TrainConfig, run_dir: Path) -> list[dict]:
    train(cfg, run_dir, progress=False)
    return [r for r in read_log(run_dir) if r["kind"] == "train"]


def test_gradient_norms_without_noise_match_the_noises_own_measurement(tmp_path):
    # σ = 0 adds nothing, so both runs take the same steps; one measures ‖g‖ from
    # clip_grad_norm_, the other through GradientNoise(track_stats=True).
    for clip in (0.05, 0.0):
        plain = gradient_lines(small(grad_clip=clip), tmp_path / f"plain{clip}")
        zero = gradient_lines(small(grad_clip=clip, noise="const:sigma=0"), tmp_path / f"zero{clip}")
        assert [r["loss"] for r in plain] == [r["loss"] for r in zero]
        for a, b in zip(plain, zero, strict=True):
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
            assert (a["noise_norm"], b["noise_norm"]) == (0.0, 0.0)
            if clip:  # the gradient the optimizer gets is clipped
                assert a["grad_norm"] <= clip
        if not clip:  # unclipped, this small model's gradients are larger than 0.05 at first
            assert plain[0]["grad_norm"] > 0.05


def test_noise_norm_is_sigma_times_root_n(tmp_path):
    sigma = 0.003
    lines = gradient_lines(small(noise=f"const:sigma={sigma}"), tmp_path / "abs")
    n = json.loads((tmp_path / "abs" / "result.json").read_text())["finals"]["parameters"]
    # ‖ε‖² ~ χ²_N: ‖ε‖ = √N (1 ± 1/√(2N)); five standard deviations.
    tolerance = 5 / math.sqrt(2 * n)
    for line in lines:
        assert line["noise_norm"] == pytest.approx(sigma * math.sqrt(n), rel=tolerance)
        assert line["noise_to_grad"] == pytest.approx(line["noise_norm"] / line["grad_norm"], rel=1e-9)
    # Relative noise: σ = r · RMS(g), so ‖noise‖ / ‖g‖ = r (up to the same χ spread).
    for line in gradient_lines(small(noise="relative:const:sigma=0.5"), tmp_path / "rel"):
        assert line["noise_to_grad"] == pytest.approx(0.5, rel=tolerance)
        assert line["sigma"] == pytest.approx(0.5 * line["grad_norm"] / math.sqrt(n), rel=1e-5)


def test_a_seeds_noise_is_the_same_draw_at_every_level():
    """Common random numbers: for one seed, every σ level (absolute or relative) adds the
    same ε, scaled; so the differences between levels are paired."""

    def noise_of(spec: str, seed: int = 0, gradient: float = 0.0, steps: int = 2) -> list[torch.Tensor]:
        cfg = small(noise=spec, noise_placement="before_clip", seed=seed)  # apply() by hand
        # One replica's parameters, (1, …) as the harness's GPT has them.
        params = [torch.nn.Parameter(torch.zeros(1, 40, 50)), torch.nn.Parameter(torch.zeros(1, 40))]
        noise = build_noise(torch.optim.AdamW(params), cfg)
        added = []
        for _ in range(steps):
            for p in params:
                p.grad = torch.full_like(p, gradient)
            noise.apply()
            added.append(torch.cat([(p.grad - gradient).flatten() for p in params]))
        return added

    low, high = noise_of("const:sigma=0.001"), noise_of("const:sigma=0.1")
    for a, b in zip(low, high, strict=True):
        torch.testing.assert_close(b, 100 * a, rtol=1e-5, atol=0)
    # Relative: σ = r · RMS(g), here r = 0.1 and RMS(g) = 1: the same ε, scaled by 0.1 again.
    relative = noise_of("relative:const:sigma=0.1", gradient=1.0)
    absolute = noise_of("const:sigma=0.1", gradient=1.0)
    for a, b in zip(absolute, relative, strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(low[0], low[1])  # a new draw each step
    assert not torch.allclose(low[0], noise_of("const:sigma=0.001", seed=1)[0])  # and each seed


def test_train_fraction_trains_on_the_first_part_of_the_split(tmp_path):
    train_tokens = np.asarray(corpora.load("shakespeare_char").splits["train"], dtype=np.uint8)
    fraction = 0.01
    head = train_tokens[: int(len(train_tokens) * fraction)].tobytes()

    def rows(name, **changes):
        seen = []
        train(
            small(max_iters=10, **changes),
            tmp_path / name,
            progress=False,
            on_step=lambda step, x, y: seen.extend(x.numpy().astype(np.uint8)),
        )
        return seen

    assert all(row.tobytes() in head for row in rows("part", train_fraction=fraction))
    assert not all(row.tobytes() in head for row in rows("whole"))
    config = json.loads((tmp_path / "part" / "config.json").read_text())
    assert config["train_fraction"] == fraction
    too_few = r"train split .* \(train_fraction=1e-05\), too few for block_size=32"
    with pytest.raises(UserError, match=too_few):
        train(small(train_fraction=1e-5), tmp_path / "tiny", progress=False)


def test_same_seed_same_batches_and_init_for_every_method(tmp_path):
    def batches_of(name, **changes):
        seen = []
        result = train(
            small(max_iters=12, **changes),
            tmp_path / name,
            progress=False,
            on_step=lambda step, x, y: seen.append((x.clone(), y.clone())),
        )
        first_eval = without_timing(read_log(tmp_path / name))[0]
        return seen, first_eval, result

    base, base_eval, _ = batches_of("baseline")
    methods = {
        "noise": dict(noise="const:sigma=0.05"),
        "smoothing": dict(label_smoothing=0.1),
        "decay": dict(weight_decay=0.0, dropout=0.2),
        "sgd": dict(optimizer="sgd", lr=0.1, min_lr=0.01),
    }
    for name, changes in methods.items():
        seen, first_eval, _ = batches_of(name, **changes)
        assert len(seen) == len(base) == 12
        for (x, y), (bx, by) in zip(seen, base, strict=True):
            assert torch.equal(x, bx) and torch.equal(y, by), name
        # Same init and the same eval batches: the step-0 evaluation is identical.
        assert first_eval == base_eval, name

    p = 0.3
    augmented, _, _ = batches_of("augment", char_substitution=p)
    vocab = corpora.load("shakespeare_char").vocab_size
    changed = total = 0
    for (x, y), (bx, by) in zip(augmented, base, strict=True):
        assert torch.equal(y, by)  # targets untouched, the batch stream not shifted
        changed += int((x != bx).sum())
        total += x.numel()
    # A substituted token differs from the original with probability 1 - 1/vocab.
    expected = p * (1 - 1 / vocab)
    tolerance = 5 * math.sqrt(expected * (1 - expected) / total)
    assert abs(changed / total - expected) < tolerance

    other_seed, _, _ = batches_of("seed1", seed=1)
    assert not torch.equal(other_seed[0][1], base[0][1])


def test_resume_continues_exactly(tmp_path):
    cfg = small(noise="exp:sigma0=0.02,gamma=0.95", char_substitution=0.1, grad_accum=2)
    whole = train(cfg, tmp_path / "whole", progress=False)

    stopped = train(cfg, tmp_path / "parts", progress=False, on_step=lambda step, x, y: step == 13)
    assert stopped["status"] == "interrupted" and stopped["finals"]["steps"] == 13
    assert checkpoint.latest(tmp_path / "parts").name == "step_0000013"
    resumed = train(cfg, tmp_path / "parts", resume=True, progress=False)

    assert resumed["status"] == "done"
    assert_resumed_as_whole(whole, resumed, tmp_path / "whole", tmp_path / "parts")

    # A finished run resumes to its result at once; a changed config is refused.
    assert train(cfg, tmp_path / "parts", resume=True, progress=False) == resumed
    with pytest.raises(UserError, match=r"lr: 0\.001 → 0\.002"):
        train(cfg.replace(lr=2e-3, max_iters=40), tmp_path / "parts", resume=True, progress=False)
    with pytest.raises(UserError, match="already holds a run"):
        train(cfg, tmp_path / "parts", progress=False)


def test_resume_from_a_checkpoint_written_before_run_state(tmp_path):
    # Checkpoints written before RunState kept progress and clock in one "book" entry; a
    # run stopped then resumes with this version exactly.
    cfg = small(noise="plateau:sigma0=0.02,patience=1", max_iters=20)
    whole = train(cfg, tmp_path / "whole", progress=False)
    train(cfg, tmp_path / "parts", progress=False, on_step=lambda step, x, y: step == 7)
    state_path = checkpoint.latest(tmp_path / "parts") / "state.pt"
    state = torch.load(state_path, weights_only=True)
    state["book"] = {**state.pop("progress"), **state.pop("clock")}
    torch.save(state, state_path)
    resumed = train(cfg, tmp_path / "parts", resume=True, progress=False)
    assert_resumed_as_whole(whole, resumed, tmp_path / "whole", tmp_path / "parts", weights=False)


@pytest.mark.parametrize(
    "changes",
    [
        dict(
            noise="exp:sigma0=0.02,gamma=0.95", noise_correlation="anticorrelated", embedding_noise_alpha=5.0
        ),
        dict(noise="relative:const:sigma=0.5", noise_placement="update", noise_correlation="anticorrelated"),
        dict(noise="const:sigma=0.05", noise_placement="update"),
    ],
)
def test_resume_continues_exactly_with_the_noise_beyond_the_gradient(tmp_path, changes):
    cfg = small(max_iters=20, **changes)
    whole = train(cfg, tmp_path / "whole", progress=False)
    stopped = train(cfg, tmp_path / "parts", progress=False, on_step=lambda step, x, y: step == 7)
    assert stopped["status"] == "interrupted"
    resumed = train(cfg, tmp_path / "parts", resume=True, progress=False)
    assert_resumed_as_whole(whole, resumed, tmp_path / "whole", tmp_path / "parts")


def test_a_checkpoint_from_before_the_later_keys_resumes(tmp_path):
    # A run stopped by an earlier version saved a config without the keys added since;
    # it resumes with their former values.
    cfg = small(max_iters=12, train_fraction=1.0)
    train(cfg, tmp_path / "parts", progress=False, on_step=lambda step, x, y: step == 5)
    state_path = checkpoint.latest(tmp_path / "parts") / "state.pt"
    state = torch.load(state_path, weights_only=True)
    for key in ("train_fraction", "noise_correlation", "embedding_noise_alpha"):
        del state["config"][key]
    torch.save(state, state_path)
    assert train(cfg, tmp_path / "parts", resume=True, progress=False)["status"] == "done"
    with pytest.raises(UserError, match="noise_correlation: 'independent' → 'anticorrelated'"):
        train(
            cfg.replace(noise_correlation="anticorrelated"), tmp_path / "parts", resume=True, progress=False
        )


def test_each_option_beyond_the_gradient_changes_the_run(tmp_path):
    def final(name, **changes):
        cfg = small(max_iters=6, noise="const:sigma=0.05", dropout=0.0, **changes)
        return train(cfg, tmp_path / name, progress=False)["finals"]["train_loss"]

    losses = {
        "plain": final("plain"),
        "anticorrelated": final("anti", noise_correlation="anticorrelated"),
        "update": final("update", noise_placement="update"),
        "neftune": final("neftune", embedding_noise_alpha=5.0),
    }
    assert len(set(losses.values())) == len(losses), losses
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1, 2, 2))], lr=0.1)  # one replica
    noise = build_noise(optimizer, small(noise="const:sigma=0.1", noise_placement="update"))
    assert (noise.placement, noise.correlation) == ("update", ["independent"])


def test_noise_placement_matters_only_with_clipping(tmp_path):
    def final(name, **changes):
        cfg = small(max_iters=8, noise="const:sigma=0.05", **changes)
        return train(cfg, tmp_path / name, progress=False)["finals"]["val_loss"]

    no_clip = [final(f"noclip_{p}", grad_clip=0.0, noise_placement=p) for p in ("after_clip", "before_clip")]
    assert no_clip[0] == no_clip[1]
    clip = [final(f"clip_{p}", grad_clip=0.1, noise_placement=p) for p in ("after_clip", "before_clip")]
    assert clip[0] != clip[1]


def test_huge_noise_diverges_with_a_clear_message(tmp_path):
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--run-dir",
            str(run),
            "--no-progress",
            *(f"{k}={v}" for k, v in {**SMALL, "checkpoint_interval": 1, "log_interval": 1}.items()),
            "optimizer=sgd",
            "noise=const:sigma=1e30",
        ]
    )
    assert code == 3
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "diverged"
    pattern = r"loss is (nan|inf) at step 2 .*σ=1e\+30.*last good checkpoint is step 1"
    assert re.search(pattern, result["error"]), result["error"]
    assert result["finals"]["steps"] == 1
    weights, _ = checkpoint.load(checkpoint.latest(run))
    assert checkpoint.latest(run).name == "step_0000001"
    assert all(torch.isfinite(w).all() for w in weights.values())

    # Noise this large overflows float32 in the first update, whose loss was still finite:
    # the broken weights are caught before they are checkpointed.
    broken = train(
        small(optimizer="sgd", noise="const:sigma=3e38", checkpoint_interval=1),
        tmp_path / "broken",
        progress=False,
    )
    assert broken["status"] == "diverged"
    assert "non-finite weights at step 1" in broken["error"]
    assert "no checkpoint was written" in broken["error"]
    assert checkpoint.latest(tmp_path / "broken") is None


def test_sigterm_checkpoints_and_resume_finishes(tmp_path):
    run = tmp_path / "run"
    changes = {"max_iters": 400, "eval_interval": 200, "checkpoint_interval": 0, "dropout": 0.0}
    overrides = [f"{k}={v}" for k, v in {**SMALL, **changes}.items()]
    command = [sys.executable, "-m", "gradnoise", "train", "--run-dir", str(run), "--no-progress", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    log = run / "log.jsonl"
    deadline = time.monotonic() + 60
    while not (log.exists() and '"kind": "train"' in log.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert "--resume" in stderr
    result = json.loads((run / "result.json").read_text())
    stopped_at = result["finals"]["steps"]
    assert result["status"] == "interrupted" and 5 <= stopped_at < 400
    assert checkpoint.latest(run).name == f"step_{stopped_at:07d}"

    # Resume in-process (the CLI path is the same function) to the end.
    resumed = train(small(**changes), run, resume=True, progress=False)
    assert resumed["status"] == "done" and resumed["finals"]["steps"] == 400
    steps = [r["step"] for r in read_log(run) if r["kind"] == "train"]
    assert steps == list(range(5, 401, 5))


def test_sample_and_export_through_the_cli(tmp_path, capsys):
    run, export = tmp_path / "run", tmp_path / "export"
    train(small(max_iters=10), run, progress=False)

    def sample(path, seed, prompt="ROMEO:"):
        assert (
            main(["sample", str(path), "--prompt", prompt, "--max-new-tokens", "40", "--seed", str(seed)])
            == 0
        )
        return capsys.readouterr().out

    first = sample(run, 1)
    assert first.startswith("ROMEO:") and len(first) == len("ROMEO:") + 40 + 1  # print's newline
    assert sample(run, 1) == first
    assert sample(run, 2) != first

    assert main(["export", str(run), str(export)]) == 0
    capsys.readouterr()
    assert sample(export, 1) == first
    from gradnoise.lm import GPT

    model = GPT.from_pretrained(export)
    assert model.config.n_embd == 32 and model.config.vocab_size == 65
    assert main(["sample", str(run), "--prompt", "\u00e9"]) == 2
    assert "not in the" in capsys.readouterr().err


def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "lrr=0.1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    assert main(["train", "--run-dir", str(run), "--config-file", str(tmp_path / "missing.json")]) == 2
    assert main(["train", "--run-dir", str(run), "--dataset", "nope"]) == 2
    for bad, allowed in (
        ("noise_correlation=bogus", "independent, anticorrelated"),
        ("noise_placement=weights", "after_clip, before_clip, update"),
        ("embedding_noise_alpha=-5", "≥ 0"),
    ):
        assert main(["train", "--run-dir", str(run), bad]) == 2
        assert allowed in capsys.readouterr().err
    assert not run.exists()


def test_the_study_layers_command_line(tmp_path, capsys):
    # The study runs each run as:
    #   gradnoise train --config-file RUN_DIR/config.json --run-dir RUN_DIR --resume --no-progress
    run = tmp_path / "run"
    run.mkdir()
    cfg = small(max_iters=10, seed=4, noise="plateau:sigma0=0.01")
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    command = [
        "train",
        "--config-file",
        str(run / "config.json"),
        "--run-dir",
        str(run),
        "--resume",
        "--no-progress",
    ]
    assert main(command) == 0
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "done" and result["finals"]["steps"] == 10
    assert {r["kind"] for r in read_log(run)} == {"train", "eval"}
    log_before = (run / "log.jsonl").read_text()
    assert main(command) == 0  # already finished: the same result, nothing rerun
    assert json.loads((run / "result.json").read_text()) == result
    assert (run / "log.jsonl").read_text() == log_before
    assert main([*command, "seed=5"]) == 2  # a different run cannot resume this one
    assert "seed: 4 → 5" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard installed")
def test_missing_logger_extra_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"gradnoise\[tensorboard\]"):
        train(small(tensorboard=True), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()

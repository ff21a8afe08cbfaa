"""The MNIST task's model and trainer: each initialization draws what it says, a zero network
moves only with noise, a batched group's replicas are the runs alone, a killed run resumes
exactly, and train-mnist refuses bad input."""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import torch

from gradnoise.cli import main
from gradnoise.errors import UserError
from gradnoise.mnist import data, trainer
from gradnoise.mnist.config import MnistConfig, parse_overrides, write_group
from gradnoise.mnist.model import DeepMLP, drop
from helpers.mnist import md5s, write_mnist

NOISE = "neelakantan:eta=0.01,gamma=0.55"


def expected_std(init: str, fan_in: int) -> float:
    """The papers' formulas, written here again: simple N(0, 0.1²); He N(0, 2/fan_in);
    Sussillo & Abbott's ReLU gain g = √2·exp(1.2/(max(N, 6) − 2.4)), N(0, g²/fan_in)."""
    if init == "simple":
        return 0.1
    if init == "he":
        return math.sqrt(2 / fan_in)
    return math.sqrt(2) * math.exp(1.2 / (max(fan_in, 6) - 2.4)) / math.sqrt(fan_in)


@pytest.mark.parametrize("init", ["simple", "random_walk", "he"])
def test_each_initialization_draws_its_gaussian(init):
    model = DeepMLP([init, init], [0, 1])
    for fan_in in (784, 50):  # the first layer; every later one (fan_in 50, output layer included)
        draws = torch.cat([w.detach().flatten() for w in model.weights if w.shape[2] == fan_in]).double()
        n, std = draws.numel(), expected_std(init, fan_in)
        # 5 standard errors: the mean's σ/√n, the variance's σ²·√(2/n), a proportion's √(p(1−p)/n).
        assert abs(draws.mean().item()) < 5 * std / math.sqrt(n)
        assert abs(draws.var().item() / std**2 - 1) < 5 * math.sqrt(2 / n)
        within = (draws.abs() < std).double().mean().item()
        assert abs(within - 0.682689) < 5 * math.sqrt(0.682689 * 0.317311 / n)
    assert all(torch.count_nonzero(b) == 0 for b in model.biases)


def test_zero_init_is_exactly_zero_and_replicas_are_their_runs_alone():
    zero = DeepMLP(["zero", "he"], [5, 6])
    assert all(torch.count_nonzero(w[0]) == 0 for w in zero.weights)
    alone = DeepMLP(["he"], [6])
    assert all(torch.equal(a[0], b[1]) for a, b in zip(alone.weights, zero.weights, strict=True))
    assert not torch.equal(DeepMLP(["he"], [7]).weights[0], alone.weights[0])


def test_dropout_drops_each_replica_at_its_own_rate():
    x = torch.ones(2, 1000, 50)
    dropped = drop(x, torch.tensor([0.0, 0.3]), [None, torch.Generator().manual_seed(0)])
    assert torch.equal(dropped[0], x[0])
    kept = dropped[1] != 0
    n = kept.numel()
    assert abs(kept.double().mean().item() - 0.7) < 5 * math.sqrt(0.7 * 0.3 / n)
    assert torch.allclose(dropped[1][kept], torch.tensor(1 / 0.7))


@pytest.fixture
def small_mnist(tmp_path, monkeypatch):
    """A 200/50-digit MNIST look-alike prepared under the tests' $GRADNOISE_HOME."""
    write_mnist(tmp_path / "idx", train=200, test=50)
    data.prepare(str(tmp_path / "idx"), expected_md5=md5s(tmp_path / "idx"))
    return MnistConfig(dataset="mnist", batch_size=16, epochs=3, eval_every=5, checkpoint_every=7)


@pytest.mark.parametrize("noise", ["none", NOISE])
def test_a_zero_network_moves_its_hidden_weights_only_with_noise(tmp_path, small_mnist, one_thread, noise):
    cfg = small_mnist.replace(init="zero", noise=noise)
    training = trainer.Training([cfg], [tmp_path / "run"], tmp_path / "run")
    training.train_step()
    hidden = [w.detach() for w in training.model.weights[:-1]]
    moved = [torch.count_nonzero(w).item() for w in hidden]
    if noise == "none":
        assert moved == [0] * len(hidden)  # ReLU'(0) = 0 and W_out = 0: no gradient reaches them
        assert torch.count_nonzero(training.model.biases[-1]) > 0  # the output bias learns
    else:
        assert all(count == w.numel() for count, w in zip(moved, hidden, strict=True))


def test_a_batched_group_equals_its_runs_trained_alone(tmp_path, small_mnist, one_thread):
    cfgs = [
        small_mnist.replace(seed=0, init="simple", noise=NOISE, grad_clip=1.0),
        small_mnist.replace(seed=1, init="he", noise="none", grad_clip=0.0),
        small_mnist.replace(seed=2, init="zero", noise=NOISE, grad_clip=10.0),
        small_mnist.replace(seed=3, init="he", noise=NOISE, grad_clip=10.0, dropout=0.5),
    ]
    group = trainer.Training(cfgs, [tmp_path / f"g{m}" for m in range(4)], tmp_path / "g")
    alone = [trainer.Training([c], [tmp_path / f"a{m}"], tmp_path / f"a{m}") for m, c in enumerate(cfgs)]
    for _ in range(2 * group.steps_per_epoch):
        group.train_step()
        for run in alone:
            run.train_step()
    accuracy, loss = group.evaluate()
    for m, run in enumerate(alone):
        for batched, single in zip(group.model.parameters(), run.model.parameters(), strict=True):
            # Measured: bit-identical after 200 steps on 1 and 2 CPU threads; the bound leaves
            # room for reassociation in other kernels (another BLAS, a GPU).
            torch.testing.assert_close(batched[m], single[0], rtol=0, atol=1e-6)
        single_accuracy, single_loss = run.evaluate()
        assert accuracy[m] == single_accuracy[0]
        assert math.isclose(loss[m], single_loss[0], abs_tol=1e-6)
    assert not torch.equal(group.model.weights[0][0], group.model.weights[0][1])


def test_a_dropout_runs_masks_are_its_own_in_any_group(tmp_path, small_mnist, one_thread):
    """Replica m's masks come from its own seed and the step: a dropout run at index 1 of a
    group whose other runs drop at other rates trains as it does alone (were the masks the
    group's, drawn from its first run's seed, they would differ)."""
    run = small_mnist.replace(seed=7, init="he", dropout=0.5)
    others = [small_mnist.replace(seed=s, init="he", dropout=0.3) for s in (1, 2)]
    dirs = [tmp_path / f"g{m}" for m in range(3)]
    group = trainer.Training([others[0], run, others[1]], dirs, tmp_path / "g")
    alone = trainer.Training([run], [tmp_path / "a"], tmp_path / "a")
    for _ in range(group.steps_per_epoch):
        for training in (group, alone):
            training.train_step()
    for batched, single in zip(group.model.parameters(), alone.model.parameters(), strict=True):
        torch.testing.assert_close(batched[1], single[0], rtol=0, atol=1e-6)


def test_a_killed_run_resumes_exactly(tmp_path, small_mnist, one_thread, monkeypatch):
    cfgs = [small_mnist.replace(seed=s, noise=NOISE, dropout=0.1 * s) for s in range(2)]
    whole = trainer.train_group(cfgs, [tmp_path / "w0", tmp_path / "w1"], tmp_path / "w")
    step = trainer.Training.train_step

    def killed_at_step_9(self):
        step(self)
        if self.step == 9:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer.Training, "train_step", killed_at_step_9)
    dirs = [tmp_path / "k0", tmp_path / "k1"]
    stopped = trainer.train_group(cfgs, dirs, tmp_path / "k")
    assert [r["status"] for r in stopped] == ["interrupted"] * 2 and stopped[0]["finals"]["steps"] == 9
    monkeypatch.undo()
    with pytest.raises(UserError, match="already holds a run"):
        trainer.train_group(cfgs, dirs, tmp_path / "k")
    resumed = trainer.train_group(cfgs, dirs, tmp_path / "k", resume=True)
    assert [r["finals"] for r in resumed] == [r["finals"] for r in whole]
    for m in range(2):
        assert (dirs[m] / "log.jsonl").read_text().count(
            "\n"
        ) == 8  # evals at 5, 10, …, 35 and the last step, 36
        whole_log = [json.loads(line) for line in (tmp_path / f"w{m}" / "log.jsonl").read_text().splitlines()]
        resumed_log = [json.loads(line) for line in (dirs[m] / "log.jsonl").read_text().splitlines()]
        assert [(e["step"], e["test_acc"], e["test_loss"]) for e in resumed_log] == [
            (e["step"], e["test_acc"], e["test_loss"]) for e in whole_log
        ]


def test_a_diverged_replica_is_frozen_and_the_others_go_on(tmp_path, small_mnist, one_thread):
    # At lr 10⁴ without clipping He-initialized weights overflow within steps; a zero network's
    # only moving weights are the output biases, whose gradient is bounded: it stays finite.
    base = small_mnist.replace(lr=1e4, grad_clip=0.0, epochs=2)
    cfgs = [base.replace(seed=0, init="he"), base.replace(seed=1, init="zero")]
    group = trainer.train_group(cfgs, [tmp_path / "g0", tmp_path / "g1"], tmp_path / "g")
    alone = trainer.train(cfgs[1], tmp_path / "alone")
    assert group[0]["status"] == "diverged" and group[0]["finals"]["steps"] < 5
    assert group[0]["finals"]["test_acc"] is None  # no evaluation before it diverged
    assert not (tmp_path / "g0" / "log.jsonl").exists() or not (tmp_path / "g0" / "log.jsonl").read_text()
    # What made them differs in the replica count alone (a group of two, a run alone).
    assert group[1]["provenance"]["numerics"]["replicas"] == 2
    assert alone["provenance"]["numerics"]["replicas"] == 1
    assert {**group[1], "provenance": None} == {**alone, "provenance": None} and alone["status"] == "done"


def test_runs_that_differ_in_a_shared_key_cannot_be_a_group(tmp_path):
    cfgs = [MnistConfig(lr=0.1), MnistConfig(lr=0.01)]
    with pytest.raises(UserError, match="differ in lr"):
        write_group(tmp_path, ["a", "b"], [tmp_path / "a", tmp_path / "b"], cfgs)


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("init=orthogonal", "init='orthogonal' is not allowed; use simple, random_walk, he, zero"),
        ("lr=0", "lr=0.0 must be a finite number > 0"),
        ("dropout=1", "dropout=1.0 must lie in [0, 1)"),
        ("epochs=2.5", "epochs='2.5' is not a int"),
        ("width", "'width' is not KEY=VALUE with a known key"),
    ],
)
def test_bad_config_values_are_named(pair, message):
    with pytest.raises(UserError) as error:
        parse_overrides([pair])
    assert message in str(error.value)


def test_train_mnist_on_the_command_line(tmp_path, small_mnist, capsys):
    run_dir = tmp_path / "run"
    argv = ["train-mnist", "--run-dir", str(run_dir), "dataset=mnist", "epochs=1", "batch_size=50", "-q"]
    assert main(argv) == 0
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "done" and result["finals"]["steps"] == 4
    assert main([*argv[:-1], "init=bad"]) == 2
    assert "init='bad' is not allowed" in capsys.readouterr().err
    assert main(argv) == 2  # the run directory holds a finished run: not overwritten
    assert "already holds a run" in capsys.readouterr().err
    assert np.isclose(json.loads((run_dir / "config.json").read_text())["lr"], 0.1)


def test_train_mnist_trains_a_group_file(tmp_path, small_mnist, capsys):
    cfgs = [small_mnist.replace(seed=s, epochs=1, noise=noise) for s, noise in ((0, "none"), (1, NOISE))]
    dirs = [tmp_path / "runs" / "a", tmp_path / "runs" / "b"]
    write_group(tmp_path / "group", ["a", "b"], dirs, cfgs)
    assert main(["train-mnist", "--group", str(tmp_path / "group"), "seed=3"]) == 2
    assert "drop --run-dir and KEY=VALUE" in capsys.readouterr().err
    assert main(["train-mnist", "--group", str(tmp_path / "group"), "-q"]) == 0
    results = [json.loads((d / "result.json").read_text()) for d in dirs]
    assert [r["finals"]["steps"] for r in results] == [12, 12]
    assert (tmp_path / "group" / "checkpoints" / "LATEST").is_file()

"""The batched trainer: a group of runs trained as one model with a replica dimension gives
each run what it gets alone (init, batches, noise, per-run settings, results, export), a
diverged run does not stop the others, and a group resumes bit for bit."""

import json
import math

import pytest
import torch

from gradnoise.cli import main
from gradnoise.lm.config import resolve_config
from gradnoise.lm.model.gpt import GPT
from gradnoise.lm.model.weights import weights_for_saving
from gradnoise.lm.storage import checkpoint
from gradnoise.lm.training import group, replicas
from gradnoise.lm.training.distributed import DistributedEnv
from gradnoise.lm.training.progress import Clock
from gradnoise.lm.training.setup import new_run
from gradnoise.lm.training.trainer import train, train_group
from helpers import configs

pytestmark = pytest.mark.usefixtures("one_thread")

# A small model and few hundred steps: a group of 6 and its runs alone take ~30 s on one thread.
BASE = configs.two_layers(8, 200, eval_interval=100, log_interval=10, checkpoint_interval=0, eval_iters=4)
BASE |= dict(grad_accum=2, warmup_iters=10, lr=3e-3, dropout=0.0)
# Each run differs from the first in per-replica settings only; the last one diverges.
MEMBERS = {
    "plain": dict(seed=0),
    "absolute": dict(seed=1, noise="const:sigma=0.01"),
    "relative": dict(seed=2, noise="const:sigma=0.5", noise_mode="relative"),
    "decay_smoothing": dict(seed=0, weight_decay=0.5, label_smoothing=0.1),
    "clip_substitution": dict(seed=1, grad_clip=0.05, char_substitution=0.2),
    "diverging": dict(seed=2, noise="const:sigma=1e30"),
}
FIRST_STEPS = 3  # steps whose batches are compared
# Equal up to floating-point reassociation (on this CPU the group is bit-identical).
TOLERANCE = 1e-3


def config(**changes):
    return resolve_config("shakespeare_char", "tiny", {**BASE, **changes})


def batches_seen(store):
    def on_step(step, inputs, targets):
        if step <= FIRST_STEPS:
            store.append((inputs.clone(), targets.clone()))

    return on_step


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The group trained once, and each of its runs (but the diverging one) alone, on one
    thread (module-scoped, it is set up before the one_thread fixture)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_all(tmp_path_factory.mktemp("group_training"))
    finally:
        torch.set_num_threads(threads)


def _train_all(root):
    cfgs = {name: config(**changes) for name, changes in MEMBERS.items()}
    group_batches, alone_batches = [], {}
    members = [group.Member(name, root / "runs" / name, cfg) for name, cfg in cfgs.items()]
    group.write_group(root / "group", members)
    results = train_group(
        [m.config for m in members],
        [m.run_dir for m in members],
        root / "group",
        progress=False,
        on_step=batches_seen(group_batches),
    )
    alone = {}
    for name, cfg in cfgs.items():
        if name != "diverging":
            alone_batches[name] = []
            alone[name] = train(
                cfg, root / "alone" / name, progress=False, on_step=batches_seen(alone_batches[name])
            )
    return dict(
        root=root,
        cfgs=cfgs,
        grouped=dict(zip(cfgs, results, strict=True)),
        alone=alone,
        group_batches=group_batches,
        alone_batches=alone_batches,
    )


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_replicas_start_from_their_runs_initial_weights():
    cfgs = [config(seed=s, weight_decay=w) for s, w in ((5, 0.1), (6, 0.0), (5, 0.3))]
    cpu, env = torch.device("cpu"), DistributedEnv()
    batched = weights_for_saving(new_run(cfgs, 65, cpu, torch.float32, env, Clock()).model)
    for m, cfg in enumerate(cfgs):
        alone = weights_for_saving(new_run([cfg], 65, cpu, torch.float32, env, Clock()).model)
        for name, value in alone.items():
            assert torch.equal(batched[name][m], value), (m, name)
    assert not torch.equal(batched["transformer.wte.weight"][0], batched["transformer.wte.weight"][1])


def test_each_replica_sees_its_runs_batches(trained):
    for m, name in enumerate(trained["cfgs"]):
        if name == "diverging":
            continue
        alone = trained["alone_batches"][name]
        assert len(alone) == FIRST_STEPS
        for (x, y), (ax, ay) in zip(trained["group_batches"], alone, strict=True):
            # (replicas, grad_accum · batch, T) in the group; one run's alone.
            assert torch.equal(x[m], ax) and torch.equal(y[m], ay), name


@pytest.mark.parametrize("name", [name for name in MEMBERS if name != "diverging"])
def test_each_replica_ends_where_its_run_alone_ends(trained, name):
    grouped, alone = trained["grouped"][name], trained["alone"][name]
    assert grouped["status"] == alone["status"] == "done"
    for key in ("val_loss", "train_loss", "best_val_loss", "train_loss_last_batch"):
        assert grouped["finals"][key] == pytest.approx(alone["finals"][key], abs=TOLERANCE), key
    assert grouped["finals"]["final_sigma"] == pytest.approx(alone["finals"]["final_sigma"], rel=1e-3)
    assert grouped["finals"]["steps"] == BASE["max_iters"]
    # The same log, line for line (up to timings and reassociation).
    group_log = read_log(trained["root"] / "runs" / name)
    alone_log = read_log(trained["root"] / "alone" / name)
    assert [(r["kind"], r["step"]) for r in group_log] == [(r["kind"], r["step"]) for r in alone_log]
    for g, a in zip(group_log, alone_log, strict=True):
        for key in ("loss", "val_loss", "grad_norm", "noise_norm"):
            if a.get(key) is not None:
                assert g[key] == pytest.approx(a[key], rel=TOLERANCE, abs=TOLERANCE), (g["step"], key)
    # The step-0 evaluation: the same initial weights on the same eval batches.
    first_eval = next(r for r in group_log if r["kind"] == "eval")
    assert first_eval["step"] == 0
    assert first_eval["val_loss"] == pytest.approx(alone_log[0]["val_loss"], abs=1e-5)


def test_the_runs_differ_where_their_settings_do(trained):
    val = {name: r["finals"]["val_loss"] for name, r in trained["grouped"].items() if r["status"] == "done"}
    assert len(set(val.values())) == len(val)  # no two members trained alike
    # Clipping to 0.05 keeps every measured gradient at that norm or below.
    lines = [r for r in read_log(trained["root"] / "runs" / "clip_substitution") if r["kind"] == "train"]
    assert lines and all(r["grad_norm"] <= 0.05 + 1e-6 for r in lines)


def test_a_diverged_replica_is_recorded_and_the_others_go_on(trained):
    result = json.loads((trained["root"] / "runs" / "diverging" / "result.json").read_text())
    assert result["status"] == "diverged"
    assert "non-finite optimizer state (exp_avg_sq) at step 10" in result["error"]
    assert "σ=1e+30" in result["error"]
    assert result["finals"]["steps"] < BASE["max_iters"]
    assert [r["status"] for n, r in trained["grouped"].items() if n != "diverging"] == ["done"] * 5
    # Frozen: its weights in the final group checkpoint are what they were when it froze,
    # the others' are trained; nothing of it leaked into them (test above: equal to alone).
    weights, state = checkpoint.load(checkpoint.latest(trained["root"] / "group"))
    assert state["replicas"][5]["progress"]["diverged"] == result["error"]
    assert all(torch.isfinite(w[:5]).all() for w in weights.values())


def test_export_of_a_replica_equals_its_run_alones_export(trained, tmp_path):
    root = trained["root"]
    assert main(["export", str(root / "runs" / "absolute"), str(tmp_path / "member")]) == 0
    assert main(["export", str(root / "alone" / "absolute"), str(tmp_path / "alone")]) == 0
    member, alone = GPT.from_pretrained(tmp_path / "member"), GPT.from_pretrained(tmp_path / "alone")
    assert member.config == alone.config
    for (name, a), b in zip(
        weights_for_saving(member).items(), weights_for_saving(alone).values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=TOLERANCE, msg=name)
    # The member's run directory points at its replica of the group's checkpoint.
    assert group.read_replica_link(root / "runs" / "absolute")[1] == 1
    assert not (root / "runs" / "absolute" / "checkpoints").exists()
    assert main(["sample", str(root / "runs" / "absolute"), "--max-new-tokens", "5"]) == 0


@pytest.mark.parametrize("placement", ["after_clip", "update"])
def test_a_group_resumes_bit_for_bit(tmp_path, placement):
    # Dropout of different rates (per-replica masks), anticorrelated noise (σ_{t−1} per
    # replica), NEFTune on one replica, substitution: every stream is restored.
    every = dict(max_iters=30, eval_interval=10, checkpoint_interval=10, noise_placement=placement)
    cfgs = [
        config(seed=0, dropout=0.1, embedding_noise_alpha=5.0, **every),
        config(
            seed=1,
            dropout=0.2,
            noise="exp:sigma0=0.02,gamma=0.95",
            noise_correlation="anticorrelated",
            char_substitution=0.1,
            **every,
        ),
    ]

    def dirs(name):
        return [tmp_path / name / f"r{m}" for m in range(2)], tmp_path / name / "group"

    whole = train_group(cfgs, *dirs("whole"), progress=False)
    stopped = train_group(cfgs, *dirs("parts"), progress=False, on_step=lambda step, x, y: step == 13)
    assert [r["status"] for r in stopped] == ["interrupted"] * 2
    assert checkpoint.latest(tmp_path / "parts" / "group").name == "step_0000013"
    resumed = train_group(cfgs, *dirs("parts"), resume=True, progress=False)
    for w, r, run_dir in zip(whole, resumed, dirs("parts")[0], strict=True):
        assert r["status"] == "done"
        for key in ("steps", "val_loss", "best_val_loss", "train_loss_last_batch", "train_loss_window"):
            assert r["finals"][key] == w["finals"][key], key
        strip = [
            {k: v for k, v in line.items() if k not in ("time_s", "tokens_per_s")}
            for line in read_log(run_dir)
        ]
        whole_dir = tmp_path / "whole" / run_dir.name
        expected = [
            {k: v for k, v in line.items() if k not in ("time_s", "tokens_per_s")}
            for line in read_log(whole_dir)
        ]
        assert strip == expected
    final_whole, _ = checkpoint.load(checkpoint.latest(tmp_path / "whole" / "group"))
    final_parts, _ = checkpoint.load(checkpoint.latest(tmp_path / "parts" / "group"))
    for key, value in final_whole.items():
        assert torch.equal(final_parts[key], value), key
    # A finished group resumes to its results at once.
    assert train_group(cfgs, *dirs("parts"), resume=True, progress=False) == resumed


def _group_and_alone(root, members: dict, **shared):
    """Train `members` ({name: per-replica settings}) as one group and each alone, few steps;
    ({name: group result}, {name: result alone}, {name: the group run's log})."""
    cfgs = {
        name: config(max_iters=60, eval_interval=30, **shared, **changes) for name, changes in members.items()
    }
    runs = [group.Member(name, root / "runs" / name, cfg) for name, cfg in cfgs.items()]
    group.write_group(root / "group", runs)
    results = train_group([r.config for r in runs], [r.run_dir for r in runs], root / "group", progress=False)
    alone = {name: train(cfg, root / "alone" / name, progress=False) for name, cfg in cfgs.items()}
    logs = {name: read_log(root / "runs" / name) for name in cfgs}
    return dict(zip(cfgs, results, strict=True)), alone, logs


@pytest.mark.parametrize(
    "placement, members",
    [
        (
            "after_clip",
            {
                "anti": dict(seed=0, noise="const:sigma=0.01", noise_correlation="anticorrelated"),
                "anti_relative": dict(
                    seed=1, noise="const:sigma=0.5", noise_mode="relative", noise_correlation="anticorrelated"
                ),
                "independent": dict(seed=0, noise="const:sigma=0.01"),
            },
        ),
        (
            "update",
            {
                "absolute": dict(seed=0, noise="const:sigma=0.3"),
                "relative_anti": dict(
                    seed=1, noise="const:sigma=0.5", noise_mode="relative", noise_correlation="anticorrelated"
                ),
                "decay_clip": dict(seed=2, noise="const:sigma=0.3", weight_decay=0.5, grad_clip=0.5),
            },
        ),
    ],
)
def test_correlated_and_update_noise_replicas_end_where_their_runs_alone_end(tmp_path, placement, members):
    grouped, alone, logs = _group_and_alone(tmp_path, members, noise_placement=placement)
    for name in members:
        assert grouped[name]["status"] == alone[name]["status"] == "done", name
        for key in ("val_loss", "train_loss_last_batch"):
            assert grouped[name]["finals"][key] == pytest.approx(alone[name]["finals"][key], abs=TOLERANCE)
        assert grouped[name]["finals"]["final_sigma"] == pytest.approx(
            alone[name]["finals"]["final_sigma"], rel=1e-3
        )
        noise = [r["noise_norm"] for r in logs[name] if r["kind"] == "train"]
        assert noise and all(n > 0 for n in noise), name
    # Each replica's settings took effect: no two members trained alike.
    finals = [r["finals"]["val_loss"] for r in grouped.values()]
    assert len(set(finals)) == len(finals)


def test_a_group_with_per_replica_embedding_noise_runs_and_its_alpha_0_replicas_equal_alone(tmp_path):
    members = {
        "off": dict(seed=0),
        "neftune": dict(seed=0, embedding_noise_alpha=5.0),
        "off_other_seed": dict(seed=1, noise="const:sigma=0.01"),
    }
    grouped, alone, _ = _group_and_alone(tmp_path, members)
    assert [r["status"] for r in grouped.values()] == ["done"] * 3
    for name in ("off", "off_other_seed"):  # α = 0: nothing of the draw reaches them
        for key in ("val_loss", "train_loss_last_batch"):
            assert grouped[name]["finals"][key] == pytest.approx(alone[name]["finals"][key], abs=TOLERANCE)
    # α = 5 trains on noisy embeddings: same seed, another path (its draw is the group's, not
    # its run alone's, so it is compared with its seed's α = 0 replica, not bitwise with alone).
    noisy, clean = grouped["neftune"]["finals"], grouped["off"]["finals"]
    assert math.isfinite(noisy["val_loss"])
    assert abs(noisy["train_loss_last_batch"] - clean["train_loss_last_batch"]) > TOLERANCE


def test_a_resumed_group_keeps_the_results_of_runs_that_ended(tmp_path):
    # What the study runner relies on: ended runs (done or diverged) are trained no further
    # and their result.json is not written again; `train --group` exits 0 once all ended.
    every = dict(max_iters=20, eval_interval=10, checkpoint_interval=10)
    members = [
        group.Member("plain", tmp_path / "runs" / "plain", config(seed=0, **every)),
        group.Member(
            "diverging", tmp_path / "runs" / "diverging", config(seed=1, noise="const:sigma=1e30", **every)
        ),
    ]
    group_dir = tmp_path / "group"
    group.write_group(group_dir, members)
    assert main(["train", "--group", str(group_dir), "--resume", "--no-progress"]) == 0  # fresh
    first = [json.loads((m.run_dir / "result.json").read_text()) for m in members]
    assert [r["status"] for r in first] == ["done", "diverged"]
    configs, run_dirs = [m.config for m in members], [m.run_dir for m in members]
    steps = []
    again = train_group(configs, run_dirs, group_dir, resume=True, progress=False, on_step=steps.append)
    assert again == first and steps == []
    # The plain run's result lost (killed while the results were written): the group
    # resumes from its last checkpoint; the diverged run's result stays as it was.
    diverged_file = members[1].run_dir / "result.json"
    written = (diverged_file.read_bytes(), diverged_file.stat().st_mtime_ns)
    (members[0].run_dir / "result.json").unlink()
    resumed = train_group(configs, run_dirs, group_dir, resume=True, progress=False)
    assert resumed[1] == first[1]
    assert (diverged_file.read_bytes(), diverged_file.stat().st_mtime_ns) == written
    assert resumed[0]["status"] == "done"
    assert resumed[0]["finals"]["val_loss"] == first[0]["finals"]["val_loss"]


def test_per_replica_clipping_and_weight_decay_follow_torchs_formulas():
    torch.manual_seed(0)
    stacked = [torch.nn.Parameter(torch.randn(3, 5, 4)), torch.nn.Parameter(torch.randn(3, 4))]
    for p in stacked:
        p.grad = torch.randn_like(p) * 3
    singles = [[torch.nn.Parameter(p[m].detach().clone()) for p in stacked] for m in range(3)]
    for m, params in enumerate(singles):
        for p, s in zip(params, stacked, strict=True):
            p.grad = s.grad[m].clone()
    clips = [1.0, 0.0, 100.0]  # clipped, not clipped (0), above the norm
    norms = replicas.clip_grad_norms_(stacked, torch.tensor(clips))
    decays = [0.1, 0.0, 0.5]
    decayed = torch.optim.AdamW([{"params": stacked, "decay": True}], lr=0.1, weight_decay=0.0)
    replicas.WeightDecay(decayed, decays, decoupled=True)
    decayed.step()
    for m, params in enumerate(singles):
        if clips[m] > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clips[m])
            assert norms[m] == pytest.approx(norm.item(), rel=1e-6)
        torch.optim.AdamW(params, lr=0.1, weight_decay=decays[m]).step()
        for p, s in zip(params, stacked, strict=True):
            torch.testing.assert_close(s[m], p, rtol=1e-6, atol=1e-7)

    # SGD's weight decay is L2, added to the gradient: g + λ·p.
    sgd_params = [torch.nn.Parameter(torch.ones(2, 3))]
    sgd_params[0].grad = torch.zeros(2, 3)
    sgd = torch.optim.SGD([{"params": sgd_params, "decay": True}], lr=1.0)
    replicas.WeightDecay(sgd, [0.5, 0.0], decoupled=False)
    sgd.step()
    assert sgd_params[0].tolist() == [[0.5] * 3, [1.0] * 3]


def test_train_group_refuses_runs_that_differ_in_shared_settings(tmp_path):
    from gradnoise.errors import UserError

    with pytest.raises(UserError, match="differ in lr"):
        train_group([config(), config(lr=1e-2)], [tmp_path / "a", tmp_path / "b"], tmp_path / "g")
    assert not any(tmp_path.iterdir())

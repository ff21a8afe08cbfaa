"""Whose run a directory holds: a run or a group member resumes only in a directory whose
files are its own (config.json, replica.json, the group checkpoint's run list), a member is
continued through its group, and a diverged member's weights are its last good ones. Every
refusal leaves every file as it was, byte for byte."""

import json
import shutil

import pytest
import torch

from gradnoise.cli import main
from gradnoise.lm.config import resolve_config
from gradnoise.lm.model.gpt import GPT
from gradnoise.lm.storage import checkpoint
from gradnoise.lm.training import group
from gradnoise.lm.training.trainer import train, train_group
from helpers import configs

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = configs.tiny(max_iters=6, eval_interval=3, log_interval=3, checkpoint_interval=3)


def tiny(**changes):
    return resolve_config("shakespeare_char", "tiny", {**TINY, **changes})


def snapshot(*roots):
    """Every file under `roots`: path → bytes."""
    return {str(p): p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def refused(capsys, argv, *expected):
    """Run `gradnoise argv`: exit 2, one error line holding each of `expected`."""
    capsys.readouterr()  # what earlier training printed
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradnoise: error:"), err
    for text in expected:
        assert text in err[0], err[0]
    return err[0]


def stopped_group(root, cfgs, at_step=3):
    """A group of `cfgs` written to root/group and trained until `at_step` (interrupted)."""
    members = [group.Member(f"r{m}", root / f"r{m}", c) for m, c in enumerate(cfgs)]
    group.write_group(root / "group", members)
    results = train_group(
        cfgs,
        [m.run_dir for m in members],
        root / "group",
        progress=False,
        on_step=lambda s, x, y: s == at_step,
    )
    assert [r["status"] for r in results] == ["interrupted"] * len(cfgs)
    return members


@pytest.mark.parametrize("member_seed", [5, 0])
def test_a_group_resume_does_not_take_over_a_finished_plain_run(tmp_path, capsys, member_seed):
    plain = tmp_path / "plain"
    assert train(tiny(seed=0), plain, progress=False)["status"] == "done"
    members = [
        group.Member("a", plain, tiny(seed=member_seed)),
        group.Member("b", tmp_path / "b", tiny(seed=6)),
    ]
    group.write_group(tmp_path / "g", members)
    before = snapshot(tmp_path)
    refused(capsys, ["train", "--group", tmp_path / "g", "--resume"], "plain holds a run", "not a member")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("swap", ["directories", "members"])
def test_a_group_resume_refuses_members_whose_directories_were_swapped(tmp_path, capsys, swap):
    cfgs = [tiny(seed=0), tiny(seed=1)]
    members = stopped_group(tmp_path, cfgs)
    if swap == "directories":  # each config now points at the other run's directory
        swapped = [
            group.Member("r0", members[1].run_dir, cfgs[0]),
            group.Member("r1", members[0].run_dir, cfgs[1]),
        ]
    else:  # the same runs in the other order: replica indices and checkpoint no longer match
        swapped = [members[1], members[0]]
    group.write_group(tmp_path / "group", swapped)
    before = snapshot(tmp_path)
    refused(capsys, ["train", "--group", tmp_path / "group", "--resume"], "r1 is run 1", "not run 0")
    assert snapshot(tmp_path) == before


def test_the_group_checkpoint_names_its_run_directories(tmp_path, capsys):
    """With the members' own files gone, the checkpoint's run list still tells."""
    cfgs = [tiny(seed=0), tiny(seed=1)]
    members = stopped_group(tmp_path, cfgs)
    elsewhere = [group.Member(m.run_id, tmp_path / "new" / m.run_id, m.config) for m in members]
    group.write_group(tmp_path / "group", elsewhere)
    before = snapshot(tmp_path)
    refused(capsys, ["train", "--group", tmp_path / "group", "--resume"], "other run directories")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["config.json", "replica.json"])
def test_a_fresh_run_does_not_overwrite_a_directorys_run_file(tmp_path, capsys, name):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / name).write_text('{"not": "gradnoise"}\n')
    before = snapshot(tmp_path)
    overrides = [f"{k}={v}" for k, v in TINY.items()]
    refused(capsys, ["train", "--run-dir", run_dir, "--no-progress", *overrides], "already holds", name)
    assert snapshot(tmp_path) == before


def test_a_plain_resume_of_a_member_points_at_its_group(tmp_path, capsys):
    members = stopped_group(tmp_path, [tiny(seed=0), tiny(seed=1)])
    run_dir = members[0].run_dir
    before = snapshot(tmp_path)
    command = ["train", "--config-file", run_dir / "config.json", "--run-dir", run_dir, "--resume"]
    refused(capsys, command, f"gradnoise train --group {tmp_path / 'group'} --resume")
    assert snapshot(tmp_path) == before
    # The group then continues it as ever.
    assert main(["train", "--group", str(tmp_path / "group"), "--resume", "-q"]) == 0
    assert json.loads((run_dir / "result.json").read_text())["finals"]["steps"] == 6


def test_a_member_moved_away_from_its_group_is_not_exported_from_its_own_checkpoints(tmp_path, capsys):
    members = stopped_group(tmp_path, [tiny(seed=0), tiny(seed=1)])
    moved = tmp_path / "away" / "r0"
    moved.parent.mkdir()
    shutil.move(members[0].run_dir, moved)
    # What a plain run left there (an earlier version resumed members alone).
    shutil.copytree(tmp_path / "group" / "checkpoints", moved / "checkpoints")
    before = snapshot(tmp_path)
    refused(capsys, ["export", moved, tmp_path / "out"], "group", "not the group's")
    refused(capsys, ["sample", moved], "group")
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_a_group_directory_is_no_members_run_directory(tmp_path, capsys):
    (tmp_path / "g").mkdir()
    runs = [{"run_id": "a", "run_dir": ".", "config": tiny().to_dict()}]
    (tmp_path / "g" / "group.json").write_text(json.dumps({"runs": runs}))
    before = snapshot(tmp_path)
    refused(capsys, ["train", "--group", tmp_path / "g"], "the group directory", "own")
    assert snapshot(tmp_path) == before


SGD = dict(optimizer="sgd", max_iters=4, checkpoint_interval=1, log_interval=1, eval_interval=2)


def test_a_diverged_member_exports_its_last_good_weights(tmp_path, capsys):
    cfgs = [tiny(seed=0, **SGD), tiny(seed=1, noise="const:sigma=1e30", **SGD)]
    members = [group.Member(f"r{m}", tmp_path / f"r{m}", c) for m, c in enumerate(cfgs)]
    group.write_group(tmp_path / "group", members)
    results = train_group(cfgs, [m.run_dir for m in members], tmp_path / "group", progress=False)
    assert [r["status"] for r in results] == ["done", "diverged"]
    assert "last good checkpoint is step 1" in results[1]["error"]
    alone = train(cfgs[1], tmp_path / "alone", progress=False)
    assert alone["status"] == "diverged" and checkpoint.latest(tmp_path / "alone").name == "step_0000001"

    assert main(["export", str(members[1].run_dir), str(tmp_path / "out"), "-q"]) == 0
    assert main(["export", str(tmp_path / "alone"), str(tmp_path / "out_alone"), "-q"]) == 0
    exported = GPT.from_pretrained(tmp_path / "out").state_dict()
    expected = GPT.from_pretrained(tmp_path / "out_alone").state_dict()
    for name, value in expected.items():
        assert torch.isfinite(exported[name]).all(), name
        assert torch.allclose(exported[name], value, rtol=1e-5, atol=1e-6), name
    # Its step-1 weights took one update with σ = 1e30: too large to sample from, which
    # sample says in one line (as for the run alone).
    for run_dir in (members[1].run_dir, tmp_path / "alone"):
        refused(capsys, ["sample", run_dir, "--max-new-tokens", "5"], "not finite")


def test_a_member_diverged_before_any_checkpoint_is_not_exported(tmp_path, capsys):
    cfgs = [tiny(seed=0, **SGD), tiny(seed=1, noise="const:sigma=3e38", **SGD)]
    members = [group.Member(f"r{m}", tmp_path / f"r{m}", c) for m, c in enumerate(cfgs)]
    group.write_group(tmp_path / "group", members)
    results = train_group(cfgs, [m.run_dir for m in members], tmp_path / "group", progress=False)
    assert results[1]["status"] == "diverged" and "no checkpoint was written" in results[1]["error"]
    before = snapshot(tmp_path)
    refused(capsys, ["export", members[1].run_dir, tmp_path / "out"], "not finite")
    refused(capsys, ["sample", members[1].run_dir, "--max-new-tokens", "5"], "not finite")
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()
    assert main(["export", str(members[0].run_dir), str(tmp_path / "out"), "-q"]) == 0


def test_members_of_a_removed_group_may_train_in_a_new_one(tmp_path):
    """What the study does when a group directory was moved away: its unfinished runs,
    which hold no checkpoint of their own, are planned again."""
    cfgs = [tiny(seed=0), tiny(seed=1)]
    members = stopped_group(tmp_path, cfgs)
    shutil.rmtree(tmp_path / "group")
    group.write_group(tmp_path / "new", members)
    results = train_group(cfgs, [m.run_dir for m in members], tmp_path / "new", resume=True, progress=False)
    assert [r["status"] for r in results] == ["done", "done"]
    assert group.read_replica_link(members[0].run_dir) == (tmp_path / "new", 0)

import json

import pytest

from gradnoise.cli import main
from gradnoise.errors import UserError
from gradnoise.lm.config import PER_REPLICA_KEYS, group_key, resolve_config
from gradnoise.lm.storage import runlog
from gradnoise.lm.training import group

QUICK = {"max_iters": 6, "eval_interval": 3, "eval_iters": 1, "log_interval": 3, "final_eval": False}


def config(**values):
    return resolve_config("shakespeare_char", "tiny", {**QUICK, "device": "cpu", **values})


def test_runs_differing_in_per_replica_settings_share_a_group_key():
    base = config()
    for key, value in [
        ("seed", 3),
        ("noise", "const:sigma=0.01"),
        ("dropout", 0.1),
        ("grad_clip", 0.5),
        ("noise_correlation", "anticorrelated"),
        ("embedding_noise_alpha", 5.0),
    ]:
        assert key in PER_REPLICA_KEYS
        assert group_key(base.replace(**{key: value})) == group_key(base)
    assert group_key(base.replace(lr=1e-2)) != group_key(base)
    assert group_key(base.replace(max_iters=7)) != group_key(base)
    assert group_key(base.replace(noise_placement="update")) != group_key(base)  # where in the step


def test_a_group_refuses_runs_that_differ_in_shared_settings(tmp_path):
    members = [
        group.Member("a", tmp_path / "a", config()),
        group.Member("b", tmp_path / "b", config(lr=1e-2)),
    ]
    with pytest.raises(UserError, match="differ in lr"):
        group.write_group(tmp_path, members)
    assert not (tmp_path / group.GROUP_FILE).exists()


def test_group_file_round_trip_keeps_relative_run_dirs(tmp_path):
    members = [group.Member(f"r{s}", tmp_path / "runs" / f"r{s}", config(seed=s)) for s in (0, 1)]
    group.write_group(tmp_path / "groups" / "g", members)
    raw = json.loads((tmp_path / "groups" / "g" / group.GROUP_FILE).read_text())
    assert [r["run_dir"] for r in raw["runs"]] == ["../../runs/r0", "../../runs/r1"]
    back = group.read_group(tmp_path / "groups" / "g")
    assert [(m.run_id, m.config.seed) for m in back] == [("r0", 0), ("r1", 1)]
    assert [m.run_dir.resolve() for m in back] == [m.run_dir.resolve() for m in members]


def test_cli_trains_every_member_of_a_group_into_its_own_run_dir(tmp_path):
    members = [group.Member(f"r{s}", tmp_path / f"r{s}", config(seed=s)) for s in (0, 1)]
    group.write_group(tmp_path, members)
    assert main(["train", "--group", str(tmp_path), "--no-progress"]) == 0
    results = [runlog.read_result(m.run_dir) for m in members]
    assert [r["status"] for r in results] == ["done", "done"]
    assert results[0]["finals"]["val_loss"] != results[1]["finals"]["val_loss"]  # different seeds


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b'{"runs": [{"run_id": "a"}]}', b"[1, 2]"])
def test_a_damaged_group_file_is_a_user_error(tmp_path, content):
    (tmp_path / group.GROUP_FILE).write_bytes(content)
    with pytest.raises(UserError, match="group file"):
        group.read_group(tmp_path)

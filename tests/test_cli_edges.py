"""The command line at its edges: -q/-v before the command, a config key given twice, a
reader of stdout that leaves early, what a group prints, a report's caveats under --set, and
the advice messages give (each must name what the user can actually do)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from gradnoise.cli import build_parser, main
from gradnoise.errors import UserError
from gradnoise.lm.config import parse_overrides, resolve_config
from gradnoise.lm.storage import files
from gradnoise.lm.training import group
from gradnoise.lm.training.trainer import train
from gradnoise.study.report import write_report
from gradnoise.study.store import Store
from helpers import configs

TINY = configs.tiny(max_iters=4, eval_interval=2, log_interval=2, checkpoint_interval=2)


def tiny(**changes):
    return resolve_config("shakespeare_char", "tiny", {**TINY, **changes})


@pytest.mark.parametrize("flag, level", [("-q", logging.WARNING), ("-v", logging.DEBUG)])
def test_verbosity_may_come_before_the_command(flag, level):
    assert main([flag, "study", "list"]) == 0
    assert logging.getLogger("gradnoise").level == level
    # After the command as before; the command's own wins.
    assert build_parser().parse_args(["study", "list", flag]).verbosity == level


def test_a_config_key_given_twice_is_an_error_naming_it():
    with pytest.raises(UserError, match=r"seed is given twice \(seed=1, then seed=2\)"):
        parse_overrides(["seed=1", "lr=1e-3", "seed=2"])
    with pytest.raises(UserError, match="max_iters is given twice"):
        parse_overrides(["max_iters=5", "max-iters=5"])


def test_a_reader_that_leaves_early_ends_the_command_quietly():
    process = subprocess.Popen(
        [sys.executable, "-m", "gradnoise", "study", "list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    process.stdout.close()  # before the command writes a line: its write meets a closed pipe
    err = process.stderr.read().decode()
    assert process.wait() == 141
    assert err == ""


def test_a_group_says_whose_eval_each_line_is_and_that_it_stopped_once(tmp_path, capsys, monkeypatch):
    members = [group.Member(f"r{m}", tmp_path / f"r{m}", tiny(seed=m, max_iters=8)) for m in range(3)]
    group.write_group(tmp_path / "g", members)
    from gradnoise.lm.training import trainer

    original = trainer.train_group

    def stopped_at_2(*args, **kwargs):
        return original(*args, **kwargs, on_step=lambda step, x, y: step == 2)

    monkeypatch.setattr(trainer, "train_group", stopped_at_2)
    assert main(["train", "--group", str(tmp_path / "g"), "--no-progress"]) == 143
    err = capsys.readouterr().err.splitlines()
    for name in ("r0", "r1", "r2"):
        assert [line for line in err if line.startswith(f"{name}: step 0/8: ")], err
    stopped = [line for line in err if "stopped at step 2" in line]
    assert stopped == [
        f"gradnoise: stopped at step 2 (checkpoint written); continue with --resume --group {tmp_path / 'g'}"
    ]


def test_embedding_noise_is_named_when_it_diverges(tmp_path):
    result = train(tiny(embedding_noise_alpha=1e30), tmp_path / "run", progress=False)
    assert result["status"] == "diverged"
    assert "no gradient noise; embedding noise α=1e+30" in result["error"], result["error"]


def test_the_damaged_weights_advice_is_one_the_user_can_follow(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not safetensors")
    with pytest.raises(UserError) as error:
        files.read_weights(path)
    assert "another checkpoint" not in str(error.value)
    assert "only its latest checkpoint" in str(error.value)


def test_the_transformers_plateau_refusal_names_the_metric_transformers_logs():
    pytest.importorskip("transformers")
    from gradnoise.integrations.transformers import GradientNoiseCallback

    with pytest.raises(UserError, match="monitor='eval_loss'"):
        GradientNoiseCallback("plateau:sigma0=0.1")


def small_study(directory, spec: dict) -> None:
    """Two methods × 2 done seeds, a few logged points each."""
    with Store(directory / "study.sqlite") as store:
        store.create_study(spec["name"], spec)
        for method, overrides in spec["methods"].items():
            for seed in (0, 1):
                values = {"max_iters": 10, **overrides, **spec.get("set", {}), "seed": seed}
                config = resolve_config("shakespeare_char", "tiny", values)
                run_id = f"{method}-{seed}"
                store.add_runs([(run_id, "shakespeare_char", method, seed, config.to_dict())])
                finals = {"steps": 10, "val_loss": 2.0 + seed, "best_val_loss": 2.0 + seed}
                curves = [
                    {"kind": "eval", "step": 0, "val_loss": 2.0, "train_loss": 2.0, "time_s": 1.0},
                    {"kind": "train", "step": 10, "loss": 2.0, "sigma": 0.0, "time_s": 1.0},
                ]
                store.record_result(run_id, {"status": "done", "error": None, "finals": finals}, curves)


SPEC = {
    "name": "edges",
    "preset": "tiny",
    "datasets": ["shakespeare_char"],
    "seeds": 2,
    "overrides": {"max_iters": 10},
    "methods": {"baseline": {}, "noise": {"noise": "const:sigma=0.01"}},
    "caveats": ["A budget of 10 steps, which is why nothing overfits."],
}


def test_a_report_under_set_leaves_out_the_specs_own_caveats(tmp_path):
    (tmp_path / "spec").mkdir()
    small_study(tmp_path / "spec", SPEC)
    (tmp_path / "set").mkdir()
    small_study(tmp_path / "set", {**SPEC, "set": {"max_iters": 4, "device": "cpu"}})
    as_specified = (write_report(tmp_path / "spec") / "report.md").read_text()
    under_set = (write_report(tmp_path / "set") / "report.md").read_text()
    assert SPEC["caveats"][0] in as_specified
    assert SPEC["caveats"][0] not in under_set
    assert "set: max_iters=4" in under_set and "device" not in under_set.split("set: ")[1].split(")")[0]


def test_a_report_prints_no_plotting_warnings(tmp_path):
    small_study(tmp_path, SPEC)  # one logged step per run: matplotlib remarks on flat axes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_report(tmp_path)
    assert [str(w.message) for w in caught] == []


def test_the_quick_spec_says_the_time_the_readme_measured():
    from gradnoise.study.spec import load_spec

    description = load_spec("quick").description
    assert "340 s" in description and "10 minutes" not in description
    assert "340 s" in (Path(__file__).parent.parent / "README.md").read_text()


def test_a_group_mismatch_names_only_the_settings_a_group_shares():
    members = [
        group.Member("a", Path("a"), tiny(seed=0, noise="const:sigma=0.01")),
        group.Member("b", Path("b"), tiny(seed=1, lr=1e-2)),
    ]
    with pytest.raises(UserError) as error:
        group.check_members(members)
    assert "they differ in lr, which every run" in str(error.value)
    assert "seed" not in str(error.value) and "noise" not in str(error.value)

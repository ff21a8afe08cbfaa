"""Run directories: a default one is never shared, one process trains in a directory at a time,
a killed writer's temporary files are cleared, and a run that fails early leaves no trace."""

import os
import stat
import subprocess
import sys
import threading

import pytest

from gradnoise.cli import main
from gradnoise.errors import UserError
from gradnoise.lm.config import resolve_config
from gradnoise.lm.storage import checkpoint, rundir
from gradnoise.lm.training.trained import export
from gradnoise.lm.training.trainer import train
from helpers import configs

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = configs.tiny(max_iters=6, eval_interval=3, log_interval=3, checkpoint_interval=3)


def tiny(**changes):
    return resolve_config("shakespeare_char", "tiny", {**TINY, **changes})


def test_new_directories_are_exclusive_even_when_created_at_once(tmp_path):
    names, barrier = [], threading.Barrier(8)

    def create():
        barrier.wait()
        with rundir.new(tmp_path / "runs", "same-second") as path:
            (path / "config.json").write_text("{}")
            names.append(path.name)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(names) == sorted(["same-second", *(f"same-second-{i}" for i in range(2, 9))])


def test_two_default_runs_in_the_same_second_get_two_directories(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda fmt: "20250101-120000")
    overrides = [f"{k}={v}" for k, v in TINY.items()]
    assert main(["train", "--no-progress", *overrides]) == 0
    assert main(["train", "--no-progress", *overrides, "noise=const:sigma=0.01"]) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == [
        "shakespeare_char-tiny-seed0-20250101-120000",
        "shakespeare_char-tiny-seed0-20250101-120000-2",
    ]
    for run in runs:
        assert (tmp_path / "runs" / run / "result.json").is_file()
    assert '"noise": "const:sigma=0.01"' in (tmp_path / "runs" / runs[1] / "config.json").read_text()


def test_a_run_directory_in_use_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny(), run_dir, progress=False, on_step=lambda step, x, y: step == 3)
    before = sorted(p.name for p in run_dir.rglob("*"))
    with rundir.claim(run_dir):
        # Another process: the CLI says so and exits 2 …
        command = [sys.executable, "-m", "gradnoise", "train", "--run-dir", str(run_dir), "--resume"]
        command += [f"{k}={v}" for k, v in TINY.items()]
        finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert finished.returncode == 2, finished.stderr
        assert f"{run_dir} is in use: another process (pid {os.getpid()})" in finished.stderr
        # … and in this process the trainer refuses it as well (flock is per open file).
        with pytest.raises(UserError, match="is in use"):
            train(tiny(), run_dir, resume=True, progress=False)
    assert sorted(p.name for p in run_dir.rglob("*")) == before  # the lock file is gone too
    assert train(tiny(), run_dir, resume=True, progress=False)["status"] == "done"


def test_partials_a_killed_writer_left_are_cleared_on_resume(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny(), run_dir, progress=False, on_step=lambda step, x, y: step == 3)
    stale = [
        run_dir / "checkpoints" / ".step_0000006.k3j2.partial",
        run_dir / ".result.json.x9.partial",
        run_dir / "checkpoints" / ".LATEST.q1.partial",
    ]
    stale[0].mkdir()
    (stale[0] / "model.safetensors").write_bytes(b"half")
    stale[1].write_text("{")
    stale[2].write_text("step_")
    assert train(tiny(), run_dir, resume=True, progress=False)["status"] == "done"
    assert not any(path.exists() for path in stale)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["LATEST", "step_0000006"]


def test_a_run_that_fails_before_writing_leaves_no_directory(tmp_path):
    with pytest.raises(UserError, match="CUDA is not available"):
        train(tiny(device="cuda"), tmp_path / "a" / "run", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_a_run_directory_that_cannot_be_a_directory_is_a_user_error(tmp_path, where):
    (tmp_path / "taken").write_text("mine")
    run_dir = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "run"
    message = "exists and is not a directory" if where == "file" else "cannot create the run directory"
    with pytest.raises(UserError, match=message):
        train(tiny(), run_dir, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
    assert (tmp_path / "taken").read_text() == "mine"


def test_the_lock_file_is_gone_after_a_run(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny(), run_dir, progress=False)
    assert not (run_dir / rundir.LOCK_FILE).exists()
    assert checkpoint.latest(run_dir).name == "step_0000006"


def test_run_and_export_files_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        train(tiny(), tmp_path / "run", progress=False)
        export(tmp_path / "run", tmp_path / "export")
    finally:
        os.umask(previous)
    paths = [*(tmp_path / "run").rglob("*"), *(tmp_path / "export").rglob("*")]
    assert any(p.name == "model.safetensors" for p in paths)  # safetensors alone would make it 0600
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == (0o750 if path.is_dir() else 0o640), path

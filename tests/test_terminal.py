"""The terminal: a bar only on a terminal, one line per eval everywhere, a visible final
pass, -q/-v, --version, `train --help` listing every config key, packaged names for
`study status`, the packaged corpus in `data list`, and the thread-count warning."""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import math
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch

from gradnoise.cli import main
from gradnoise.cli.common import configure_logging
from gradnoise.lm.config import TrainConfig, resolve_config
from gradnoise.lm.data import corpora
from gradnoise.lm.storage import checkpoint
from gradnoise.lm.training.trainer import train
from gradnoise.study.runner import open_study
from gradnoise.study.spec import load_spec, packaged_specs
from helpers import configs

ROOT = Path(__file__).resolve().parents[1]
TINY = configs.tiny(max_iters=20, eval_interval=10, log_interval=5, checkpoint_interval=10, final_eval=None)
OVERRIDES = [f"{k}={v}" for k, v in TINY.items()]
EVAL_LINE = r"step (\d+)/20: train loss \d\.\d{4}, val loss \d\.\d{4}"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def gradnoise(*argv, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kwargs.pop("env", {})}
    return [sys.executable, "-m", "gradnoise", *argv], env


def val_windows() -> int:
    """Windows of the final exact pass over shakespeare_char's val split (block 16)."""
    return math.ceil((len(corpora.load("shakespeare_char").splits["val"]) - 1) / TINY["block_size"])


def test_in_a_log_file_no_bar_but_one_line_per_eval_and_the_final_pass(tmp_path):
    command, env = gradnoise("train", "--run-dir", str(tmp_path / "run"), *OVERRIDES)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr  # no carriage-return updates piling up on one line
    lines = done.stderr.splitlines()
    evals = [line for line in lines if re.match(EVAL_LINE, line)]
    assert [int(re.match(EVAL_LINE, line).group(1)) for line in evals] == [0, 10, 20]
    assert re.fullmatch(EVAL_LINE + r", σ 0, [\d,]+ tok/s", evals[1])  # σ and speed after step 0
    assert f"final evaluation: exact val loss over the whole split ({val_windows():,} windows)" in lines
    assert lines[-2].startswith("done: 20 steps") and lines[-1] == f"results in {tmp_path / 'run'}"
    assert len(lines) == 6
    assert done.stdout == ""


def test_on_a_terminal_the_evals_print_above_the_bar(tmp_path):
    command, env = gradnoise("train", "--run-dir", str(tmp_path / "run"), *OVERRIDES)
    main_fd, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main_fd)
    assert process.wait(timeout=300) == 0
    screen = ANSI.sub("", b"".join(chunks).decode(errors="replace"))
    pieces = [piece.strip() for piece in re.split(r"[\r\n]", screen)]
    assert any(re.match(r"shakespeare_char: +\d+%\|", piece) for piece in pieces)  # the bar
    assert any(re.match(r"exact val: +\d+%\|", piece) for piece in pieces)  # the final pass
    evals = [piece for piece in pieces if re.fullmatch(EVAL_LINE + r"(, σ 0, [\d,]+ tok/s)?", piece)]
    assert [int(re.match(EVAL_LINE, line).group(1)) for line in evals] == [0, 10, 20]


def test_quiet_prints_nothing_and_verbose_every_train_line(tmp_path, capsys):
    assert main(["train", "-q", "--run-dir", str(tmp_path / "quiet"), *OVERRIDES, "final_eval=false"]) == 0
    assert capsys.readouterr() == ("", "")
    assert main(["train", "-v", "--run-dir", str(tmp_path / "loud"), *OVERRIDES, "final_eval=false"]) == 0
    err = capsys.readouterr().err
    assert [int(s) for s in re.findall(r"^step (\d+): loss \d", err, re.M)] == [5, 10, 15, 20]
    assert len(re.findall(EVAL_LINE, err)) == 3
    assert main(["export", "-q", str(tmp_path / "loud"), str(tmp_path / "export")]) == 0
    assert capsys.readouterr() == ("", "")


def test_version_is_the_packages(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert capsys.readouterr().out == f"gradnoise {declared}\n"


def test_train_help_lists_every_config_key_with_its_default_and_meaning():
    command, env = gradnoise("train", "--help", env={"COLUMNS": "200"})
    shown = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120).stdout
    defaults = resolve_config("shakespeare_char", "tiny")
    for field in dataclasses.fields(TrainConfig):
        meaning = field.metadata.get("help")
        assert meaning and len(meaning) < 90, field.name  # one line each, in the dataclass
        value = getattr(defaults, field.name)
        text = "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        assert re.search(rf"^  {field.name} +{re.escape(text)} +{re.escape(meaning)}$", shown, re.M), (
            field.name
        )


def test_study_status_takes_a_packaged_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["study", "status", "quick"]) == 2
    assert f"{Path('studies') / 'quick'} holds no study" in capsys.readouterr().err
    open_study(load_spec("quick"), tmp_path / "studies" / "quick").close()
    assert main(["study", "status", "quick"]) == 0
    assert capsys.readouterr().out.startswith("study quick (studies/quick): 15 runs — 15 pending")
    for name in packaged_specs():  # so that the name is also the default directory's
        assert load_spec(name).name == name


def test_a_resume_takes_its_checkpoints_thread_count_and_warns_when_told_otherwise(tmp_path, capsys):
    cfg = resolve_config("shakespeare_char", "tiny", {**TINY, "final_eval": False})
    threads = torch.get_num_threads()
    seen = []

    def stop_at(last):
        def on_step(step, x, y):
            seen.append(torch.get_num_threads())
            return step == last

        return on_step

    configure_logging(logging.INFO)
    try:
        torch.set_num_threads(1)
        train(cfg, tmp_path / "run", progress=False, on_step=stop_at(10))
        assert checkpoint.load(checkpoint.latest(tmp_path / "run"))[1]["threads"] == 1
        torch.set_num_threads(2)
        capsys.readouterr()
        seen.clear()
        result = train(cfg, tmp_path / "run", resume=True, progress=False, on_step=stop_at(15))
        # Resumed on the checkpoint's count, and the process's count put back afterwards.
        assert set(seen) == {1} and torch.get_num_threads() == 2
        assert result["provenance"]["numerics"]["threads"] == 1
        assert "warning" not in capsys.readouterr().err
        seen.clear()
        train(cfg, tmp_path / "run", resume=True, progress=False, on_step=stop_at(18), threads=2)
        assert set(seen) == {2}
        warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
        assert warning == [
            f"gradnoise: warning: resuming {tmp_path / 'run' / 'checkpoints' / 'step_0000015'} "
            "on 2 CPU thread(s) as asked; it was checkpointed on 1, so the run will not be "
            "bit-identical to an uninterrupted one (leave out --threads to resume on the "
            "checkpoint's count)"
        ]
        result = train(cfg, tmp_path / "run", resume=True, progress=False)  # checkpointed on 2
        assert "warning" not in capsys.readouterr().err
        assert result["provenance"]["attempts"] == 4 and not result["provenance"]["consistent"]
    finally:
        torch.set_num_threads(threads)

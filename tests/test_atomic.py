import os
import stat

import pytest

from gradnoise.lm.storage import atomic


def write_then_fail(directory):
    (directory / "half.txt").write_text("partial")
    raise RuntimeError("disk full")


def test_a_failed_build_leaves_nothing_and_keeps_the_old_directory(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        atomic.build_directory(target, write_then_fail, replace=True)
    assert list(tmp_path.iterdir()) == []

    assert atomic.build_directory(target, lambda d: (d / "a.txt").write_text("1"), replace=True)
    with pytest.raises(RuntimeError):
        atomic.build_directory(target, write_then_fail, replace=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["a.txt"]


def test_replace_false_never_touches_an_existing_directory(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert not atomic.build_directory(target, lambda d: (d / "new.txt").write_text("x"), replace=False)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_replace_true_swaps_in_the_new_directory(tmp_path):
    target = tmp_path / "out"
    atomic.build_directory(target, lambda d: (d / "old.txt").write_text("1"), replace=True)
    atomic.build_directory(target, lambda d: (d / "new.txt").write_text("2"), replace=True)
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_outputs_follow_the_umask_not_mkstemp_privacy(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "f.txt", "hello")
        atomic.build_directory(tmp_path / "d", lambda d: None, replace=False)
    finally:
        os.umask(previous)
    assert (tmp_path / "f.txt").read_text() == "hello"
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_remove_partials_clears_what_a_killed_writer_left(tmp_path):
    (tmp_path / ".step_0000100.abc.partial").mkdir()
    (tmp_path / ".LATEST.xyz.partial").write_text("half")
    (tmp_path / "step_0000050").mkdir()
    removed = atomic.remove_partials(tmp_path)
    assert len(removed) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000050"]

"""Atomic writes: a reader sees the old file or directory, or the new one, never a part.

    write_text(path, text)                     a file, via a temporary file and os.replace
    build_directory(target, write, ...)        a directory, built aside and renamed into place

Every temporary name starts with "." and ends with ".partial", beside its
destination, so `remove_partials` can clear what a killed process left.
Files and directories get the user's umask (mkstemp/mkdtemp alone would make
them private).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets under the user's umask (0o644 under umask 022)."""
    return 0o666 & ~_umask()


def write_text(path: Path, text: str) -> None:
    """Write a text file so that readers see the old content or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_directory(target: Path, write: Callable[[Path], None], *, replace: bool) -> bool:
    """Call write(tmp) on a fresh temporary directory beside `target`, then move it to `target`.

    replace: an existing `target` is swapped out (and deleted) only after `write`
        succeeded. Callers pass True only for a directory they own (a checkpoint
        of their own run, a report they generate).
    Without replace an existing `target` is left alone and False is returned (the
    caller decides whether that is an error); True means `target` now holds the
    new directory. On any error nothing is left behind and `target` is unchanged.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=target.parent))
    try:
        tmp.chmod(0o777 & ~_umask())
        write(tmp)
        try:
            # rename(2) moves a directory onto a missing or *empty* one, atomically.
            os.rename(tmp, target)
            return True
        except OSError:
            if not target.exists() or not replace:
                if target.exists():
                    return False
                raise
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=target.parent))
        os.replace(target, trash / target.name)
        os.replace(tmp, target)
        shutil.rmtree(trash, ignore_errors=True)
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_partials(directory: Path) -> list[Path]:
    """Delete the temporary files and directories a killed writer left in `directory`."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for path in directory.glob(f".*{PARTIAL_SUFFIX}"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed

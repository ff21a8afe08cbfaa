"""Run directories: one process trains in a run directory at a time, and a new default one is
never shared.

    with rundir.new(Path("runs"), "shakespeare_char-tiny-seed0-20250101-120000") as run_dir:
        ...                    # runs/<name>, or <name>-2, <name>-3, …: created by this process alone
    with rundir.claim(run_dir):
        train(...)             # run_dir exists and is locked; a second process gets a UserError

`claim` locks LOCK_FILE inside the directory with fcntl.flock (released by the
kernel when the process dies, so a killed run never leaves it locked), then
clears the temporary files a killed writer left there (atomic.remove_partials).
Both remove what they created (the lock file, directories) if the block leaves
them empty, so a run that fails before it writes anything leaves no trace.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from gradnoise.errors import UserError
from gradnoise.lm.storage import atomic
from gradnoise.lm.storage.checkpoint import CHECKPOINTS

LOCK_FILE = ".train.lock"
# Where a killed writer may have left temporary entries: log/config/result, checkpoints.
PARTIALS_IN = (".", CHECKPOINTS)
MAX_SUFFIX = 1000


@contextlib.contextmanager
def new(parent: Path, name: str) -> Iterator[Path]:
    """A directory `parent/name` that this process created, with an exclusive mkdir: if the
    name is taken (another run started in the same second), `name-2`, `name-3`, …"""
    created = _make_parents(Path(parent))
    for suffix in range(1, MAX_SUFFIX + 1):
        path = Path(parent) / (name if suffix == 1 else f"{name}-{suffix}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as error:
            raise UserError(f"cannot create a run directory under {parent}: {_reason(error)}") from None
        created.append(path)
        break
    else:
        raise UserError(f"{parent} already holds {MAX_SUFFIX} runs named {name}[-N]; give --run-dir")
    try:
        yield path
    finally:
        _remove_if_empty(created)


@contextlib.contextmanager
def claim(run_dir: Path, *, enabled: bool = True) -> Iterator[Path]:
    """Create `run_dir` if needed and hold its lock for the block; UserError if another
    process holds it, or if run_dir cannot be a directory. enabled=False (the ranks other
    than 0 of a data-parallel run, which write nothing) does nothing."""
    run_dir = Path(run_dir)
    if not enabled:
        yield run_dir
        return
    created = _make_parents(run_dir)
    lock = _lock(run_dir)
    try:
        for name in PARTIALS_IN:
            atomic.remove_partials(run_dir / name)
        yield run_dir
    finally:
        # Unlink before unlocking: a process that opened the file meanwhile then finds
        # its lock on a file no longer in the directory, and takes the lock again.
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
        os.close(lock)
        _remove_if_empty(created)


def _lock(run_dir: Path) -> int:
    """An fd of run_dir/LOCK_FILE holding an exclusive flock, with this process's pid in it."""
    path = run_dir / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise UserError(f"cannot lock the run directory {run_dir}: {_reason(error)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise UserError(
                f"{run_dir} is in use: another process (pid {holder or '?'}) is training in it; "
                "wait for it to end, or choose another --run-dir"
            ) from None
        # The previous holder may have unlinked the file after we opened it: then the lock
        # is on an orphaned file, and we try again on the one now in the directory.
        with contextlib.suppress(FileNotFoundError):
            if _same_file(os.fstat(fd), path.stat()):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
        os.close(fd)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _make_parents(directory: Path) -> list[Path]:
    """mkdir -p directory; returns the directories it created, outermost first."""
    missing = []
    for path in (directory, *directory.parents):
        if path.exists() or path.is_symlink():
            break
        missing.append(path)
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue  # made meanwhile by another process: not ours to remove
        except OSError as error:
            _remove_if_empty(created)
            raise UserError(f"cannot create the run directory {directory}: {_reason(error)}") from None
        created.append(path)
    if not directory.is_dir():
        _remove_if_empty(created)
        raise UserError(f"the run directory {directory} exists and is not a directory; choose another")
    return created


def _remove_if_empty(created: list[Path]) -> None:
    """rmdir what this process created, innermost first, where nothing was put in it."""
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            return  # not empty (or gone): neither are its parents


def _reason(error: OSError) -> str:
    return error.strerror or str(error)

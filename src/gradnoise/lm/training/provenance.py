"""What made a run: the code and the numerics environment, recorded in every run's files.

    provenance.current(device, dtype, compiled, replicas) ->
        {"code": {"version", "commit", "dirty", "source_sha256"},
         "numerics": {"torch", "device", "device_model", "dtype", "threads", "compile", "replicas"}}

code: the package's version; where it runs from a git checkout (its __init__.py is
tracked), the commit (`git rev-parse HEAD`) and whether the package's directory differs
from it (`dirty`: modified, staged or untracked files there); else commit and dirty are
None. source_sha256 is always there: sha256 over the package's .py files (relative path,
NUL, contents; sorted by path), so two processes run the same code exactly when their
hashes are equal, whether installed or checked out, committed or not.

numerics: what else decides a run's numbers on the same code: the torch version, the
device and its model (the CPU's model name, or the CUDA device's), the dtype, torch's
CPU thread count (CPU kernels sum in another order on another count), whether the model
was compiled, and how many runs trained as one batched model (members of a group match
their run alone up to reassociation only).

A run's numbers come back bit for bit where `same_code` holds and
`numerics_differences` finds none: equal source hash, torch, device model, dtype,
threads, compile and replicas.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
from pathlib import Path

import torch

import gradnoise

PACKAGE_DIR = Path(gradnoise.__file__).resolve().parent
#: The numerics `numerics_differences` compares (the device's name aside: a GPU's index may change).
NUMERICS_KEYS = ("torch", "device_model", "dtype", "threads", "compile", "replicas")
UNKNOWN = "unknown"


@functools.lru_cache(maxsize=1)
def code_identity() -> dict:
    """{"version", "commit", "dirty", "source_sha256"} of the gradnoise running here."""
    commit, dirty = _git_state(PACKAGE_DIR)
    return {
        "version": gradnoise.__version__,
        "commit": commit,
        "dirty": dirty,
        "source_sha256": source_sha256(PACKAGE_DIR),
    }


def source_sha256(package_dir: Path) -> str:
    """sha256 over every .py file under package_dir: relative path, NUL, bytes, sorted by path."""
    digest = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py"), key=lambda p: p.relative_to(package_dir).as_posix()):
        digest.update(path.relative_to(package_dir).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _git_state(package_dir: Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) where package_dir is tracked in a git checkout, else (None, None).
    Fails soft: no git, no repository, a package installed inside someone else's
    repository (its files untracked there) all give (None, None)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=package_dir, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    if git("ls-files", "--error-unmatch", "__init__.py") is None:
        return None, None
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", ".")
    if commit is None or status is None:
        return None, None
    return commit.strip(), bool(status.strip())


def numerics(device: torch.device, dtype: torch.dtype, compiled: bool, replicas: int = 1) -> dict:
    """The numerics-relevant environment of a run training here now."""
    return {
        "torch": torch.__version__,
        "device": str(device),
        "device_model": device_model(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "compile": bool(compiled),
        "replicas": replicas,
    }


def device_model(device: torch.device) -> str:
    """The CUDA device's name, or the CPU's model name (/proc/cpuinfo; else platform's)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()


@functools.lru_cache(maxsize=1)
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or UNKNOWN


def current(device: torch.device, dtype: torch.dtype, compiled: bool, replicas: int = 1) -> dict:
    """{"code": code_identity(), "numerics": numerics(...)}: what a run records."""
    return {"code": dict(code_identity()), "numerics": numerics(device, dtype, compiled, replicas)}


def code_label(code: dict | None) -> str:
    """One short line naming the code: `0.1.0 @ 1a2b3c4d5e6f`, `… (dirty, source 9f8e7d6c5b4a)`,
    `0.1.0, source 9f8e7d6c5b4a` (not from a checkout), or "unknown"."""
    if not code or not code.get("source_sha256"):
        return UNKNOWN
    source = f"source {code['source_sha256'][:12]}"
    if code.get("commit"):
        dirty = f" (dirty, {source})" if code.get("dirty") else ""
        return f"{code.get('version')} @ {code['commit'][:12]}{dirty}"
    return f"{code.get('version')}, {source}"


def same_code(a: dict | None, b: dict | None) -> bool:
    """Both known and equal in their source hash."""
    return bool(a and b and a.get("source_sha256") and a.get("source_sha256") == b.get("source_sha256"))


def numerics_differences(a: dict | None, b: dict | None) -> list[str]:
    """`key a→b` for each NUMERICS_KEYS field that differs (all of them where one is unknown)."""
    if not a or not b:
        return ["numerics unknown"]
    return [f"{key} {a.get(key)}→{b.get(key)}" for key in NUMERICS_KEYS if a.get(key) != b.get(key)]

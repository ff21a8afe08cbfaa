"""The golden run: a tiny fixed config and seed, with noise on, whose first numbers are pinned
in tests/golden/golden_run.json and checked by tests/test_golden_run.py.

Regenerate it (only on purpose, when a change of numerics is intended) from the repository
root with

    PYTHONPATH=src python tests/golden/regenerate.py

It trains the run on 1 and on 2 CPU threads, stores the 1-thread numbers, and sets the
tolerance from the spread between the two (see `tolerance`). The commit that regenerates
it says that numerics changed, and which committed studies (results/) must be rerun.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

GOLDEN_FILE = Path(__file__).with_name("golden_run.json")
#: The run: the tiny preset made smaller, constant noise about the gradient's RMS (so that
#: the noise stream moves the losses too), logged every 5 steps, evaluated every 10.
CONFIG = {
    "dataset": "shakespeare_char",
    "seed": 7,
    "n_layer": 1,
    "n_head": 2,
    "n_embd": 32,
    "block_size": 32,
    "batch_size": 4,
    "max_iters": 20,
    "eval_interval": 10,
    "eval_iters": 2,
    "log_interval": 5,
    "checkpoint_interval": 0,
    "final_eval": False,
    "noise": "const:sigma=0.01",
    "device": "cpu",
    "dtype": "float32",
    "compile": False,
}
#: The pinned values: eval train/val loss at each eval, train loss and ‖noise‖ at each log line.
PINNED = {"eval": ("train_loss", "val_loss"), "train": ("loss", "noise_norm")}
#: The smallest relative tolerance: a few float32 roundings (2^-23 ≈ 1.2e-7) carried through
#: 20 steps, for a CPU whose kernels round differently from the one that made the file.
FLOOR = 1e-5
#: The tolerance is this many times the spread measured between 1 and 2 threads.
SPREAD_FACTOR = 10


def measure(threads: int) -> dict[str, float]:
    """The pinned values of the golden run trained on `threads` CPU threads:
    {"eval/train_loss@0": …, "train/noise_norm@5": …, …}."""
    from gradnoise.lm.config import resolve_config
    from gradnoise.lm.training.trainer import train

    cfg = resolve_config("shakespeare_char", "tiny", CONFIG)
    with tempfile.TemporaryDirectory(prefix="gradnoise-golden-") as scratch:
        train(cfg, Path(scratch) / "run", progress=False, threads=threads)
        lines = [json.loads(line) for line in (Path(scratch) / "run" / "log.jsonl").read_text().splitlines()]
    return {
        f"{line['kind']}/{field}@{line['step']}": line[field]
        for line in lines
        for field in PINNED[line["kind"]]
    }


def relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def differences(measured: dict[str, float], pinned: dict[str, float], tolerance: float) -> list[str]:
    """One line per pinned value that is missing or off by more than `tolerance` (relative)."""
    out = []
    for key, expected in pinned.items():
        value = measured.get(key)
        if value is None:
            out.append(f"{key}: not logged (expected {expected!r})")
        elif not math.isfinite(value) or relative_difference(value, expected) > tolerance:
            off = relative_difference(value, expected)
            out.append(f"{key}: {value!r}, pinned {expected!r} (relative difference {off:.3g})")
    return out


def main() -> int:
    one, two = measure(1), measure(2)
    spread = max(relative_difference(one[k], two[k]) for k in one)
    tolerance = max(FLOOR, SPREAD_FACTOR * spread)
    document = {
        "about": "the golden run of tests/test_golden_run.py; regenerate on purpose only: "
        "PYTHONPATH=src python tests/golden/regenerate.py (see docs/design.md, Reproducibility)",
        "config": CONFIG,
        "spread_1_vs_2_threads": spread,
        "tolerance": tolerance,
        "values": one,
    }
    GOLDEN_FILE.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {GOLDEN_FILE}: {len(one)} values, spread 1 vs 2 threads {spread:.3g}, ", end="")
    print(f"tolerance {tolerance:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

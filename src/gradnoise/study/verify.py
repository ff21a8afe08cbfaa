"""`gradnoise study verify`: do a study's stored numbers come back from their own configs?

    outcome = verify_study(Path("results/quick"), count=3, steps=100)
    print("\\n".join(outcome.lines)); exit(0 if outcome.agree else 1)

Reruns some finished runs of a study (`count` chosen at random with `seed`, or the
named `run_ids`) from the configs the store holds, in a temporary directory (the
study directory is only read), for their first `steps` steps or whole, and compares
every logged loss (train lines' loss; evals' train, val and test loss; for whole runs
also the exact final val and test loss) with the stored ones:

- exact (every value equal) where the stored run recorded its code and numerics and
  they are this process's: the same source hash, torch, device model, dtype, thread
  count (the rerun takes the stored run's), compile and replicas;
- within a tolerance otherwise (the stored run's identity is unknown, or differs):
  STEP0_TOLERANCE at step 0, where only the initial weights and the eval batches
  decide the losses, and TOLERANCE after, where a change in the order of floating-point
  sums alone moves a run's losses by up to about a hundredth of a nat over a thousand
  steps (docs/design.md, "Reproducibility").

A run mismatches when a stored point is missing from the rerun or differs beyond what is
allowed; the line then says where it first differs and what differs in what made it.

A study of the MNIST task compares its evals' test accuracy, test loss and train loss
(MNIST_COMPARED), under the same rules and tolerances (an accuracy tolerance of 0.02 is 20
digits of mnist_5k's 1,000); a rerun of its first `steps` steps trains whole epochs
(the batches of an epoch do not depend on how many follow) and compares the evals up to
`steps`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from gradnoise.errors import UserError
from gradnoise.lm.config import TrainConfig
from gradnoise.lm.storage import runlog
from gradnoise.lm.training import provenance
from gradnoise.study import tasks
from gradnoise.study.executors import run_name
from gradnoise.study.store import STORE_FILE, Store, run_code, run_numerics

#: |Δ| allowed at step 0 (nats): a forward pass of the same weights on the same batches.
STEP0_TOLERANCE = 1e-4
#: |Δ| allowed after step 0 (nats) where the rerun cannot be exact.
TOLERANCE = 0.02
#: The logged values compared: (kind, field).
COMPARED = (("train", "loss"), ("eval", "train_loss"), ("eval", "val_loss"), ("eval", "test_loss"))
#: Finals compared for a whole run (the exact pass over the whole split).
COMPARED_FINALS = ("val_loss_full", "test_loss_full")
#: What an MNIST run's rerun is compared on: its evals (it logs no train lines).
MNIST_COMPARED = (("eval", "test_acc"), ("eval", "test_loss"), ("eval", "train_loss"))
#: Threads for a rerun of a run that did not record its own.
DEFAULT_THREADS = 1


@dataclass(frozen=True)
class Verdict:
    run_id: str
    agrees: bool
    line: str


@dataclass(frozen=True)
class Outcome:
    verdicts: list[Verdict]

    @property
    def agree(self) -> bool:
        return all(v.agrees for v in self.verdicts)

    @property
    def lines(self) -> list[str]:
        failed = sum(not v.agrees for v in self.verdicts)
        total = len(self.verdicts)
        verdict = (
            f"verify: all {total} run(s) agree"
            if not failed
            else f"verify: {failed} of {total} run(s) do not match their stored numbers"
        )
        return [v.line for v in self.verdicts] + [verdict]


def verify_study(
    study_dir: Path,
    *,
    count: int | None = None,
    run_ids: list[str] | None = None,
    steps: int | None = None,
    seed: int = 0,
    on_verdict=None,
) -> Outcome:
    """Rerun and compare (see the module docstring); on_verdict(verdict) as each run ends."""
    rows, finals, curves, task = _read(Path(study_dir), run_ids)
    chosen = _choose(rows, count, run_ids, seed)
    verdicts = []
    for row in chosen:
        limit = _check_steps(steps, row, task)
        if task.name == "mnist":
            verdict = _verify_mnist_run(row, curves[row["id"]], limit)
        else:
            verdict = _verify_run(row, finals.get(row["id"]), curves[row["id"]], limit, whole=steps is None)
        if on_verdict is not None:
            on_verdict(verdict)
        verdicts.append(verdict)
    return Outcome(verdicts)


def _read(study_dir: Path, run_ids) -> tuple[list[dict], dict, dict, tasks.Task]:
    database = study_dir / STORE_FILE
    if not database.is_file():
        raise UserError(f"{study_dir} holds no study (no {STORE_FILE})")
    with Store(database, readonly=True) as store:
        rows = [r for r in store.runs() if r["status"] in runlog.FINISHED]
        finals = {f["id"]: f for f in store.finals()}
        points = store.curves([r["id"] for r in rows])
        task = tasks.task_of_spec(store.study()["spec"])
    curves: dict[str, list[dict]] = {r["id"]: [] for r in rows}
    for point in points:
        curves[point["run_id"]].append(point)
    return rows, finals, curves, task


def _choose(rows: list[dict], count, run_ids, seed) -> list[dict]:
    """The named runs, or `count` finished runs drawn with random.Random(seed)."""
    by_id = {r["id"]: r for r in rows}
    if run_ids:
        missing = [i for i in run_ids if i not in by_id]
        if missing:
            raise UserError(
                f"run(s) {', '.join(missing)}: not finished runs of this study; "
                f"its finished runs are {', '.join(by_id) or 'none'}"
            )
        return [by_id[i] for i in dict.fromkeys(run_ids)]
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(rows):
        raise UserError(f"--runs {count!r}: give an integer from 1 to {len(rows)} (the finished runs)")
    return random.Random(seed).sample(rows, count)


def _check_steps(steps, row: dict, task: tasks.Task) -> int:
    max_iters = task.total_steps(task.from_dict(row["config"]))
    if steps is None:
        return max_iters
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= max_iters:
        raise UserError(f"--steps {steps!r}: give an integer from 1 to {max_iters} (run {row['id']}'s steps)")
    return steps


def _verify_run(row: dict, stored_finals, stored_curves: list[dict], steps: int, whole: bool) -> Verdict:
    """Rerun one run for `steps` steps in a temporary directory and compare."""
    from gradnoise.lm.training.trainer import train

    stored_numerics = run_numerics(row)
    threads = (stored_numerics or {}).get("threads") or DEFAULT_THREADS
    cfg = TrainConfig.from_dict(row["config"]).replace(tensorboard=False, wandb=False)
    with tempfile.TemporaryDirectory(prefix="gradnoise-verify-") as scratch, _quiet_trainer():
        run_dir = Path(scratch) / row["id"]

        def stop(step, inputs, targets) -> bool:
            # At step 1 and every log line, compare what is logged (the steps before this
            # one): a run that differs beyond the tolerance need not train to its end.
            if step == 1 or step % cfg.log_interval == 0:
                logged = runlog.read_curves(run_dir)
                if _compare(stored_curves, logged, step - 1, exact=False)[0] is not None:
                    return True
            return step >= steps

        result = train(cfg, run_dir, progress=False, on_step=stop, threads=threads)
        rerun = runlog.read_curves(run_dir)
    here = result["provenance"]
    exact, why_not = _exact_expected(row, stored_numerics, here)
    name = run_name(row["id"], row["dataset"], row["method"], row["seed"])
    first, largest, compared = _compare(stored_curves, rerun, steps, exact)
    if first is None and whole and stored_finals is not None:
        first, largest, extra = _compare_finals(stored_finals, result["finals"], exact, largest)
        compared += extra
    span = "whole run" if whole else f"steps ≤ {steps}"
    threads_note = "" if stored_numerics else f"; rerun on {threads} thread(s)"
    if first is not None:
        return Verdict(row["id"], False, f"{name}: MISMATCH ({span}): {first}; {why_not or 'same code'}")
    if exact:
        line = f"{name}: exact ({span}, {compared} values equal; same code and numerics)"
    else:
        agreement = "bit for bit" if largest == 0 else f"within tolerance, largest |Δ| {largest:.2g}"
        line = f"{name}: agrees {agreement} ({span}, {compared} values; {why_not}{threads_note})"

    return Verdict(row["id"], True, line)


def _exact_expected(row: dict, stored_numerics: dict | None, here: dict) -> tuple[bool, str]:
    """(whether the rerun must be bit-identical, what made the two differ, if anything)."""
    stored_code = run_code(row)
    if stored_code is None:
        return False, "the stored run's code is unknown (recorded before runs recorded it)"
    reasons = []
    if not provenance.same_code(stored_code, here["code"]):
        reasons.append(f"stored code {_code_text(stored_code)}, here {_code_text(here['code'])}")
    differences = provenance.numerics_differences(stored_numerics, here["numerics"])
    if differences:
        reasons.append("numerics differ: " + ", ".join(differences))
    if row.get("provenance_consistent") == 0:
        reasons.append("the stored run's attempts had different code or numerics")
    return not reasons, "; ".join(reasons)


def _code_text(code: dict) -> str:
    """The code's label, with its source hash where the label lacks it (a clean checkout's)."""
    label = provenance.code_label(code)
    return label if "source" in label else f"{label} (source {code['source_sha256'][:12]})"


def _verify_mnist_run(row: dict, stored_curves: list[dict], steps: int) -> Verdict:
    """Rerun an MNIST run for the whole epochs that hold its first `steps` steps, on the
    stored run's thread count, in a temporary directory, and compare its evals."""
    from gradnoise.mnist.trainer import train

    stored_numerics = run_numerics(row)
    cfg = tasks.MNIST.from_dict(row["config"])
    steps_per_epoch = cfg.total_steps() // cfg.epochs
    short = cfg.replace(epochs=min(cfg.epochs, math.ceil(steps / steps_per_epoch)))
    threads = torch.get_num_threads()
    torch.set_num_threads((stored_numerics or {}).get("threads") or DEFAULT_THREADS)
    try:
        with tempfile.TemporaryDirectory(prefix="gradnoise-verify-") as scratch, _quiet_trainer():
            result = train(short, Path(scratch) / row["id"])
            rerun = runlog.read_curves(Path(scratch) / row["id"])
    finally:
        torch.set_num_threads(threads)
    exact, why_not = _exact_expected(row, stored_numerics, result["provenance"])
    name = run_name(row["id"], row["dataset"], row["method"], row["seed"])
    first, largest, compared = _compare(stored_curves, rerun, steps, exact, MNIST_COMPARED)
    span = "whole run" if steps == cfg.total_steps() else f"steps ≤ {steps}"
    if first is not None:
        return Verdict(row["id"], False, f"{name}: MISMATCH ({span}): {first}; {why_not or 'same code'}")
    if exact:
        line = f"{name}: exact ({span}, {compared} values equal; same code and numerics)"
        return Verdict(row["id"], True, line)
    agreement = "bit for bit" if largest == 0 else f"within tolerance, largest |Δ| {largest:.2g}"
    return Verdict(row["id"], True, f"{name}: agrees {agreement} ({span}, {compared} values; {why_not})")


def _compare(
    stored: list[dict], rerun: list[dict], steps: int, exact: bool, fields=COMPARED
) -> tuple[str | None, float, int]:
    """(where the rerun first differs or None, the largest |Δ|, how many values were compared)."""
    again = {(p["kind"], p["step"]): p for p in rerun}
    largest, compared = 0.0, 0
    for point in sorted(stored, key=lambda p: (p["step"], p["kind"] != "eval")):
        if point["step"] > steps:
            continue
        for kind, field in fields:
            if point["kind"] != kind or point.get(field) is None:
                continue
            new = again.get((kind, point["step"]), {}).get(field)
            if new is None:
                return f"the rerun logged no {kind} {field} at step {point['step']}", largest, compared
            delta = abs(new - point[field])
            largest, compared = max(largest, delta), compared + 1
            allowed = 0.0 if exact else STEP0_TOLERANCE if point["step"] == 0 else TOLERANCE
            if delta > allowed:
                return _differs(kind, field, point["step"], new, point[field]), largest, compared
    return None, largest, compared


def _compare_finals(stored: dict, rerun: dict, exact: bool, largest: float) -> tuple[str | None, float, int]:
    compared = 0
    for key in COMPARED_FINALS:
        if stored.get(key) is None:
            continue
        new = rerun.get(key)
        if new is None:
            return f"the rerun has no final {key}", largest, compared
        delta = abs(new - stored[key])
        largest, compared = max(largest, delta), compared + 1
        if delta > (0.0 if exact else TOLERANCE):
            return (
                f"final {key} {new:.6g} here vs {stored[key]:.6g} stored (|Δ| {delta:.2g})",
                largest,
                compared,
            )
    return None, largest, compared


def _differs(kind: str, field: str, step: int, new: float, old: float) -> str:
    where = f"{kind} {field} at step {step}: {new:.6g} here vs {old:.6g} stored (|Δ| {abs(new - old):.2g})"
    if step == 0:
        return f"{where}, before any training step: the initial weights or the eval batches differ"
    return f"first differs at {where}"


@contextlib.contextmanager
def _quiet_trainer():
    """The reruns' own eval lines stay out of the verify output (warnings still show)."""
    loggers = [logging.getLogger("gradnoise.lm"), logging.getLogger("gradnoise.mnist")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)

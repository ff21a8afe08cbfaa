"""A study as the report reads it from its store: the runs, the finals of the done
runs, their eval and train log points, and the spec's report blocks parsed.

    study = load_study(store)
    study.values("shakespeare_char", "exp", "val_loss")   # seed → value, done runs only

Only runs with status "done" have finals and curves here; the others are listed in
`Study.runs` alone.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from gradnoise.lm.storage.runlog import GRADIENT_FIELDS
from gradnoise.study.hypotheses import Hypotheses, parse_hypotheses
from gradnoise.study.layout import (
    DoseLayout,
    FindingsLayout,
    Published,
    TableLayout,
    parse_dose_response,
    parse_findings,
    parse_published,
    parse_table,
)
from gradnoise.study.store import Store


@dataclass(frozen=True)
class Study:
    """What the report needs of a study's store."""

    name: str
    spec: dict
    baseline: str
    #: every run (Store.runs rows), in the store's order
    runs: tuple[dict, ...]
    #: the spec's order first, then any other seen in the runs; only those with runs
    datasets: tuple[str, ...]
    methods: tuple[str, ...]
    #: (dataset, method) → seed → finals row (Store.finals) of a done run
    done: dict[tuple[str, str], dict[int, dict]]
    #: run id → its eval points (Store.curves rows of kind "eval"), done runs only
    evals: dict[str, list[dict]]
    #: run id → its train log points (step, loss, sigma and GRADIENT_FIELDS), done runs only
    trains: dict[str, list[dict]]
    published: Published | None
    table: TableLayout | None
    dose: DoseLayout | None = None
    findings: FindingsLayout | None = None
    hypotheses: Hypotheses | None = None

    def values(self, dataset: str, method: str, metric: str) -> dict[int, float | None]:
        """seed → the metric's value, over the done runs of (dataset, method)."""
        return {seed: row.get(metric) for seed, row in self.done.get((dataset, method), {}).items()}

    def has(self, metric: str) -> bool:
        """Whether any done run has a value for `metric`."""
        return any(row.get(metric) is not None for rows in self.done.values() for row in rows.values())

    def config(self, dataset: str, method: str) -> dict | None:
        """The resolved config of (dataset, method)'s first run (seed and device aside, a
        method's runs on one dataset share it)."""
        return next(
            (r["config"] for r in self.runs if (r["dataset"], r["method"]) == (dataset, method)), None
        )


def headline_metric(study: Study) -> str:
    """The final val loss the report leads with: the exact full pass where the runs made
    it, else the last eval's estimate."""
    return "val_loss_full" if study.has("val_loss_full") else "val_loss"


TRAIN_KEYS = ("step", "loss", "sigma", *GRADIENT_FIELDS)


def load_study(store: Store) -> Study:
    """Read a study from its store: runs, the finals of done runs, and of their curves the
    eval points and the train points' loss, σ and gradient statistics.

    A store written before train_loss_window was a final gets it from the run's last
    train log line, when that line is the run's last step (the same number)."""
    stored = store.study()
    spec = stored["spec"]
    runs = store.runs()
    done: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for row in store.finals():
        if row["status"] == "done":
            done[(row["dataset"], row["method"])][row["seed"]] = row
    evals, trains = {}, {}
    for row in (row for rows in done.values() for row in rows.values()):
        points = store.curves([row["id"]])
        evals[row["id"]] = [p for p in points if p["kind"] == "eval"]
        trains[row["id"]] = [{k: p[k] for k in TRAIN_KEYS} for p in points if p["kind"] == "train"]
        last = trains[row["id"]][-1] if trains[row["id"]] else None
        if row.get("train_loss_window") is None and last is not None and last["step"] == row["steps"]:
            row["train_loss_window"] = last["loss"]
    baseline = spec.get("baseline", "baseline")
    datasets = _ordered(spec.get("datasets") or [], (run["dataset"] for run in runs))
    methods = _ordered([baseline, *(spec.get("methods") or {})], (run["method"] for run in runs))
    source = f"in {store.path}"
    return Study(
        name=stored["name"],
        spec=spec,
        baseline=baseline,
        runs=tuple(runs),
        datasets=tuple(d for d in datasets if any(run["dataset"] == d for run in runs)),
        methods=tuple(m for m in methods if any(run["method"] == m for run in runs)),
        done=dict(done),
        evals=evals,
        trains=trains,
        published=parse_published(spec, source),
        table=parse_table(spec, source),
        dose=parse_dose_response(spec, source),
        findings=parse_findings(spec, source),
        hypotheses=parse_hypotheses(spec, source),
    )


def _ordered(preferred: Iterable[str], seen: Iterable[str]) -> list[str]:
    """`preferred` first (the spec's order), then any other name seen, sorted."""
    order = list(dict.fromkeys(preferred))
    return order + sorted(set(seen) - set(order))

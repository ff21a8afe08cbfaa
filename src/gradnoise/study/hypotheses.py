"""A spec's pre-registered hypotheses: the confirmatory family the report answers first.

    hypotheses:
      metric: val_loss_full          # the primary metric (a final metric; lower is better)
      alpha: 0.05                    # the family's level
      correction: holm               # across the confirmatory family (the only one offered)
      confirmatory:
        - {id: a, kind: better, treatment: rel-3, control: baseline}
        - {id: d, kind: equivalent, margin: 0.05, treatment: rel-3, control: dropout-0.1}
      contrasts:                     # exploratory: estimated with a CI, outside the family
        - {id: noise-x-dropout, treatment: rel-3+d0.1, control: d0.1, versus: [rel-3, baseline]}

`better`: two-sided paired t of treatment − control; the report says better / worse where
the Holm-adjusted p is below α, else inconclusive. `equivalent`: two one-sided paired t-tests
(TOST) of |treatment − control| < margin, in the metric's units. A contrast is treatment −
control, or with `versus: [t2, c2]` the interaction (treatment − control) − (t2 − c2).
Each entry may name its own `metric` and a `claim` (the sentence it tests, in words).

The block changes no run, yet it is not a report key: a study's store refuses a spec whose
hypotheses differ from the ones it was created with, so they cannot move after the data.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from gradnoise.errors import UserError
from gradnoise.lm.storage.runlog import FINAL_METRICS

BLOCK_KEYS = ("metric", "alpha", "correction", "confirmatory", "contrasts")
TEST_KEYS = ("id", "kind", "treatment", "control", "margin", "metric", "claim")
CONTRAST_KEYS = ("id", "treatment", "control", "versus", "metric", "claim")
KINDS = ("better", "equivalent")
CORRECTIONS = ("holm",)
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=×-]*")


@dataclass(frozen=True)
class Hypothesis:
    """One confirmatory test: treatment − control on `metric`, paired on seeds."""

    id: str
    kind: str
    treatment: str
    control: str
    metric: str
    margin: float | None = None
    claim: str = ""


@dataclass(frozen=True)
class Contrast:
    """An exploratory paired difference, or interaction when `versus` is given."""

    id: str
    treatment: str
    control: str
    metric: str
    versus: tuple[str, str] | None = None
    claim: str = ""


@dataclass(frozen=True)
class Hypotheses:
    metric: str
    alpha: float
    correction: str
    confirmatory: tuple[Hypothesis, ...]
    contrasts: tuple[Contrast, ...]


def parse_hypotheses(data: dict, source: str = "<spec>") -> Hypotheses | None:
    """The spec's `hypotheses:` block, validated against its methods (None if it has none)."""
    where = f"study spec {source}: hypotheses"
    block = data.get("hypotheses")
    if block is None:
        return None
    block = _entry(block, BLOCK_KEYS, where)
    metric = _metric(block.get("metric"), f"{where}.metric")
    alpha = block.get("alpha", 0.05)
    if not (_number(alpha) and 0 < alpha < 0.5):
        raise UserError(f"{where}.alpha={alpha!r} must be a number in (0, 0.5), e.g. 0.05")
    correction = block.get("correction", "holm")
    if correction not in CORRECTIONS:
        raise UserError(f"{where}.correction={correction!r}; allowed: {', '.join(CORRECTIONS)}")
    methods = list(data.get("methods") or {})
    tests = _list(block.get("confirmatory"), f"{where}.confirmatory")
    contrasts = _list(block.get("contrasts"), f"{where}.contrasts")
    if not tests and not contrasts:
        raise UserError(f"{where}: give at least one entry in confirmatory or contrasts")
    confirmatory = tuple(
        _hypothesis(entry, f"{where}.confirmatory[{i}]", methods, metric) for i, entry in enumerate(tests)
    )
    explored = tuple(
        _contrast(entry, f"{where}.contrasts[{i}]", methods, metric) for i, entry in enumerate(contrasts)
    )
    ids = [h.id for h in confirmatory] + [c.id for c in explored]
    if repeated := sorted({i for i in ids if ids.count(i) > 1}):
        raise UserError(f"{where}: id {repeated[0]!r} is used twice; each entry needs its own id")
    return Hypotheses(metric, float(alpha), correction, confirmatory, explored)


def _hypothesis(entry, where: str, methods: list[str], metric: str) -> Hypothesis:
    entry = _entry(entry, TEST_KEYS, where)
    kind = entry.get("kind")
    if kind not in KINDS:
        raise UserError(f"{where}.kind={kind!r}; allowed: {', '.join(KINDS)}")
    margin = entry.get("margin")
    if kind == "equivalent" and not (_number(margin) and margin > 0):
        raise UserError(
            f"{where}.margin={margin!r}: an equivalence test needs a margin > 0, in the metric's units"
        )
    if kind == "better" and margin is not None:
        raise UserError(f"{where}.margin={margin!r}: only kind equivalent takes a margin")
    treatment, control = _pair(entry, where, methods)
    return Hypothesis(
        id=_id(entry.get("id"), where),
        kind=kind,
        treatment=treatment,
        control=control,
        metric=_metric(entry.get("metric", metric), f"{where}.metric"),
        margin=float(margin) if margin is not None else None,
        claim=_claim(entry.get("claim", ""), where),
    )


def _contrast(entry, where: str, methods: list[str], metric: str) -> Contrast:
    entry = _entry(entry, CONTRAST_KEYS, where)
    treatment, control = _pair(entry, where, methods)
    versus = entry.get("versus")
    if versus is not None:
        if not (isinstance(versus, list) and len(versus) == 2):
            raise UserError(f"{where}.versus={versus!r} must be a list of two methods [treatment, control]")
        versus = _pair({"treatment": versus[0], "control": versus[1]}, f"{where}.versus", methods)
    return Contrast(
        id=_id(entry.get("id"), where),
        treatment=treatment,
        control=control,
        metric=_metric(entry.get("metric", metric), f"{where}.metric"),
        versus=versus,
        claim=_claim(entry.get("claim", ""), where),
    )


def _pair(entry: dict, where: str, methods: list[str]) -> tuple[str, str]:
    names = []
    for key in ("treatment", "control"):
        name = entry.get(key)
        if name not in methods:
            raise UserError(f"{where}.{key}={name!r} is not one of the methods ({', '.join(methods)})")
        names.append(name)
    if names[0] == names[1]:
        raise UserError(f"{where}: treatment and control are both {names[0]!r}; compare two methods")
    return names[0], names[1]


def _entry(value, allowed: tuple[str, ...], where: str) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a mapping of {', '.join(allowed)}, got {value!r:.200}")
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(allowed)}")
    return value


def _list(value, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(f"{where}={value!r:.200} must be a list")
    return value


def _metric(value, where: str) -> str:
    if value not in FINAL_METRICS:
        raise UserError(f"{where}={value!r}: unknown metric; allowed: {', '.join(FINAL_METRICS)}")
    return value


def _id(value, where: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise UserError(f"{where}.id={value!r}: an id is required, made of letters, digits and _.+=×-")
    return value


def _claim(value, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}.claim={value!r} must be a string")
    return " ".join(value.split())


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

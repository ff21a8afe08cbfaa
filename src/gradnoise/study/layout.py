"""The spec's report layout: the keys that change what a study's report says, not what runs.

    published:        reference values beside the study's own (LM task)
    table:            a paper-style table, a row per dataset (LM task)
    dose_response:    noise levels as one family: plot, Holm, sentence (LM task)
    findings:         which methods beat the baseline, and a reference method (LM task)
    settings_table:   a classifier paper's table (MNIST task): per setting, best and
                      average of a metric without → with noise, the published values
                      beside them, and the fraction of runs that train, paired on seeds

Each block is validated here against the spec's methods and its task's final metrics;
`gradnoise.study.spec` expands the runs and calls these parsers, and the report calls
them again on the spec a store holds. `check_producible` checks that the runs produce
every metric the blocks name.
"""

from __future__ import annotations

import dataclasses
import math

from gradnoise.errors import UserError
from gradnoise.lm.data.sources import CORPORA
from gradnoise.study.tasks import task_of_spec

PUBLISHED_KEYS = ("source", "method", "values", "how")
TABLE_KEYS = ("title", "caption", "metrics", "labels")
DOSE_KEYS = ("methods", "metrics", "references")
DOSE_METRICS = ("val_loss_full", "best_val_loss")
#: The loss metrics the report compares with the baseline, paired on seeds: what the
#: findings and dose_response sentences may name.
COMPARED_METRICS = ("val_loss_full", "best_val_loss", "val_loss", "train_loss", "test_loss_full")
FINDINGS_KEYS = ("reference", "metrics")
SETTINGS_KEYS = ("title", "caption", "source", "metric", "trained_above", "rows")
SETTINGS_ROW_KEYS = ("label", "without", "with", "published")
#: The report blocks (and pre-registered tests) each task's report draws; a spec naming
#: another task's is refused.
TASK_BLOCKS = {
    "lm": ("published", "table", "dose_response", "findings", "hypotheses"),
    "mnist": ("settings_table",),
}


@dataclasses.dataclass(frozen=True)
class Published:
    """Reference values from elsewhere (a paper), shown beside the study's own.

    values[dataset][metric] is the source's number for the study's final metric
    `metric` of `method`; how[metric] says how the source measured it where that
    differs from how this project does.
    """

    source: str
    method: str
    values: dict[str, dict[str, float]]
    how: dict[str, str]


@dataclasses.dataclass(frozen=True)
class TableLayout:
    """A paper-style table: a row per dataset, a column per method × metric, each cell
    mean ± sd over seeds with the p-value of the paired test against the baseline."""

    title: str
    caption: str
    metrics: tuple[str, ...]
    labels: dict[str, str]

    def label(self, metric: str) -> str:
        return self.labels.get(metric, metric)


@dataclasses.dataclass(frozen=True)
class DoseLayout:
    """Noise levels compared with the baseline as one family: the report plots each
    method's difference from the baseline against the σ it used (logged, median over
    training), adjusts their p-values together (Holm) and says whether any level helps.
    `references` (e.g. dropout) are drawn beside them, outside the family."""

    methods: tuple[str, ...]
    metrics: tuple[str, ...]
    references: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class FindingsLayout:
    """What the report's findings say, per dataset and metric: which methods are
    significantly better (or worse) than the baseline (Holm across all methods), and,
    if a `reference` method is named (the classical regularizer to beat), how each
    other method compares with it, paired on seeds (Holm across those comparisons)."""

    reference: str | None
    metrics: tuple[str, ...]


def check_producible(where: str, runs: list, published, table, dose, findings, set_values) -> None:
    """UserError unless every metric and method the report keys name is one the runs produce:
    a metric of the final pass (*_full) needs final_eval in every run it is read from, a test
    metric a dataset with a test split, the findings and dose_response metrics are losses the
    report compares, and every dose_response method adds gradient noise. A `set:` (or
    --set) final_eval is the user's choice over the whole spec: the report then says which
    metrics no run computed (report.sentences.left_out)."""

    def check(key: str, metric: str, datasets) -> None:
        considered = [run for run in runs if run.dataset in datasets]
        if metric.endswith("_full") and "final_eval" not in set_values:
            without = sorted({run.method for run in considered if not run.config.final_eval})
            if without:
                raise UserError(
                    f"{where}: {key} names {metric}, which only the final pass computes, and "
                    f"{', '.join(without)} run with final_eval: false; drop {metric} or set final_eval: true"
                )
        if metric.startswith("test_"):
            untested = sorted({d for d in datasets if "test" not in dict(CORPORA[d].splits)})
            if untested:
                raise UserError(f"{where}: {key} names {metric}, but {', '.join(untested)} has no test split")

    every = sorted({run.dataset for run in runs})
    for key, layout in (("findings.metrics", findings), ("dose_response.metrics", dose)):
        for metric in layout.metrics if layout is not None else ():
            if metric not in COMPARED_METRICS:
                raise UserError(
                    f"{where}: {key} names {metric!r}, which the report does not compare with the "
                    f"baseline; allowed: {', '.join(COMPARED_METRICS)}"
                )
            check(key, metric, every)
    for metric in table.metrics if table is not None else ():
        check("table.metrics", metric, every)
    for dataset, values in (published.values if published is not None else {}).items():
        for metric in values:
            check(f"published.values.{dataset}", metric, [dataset])
    for method in dose.methods if dose is not None else ():
        if any(run.method == method and run.config.noise == "none" for run in runs):
            raise UserError(
                f"{where}: dose_response.methods names {method!r}, which adds no gradient noise "
                "(noise: none); list noise levels there, other methods under references"
            )


def parse_published(data: dict, source: str = "<spec>") -> Published | None:
    """The spec's `published:` block, validated against its datasets and methods (None if
    it has none). The report calls this on the spec a store holds."""
    where = f"study spec {source}: published"
    block = data.get("published")
    if block is None:
        return None
    block = _known_keys(_mapping(block, where), PUBLISHED_KEYS, where)
    text = block.get("source")
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}.source={text!r}: say where the values come from (a non-empty string)")
    methods = data.get("methods") or {}
    method = block.get("method", data.get("baseline", "baseline"))
    if method not in methods:
        raise UserError(f"{where}.method={method!r} is not one of the methods ({', '.join(methods)})")
    values = _mapping(block.get("values"), f"{where}.values")
    if not values:
        raise UserError(f"{where}.values is empty; give dataset: {{metric: value}}, e.g. {_EXAMPLE}")
    datasets = data.get("datasets")
    datasets = [datasets] if isinstance(datasets, str) else list(datasets or [])
    checked: dict[str, dict[str, float]] = {}
    for dataset, metrics in values.items():
        here = f"{where}.values.{dataset}"
        if dataset not in datasets:
            raise UserError(f"{here}: {dataset!r} is not in datasets (datasets: {', '.join(datasets)})")
        metrics = _mapping(metrics, here)
        if not metrics:
            raise UserError(f"{here} is empty; give {{metric: value}}, e.g. {_EXAMPLE}")
        for metric, value in metrics.items():
            _final_metric(metric, here, data)
            if not _finite_number(value):
                raise UserError(f"{here}.{metric}={value!r} must be a finite number")
        checked[dataset] = {metric: float(value) for metric, value in metrics.items()}
    how = _mapping(block.get("how"), f"{where}.how")
    given = {metric for metrics in checked.values() for metric in metrics}
    for metric, text in how.items():
        if metric not in given:
            raise UserError(
                f"{where}.how names {metric!r}, which no published value has "
                f"(published metrics: {', '.join(sorted(given))})"
            )
        if not isinstance(text, str):
            raise UserError(f"{where}.how.{metric}={text!r} must be a string")
    return Published(source=block["source"].strip(), method=method, values=checked, how=dict(how))


def parse_table(data: dict, source: str = "<spec>") -> TableLayout | None:
    """The spec's `table:` block, validated (None if it has none)."""
    where = f"study spec {source}: table"
    block = data.get("table")
    if block is None:
        return None
    block = _known_keys(_mapping(block, where), TABLE_KEYS, where)
    title = block.get("title")
    if not isinstance(title, str) or not title.strip():
        raise UserError(f"{where}.title={title!r}: a title is required (a non-empty string)")
    caption = block.get("caption", "")
    if not isinstance(caption, str):
        raise UserError(f"{where}.caption={caption!r} must be a string")
    metrics = block.get("metrics")
    if not isinstance(metrics, list) or not metrics:
        raise UserError(
            f"{where}.metrics={metrics!r} must be a non-empty list of final metrics, "
            "e.g. [train_loss, val_loss]"
        )
    for metric in metrics:
        _final_metric(metric, f"{where}.metrics", data)
    if len(set(metrics)) != len(metrics):
        raise UserError(f"{where}.metrics={metrics} lists a metric twice")
    labels = _mapping(block.get("labels"), f"{where}.labels")
    for metric, label in labels.items():
        if metric not in metrics:
            raise UserError(
                f"{where}.labels names {metric!r}, which is not in metrics ({', '.join(metrics)})"
            )
        if not isinstance(label, str) or not label.strip():
            raise UserError(f"{where}.labels.{metric}={label!r} must be a non-empty string")
    return TableLayout(
        title=title.strip(), caption=caption.strip(), metrics=tuple(metrics), labels=dict(labels)
    )


def parse_dose_response(data: dict, source: str = "<spec>") -> DoseLayout | None:
    """The spec's `dose_response:` block, validated against its methods (None if it has none)."""
    where = f"study spec {source}: dose_response"
    block = data.get("dose_response")
    if block is None:
        return None
    block = _known_keys(_mapping(block, where), DOSE_KEYS, where)
    methods = data.get("methods") or {}
    baseline = data.get("baseline", "baseline")

    def method_list(key: str, required: bool) -> tuple[str, ...]:
        names = block.get(key, None if required else [])
        if not isinstance(names, list) or (required and not names):
            kind = "a non-empty list" if required else "a list"
            raise UserError(f"{where}.{key}={names!r} must be {kind} of methods")
        for name in names:
            if name not in methods or name == baseline:
                raise UserError(
                    f"{where}.{key} names {name!r}, which is not one of the methods compared with "
                    f"{baseline} ({', '.join(m for m in methods if m != baseline)})"
                )
        if len(set(names)) != len(names):
            raise UserError(f"{where}.{key}={names} lists a method twice")
        return tuple(names)

    family, references = method_list("methods", True), method_list("references", False)
    both = sorted(set(family) & set(references))
    if both:
        raise UserError(f"{where}: {', '.join(both)} is in both methods and references; choose one")
    metrics = block.get("metrics", list(DOSE_METRICS))
    if not isinstance(metrics, list) or not metrics:
        raise UserError(f"{where}.metrics={metrics!r} must be a non-empty list of final metrics")
    for metric in metrics:
        _final_metric(metric, f"{where}.metrics", data)
    return DoseLayout(methods=family, metrics=tuple(dict.fromkeys(metrics)), references=references)


def parse_findings(data: dict, source: str = "<spec>") -> FindingsLayout | None:
    """The spec's `findings:` block, validated against its methods (None if it has none)."""
    where = f"study spec {source}: findings"
    block = data.get("findings")
    if block is None:
        return None
    block = _known_keys(_mapping(block, where), FINDINGS_KEYS, where)
    methods = data.get("methods") or {}
    baseline = data.get("baseline", "baseline")
    reference = block.get("reference")
    if reference is not None and (reference not in methods or reference == baseline):
        raise UserError(
            f"{where}.reference={reference!r} is not one of the methods compared with {baseline} "
            f"({', '.join(m for m in methods if m != baseline)})"
        )
    metrics = block.get("metrics", list(DOSE_METRICS))
    if not isinstance(metrics, list) or not metrics:
        raise UserError(f"{where}.metrics={metrics!r} must be a non-empty list of final metrics")
    for metric in metrics:
        _final_metric(metric, f"{where}.metrics", data)
    return FindingsLayout(reference=reference, metrics=tuple(dict.fromkeys(metrics)))


_EXAMPLE = "{shakespeare_char: {val_loss: 1.47}}"


def _known_keys(block: dict, allowed: tuple[str, ...], where: str) -> dict:
    unknown = [k for k in block if k not in allowed]
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(allowed)}")
    return block


def _final_metric(metric, where: str, data: dict) -> None:
    """UserError unless `metric` is a final metric of the spec's task."""
    allowed = task_of_spec(data).metrics
    if metric not in allowed:
        raise UserError(f"{where}: unknown metric {metric!r}; allowed: {', '.join(allowed)}")


def _finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class SettingsRow:
    """One setting of a settings table: the methods without noise and their paired methods
    with noise (without[i] and with_noise[i] share seeds: the same init and batches), and
    the published (best, average) of each side, in percent, where the source gives them."""

    label: str
    without: tuple[str, ...]
    with_noise: tuple[str, ...]
    published_without: tuple[float, float] | None
    published_with: tuple[float, float] | None


@dataclasses.dataclass(frozen=True)
class SettingsTable:
    """A classifier paper's table: per row (setting), the best and the average of `metric`
    over every run of the row's methods, without → with noise; a run "trains" when its
    metric exceeds `trained_above` (the trainer's escape threshold)."""

    title: str
    caption: str
    source: str
    metric: str
    trained_above: float
    rows: tuple[SettingsRow, ...]


def parse_settings_table(data: dict, source: str = "<spec>") -> SettingsTable | None:
    """The spec's `settings_table:` block, validated against its methods (None if it has none)."""
    where = f"study spec {source}: settings_table"
    block = data.get("settings_table")
    if block is None:
        return None
    block = _known_keys(_mapping(block, where), SETTINGS_KEYS, where)
    texts = {}
    for key, required in (("title", True), ("caption", False), ("source", True)):
        text = block.get(key, "")
        if not isinstance(text, str) or (required and not text.strip()):
            raise UserError(f"{where}.{key}={text!r} must be a {'non-empty ' if required else ''}string")
        texts[key] = text.strip()
    metric = block.get("metric")
    _final_metric(metric, f"{where}.metric", data)
    trained_above = block.get("trained_above")
    if not _finite_number(trained_above):
        raise UserError(f"{where}.trained_above={trained_above!r} must be a finite number")
    rows = block.get("rows")
    if not isinstance(rows, list) or not rows:
        raise UserError(f"{where}.rows={rows!r:.80} must be a non-empty list of settings")
    parsed = tuple(_settings_row(row, f"{where}.rows[{i}]", data) for i, row in enumerate(rows))
    return SettingsTable(**texts, metric=metric, trained_above=float(trained_above), rows=parsed)


def _settings_row(row, where: str, data: dict) -> SettingsRow:
    row = _known_keys(_mapping(row, where), SETTINGS_ROW_KEYS, where)
    label = row.get("label")
    if not isinstance(label, str) or not label.strip():
        raise UserError(f"{where}.label={label!r} must be a non-empty string")
    methods = data.get("methods") or {}

    def names(key: str) -> tuple[str, ...]:
        given = row.get(key, [])
        if not isinstance(given, list) or not all(name in methods for name in given):
            raise UserError(f"{where}.{key}={given!r} must be a list of methods ({', '.join(methods)})")
        return tuple(given)

    without, with_noise = names("without"), names("with")
    if not without:
        raise UserError(f"{where}.without is empty; give the methods without noise")
    if with_noise and len(with_noise) != len(without):
        raise UserError(
            f"{where}: with={list(with_noise)} must pair one to one with without={list(without)} "
            "(the i-th of each share seeds)"
        )
    published = _mapping(row.get("published"), f"{where}.published")
    _known_keys(published, ("without", "with"), f"{where}.published")
    pairs = {}
    for side, value in published.items():
        if not (isinstance(value, list) and len(value) == 2 and all(_finite_number(v) for v in value)):
            raise UserError(f"{where}.published.{side}={value!r} must be [best, average] in percent")
        pairs[side] = (float(value[0]), float(value[1]))
    if "with" in pairs and not with_noise:
        raise UserError(f"{where}.published.with is given, but the row has no methods with noise")
    return SettingsRow(label.strip(), without, with_noise, pairs.get("without"), pairs.get("with"))


def check_task_blocks(data: dict, where: str) -> None:
    """UserError for a report block the spec's task does not draw."""
    task = task_of_spec(data)
    for blocks in TASK_BLOCKS.values():
        for key in blocks:
            if key in data and key not in TASK_BLOCKS[task.name]:
                raise UserError(
                    f"{where}: {key}: is not drawn for task {task.name}; its report draws "
                    f"{', '.join(TASK_BLOCKS[task.name])}"
                )


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a mapping (key: value), got {value!r}")
    return value

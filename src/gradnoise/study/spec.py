"""Study specs: a YAML file that expands to runs, dataset × method × seed.

    name: quick
    description: what the study asks
    preset: tiny                      # tiny | paper
    datasets: [shakespeare_char]
    seeds: 3                          # 0, 1, 2; or a list [0, 1, 2]
    baseline: baseline                # the method the others are compared with
    overrides: {max_iters: 600}       # every run
    dataset_overrides: {enwik8: {seeds: 3, max_iters: 20000}}
    methods:                          # name → config overrides of that method
      baseline: {}
      exp: {noise: "exp:sigma0=0.01,gamma=0.999"}
      linear: {noise: "linear:sigma0=0.01,total_steps={max_iters}"}
    caveats: [lines the report prints]
    set: {device: cpu}                # applied last, above everything (`--set` on the CLI)
    published:                        # optional: reference values the report shows
      source: the seed paper's baseline, mean of seeds, paper preset
      method: baseline                # the method they are the counterpart of (default: baseline)
      values: {shakespeare_char: {train_loss: 0.8132, best_val_loss: 1.4692}}
      how: {train_loss: how the source measured it, ...}
    table:                            # optional: a paper-style table, a row per dataset
      title: Table 1
      caption: the seed paper's layout
      metrics: [train_loss, val_loss] # its columns: method × metric (final-metric names)
      labels: {train_loss: train, val_loss: val}
    dose_response:                    # optional: noise levels as one family (plot, Holm, sentence)
      methods: [const-1e-4, const-1e-3, rel-0.1, rel-1]   # each at its logged σ (median)
      metrics: [val_loss_full, best_val_loss]             # default: these two
      references: [dropout-0.1]       # other methods drawn beside them (not in the family)
    findings:                         # optional: a table of which methods beat the baseline
      reference: dropout-0.1          # and, paired on seeds, whether they beat this method too
      metrics: [val_loss_full, best_val_loss]             # default: these two
    hypotheses:                       # optional: pre-registered tests (see `hypotheses`)
      metric: val_loss_full
      confirmatory: [{id: a, kind: better, treatment: exp, control: baseline}]

A run's config is the preset's, then `overrides`, then `dataset_overrides`,
then the method's, then `set`, then its dataset and seed. A string value may
name other config values in braces (`{max_iters}`), filled in from the run's
resolved config. Everything is validated here, before anything runs: one file
(about 600 lines) for one idea, the spec's grammar, each key's check beside its key.

The report keys (description, caveats, published, table, dose_response, findings) change what the report
says, not what runs: a study's store accepts a spec that differs from its own
in them alone, and takes the new values (see `runner.open_study`). `hypotheses`
(pre-registered tests, parsed in `gradnoise.study.hypotheses`) is not one of them:
it changes no run, but a study's store refuses to change it after it was created.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path

import yaml

from gradnoise import schedules
from gradnoise.errors import UserError
from gradnoise.lm.config import DATASETS, LATER_KEYS, MAX_SEED, PRESETS, TrainConfig, resolve_config
from gradnoise.lm.data.sources import CORPORA
from gradnoise.lm.storage.runlog import FINAL_METRICS
from gradnoise.study.hypotheses import Hypotheses, parse_hypotheses

SPEC_KEYS = (
    "name",
    "description",
    "preset",
    "datasets",
    "seeds",
    "baseline",
    "overrides",
    "dataset_overrides",
    "methods",
    "caveats",
    "set",
    "published",
    "table",
    "dose_response",
    "findings",
    "hypotheses",
)
# What only the report reads: a spec may change these without changing its runs.
REPORT_KEYS = ("description", "caveats", "published", "table", "dose_response", "findings")
PUBLISHED_KEYS = ("source", "method", "values", "how")
TABLE_KEYS = ("title", "caption", "metrics", "labels")
DOSE_KEYS = ("methods", "metrics", "references")
DOSE_METRICS = ("val_loss_full", "best_val_loss")
#: The loss metrics the report compares with the baseline, paired on seeds: what the
#: findings and dose_response sentences may name.
COMPARED_METRICS = ("val_loss_full", "best_val_loss", "val_loss", "train_loss", "test_loss_full")
FINDINGS_KEYS = ("reference", "metrics")
# The study decides these per run; a spec that set them would fight the expansion.
RESERVED_CONFIG_KEYS = ("dataset", "seed")
# Where a run executes does not change what it computes, so it is not part of the run id.
EXECUTION_KEYS = ("device",)
SPECS_DIR = Path(__file__).parent / "specs"
# A count n means seeds 0 … n-1; more than this is a typo, not a study.
MAX_SEED_COUNT = 10_000
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a study."""

    run_id: str
    dataset: str
    method: str
    seed: int
    config: TrainConfig


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


@dataclasses.dataclass(frozen=True)
class StudySpec:
    """A validated spec and its runs. `data` is the spec as given (what the store keeps)."""

    name: str
    description: str
    preset: str
    datasets: tuple[str, ...]
    baseline: str
    methods: tuple[str, ...]
    caveats: tuple[str, ...]
    runs: tuple[Run, ...]
    data: dict
    published: Published | None = None
    table: TableLayout | None = None
    dose_response: DoseLayout | None = None
    findings: FindingsLayout | None = None
    hypotheses: Hypotheses | None = None


def run_id(config: TrainConfig) -> str:
    """sha256[:12] of the canonical JSON of the resolved config (dataset and seed included,
    execution keys such as the device left out, and LATER_KEYS at their former value)."""
    values = {
        k: v
        for k, v in config.to_dict().items()
        if k not in EXECUTION_KEYS and not (k in LATER_KEYS and v == LATER_KEYS[k])
    }
    return hashlib.sha256(canonical(values).encode()).hexdigest()[:12]


def packaged_specs() -> dict[str, Path]:
    """The specs shipped with gradnoise, by name."""
    return {path.stem: path for path in sorted(SPECS_DIR.glob("*.yaml"))}


def load_spec(spec: str | Path, set_values: dict | None = None) -> StudySpec:
    """Load a spec from a YAML path or a packaged name; `set_values` become its `set:`
    (applied to every run, above everything else)."""
    path = Path(spec)
    packaged = packaged_specs()
    if not path.is_file():
        if str(spec) not in packaged:
            raise UserError(
                f"no study spec {str(spec)!r}: not a file, and not a packaged spec "
                f"(packaged: {', '.join(packaged)})"
            )
        path = packaged[str(spec)]
    data = read_yaml(path)
    if set_values and isinstance(data, dict) and isinstance(data.get("set") or {}, dict):
        data = {**data, "set": {**(data.get("set") or {}), **set_values}}
    return parse_spec(data, source=str(path))


def read_yaml(path: Path):
    """Parse YAML, rejecting duplicate keys (PyYAML would silently keep the last)."""
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML: {error}") from None
    except OSError as error:
        raise UserError(f"cannot read study spec {path}: {error}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader itself reports it below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (each name may appear once)",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)


def parse_spec(data, source: str = "<spec>") -> StudySpec:
    """Validate a parsed spec and expand it to runs; UserError on the first problem."""
    where = f"study spec {source}"
    if not isinstance(data, dict):
        raise UserError(f"{where}: must be a mapping of {', '.join(SPEC_KEYS)}")
    unknown = [k for k in data if k not in SPEC_KEYS]
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(SPEC_KEYS)}")

    name = data.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UserError(f"{where}: name={name!r}: a name is required, made of letters, digits and _.+=- ")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise UserError(f"{where}: description={description!r} must be a string")
    preset = data.get("preset", "tiny")
    if preset not in PRESETS:
        raise UserError(f"{where}: preset={preset!r}; allowed: {', '.join(PRESETS)}")

    datasets = data.get("datasets")
    if isinstance(datasets, str):
        datasets = [datasets]
    if not isinstance(datasets, list) or not datasets:
        raise UserError(f"{where}: datasets={datasets!r} must be a non-empty list of {DATASETS}")
    for dataset in datasets:
        if dataset not in DATASETS:
            raise UserError(f"{where}: unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}")
    if len(set(datasets)) != len(datasets):
        raise UserError(f"{where}: datasets={datasets} lists a dataset twice")

    overrides = _config_mapping(data.get("overrides"), f"{where}: overrides")
    set_values = _config_mapping(data.get("set"), f"{where}: set")
    default_seeds = _seeds(data.get("seeds", 3), f"{where}: seeds")
    dataset_overrides = _mapping(data.get("dataset_overrides"), f"{where}: dataset_overrides")
    for dataset in dataset_overrides:
        if dataset not in datasets:
            raise UserError(
                f"{where}: dataset_overrides names {dataset!r}, which is not in datasets "
                f"(datasets: {', '.join(datasets)})"
            )
    seeds_by_dataset, config_by_dataset = {}, {}
    for dataset in datasets:
        here = f"{where}: dataset_overrides.{dataset}"
        values = dict(_mapping(dataset_overrides.get(dataset), here))
        seeds_by_dataset[dataset] = (
            _seeds(values.pop("seeds"), f"{here}.seeds") if "seeds" in values else default_seeds
        )
        config_by_dataset[dataset] = _config_mapping(values, here)

    methods = _mapping(data.get("methods"), f"{where}: methods")
    if not methods:
        raise UserError(f"{where}: methods is empty; give at least a baseline, e.g. baseline: {{}}")
    for method in methods:
        if not isinstance(method, str) or not _NAME.fullmatch(method):
            raise UserError(f"{where}: method name {method!r} must be made of letters, digits and _.+=- ")
    baseline = data.get("baseline", "baseline")
    if baseline not in methods:
        raise UserError(f"{where}: baseline={baseline!r} is not one of the methods ({', '.join(methods)})")
    method_overrides = {m: _config_mapping(v, f"{where}: methods.{m}") for m, v in methods.items()}

    caveats = data.get("caveats", [])
    if not isinstance(caveats, list) or not all(isinstance(c, str) for c in caveats):
        raise UserError(f"{where}: caveats={caveats!r} must be a list of strings")
    published = parse_published(data, source)
    table = parse_table(data, source)
    dose_response = parse_dose_response(data, source)
    findings = parse_findings(data, source)
    hypotheses = parse_hypotheses(data, source)

    runs = []
    for dataset in datasets:
        for seed in seeds_by_dataset[dataset]:
            method_of_id, method_of_computation = {}, {}
            for method, values in method_overrides.items():
                merged = {**overrides, **config_by_dataset[dataset], **values, **set_values}
                context = f"{where}: method {method!r} on {dataset}, seed {seed}"
                config = _resolve(dataset, preset, {**merged, "seed": seed}, context)
                rid = run_id(config)
                if rid in method_of_id:
                    raise UserError(
                        f"{where}: methods {method_of_id[rid]!r} and {method!r} resolve to the "
                        f"same config on {dataset}; they would be the same run. Make them differ "
                        "or remove one."
                    )
                method_of_id[rid] = method
                same = method_of_computation.setdefault(computation(config), method)
                if same != method:
                    raise UserError(
                        f"{where}: methods {same!r} and {method!r} compute the same on {dataset} "
                        f"(noise {config.noise!r} with noise_mode={config.noise_mode} is "
                        f"{same!r}'s computation: noise_mode=relative is a relative: schedule, and "
                        "a σ of 0 at every step is no noise); remove one"
                    )
                runs.append(Run(rid, dataset, method, seed, config))

    check_producible(where, runs, published, table, dose_response, findings, set_values)
    return StudySpec(
        name=name,
        description=description.strip(),
        preset=preset,
        datasets=tuple(datasets),
        baseline=baseline,
        methods=tuple(methods),
        caveats=tuple(caveats),
        runs=tuple(runs),
        data=data,
        published=published,
        table=table,
        dose_response=dose_response,
        findings=findings,
        hypotheses=hypotheses,
    )


def computation(config: TrainConfig) -> str:
    """What a run computes, as canonical JSON: its run id's values with the noise written one
    way. noise_mode=relative folds into a `relative:` schedule (GradientNoise treats the two
    alike), a schedule whose σ is 0 at every step of the run is `none`, its mode,
    correlation and placement then changing nothing, and noise placed before clipping
    where nothing is clipped (grad_clip = 0) is noise placed after it."""
    values = {k: v for k, v in config.to_dict().items() if k not in EXECUTION_KEYS}
    schedule = schedules.parse(config.noise)
    if (
        config.noise_mode == "relative"
        and schedule is not None
        and not isinstance(schedule, schedules.Relative)
    ):
        schedule = schedules.Relative(schedule)
    if schedule is not None and schedule(0) == 0 and all(schedule(t) == 0 for t in range(config.max_iters)):
        schedule = None
    values["noise"] = "none" if schedule is None else schedule.spec
    values["noise_mode"] = "absolute"
    if schedule is None:
        values.update({key: _DEFAULTS[key] for key in ("noise_correlation", "noise_placement")})
    elif config.noise_placement == "before_clip" and config.grad_clip == 0:
        values["noise_placement"] = "after_clip"  # without clipping, the two are one place
    return canonical(values)


_DEFAULTS = {field.name: field.default for field in dataclasses.fields(TrainConfig)}


def check_producible(where: str, runs: list[Run], published, table, dose, findings, set_values) -> None:
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
            _final_metric(metric, here)
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
        _final_metric(metric, f"{where}.metrics")
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
        _final_metric(metric, f"{where}.metrics")
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
        _final_metric(metric, f"{where}.metrics")
    return FindingsLayout(reference=reference, metrics=tuple(dict.fromkeys(metrics)))


_EXAMPLE = "{shakespeare_char: {val_loss: 1.47}}"


def _known_keys(block: dict, allowed: tuple[str, ...], where: str) -> dict:
    unknown = [k for k in block if k not in allowed]
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(allowed)}")
    return block


def _final_metric(metric, where: str) -> None:
    if metric not in FINAL_METRICS:
        raise UserError(f"{where}: unknown metric {metric!r}; allowed: {', '.join(FINAL_METRICS)}")


def _finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def runs_differ(stored: dict, given: dict) -> bool:
    """Whether two specs' data differ in anything but the report keys (so in their runs)."""

    def runs_part(data: dict) -> dict:
        return {k: v for k, v in data.items() if k not in REPORT_KEYS}

    return canonical(runs_part(stored)) != canonical(runs_part(given))


def canonical(value) -> str:
    """The JSON text two equal specs share (what the store compares)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _resolve(dataset: str, preset: str, values: dict, context: str) -> TrainConfig:
    """resolve_config, with `{key}` placeholders in strings filled from the resolved config."""
    try:
        templated = {k: v for k, v in values.items() if isinstance(v, str) and "{" in v}
        if templated:
            plain = resolve_config(
                dataset, preset, {k: v for k, v in values.items() if k not in templated}
            ).to_dict()
            for key, template in templated.items():
                values[key] = _fill(template, plain, key)
        return resolve_config(dataset, preset, values)
    except UserError as error:
        raise UserError(f"{context}: {error}") from None


def _fill(template: str, config: dict, key: str) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1)
        if name not in config:
            raise UserError(f"{key}={template!r}: no config value {{{name}}}; allowed: {', '.join(config)}")
        return str(config[name])

    return _PLACEHOLDER.sub(value, template)


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a mapping (key: value), got {value!r}")
    return value


def _config_mapping(value, where: str) -> dict:
    values = _mapping(value, where)
    for key in values:
        if key in RESERVED_CONFIG_KEYS:
            raise UserError(
                f"{where}: {key!r} cannot be set here; the study sets it per run (use datasets: and seeds:)"
            )
    return values


def _seeds(value, where: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= MAX_SEED_COUNT:
            raise UserError(f"{where}={value!r}: a count of seeds must be ≥ 1 and ≤ {MAX_SEED_COUNT:,}")
        return tuple(range(value))
    if (
        isinstance(value, list)
        and value
        and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED for s in value)
    ):
        if len(set(value)) != len(value):
            raise UserError(f"{where}={value!r} lists a seed twice")
        return tuple(value)
    raise UserError(
        f"{where}={value!r:.200}: give a count n (seeds 0..n-1) or a list of seeds in [0, 2**63 - 1]"
    )

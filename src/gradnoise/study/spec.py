"""Study specs: a YAML file that expands to runs, dataset × method × seed.

    name: quick
    description: what the study asks
    task: lm                          # lm (default) | mnist: which harness trains the runs
    preset: tiny                      # tiny | paper (task lm); task mnist has none
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
    settings_table: {...}             # optional, task mnist: a classifier paper's table
    hypotheses:                       # optional: pre-registered tests (see `hypotheses`)
      metric: val_loss_full
      confirmatory: [{id: a, kind: better, treatment: exp, control: baseline}]

A run's config is the preset's, then `overrides`, then `dataset_overrides`,
then the method's, then `set`, then its dataset and seed. A string value may
name other config values in braces (`{max_iters}`), filled in from the run's
resolved config. Everything is validated before anything runs: the run expansion here,
the report blocks (published, table, dose_response, findings, settings_table) in
`gradnoise.study.layout`. A task mnist spec's runs are MnistConfigs (its datasets
mnist_5k or mnist, no preset, dropout and the rest as `gradnoise train-mnist` keys);
see `gradnoise.study.tasks`.

The report keys (description, caveats, published, table, dose_response, findings,
settings_table) change what the report
says, not what runs: a study's store accepts a spec that differs from its own
in them alone, and takes the new values (see `runner.open_study`). `hypotheses`
(pre-registered tests, parsed in `gradnoise.study.hypotheses`) is not one of them:
it changes no run, but a study's store refuses to change it after it was created.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from gradnoise import schedules
from gradnoise.errors import UserError
from gradnoise.lm.config import MAX_SEED, TrainConfig
from gradnoise.study.hypotheses import Hypotheses, parse_hypotheses
from gradnoise.study.layout import (
    DoseLayout,
    FindingsLayout,
    Published,
    SettingsTable,
    TableLayout,
    check_producible,
    check_task_blocks,
    parse_dose_response,
    parse_findings,
    parse_published,
    parse_settings_table,
    parse_table,
)
from gradnoise.study.tasks import EXECUTION_KEYS, LM, Task, canonical, task_of

SPEC_KEYS = (
    "name",
    "description",
    "task",
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
    "settings_table",
    "hypotheses",
)
# What only the report reads: a spec may change these without changing its runs.
REPORT_KEYS = (
    "description",
    "caveats",
    "published",
    "table",
    "dose_response",
    "findings",
    "settings_table",
)
# The study decides these per run; a spec that set them would fight the expansion.
RESERVED_CONFIG_KEYS = ("dataset", "seed")
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
    #: a TrainConfig (task lm) or an MnistConfig (task mnist)
    config: object
    task: Task = LM


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
    settings_table: SettingsTable | None = None
    task: Task = LM


def run_id(config) -> str:
    """An LM run's id (see `tasks.Task.run_id`)."""
    return LM.run_id(config)


def packaged_specs() -> dict[str, Path]:
    """The specs shipped with gradnoise, by name."""
    return {path.stem: path for path in sorted(SPECS_DIR.glob("*.yaml"))}


def load_spec(spec: str | Path, set_values: dict | None = None) -> StudySpec:
    """Load a spec from a YAML path or a packaged name; `set_values` become its `set:`
    (applied to every run, above everything else)."""
    path = _spec_path(spec)
    data = read_yaml(path)
    if set_values and isinstance(data, dict) and isinstance(data.get("set") or {}, dict):
        data = {**data, "set": {**(data.get("set") or {}), **set_values}}
    return parse_spec(data, source=str(path))


def spec_task(spec: str | Path) -> Task:
    """The task a spec (a YAML path or a packaged name) names, read before its runs expand
    (`study run --set` types its values as that task's config fields)."""
    path = _spec_path(spec)
    data = read_yaml(path)
    return task_of(data.get("task", "lm") if isinstance(data, dict) else "lm", f"study spec {path}")


def _spec_path(spec: str | Path) -> Path:
    path = Path(spec)
    packaged = packaged_specs()
    if not path.is_file():
        if str(spec) not in packaged:
            raise UserError(
                f"no study spec {str(spec)!r}: not a file, and not a packaged spec "
                f"(packaged: {', '.join(packaged)})"
            )
        path = packaged[str(spec)]
    return path


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
    """Validate a parsed spec and expand it to runs; UserError on the first problem.

    The checks run in the spec's own order: the keys, the header (name, task, preset),
    the datasets and their configs, the methods, the caveats, the report blocks, then
    the runs each (dataset, seed, method) resolves to."""
    where = f"study spec {source}"
    _check_keys(data, where)
    name, description, task, preset = _header(data, where)
    datasets = _datasets(data, task, where)
    configs = _dataset_configs(data, datasets, where)
    baseline, method_overrides = _methods(data, where)
    caveats = data.get("caveats", [])
    if not isinstance(caveats, list) or not all(isinstance(c, str) for c in caveats):
        raise UserError(f"{where}: caveats={caveats!r} must be a list of strings")
    published = parse_published(data, source)
    table = parse_table(data, source)
    dose_response = parse_dose_response(data, source)
    findings = parse_findings(data, source)
    settings_table = parse_settings_table(data, source)
    hypotheses = parse_hypotheses(data, source)
    runs = [
        run
        for dataset in datasets
        for seed in configs.seeds[dataset]
        for run in _seed_runs(where, task, preset, dataset, seed, method_overrides, configs)
    ]
    check_producible(where, runs, published, table, dose_response, findings, configs.set_values)
    return StudySpec(
        name=name,
        description=description.strip(),
        preset=preset,
        datasets=tuple(datasets),
        baseline=baseline,
        methods=tuple(method_overrides),
        caveats=tuple(caveats),
        runs=tuple(runs),
        data=data,
        published=published,
        table=table,
        dose_response=dose_response,
        findings=findings,
        hypotheses=hypotheses,
        settings_table=settings_table,
        task=task,
    )


def _check_keys(data, where: str) -> None:
    """The spec is a mapping of SPEC_KEYS only."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: must be a mapping of {', '.join(SPEC_KEYS)}")
    unknown = [k for k in data if k not in SPEC_KEYS]
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(SPEC_KEYS)}")


def _header(data: dict, where: str) -> tuple[str, str, Task, str]:
    """(name, description, task, preset), checked; the task's own blocks checked too."""
    name = data.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UserError(f"{where}: name={name!r}: a name is required, made of letters, digits and _.+=- ")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise UserError(f"{where}: description={description!r} must be a string")
    task = task_of(data.get("task", "lm"), where)
    preset = data.get("preset", task.presets[0] if task is not LM else "tiny")
    if preset not in task.presets:
        raise UserError(f"{where}: preset={preset!r}; allowed: {', '.join(task.presets)}")
    check_task_blocks(data, where)
    return name, description, task, preset


def _datasets(data: dict, task: Task, where: str) -> list[str]:
    """The spec's datasets (one name stands for a list of one): known to the task, none twice."""
    datasets = data.get("datasets")
    if isinstance(datasets, str):
        datasets = [datasets]
    if not isinstance(datasets, list) or not datasets:
        raise UserError(f"{where}: datasets={datasets!r} must be a non-empty list of {task.datasets}")
    for dataset in datasets:
        if dataset not in task.datasets:
            raise UserError(f"{where}: unknown dataset {dataset!r}; allowed: {', '.join(task.datasets)}")
    if len(set(datasets)) != len(datasets):
        raise UserError(f"{where}: datasets={datasets} lists a dataset twice")
    return datasets


@dataclasses.dataclass(frozen=True)
class _DatasetConfigs:
    """The config values a spec sets around its methods' own: `overrides` under them,
    each dataset's `dataset_overrides` over those, `set` over everything; and each
    dataset's seeds."""

    overrides: dict
    set_values: dict
    seeds: dict[str, tuple[int, ...]]
    by_dataset: dict[str, dict]


def _dataset_configs(data: dict, datasets: list[str], where: str) -> _DatasetConfigs:
    """overrides, set, seeds and dataset_overrides, checked (a dataset override may set seeds)."""
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
    return _DatasetConfigs(overrides, set_values, seeds_by_dataset, config_by_dataset)


def _methods(data: dict, where: str) -> tuple[str, dict[str, dict]]:
    """(baseline, method → its config values), in the spec's order; the baseline is one of them."""
    methods = _mapping(data.get("methods"), f"{where}: methods")
    if not methods:
        raise UserError(f"{where}: methods is empty; give at least a baseline, e.g. baseline: {{}}")
    for method in methods:
        if not isinstance(method, str) or not _NAME.fullmatch(method):
            raise UserError(f"{where}: method name {method!r} must be made of letters, digits and _.+=- ")
    baseline = data.get("baseline", "baseline")
    if baseline not in methods:
        raise UserError(f"{where}: baseline={baseline!r} is not one of the methods ({', '.join(methods)})")
    return baseline, {m: _config_mapping(v, f"{where}: methods.{m}") for m, v in methods.items()}


def _seed_runs(
    where: str,
    task: Task,
    preset: str,
    dataset: str,
    seed: int,
    method_overrides: dict[str, dict],
    configs: _DatasetConfigs,
) -> list[Run]:
    """Every method's run on one (dataset, seed); no two methods may be the same run or
    compute the same."""
    runs, method_of_id, method_of_computation = [], {}, {}
    for method, values in method_overrides.items():
        merged = {**configs.overrides, **configs.by_dataset[dataset], **values, **configs.set_values}
        context = f"{where}: method {method!r} on {dataset}, seed {seed}"
        config = _resolve(task, dataset, preset, {**merged, "seed": seed}, context)
        rid = task.run_id(config)
        if rid in method_of_id:
            raise UserError(
                f"{where}: methods {method_of_id[rid]!r} and {method!r} resolve to the "
                f"same config on {dataset}; they would be the same run. Make them differ "
                "or remove one."
            )
        method_of_id[rid] = method
        same = method_of_computation.setdefault(
            computation(config) if task is LM else canonical(config.to_dict()), method
        )
        if same != method:
            raise UserError(
                f"{where}: methods {same!r} and {method!r} compute the same on {dataset} "
                f"(noise {config.noise!r} with noise_mode={config.noise_mode} is "
                f"{same!r}'s computation: noise_mode=relative is a relative: schedule, and "
                "a σ of 0 at every step is no noise); remove one"
            )
        runs.append(Run(rid, dataset, method, seed, config, task))
    return runs


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


def runs_differ(stored: dict, given: dict) -> bool:
    """Whether two specs' data differ in anything but the report keys (so in their runs)."""

    def runs_part(data: dict) -> dict:
        return {k: v for k, v in data.items() if k not in REPORT_KEYS}

    return canonical(runs_part(stored)) != canonical(runs_part(given))


def _resolve(task: Task, dataset: str, preset: str, values: dict, context: str):
    """The task's config, with `{key}` placeholders in strings filled from the resolved config."""
    try:
        templated = {k: v for k, v in values.items() if isinstance(v, str) and "{" in v}
        if templated:
            plain = task.resolve(
                dataset, preset, {k: v for k, v in values.items() if k not in templated}
            ).to_dict()
            for key, template in templated.items():
                values[key] = _fill(template, plain, key)
        return task.resolve(dataset, preset, values)
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

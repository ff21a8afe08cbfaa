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

A run's config is the preset's, then `overrides`, then `dataset_overrides`,
then the method's, then `set`, then its dataset and seed. A string value may
name other config values in braces (`{max_iters}`), filled in from the run's
resolved config. Everything is validated here, before anything runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import yaml

from gradnoise.errors import UserError
from gradnoise.lm.config import DATASETS, PRESETS, TrainConfig, resolve_config

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
)
# The study decides these per run; a spec that set them would fight the expansion.
RESERVED_CONFIG_KEYS = ("dataset", "seed")
# Where a run executes does not change what it computes, so it is not part of the run id.
EXECUTION_KEYS = ("device",)
SPECS_DIR = Path(__file__).parent / "specs"
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


def run_id(config: TrainConfig) -> str:
    """sha256[:12] of the canonical JSON of the resolved config (dataset and seed included,
    execution keys such as the device left out)."""
    values = {k: v for k, v in config.to_dict().items() if k not in EXECUTION_KEYS}
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


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

    runs = []
    for dataset in datasets:
        for seed in seeds_by_dataset[dataset]:
            method_of_id = {}
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
                runs.append(Run(rid, dataset, method, seed, config))

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
    )


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
        if value < 1:
            raise UserError(f"{where}={value!r}: a count of seeds must be ≥ 1")
        return tuple(range(value))
    if (
        isinstance(value, list)
        and value
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)
    ):
        if len(set(value)) != len(value):
            raise UserError(f"{where}={value!r} lists a seed twice")
        return tuple(value)
    raise UserError(f"{where}={value!r}: give a count n (seeds 0..n-1) or a list of seeds ≥ 0")

"""Packaging: the library imports with torch alone, the commands name the extra they miss,
the extras match pyproject.toml, and src/ has no import circle."""

import argparse
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gradnoise.cli import COMMAND_EXTRAS, EXTRAS, build_parser

SRC = Path(__file__).resolve().parents[1] / "src"
ALL_EXTRA_MODULES = [module for modules in EXTRAS.values() for module in modules]


def run_without(modules, code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter in which importing any of `modules` fails, as in an
    environment where they are not installed (None in sys.modules: ModuleNotFoundError)."""
    blocker = f"import sys\nBLOCKED = {list(modules)!r}\nfor name in BLOCKED:\n    sys.modules[name] = None\n"
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-c", blocker + code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])},
    )


def cli(argv: list[str]) -> str:
    return f"from gradnoise.cli import main\nsys.exit(main({argv!r}))\n"


def test_the_library_needs_torch_alone():
    code = (
        "import torch, gradnoise\n"
        "from gradnoise import schedules\n"
        "w = torch.nn.Parameter(torch.ones(3)); opt = torch.optim.SGD([w], lr=0.1)\n"
        "gn = gradnoise.GradientNoise(opt, schedules.Constant(0.5), seed=0)\n"
        "w.grad = torch.zeros(3); opt.step()\n"
        "assert gn.step == 1 and not torch.equal(w.detach(), torch.ones(3))\n"
        "from gradnoise.lm import GPT, GPTConfig\n"  # the model itself is torch too
        "GPT(GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4))\n"
        "loaded = [m for m, mod in sys.modules.items() if mod is not None and m.split('.')[0] in BLOCKED]\n"
        "print('ok', loaded)\n"
    )
    finished = run_without(ALL_EXTRA_MODULES, code)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == "ok []"


def test_help_names_the_extras_and_what_is_missing():
    finished = run_without(ALL_EXTRA_MODULES, cli(["--help"]))
    assert finished.returncode == 0, finished.stderr
    assert "pip install 'gradnoise[lm]'" in finished.stdout
    assert "pip install 'gradnoise[study]'" in finished.stdout
    assert f"Not installed here: {', '.join(ALL_EXTRA_MODULES)}." in finished.stdout
    # Here everything is installed: the extras are named, nothing is said missing.
    assert "gradnoise[study]" in build_parser().format_help()
    assert "Not installed here" not in build_parser().format_help()


@pytest.mark.parametrize(
    ("blocked", "argv", "extra"),
    [
        (["numpy"], ["data", "list"], "lm"),
        (["numpy"], ["train", "--run-dir", "RUN", "max_iters=1"], "lm"),
        (["numpy"], ["train-mnist", "--run-dir", "RUN", "epochs=1"], "lm"),
        (["tqdm"], ["bench", "train", "--max-iters", "1"], "lm"),
        (["yaml"], ["study", "list"], "study"),
        (["scipy", "matplotlib"], ["study", "report", "STUDY"], "study"),
    ],
)
def test_a_command_without_its_extra_says_which_to_install(tmp_path, blocked, argv, extra):
    argv = [str(tmp_path / a) if a.isupper() else a for a in argv]
    (tmp_path / "STUDY").mkdir()
    (tmp_path / "STUDY" / "study.sqlite").touch()
    finished = run_without(blocked, cli(argv))
    assert finished.returncode == 2, finished.stderr
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1, finished.stderr
    needs = "|".join(blocked)
    pattern = (
        rf"gradnoise: error: `gradnoise {argv[0]}` needs ({needs}), .*: pip install 'gradnoise\[{extra}\]'"
    )
    assert re.fullmatch(pattern, lines[0]), lines[0]
    assert not (tmp_path / "RUN").exists()


def test_extras_match_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11
    project = tomllib.loads((SRC.parent / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == ["torch>=2.3"]
    module_of = {"pyyaml": "yaml"}
    extras = project["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        names = [requirement.split(">")[0].split("=")[0].split("[")[0] for requirement in extras[extra]]
        brought = {module_of.get(name, name) for name in names if name != "gradnoise"}
        assert brought == set(modules), extra
    assert "gradnoise[lm]" in extras["study"]
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(COMMAND_EXTRAS) == set(commands.choices)


def module_graph() -> dict[str, set[str]]:
    """module → the modules of src/ it imports (at any depth of the file, lazily or not)."""
    files = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                # `from package import module` depends on the module, not the package.
                modules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files]
                imported.update(modules)
                if len(modules) < len(node.names):
                    imported.add(base)
        graph[name] = {m for m in imported if m in files and m != name}
    return graph


def test_no_import_circle_in_src():
    graph, state, circles = module_graph(), {}, []

    def visit(module, path):
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                circles.append(" → ".join([*path[path.index(imported) :], imported]))
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles


def test_layers_import_only_downwards():
    # The library never imports the harness (lm, mnist), the harness never the study, nothing the CLI.
    graph = module_graph()
    layer = {"gradnoise.lm": 1, "gradnoise.mnist": 1, "gradnoise.study": 2, "gradnoise.cli": 3}

    def level(module):
        return next((n for prefix, n in layer.items() if module.startswith(prefix)), 0)

    upward = [
        (module, imported)
        for module, imports in graph.items()
        for imported in imports
        if level(imported) > level(module) and module != "gradnoise.__main__"
    ]
    assert not upward


def test_the_harness_packages_import_only_downwards():
    # Inside lm: storage, devices and seeding at the bottom, then data, model, config,
    # training, and the benchmarks on top (lm/__init__ exports the model: it is on top too).
    tiers = [
        ("gradnoise.lm.storage", "gradnoise.lm.devices", "gradnoise.lm.seeding"),
        ("gradnoise.lm.data",),
        ("gradnoise.lm.model",),
        ("gradnoise.lm.config",),
        ("gradnoise.lm.training",),
        ("gradnoise.lm.bench", "gradnoise.lm"),
    ]

    def place(module):
        """(tier, package) of a harness module: the longest prefix that names one."""
        matches = [
            (len(p), n, p) for n, names in enumerate(tiers) for p in names if f"{module}.".startswith(f"{p}.")
        ]
        return max(matches)[1:] if matches else None

    graph = module_graph()
    harness = [module for module in graph if place(module) is not None]
    assert "gradnoise.lm.training.trainer" in harness and "gradnoise.lm.storage.checkpoint" in harness
    sideways_or_up = [
        (module, imported)
        for module in harness
        for imported in graph[module]
        if place(imported) is not None
        and place(imported)[1] != place(module)[1]
        and place(imported)[0] >= place(module)[0]
    ]
    assert not sideways_or_up

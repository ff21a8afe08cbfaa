"""The documentation's code runs as written: every ```python block of README.md and
docs/*.md is executed, and every `gradnoise …` command in a ```bash block is parsed by the
real command-line parser (parsed only, not run), so a renamed function or flag fails here.

What a block takes from the reader's own code, it names in a comment (README: "model:
your torch.nn.Module; loss: its loss on a batch"); PRELUDE below is that code, the smallest
that makes those names exist, run before each block in a fresh namespace. SHRINK lists
the only edits made to a block before it runs, each to keep a benchmark's measurement
short (it still runs every line)."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from gradnoise.cli import build_parser

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

PRELUDE = """
import torch, gradnoise
from gradnoise import schedules
from torch.nn.utils import clip_grad_norm_
model = torch.nn.Linear(4, 2)
params = list(model.parameters())
optimizer = torch.optim.SGD(params, lr=0.1)
loss = model(torch.randn(3, 4)).square().mean()
spec = "const:sigma=0.01"
"""
# text in a block → what runs instead: the paper preset's step takes ~15 s on a CPU.
SHRINK = {'for preset in ("tiny", "paper"):': 'for preset in ("tiny",):'}

_FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[tuple[str, str]]:
    """(doc:line, code) of every fenced block in `language`, dedented to its fence."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in _FENCE.finditer(text):
            if match.group(2) != language:
                continue
            indent = len(match.group(1))
            code = "\n".join(line[indent:] for line in match.group(3).splitlines())
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{path.name}:{line}", code))
    return found


def commands() -> list[tuple[str, list[str]]]:
    """(doc:line, argv) of every `gradnoise …` command in a bash block: the words after
    `gradnoise` (or `-m gradnoise`), one per command of a `&&` / `|` / `;` chain."""
    found = []
    for where, code in blocks("bash"):
        for line in code.splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words, command = list(lexer), []
            for word in [*words, ";"]:
                if word in ("&&", "||", "|", ";"):
                    if "gradnoise" in command:
                        found.append((where, command[command.index("gradnoise") + 1 :]))
                    command = []
                else:
                    command.append(word)
    return found


def test_the_docs_have_code_to_check():
    assert len(blocks("python")) >= 4
    assert len(commands()) >= 30


@pytest.mark.parametrize("where, code", blocks("python"), ids=[w for w, _ in blocks("python")])
def test_every_python_block_runs(where, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what a block writes (noise.pt) stays there
    for text, shorter in SHRINK.items():
        code = code.replace(text, shorter)
    namespace: dict = {}
    exec(compile(PRELUDE, "<prelude>", "exec"), namespace)
    exec(compile(code, where, "exec"), namespace)


def subcommand_parser(parser: argparse.ArgumentParser, argv: list[str]):
    """The parser of the innermost sub-command `argv` names (`study run`, `bench noise`)."""
    for word in argv:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or word not in actions[0].choices:
            break
        parser = actions[0].choices[word]
    return parser


@pytest.mark.parametrize("where, argv", commands(), ids=[f"{w} {' '.join(a)}" for w, a in commands()])
def test_every_command_line_parses(where, argv, capsys):
    if any(word.startswith("[") for word in argv):
        # A synopsis (`gradnoise bench noise [--steps N] …`): each option it shows exists.
        parser = subcommand_parser(build_parser(), argv)
        known = {option for action in parser._actions for option in action.option_strings}
        shown = {m.group(0) for word in argv for m in re.finditer(r"--[\w-]+", word)}
        assert shown <= known, f"{where}: {sorted(shown - known)} are not options of {parser.prog}"
        return
    try:
        build_parser().parse_args(argv)
    except SystemExit as exit:
        assert exit.code == 0, f"{where}: gradnoise {' '.join(argv)}: {capsys.readouterr().err}"

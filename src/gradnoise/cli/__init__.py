"""The `gradnoise` command. Thin: parses arguments and calls the layers.

Each sub-module adds its sub-commands with `register(subparsers)`; handlers
import the heavy layers lazily, so `gradnoise --help` stays fast and works with
torch alone. The library needs nothing else; the commands need the harness's or
the study's dependencies (EXTRAS), and when one is missing they say which extra
installs it. Exit status 2 with one `gradnoise: error: ...` line: bad input, or a
missing extra; 141 without a word when the reader of stdout left (`| head`). Every
command takes -q (warnings only) and -v (more), before or after its name; see
gradnoise.cli.common for where messages go.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys

from gradnoise import __version__
from gradnoise.cli import bench, data, mnist, study, train
from gradnoise.cli.common import Parser, configure_logging
from gradnoise.errors import UserError

# The modules each pip extra brings (pyproject.toml's optional-dependencies; "study"
# includes "lm"). The library itself needs torch alone.
EXTRAS = {
    "lm": ("numpy", "tqdm", "safetensors"),
    "study": ("scipy", "matplotlib", "yaml"),
}
#: A command whose stdout reader left: 128 + SIGPIPE, as the shell reports a program killed by it.
EXIT_BROKEN_PIPE = 141
# Which extra each command needs.
COMMAND_EXTRAS = {
    "data": "lm",
    "train": "lm",
    "train-mnist": "lm",
    "sample": "lm",
    "export": "lm",
    "bench": "lm",
    "study": "study",
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gradnoise",
        description="Gradient noise injection for PyTorch, and a small-LM study harness.",
        epilog=_extras_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gradnoise {__version__}")
    # -q/-v also before the command (`gradnoise -q study list`); a sub-command's own wins.
    before = parser.add_mutually_exclusive_group()
    for flags, level, meaning in (
        (("-q", "--quiet"), logging.WARNING, "warnings only"),
        (("-v", "--verbose"), logging.DEBUG, "more"),
    ):
        before.add_argument(*flags, dest="verbosity_before", action="store_const", const=level, help=meaning)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (data, train, mnist, bench, study):
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verbosity", None) is None:
        args.verbosity = args.verbosity_before
    configure_logging(args.verbosity)
    try:
        status = args.func(args) or 0
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not at exit
        return status
    except BrokenPipeError:
        # The reader of stdout left (`gradnoise study list | head`): nothing more to say to
        # it, and no traceback; stdout goes to /dev/null so the exit's flush fails no more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except UserError as error:
        print(f"gradnoise: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        missing = (error.name or "").partition(".")[0]
        if not any(missing in modules for modules in EXTRAS.values()):
            raise
        extra = COMMAND_EXTRAS[args.command]
        print(
            f"gradnoise: error: `gradnoise {args.command}` needs {missing}, which is not installed; "
            f"install the '{extra}' extra: pip install 'gradnoise[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("gradnoise: interrupted", file=sys.stderr)
        return 130


def _extras_help() -> str:
    lines = [
        "The library (import gradnoise) needs torch alone; the commands need an extra:",
        "  data, train, train-mnist, sample, export, bench:  pip install 'gradnoise[lm]'",
        "  (train-mnist's offline sample, mnist_5k:  pip install 'gradnoise[mnist-sample]')",
        "  study (and all of the above):                     pip install 'gradnoise[study]'",
    ]
    missing = [m for modules in EXTRAS.values() for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        lines.append(f"Not installed here: {', '.join(missing)}.")
    return "\n".join(lines)

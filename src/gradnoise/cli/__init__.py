"""The `gradnoise` command. Thin: parses arguments and calls the layers.

Each sub-module adds its sub-commands with `register(subparsers)`; handlers
import the heavy layers lazily so `gradnoise --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from gradnoise.cli import bench, data, study, train
from gradnoise.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradnoise",
        description="Gradient noise injection for PyTorch, and a small-LM study harness.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (data, train, bench, study):
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as error:
        print(f"gradnoise: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradnoise: interrupted", file=sys.stderr)
        return 130

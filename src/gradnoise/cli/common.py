"""What every command shares: its parser class, -q / -v, and where messages go.

Results (sampled text, listings, a study's status, benchmark figures) go to stdout
with print. Messages (progress, one line per eval, summaries, warnings) go through
`logging` to stderr:

    gradnoise COMMAND …      INFO: progress and summaries
    gradnoise COMMAND -q …   WARNING: warnings only (and the error line, always)
    gradnoise COMMAND -v …   DEBUG: also every training log line
    (or `gradnoise -q COMMAND …`: before the command too; the command's own wins)

While tqdm is loaded, messages go through tqdm.write, so that on a terminal they
appear above a progress bar instead of breaking it.
"""

from __future__ import annotations

import argparse
import logging
import sys

LOGGER = "gradnoise"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog may be computed when help is shown (`epilog_factory`),
    so that `gradnoise --help` need not import what one command's help lists."""

    epilog_factory = None

    def format_help(self) -> str:
        if self.epilog_factory is not None:
            self.epilog = self.epilog_factory()
        return super().format_help()


def verbosity_options() -> argparse.ArgumentParser:
    """A parent parser with -q/--quiet and -v/--verbose (dest "verbosity": a logging level)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_mutually_exclusive_group()
    group.add_argument(
        "-q",
        "--quiet",
        dest="verbosity",
        action="store_const",
        const=logging.WARNING,
        help="print only warnings and errors",
    )
    group.add_argument(
        "-v",
        "--verbose",
        dest="verbosity",
        action="store_const",
        const=logging.DEBUG,
        help="print more (e.g. every training log line)",
    )
    return parent


VERBOSITY = verbosity_options()


def quiet(args: argparse.Namespace) -> bool:
    return getattr(args, "verbosity", None) == logging.WARNING


def configure_logging(level: int | None) -> None:
    """Messages of the gradnoise loggers at `level` (default INFO) and above, to stderr."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level or logging.INFO)
    logger.propagate = False
    if not any(isinstance(handler, _Handler) for handler in logger.handlers):
        handler = _Handler()
        handler.setFormatter(_Formatter())
        logger.addHandler(handler)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"gradnoise: {record.levelname.lower()}: {message}"
        return message


class _Handler(logging.Handler):
    """Writes to sys.stderr as it is at the time (tests and tqdm replace it), through tqdm
    when it is loaded."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            tqdm = sys.modules.get("tqdm")
            if tqdm is not None:
                tqdm.tqdm.write(line, file=sys.stderr)
            else:
                print(line, file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)

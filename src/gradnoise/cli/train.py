"""`gradnoise train`, `gradnoise sample` and `gradnoise export`.

Exit status of `gradnoise train`: 0 the run finished, 3 it diverged (non-finite loss;
the message says where), 143 (128 + SIGTERM) it was stopped by SIGTERM after writing a
checkpoint: run the same command with --resume to continue. 2: bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path

from gradnoise.cli.common import VERBOSITY, quiet
from gradnoise.errors import UserError

EXIT_STATUS = {"done": 0, "diverged": 3, "interrupted": 143}
log = logging.getLogger(__name__)


def register(commands) -> None:
    """Add `train`, `sample` and `export` to the `gradnoise` parser."""
    train = commands.add_parser(
        "train",
        parents=[VERBOSITY],
        help="train a small GPT (tiny or paper preset, any value overridable)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a character-level GPT. Values come from a preset for the dataset\n"
        "(or a whole config file), then KEY=VALUE overrides (listed below), e.g.\n\n"
        "  gradnoise train --preset paper noise=exp:sigma0=0.1,gamma=0.99 seed=3\n\n"
        "Exit status: 0 done, 3 diverged (a non-finite loss, weight or optimizer state),\n"
        "143 stopped by SIGTERM (checkpoint written; rerun with --resume), 2 bad input.\n"
        "Under torchrun every rank trains its slice of the batch (DDP); --run-dir is then\n"
        "required. A run directory is locked while a process trains in it.",
    )
    train.epilog_factory = _config_keys
    train.add_argument("--dataset", help="shakespeare_char (default), enwik8 or text8")
    train.add_argument("--preset", help="tiny (default) or paper")
    train.add_argument(
        "--config-file",
        type=Path,
        metavar="JSON",
        help="a whole training config (e.g. a run's config.json); overrides still apply",
    )
    train.add_argument(
        "--run-dir",
        type=Path,
        metavar="DIR",
        help="where config.json, log.jsonl, checkpoints/ and result.json go "
        "(default: a new runs/DATASET-PRESET-seedS-TIME[-N])",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run directory's latest checkpoint (start afresh if it has none)",
    )
    train.add_argument(
        "--group",
        type=Path,
        metavar="GROUP_DIR",
        help="train the runs listed in GROUP_DIR/group.json together (the study runner's "
        "--batch-models); exit 0 when every run ended (done or diverged: see each result.json)",
    )
    train.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (there is none where stderr is not a terminal; evals are still printed)",
    )
    train.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch's CPU threads (default: the process's, OMP_NUM_THREADS; with --resume, the "
        "count the checkpoint was written with, so that the run continues bit for bit)",
    )
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    train.set_defaults(func=_train)
    _register_sample_and_export(commands)


def _register_sample_and_export(commands) -> None:
    sample = commands.add_parser(
        "sample",
        parents=[VERBOSITY],
        help="generate text from a run or an export",
        description="Generate text from a run directory (its latest checkpoint) or an export "
        "directory. The same --seed gives the same text.",
    )
    sample.add_argument("path", type=Path, metavar="RUN_DIR|EXPORT_DIR")
    sample.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    sample.add_argument("--max-new-tokens", type=int, default=500, metavar="N")
    sample.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    sample.add_argument("--top-k", type=int, default=200, metavar="K", help="0 = no cut (default 200)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    sample.set_defaults(func=_sample)

    export = commands.add_parser(
        "export",
        parents=[VERBOSITY],
        help="write a run's model for GPT.from_pretrained",
        description="Write config.json, model.safetensors and vocab.json of a run's latest "
        "checkpoint to OUT_DIR; gradnoise.lm.GPT.from_pretrained(OUT_DIR) loads it. OUT_DIR "
        "must be new or empty, and outside the run directory.",
    )
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    export.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    export.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier export in OUT_DIR (a directory holding only "
        "config.json, model.safetensors and vocab.json; never other files)",
    )
    export.set_defaults(func=_export)


def _config_keys() -> str:
    try:
        from gradnoise.lm.config import describe_keys
    except ModuleNotFoundError as error:
        return f"(the config keys are listed once the 'lm' extra is installed: {error.name} is missing)"
    return "config keys (KEY=VALUE), with the tiny preset's value and their meaning:\n" + describe_keys()


def _train(args: argparse.Namespace) -> int:
    if args.group is not None:
        return _train_group(args)
    from gradnoise.lm.config import parse_overrides, read_config, resolve_config
    from gradnoise.lm.storage import rundir
    from gradnoise.lm.training.distributed import DistributedEnv
    from gradnoise.lm.training.trainer import train

    overrides = parse_overrides(args.overrides)
    if args.config_file is not None:
        if args.dataset is not None or args.preset is not None:
            raise UserError(
                "--config-file gives the whole config; change it with key=value overrides, "
                "not --dataset or --preset"
            )
        cfg = read_config(args.config_file).replace(**overrides)
    else:
        cfg = resolve_config(args.dataset or "shakespeare_char", args.preset or "tiny", overrides)

    dist_env = DistributedEnv.from_environment()
    if args.run_dir is not None:
        directory = contextlib.nullcontext(args.run_dir)
    elif dist_env.world_size > 1 or args.resume:
        raise UserError("--run-dir is required with --resume and under torchrun")
    else:
        # A name of its own, created exclusively: two runs started in the same second differ.
        stamp = time.strftime("%Y%m%d-%H%M%S")
        directory = rundir.new(Path("runs"), f"{cfg.dataset}-{args.preset or 'tiny'}-seed{cfg.seed}-{stamp}")

    with directory as run_dir:
        result = train(
            cfg,
            run_dir,
            resume=args.resume,
            progress=not args.no_progress and not quiet(args),
            threads=args.threads,
        )
    if dist_env.is_main:
        _report(result, run_dir)
    return EXIT_STATUS[result["status"]]


def _train_group(args: argparse.Namespace) -> int:
    from gradnoise.lm.training.group import read_group
    from gradnoise.lm.training.trainer import train_group

    given = [
        name for name in ("dataset", "preset", "config_file", "run_dir") if getattr(args, name) is not None
    ]
    if given or args.overrides:
        shown = [f"--{name.replace('_', '-')}" for name in given] + args.overrides
        raise UserError(f"--group takes its runs and configs from group.json; drop {' '.join(shown)}")
    members = read_group(args.group)
    results = train_group(
        [m.config for m in members],
        [m.run_dir for m in members],
        args.group,
        resume=args.resume,
        progress=not args.no_progress and not quiet(args),
        threads=args.threads,
    )
    for member, result in zip(members, results, strict=True):
        if result["status"] != "interrupted":
            _report(result, member.run_dir)
    stopped = [r["finals"]["steps"] for r in results if r["status"] == "interrupted"]
    if stopped:  # once for the group: its members stop together
        print(
            f"gradnoise: stopped at step {max(stopped)} (checkpoint written); "
            f"continue with --resume --group {args.group}",
            file=sys.stderr,
        )
        return EXIT_STATUS["interrupted"]
    return 0


def _report(result: dict, run_dir: Path) -> None:
    finals = result["finals"]
    if result["status"] == "diverged":
        print(f"gradnoise: {result['error']}", file=sys.stderr)
    elif result["status"] == "interrupted":
        print(
            f"gradnoise: stopped at step {finals['steps']} (checkpoint written); "
            f"continue with --resume --run-dir {run_dir}",
            file=sys.stderr,
        )
    else:
        line = (
            f"done: {finals['steps']} steps, train {finals['train_loss']:.4f}, "
            f"val {finals['val_loss']:.4f} (best {finals['best_val_loss']:.4f} "
            f"at step {finals['best_val_step']})"
        )
        for split in ("val", "test"):
            if finals.get(f"{split}_loss_full") is not None:
                line += f", full {split} {finals[f'{split}_loss_full']:.4f} nats"
                line += f" = {finals[f'{split}_bpc_full']:.4f} bpc"
        log.info(line)
    log.info(f"results in {run_dir}")


def _sample(args: argparse.Namespace) -> int:
    from gradnoise.lm.devices import resolve_device
    from gradnoise.lm.model.sampling import sample_text
    from gradnoise.lm.training.trained import load_trained

    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens={args.max_new_tokens} must be ≥ 0")
    model, vocab = load_trained(args.path, map_location=resolve_device(args.device))
    text = sample_text(
        model,
        vocab,
        args.prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k or None,
        args.seed,
    )
    print(text)
    return 0


def _export(args: argparse.Namespace) -> int:
    from gradnoise.lm.training.trained import export

    out = export(args.run_dir, args.out_dir, force=args.force)
    log.info(f"exported {args.run_dir} to {out} (load with gradnoise.lm.GPT.from_pretrained)")
    return 0

"""`gradnoise bench noise`, `bench train` and `bench batch`: benchmarks that print figures."""

from __future__ import annotations

import argparse
import json
import logging

from gradnoise.cli.common import VERBOSITY, quiet

log = logging.getLogger(__name__)


def register(commands) -> None:
    """Add `gradnoise bench noise`, `bench train` and `bench batch` to the `gradnoise` parser."""
    bench = commands.add_parser("bench", help="measure the cost of gradient noise and of training")
    actions = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")

    noise = actions.add_parser(
        "noise",
        parents=[VERBOSITY],
        help="time training steps without noise, with the per-parameter loop and with gradnoise",
        description="Times, interleaved in one process, a full training step (forward, backward, "
        "clip, AdamW step) of the paper and/or tiny model with: no noise; the per-parameter "
        "loop (ESPnet/Chainer); gradnoise (and, on CUDA, gradnoise without the fused kernel). "
        "Then the noise op alone in µs and GB/s (8 bytes per gradient element), against a "
        "single normal_ fill of as many samples (single-threaded on CPU) and the device's copy "
        "bandwidth measured in the same run.",
    )
    noise.add_argument("--preset", default="both", help="tiny, paper or both (default)")
    noise.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    noise.add_argument(
        "--steps",
        type=int,
        metavar="N",
        help="timed steps per variant (default: CPU tiny 30, CPU paper 3, CUDA tiny 300, CUDA paper 200)",
    )
    noise.add_argument("--no-compile", action="store_true", help="CUDA: leave the model eager")
    noise.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    noise.set_defaults(func=_noise)

    train = actions.add_parser(
        "train",
        parents=[VERBOSITY],
        help="time a whole training run of a preset (wall time with evals, ms/step, tokens/s)",
        description="Runs `gradnoise train` for a preset in a temporary directory and reports "
        "the wall time including evaluation, the median ms/step and tokens/s. The default is "
        "the full preset (paper on shakespeare_char: 5,000 iterations); shorten it on a CPU "
        "with --max-iters and e.g. --set eval_iters=10.",
    )
    train.add_argument("--preset", default="paper", help="paper (default) or tiny")
    train.add_argument("--dataset", default="shakespeare_char")
    train.add_argument("--max-iters", type=int, metavar="N", help="default: the preset's")
    train.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="any other config override, as for `gradnoise train` (repeatable)",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    train.set_defaults(func=_train)

    batch = actions.add_parser(
        "batch",
        parents=[VERBOSITY],
        help="time the batched trainer's step for M runs as one model: ms/step, runs/hour, speed-up",
        description="For each M of --models, in one process: M runs of the preset (seeds 0 … M−1) "
        "trained as one batched model (`gradnoise train --group`); times the optimizer step and "
        "reports ms/step, runs per hour (M runs of the preset's max_iters steps, evaluation not "
        "counted) and the speed-up in runs per hour over the first M (give 1 first).",
    )
    batch.add_argument("--preset", default="tiny", help="tiny (default) or paper")
    batch.add_argument(
        "--models", default="1,2,4,8,16", metavar="M,M,…", help="replica counts (default 1,2,4,8,16)"
    )
    batch.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    batch.add_argument(
        "--steps",
        type=int,
        metavar="N",
        help="timed steps per M (default: CPU tiny 20, CPU paper 2, CUDA tiny 200, CUDA paper 100)",
    )
    batch.add_argument("--noise", default="none", help="every run's noise schedule (default none)")
    batch.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    batch.set_defaults(func=_batch)


def _log(message: str) -> None:
    log.info(f"[bench] {message}")


def _noise(args: argparse.Namespace) -> int:
    from gradnoise.lm.bench import noise

    presets = noise.PRESETS if args.preset == "both" else (args.preset,)
    result = noise.bench_noise(
        presets, device=args.device, steps=args.steps, compile=not args.no_compile, log=_log
    )
    print(json.dumps(result, indent=2) if args.json else noise.format_noise_report(result))
    return 0


def _train(args: argparse.Namespace) -> int:
    from gradnoise.lm.bench import train
    from gradnoise.lm.config import parse_overrides

    overrides = parse_overrides(args.overrides)
    if args.max_iters is not None:
        overrides["max_iters"] = args.max_iters
    if args.device is not None:
        overrides["device"] = args.device
    result = train.bench_train(
        args.dataset, args.preset, overrides, progress=not args.no_progress and not quiet(args)
    )
    print(json.dumps(result, indent=2) if args.json else train.format_train_report(result))
    return 0


def _batch(args: argparse.Namespace) -> int:
    from gradnoise.lm.bench import batch

    result = batch.bench_batch(
        args.preset,
        batch.parse_models(args.models),
        device=args.device,
        steps=args.steps,
        noise=args.noise,
        log=_log,
    )
    print(json.dumps(result, indent=2) if args.json else batch.format_batch_report(result))
    return 0

"""`gradnoise study …` sub-commands: list, run, status, report, verify."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from gradnoise.cli.common import VERBOSITY, quiet

log = logging.getLogger(__name__)


def register(commands) -> None:
    """Add this module's sub-commands to the `gradnoise` parser."""
    study = commands.add_parser(
        "study",
        help="run a grid of methods × datasets × seeds into SQLite, and report it",
        description="Studies: a YAML spec expands to runs (dataset × method × seed); "
        "results go to DIR/study.sqlite; the report compares methods with paired statistics.",
    )
    actions = study.add_subparsers(dest="study_command", required=True, metavar="ACTION")

    listing = actions.add_parser("list", parents=[VERBOSITY], help="the packaged study specs")
    listing.set_defaults(func=list_specs)
    _register_run(actions)
    _register_readers(actions)


def _register_run(actions) -> None:
    run = actions.add_parser(
        "run",
        parents=[VERBOSITY],
        help="run a study (skips finished runs, resumes interrupted ones)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every run of a study spec not finished yet.\n\n"
        "  gradnoise study run quick --jobs 2 --report\n"
        "  gradnoise study run paper-small --devices cuda:0 --per-device 4\n"
        "  gradnoise study run paper --devices cuda:0 --batch-models 8 --datasets shakespeare_char\n"
        "  gradnoise study run my.yaml --executor ray --address auto\n"
        "  gradnoise study run quick --dir /tmp/smoke --set max_iters=50",
    )
    run.add_argument("spec", metavar="SPEC_OR_NAME", help="a spec YAML file or a packaged name")
    run.add_argument("--dir", type=Path, help="study directory (default: ./studies/<name>)")
    run.add_argument("--executor", choices=("local", "ray"), default="local")
    run.add_argument("--address", help="Ray cluster address (e.g. auto); default: a local Ray")
    run.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="concurrent processes (local executor): runs, or groups of runs with --batch-models",
    )
    run.add_argument(
        "--devices",
        help="comma-separated devices, e.g. cuda:0,cuda:1; runs go round-robin over them",
    )
    run.add_argument(
        "--per-device", type=int, default=1, help="concurrent processes sharing one device (GPU)"
    )
    run.add_argument(
        "--batch-models",
        type=int,
        metavar="M",
        help="train up to M runs that differ only in per-replica settings (seed, noise, dropout, "
        "regularizers, clipping) in one process, as one batched model (1: a process per run). "
        "Default: 8 where the runs train on CUDA (--devices "
        "names a GPU, or device auto/cuda with a GPU here), else 1 (40 for a spec of the MNIST "
        "task); give it for a Ray cluster. "
        "A group once started keeps its runs until they finish",
    )
    run.add_argument(
        "--datasets",
        metavar="A,B",
        help="run only these of the spec's datasets (comma-separated; default: all)",
    )
    run.add_argument(
        "--set",
        dest="set_values",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config value for every run, above the spec's own (repeatable), e.g. max_iters=50",
    )
    run.add_argument("--report", action="store_true", help="write the report when done")
    run.add_argument("--no-progress", action="store_true", help="no live status display")
    run.set_defaults(func=run_spec)


def _register_readers(actions) -> None:
    """`study status`, `study report` and `study verify`: they read a study directory."""
    where = "a study directory, or a packaged spec's name for its default directory (studies/NAME)"
    status = actions.add_parser(
        "status", parents=[VERBOSITY], help="progress of a study (from another terminal)"
    )
    status.add_argument("dir", metavar="DIR_OR_NAME", help=where)
    status.set_defaults(func=show_status)

    report = actions.add_parser(
        "report", parents=[VERBOSITY], help="write DIR/report: tables, plots, index.html"
    )
    report.add_argument("dir", metavar="DIR_OR_NAME", help=where)
    report.add_argument(
        "--allow-mixed-code",
        action="store_true",
        help="compare runs that came from different code (refused by default; the report then "
        "says so at its top)",
    )
    report.set_defaults(func=write_report)

    verify = actions.add_parser(
        "verify",
        parents=[VERBOSITY],
        help="rerun some of a study's runs from their stored configs and compare their losses",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Rerun finished runs of a study from the configs its store holds, in a temporary\n"
        "directory (nothing is written into the study), and compare every logged loss with the\n"
        "stored one: exact where the stored run's code and numerics are this process's, else\n"
        "within a tolerance. One line per run, then a verdict.\n"
        "Exit status: 0 every run agrees, 1 some run does not, 2 bad input.\n\n"
        "  gradnoise study verify results/quick --runs 3\n"
        "  gradnoise study verify results/sweep --run 9fc29374b429 --steps 100",
    )
    verify.add_argument("dir", metavar="DIR_OR_NAME", help=where)
    chosen = verify.add_mutually_exclusive_group()
    chosen.add_argument(
        "--runs", type=int, metavar="K", help="how many finished runs to draw at random (default 3)"
    )
    chosen.add_argument(
        "--run", dest="run_ids", action="append", metavar="ID", help="a run to verify (repeatable)"
    )
    verify.add_argument("--steps", type=int, metavar="N", help="only the first N steps (default: whole runs)")
    verify.add_argument("--seed", type=int, default=0, help="the seed that draws the runs (default 0)")
    verify.set_defaults(func=verify_runs)


def list_specs(args) -> int:
    from gradnoise.study.spec import load_spec, packaged_specs

    for name in packaged_specs():
        spec = load_spec(name)
        summary = spec.description.splitlines()[0] if spec.description else ""
        print(f"{name:<12} {len(spec.runs):>4} runs  {summary}")
    return 0


def run_spec(args) -> int:
    from gradnoise.study.runner import run_study
    from gradnoise.study.spec import load_spec, spec_task

    # --set values are typed as the config fields of the spec's task.
    set_values = spec_task(args.spec).parse_set(args.set_values) if args.set_values else {}
    spec = load_spec(args.spec, set_values)
    study_dir = args.dir or default_dir(spec.name)
    devices = [d.strip() for d in args.devices.split(",")] if args.devices else None
    summary = run_study(
        spec,
        study_dir,
        executor=args.executor,
        jobs=args.jobs,
        devices=devices,
        per_device=args.per_device,
        address=args.address,
        batch_models=args.batch_models,
        datasets=[d.strip() for d in args.datasets.split(",")] if args.datasets is not None else None,
        progress=not args.no_progress and not quiet(args),
    )
    log.info(
        f"study {summary['name']} in {summary['study_dir']}: {summary['done']} done, "
        f"{summary['diverged']} diverged, {summary['failed']} failed of {summary['total']} runs "
        f"({summary['ran']} run now, {summary['skipped']} already finished) "
        f"in {summary['wall_s']:.0f} s"
    )
    if args.report:
        from gradnoise.study.report import write_report as write

        log.info(f"report: {write(study_dir) / 'index.html'}")
    if summary["failed"]:
        log.warning(
            f"{summary['failed']} run(s) failed; see the errors with: gradnoise study status {study_dir}"
        )
        return 1
    return 0


def default_dir(name: str) -> Path:
    """Where `gradnoise study run NAME` puts a study without --dir."""
    return Path("studies") / name


def study_dir(given: str) -> Path:
    """A study directory as given, or, for a packaged spec's name that is not a directory
    here, the directory `study run NAME` uses."""
    from gradnoise.study.spec import packaged_specs

    if not Path(given).exists() and given in packaged_specs():
        return default_dir(given)
    return Path(given)


def show_status(args) -> int:
    from gradnoise.study.runner import study_status

    print(study_status(study_dir(args.dir)))
    return 0


def write_report(args) -> int:
    from gradnoise.study.report import write_report as write

    log.info(f"report: {write(study_dir(args.dir), allow_mixed_code=args.allow_mixed_code) / 'index.html'}")
    return 0


def verify_runs(args) -> int:
    from gradnoise.study.verify import verify_study

    outcome = verify_study(
        study_dir(args.dir),
        count=args.runs if args.runs is not None or args.run_ids else 3,
        run_ids=args.run_ids,
        steps=args.steps,
        seed=args.seed,
        on_verdict=lambda verdict: print(verdict.line, flush=True),
    )
    print(outcome.lines[-1])
    return 0 if outcome.agree else 1

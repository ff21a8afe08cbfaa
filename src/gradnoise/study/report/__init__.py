"""The study report: what `gradnoise study report DIR` writes into DIR/report/.

    write_report(study_dir) -> study_dir / "report"

reads DIR/study.sqlite through `Store` and writes

    report.md        tables and caveats (Markdown; links the PNGs)
    index.html       the same tables with the plots embedded: one self-contained file
    summary.csv      per dataset × method: run counts, n / mean / sd / 95% CI of every final
    comparison.csv   per dataset × metric × method vs the baseline: paired tests, Holm
    speed_cost.csv   per dataset × method: steps and seconds to the baseline's best val
                     loss, median step time, overhead %
    runs.csv         per run: its finals, wall time, and its directory and log (relative links)
    tests.csv        (a spec with hypotheses:) each confirmatory test and exploratory contrast:
                     Δ, CI, p, Holm p, verdict, the control's final − best val
                     (periodic estimates, the same batches)
    curves_*.png, final_val_*.png, gradients_*.png, dose_response_*.png (a spec with
    dose_response:), sigma_schedules.png, overhead.png, and the answer's figure:
    answer.png (a spec with hypotheses:, see `verdict`) or answer_*.png (dose-response)

The report opens with the answer: with hypotheses, a paragraph per confirmatory test
(the word it allows, estimate, CI, Holm p) and their forest plot; without, the
best-supported finding and its figure. The caveats follow, folded, then the tables.

The report says at its top which code made the runs (the store's per-run identity,
`gradnoise.study.identity`); a study whose runs came from different code is refused,
naming the runs of each, unless allow_mixed_code (`--allow-mixed-code`), and then says
so at its top. Only runs with status "done" enter means, tests and plots; failed, diverged and
unfinished runs are counted and listed. The directory is built aside and
swapped in whole, so a report is never half-written.

The pieces, each usable alone:

    analysis   the study loaded from its store, and the typed rows (summaries,
               comparisons, speeds, schedules, published values) everything is drawn from
    plots      one function per figure
    tables     the tables and caveats, as text
    render     Markdown, HTML and CSV

A study of the MNIST task (a spec with `task: mnist`) gets the report `settings` builds
from its spec's `settings_table:` instead: the classifier paper's table, the fraction of
runs that train with its paired test, a strip plot of every run, its runs.

What is particular to one study comes from its spec: `table:` (a
paper-style table), `published:` (reference values) and `dose_response:` (noise
levels compared as one family), read from the spec the store holds. A study
stored before these keys existed gets them by running its spec again with them
added (`gradnoise study run DIR/spec.yaml --dir DIR`): the store takes new report
keys without running anything.
"""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

import gradnoise
from gradnoise.errors import UserError
from gradnoise.lm.storage import atomic
from gradnoise.study import identity
from gradnoise.study.layout import parse_settings_table
from gradnoise.study.report import plots, render, sentences, settings, tables, verdict
from gradnoise.study.report.analysis import Analysis, analyze
from gradnoise.study.report.document import Section
from gradnoise.study.report.loading import headline_metric, load_study
from gradnoise.study.store import STORE_FILE, Store
from gradnoise.study.tasks import LM, task_of_spec

#: Where the warnings matplotlib issues point: its own modules, or the plotting code calling it.
PLOTTING_MODULES = r"(matplotlib|gradnoise\.study\.report\.plots)(\.|$)"

__all__ = ["write_report"]


def write_report(study_dir: Path, *, allow_mixed_code: bool = False) -> Path:
    """Write DIR/report/ (see the module docstring) from DIR/study.sqlite; returns that dir."""
    study_dir = Path(study_dir)
    database = study_dir / STORE_FILE
    if not database.is_file():
        raise UserError(
            f"no study in {study_dir}: {database} does not exist; "
            "run `gradnoise study run SPEC --dir DIR` first"
        )
    with Store(database, readonly=True) as store:
        rows, name = store.runs(), store.study()["name"]
        groups = identity.code_groups(rows)
        if not allow_mixed_code:
            identity.refuse_mixed(name, groups)
        spec = store.study()["spec"]
        analysis = analyze(load_study(store)) if task_of_spec(spec) is LM else None
        finals = store.finals() if analysis is None else []
    made_by = f"code: {identity.describe(groups)}; numerics: {identity.numerics_summary(rows)}"
    if identity.mixed(groups):
        made_by = f"MIXED CODE, compared anyway (--allow-mixed-code): {made_by}"

    def build(building: Path) -> None:
        if analysis is not None:
            _build(analysis, building, made_by)
        else:
            _build_settings(name, spec, rows, finals, building, made_by)

    report_dir = study_dir / "report"
    with warnings.catch_warnings():
        # matplotlib's remarks on a plot of few points (identical axis limits, nothing to
        # log-scale) are no news to the reader of the report: the plot is drawn regardless.
        warnings.filterwarnings("ignore", module=PLOTTING_MODULES)
        atomic.build_directory(report_dir, build, replace=True)
    return report_dir


def _build_settings(
    name: str, spec: dict, runs: list[dict], finals: list[dict], directory: Path, made_by: str
):
    """The report of a study whose task is not the LM one (see `settings`)."""
    task = task_of_spec(spec)
    layout = parse_settings_table(spec, "in the study's store")
    counts = {status: sum(r["status"] == status for r in runs) for status in ("done", "diverged", "failed")}
    caveats = [
        *[str(line) for line in spec.get("caveats") or []],
        f"{len(runs)} runs: {counts['done']} done, {counts['diverged']} diverged, {counts['failed']} failed, "
        f"{len(runs) - sum(counts.values())} not finished.",
    ]
    if layout is None:
        lead, sections = [], [Section("Runs", tables=[settings.runs_table(finals, next(iter(task.metrics)))])]
    else:
        results = settings.settings_rows(runs, finals, layout, task)
        settings.write_csvs(directory, results, finals, layout.metric)
        answer, sections = settings.sections(results, layout, finals, directory)
        lead = [answer]
    description = str(spec.get("description") or "").strip()
    stamp = f"gradnoise {gradnoise.__version__}, {time.strftime('%Y-%m-%d %H:%M')}. Runs made by {made_by}"
    (directory / "report.md").write_text(
        render.markdown(name, description, stamp, caveats, sections, lead), encoding="utf-8"
    )
    (directory / "index.html").write_text(
        render.page(name, description, stamp, caveats, sections, lead), encoding="utf-8"
    )


#: A study's confirmatory tests and exploratory contrasts (`verdict`), estimated once.
Tested = tuple[list[verdict.HypothesisRow], list[verdict.ContrastRow]]


def _answer(analysis: Analysis, tested: Tested | None, directory: Path) -> Section | None:
    """What the report opens with. With hypotheses: a paragraph per confirmatory test and
    the forest plot of the tested differences and exploratory contrasts. Without: the
    best-supported finding and the figure that shows it (dose-response, else final val)."""
    study = analysis.study
    if tested is not None:
        rows, contrasts = tested
        text = (
            [verdict.family_sentence(study, rows), *verdict.verdict_paragraphs(study, rows)]
            if rows
            else verdict.exploratory_paragraphs(study, contrasts)
        )
        forest = verdict.forest(study, rows, contrasts, directory / "answer.png")
        levels = verdict.contrasts_by_level(study, contrasts, directory / "answer_levels.png")
        # Without confirmatory tests, the contrasts by noise level are the figure to read first.
        figures = (forest, levels) if rows else (levels, forest)
        return Section("The answer", text=text, plots=_drawn(*figures))
    if not study.datasets:
        return None
    dataset = study.datasets[0]
    text = [line for d in study.datasets if (line := sentences.lead_finding(analysis, d))]
    slug = _slug(dataset)
    figure = (
        plots.dose_response(analysis, dataset, directory / f"answer_{slug}.png", (headline_metric(study),))
        if study.dose
        else plots.final_val(analysis, dataset, directory / f"final_val_{slug}.png")
    )
    return Section("The answer", text=text, plots=_drawn(figure)) if text or figure else None


def _tests_in_full(study, tested: Tested | None) -> Section | None:
    if tested is None:
        return None
    rows, contrasts = tested
    found = [
        *([verdict.hypotheses_table(rows)] if rows else []),
        *([verdict.contrasts_table(study, contrasts)] if contrasts else []),
    ]
    return Section("The tests in full", tables=found)


def _build(analysis: Analysis, directory: Path, made_by: str) -> None:
    """The report's files, in reading order: the CSVs, the answer (drawing its figure
    first, so a dataset's section leaves out a figure the answer already shows), the
    sections, then report.md and index.html."""
    study = analysis.study
    render.write_csvs(directory, analysis)
    tested = None
    if study.hypotheses is not None:
        tested = verdict.hypothesis_rows(study), verdict.contrast_rows(study)
        render.write_tests_csv(directory, verdict.TESTS_COLUMNS, verdict.tests_records(study, *tested))
    answer = _answer(analysis, tested, directory)
    lead = [answer] if answer else []
    sections = [
        *[s for s in (_tests_in_full(study, tested), _published_section(analysis)) if s is not None],
        *_findings_sections(analysis),
        *_dose_sections(analysis, directory),
        *[_dataset_section(analysis, dataset, directory) for dataset in study.datasets],
        *_closing_sections(analysis, directory),
    ]
    caveats = sentences.caveats(analysis)
    description = str(study.spec.get("description") or "").strip()
    stamp = (
        f"gradnoise {gradnoise.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, baseline: {study.baseline}. "
        f"Runs made by {made_by}"
    )
    (directory / "report.md").write_text(
        render.markdown(study.name, description, stamp, caveats, sections, lead), encoding="utf-8"
    )
    (directory / "index.html").write_text(
        render.page(study.name, description, stamp, caveats, sections, lead), encoding="utf-8"
    )


def _published_section(analysis: Analysis) -> Section | None:
    """The spec's paper-style table with the published values beside it, or those alone."""
    paper_table, published = tables.paper_table(analysis), tables.published_table(analysis)
    if paper_table is not None:
        return Section(analysis.study.table.title, tables=[paper_table, *([published] if published else [])])
    if published is not None:
        return Section("Published values", tables=[published])
    return None


def _findings_sections(analysis: Analysis) -> list[Section]:
    """Per dataset: which methods beat the baseline, and which were left out of the test."""
    sections = []
    for dataset in analysis.study.datasets:
        found = verdict.findings_tables(analysis, dataset, sentences.ALPHA)
        left_out = sentences.left_out(analysis, dataset)
        if found or left_out:
            note = sentences.best_val_note(analysis, dataset)
            sections.append(
                Section(f"{dataset}: findings", tables=found, text=([note] if note else []) + left_out)
            )
    return sections


def _dose_sections(analysis: Analysis, directory: Path) -> list[Section]:
    """Per dataset with a dose-response family: its tables, sentences and plot."""
    study, sections = analysis.study, []
    for dataset in study.datasets:
        dose = [
            t
            for key in (study.dose.metrics if study.dose else ())
            if (t := tables.dose_table(analysis, dataset, key))
        ]
        if dose:
            note = sentences.gradient_note(analysis, dataset)
            figure = directory / f"dose_response_{_slug(dataset)}.png"
            sections.append(
                Section(
                    f"{dataset}: does any amount of noise help?",
                    text=[*sentences.dose_findings(analysis, dataset), *([note] if note else [])],
                    tables=dose,
                    plots=_drawn(plots.dose_response(analysis, dataset, figure)),
                )
            )
    return sections


def _dataset_section(analysis: Analysis, dataset: str, directory: Path) -> Section:
    """One dataset's summaries, comparisons with the baseline, speed, and curves."""
    study, slug = analysis.study, _slug(dataset)
    speed = tables.speed_table(analysis, dataset)
    notes = [
        None if study.dose else sentences.gradient_note(analysis, dataset),
        # Beside the first table of best val: the findings' if there are any, else here.
        None if study.findings else sentences.best_val_note(analysis, dataset),
    ]
    return Section(
        dataset,
        tables=[
            *tables.summary_tables(analysis, dataset),
            *tables.comparison_tables(analysis, dataset),
            *([speed] if speed else []),
        ],
        plots=_drawn(
            plots.curves(analysis, dataset, directory / f"curves_{slug}.png"),
            # Drawn here unless the answer above already shows it.
            None
            if (directory / f"final_val_{slug}.png").exists()
            else plots.final_val(analysis, dataset, directory / f"final_val_{slug}.png"),
            plots.gradient_norms(analysis, dataset, directory / f"gradients_{slug}.png"),
        ),
        text=[note for note in notes if note],
    )


def _closing_sections(analysis: Analysis, directory: Path) -> list[Section]:
    """The noise schedules and their cost, then the methods and every run."""
    not_done = tables.not_done_table(analysis.study)
    return [
        Section(
            "Noise schedules and cost",
            plots=_drawn(
                plots.sigma_schedules(analysis, directory / "sigma_schedules.png"),
                plots.overhead(analysis, directory / "overhead.png"),
            ),
            text=[] if analysis.schedules else ["No run of this study adds gradient noise."],
        ),
        Section(
            "Methods and runs",
            tables=[
                tables.methods_table(analysis),
                tables.runs_table(analysis),
                *([not_done] if not_done else []),
            ],
        ),
    ]


def _drawn(*paths: Path | None) -> list[Path]:
    return [path for path in paths if path is not None]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)

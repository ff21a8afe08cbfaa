"""The report's files: Markdown and one self-contained HTML page from the sections, and
the CSV files from the analysis rows."""

from __future__ import annotations

import base64
import csv
import html
import math
import re
from pathlib import Path

from gradnoise.study.report.analysis import Analysis, ComparisonRow, SpeedRow, SummaryRow
from gradnoise.study.report.conditions import RunRow
from gradnoise.study.report.document import Link, Section, Table
from gradnoise.study.report.metrics import RUN_METRICS, SUMMARY_METRICS

# ---- Markdown -------------------------------------------------------------------------------


def _cell_markdown(cell) -> str:
    text = str(cell).replace("|", "\\|")
    return f"[{text}]({cell.href})" if isinstance(cell, Link) else text


def table_markdown(table: Table) -> str:
    def line(cells):
        return "| " + " | ".join(_cell_markdown(c) for c in cells) + " |"

    lines = [f"**{table.title}**", "", line(table.columns), line(["---"] * len(table.columns))]
    lines += [line(row) for row in table.rows]
    for note in table.notes:
        lines += ["", f"*{note}*"]
    return "\n".join(lines) + "\n"


def markdown(
    name: str,
    description: str,
    stamp: str,
    caveats: list[str],
    sections: list[Section],
    lead: list[Section] = (),
) -> str:
    """The answer (`lead`) first, then what the study asks, the caveats and the sections."""
    parts = [f"# Study `{name}`: report", ""]
    for section in lead:
        parts += _section_markdown(section)
    if description:
        parts += [description, ""]
    parts += [f"*{stamp}*", "", "## Caveats", ""]
    parts += [f"- {line}" for line in caveats] + [""]
    for section in sections:
        parts += _section_markdown(section)
    return "\n".join(parts)


def _section_markdown(section: Section) -> list[str]:
    parts = [f"## {section.title}", ""]
    parts += [line + "\n" for line in section.text]
    parts += [table_markdown(table) for table in section.tables]
    parts += [f"![{plot.stem}]({plot.name})\n" for plot in section.plots]
    return parts


# ---- HTML -----------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1em clamp(0.75em, 3vw, 2em); color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; overflow-wrap: anywhere; }
.wide { overflow-x: auto; -webkit-overflow-scrolling: touch; max-width: 100%; }
table { border-collapse: collapse; margin: 0.5em 0 0.3em; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; white-space: nowrap; }
td.num { text-align: right; }
td.text { white-space: normal; min-width: 14em; max-width: 32em; }
th { background: #f3f3f3; cursor: pointer; user-select: none; }
td:first-child { position: sticky; left: 0; background: #fff; }
th:first-child { position: sticky; left: 0; }
th[aria-sort="ascending"]::after { content: " ▲"; }
th[aria-sort="descending"]::after { content: " ▼"; }
code { overflow-wrap: anywhere; background: #f4f4f4; padding: 0 0.2em; border-radius: 3px; }
.note { font-size: 0.85em; color: #555; margin: 0.2em 0; }
.caveats { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5em 1.2em; margin: 1em 0; }
.caveats summary { cursor: pointer; font-weight: 600; }
.caveats ul { padding-left: 1.2em; }
.lead { border-left: 4px solid #2b6cb0; padding: 0 1em; }
.lead p { margin: 0.4em 0; }
img { display: block; max-width: 100%; height: auto; margin: 1em 0; }
@media (max-width: 700px) {
  .wide img { max-width: 900px; width: auto; }
  .lead .wide img { max-width: 100%; width: 100%; }  /* the answer's figure: whole, on one screen */
  table { font-size: 0.8em; }
}
"""

# Click a column's header to sort the table by it (numbers by value, then text); again to reverse.
_SCRIPT = """
function sortBy(th) {
  var body = th.closest("table").tBodies[0], column = th.cellIndex;
  var ascending = th.getAttribute("aria-sort") !== "ascending";
  th.closest("tr").querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
  th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  function key(row) {
    var text = row.cells[column].textContent.trim();
    var value = parseFloat(text.replace(/^[<=p(]+/, "").replace("\u2212", "-"));
    return isNaN(value) ? text : value;
  }
  var rows = Array.prototype.slice.call(body.rows);
  rows.sort(function (a, b) {
    var x = key(a), y = key(b);
    if (typeof x !== typeof y) { return typeof x === "number" ? -1 : 1; }
    return (x < y ? -1 : x > y ? 1 : 0) * (ascending ? 1 : -1);
  });
  rows.forEach(function (row) { body.appendChild(row); });
}
document.querySelectorAll("th").forEach(function (th) {
  th.addEventListener("click", function () { sortBy(th); });
});
"""
#: A cell longer than this wraps (prose: how a value was measured, a config difference).
_WRAP_AT = 40
#: A number, a statistic ("1.23 ± 0.04 [...]"), a p-value ("<0.001") or a missing value.
_NUMERIC = re.compile(r"^([-+<]?\d|—|n/a$)")


def _cell_html(cell) -> str:
    text = html.escape(str(cell))
    if isinstance(cell, Link):
        return f'<td><a href="{html.escape(cell.href)}">{text}</a></td>'
    if _NUMERIC.match(str(cell)):
        return f'<td class="num">{text}</td>'
    if len(text) > _WRAP_AT:
        return f'<td class="text">{_inline_code(text)}</td>'
    return f"<td>{_inline_code(text)}</td>"


def table_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(_cell_html(c) for c in row) + "</tr>" for row in table.rows)
    notes = "".join(f'<p class="note">{_inline_code(html.escape(n))}</p>' for n in table.notes)
    return (
        f"<h4>{html.escape(table.title)}</h4>"
        f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{notes}'
    )


def page(
    name: str,
    description: str,
    stamp: str,
    caveats: list[str],
    sections: list[Section],
    lead: list[Section] = (),
) -> str:
    """One HTML file with everything in it: the plots are embedded as data: URLs, the
    style and the sorting script inline; it requests nothing from anywhere. The answer
    (`lead`) opens it; the caveats follow, folded."""
    body = [f"<h1>Study {html.escape(name)}: report</h1>"]
    for section in lead:
        body.append(f'<div class="lead">{_section_html(section)}</div>')
    if description:
        body.append(f"<p>{_inline_code(html.escape(description))}</p>")
    body.append(f'<p class="note">{html.escape(stamp)}</p>')
    body.append(f'<details class="caveats"><summary>Caveats ({len(caveats)})</summary><ul>')
    body += [f"<li>{_inline_code(html.escape(line))}</li>" for line in caveats]
    body.append("</ul></details>")
    body += [_section_html(section) for section in sections]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Study {html.escape(name)}: report</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}<script>{_SCRIPT}</script></body></html>\n"
    )


def _section_html(section: Section) -> str:
    parts = [f"<h2>{html.escape(section.title)}</h2>"]
    parts += [f"<p>{_inline_code(html.escape(line))}</p>" for line in section.text]
    parts += [table_html(table) for table in section.tables]
    parts += [_image(plot) for plot in section.plots]
    return "".join(parts)


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<div class="wide"><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"></div>'


def _inline_code(escaped: str) -> str:
    """Markdown's `code` and **strong** spans, as HTML."""
    escaped = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


# ---- CSV ------------------------------------------------------------------------------------

SUMMARY_COLUMNS = ["dataset", "method", "runs", "done", "diverged", "failed", "unfinished"] + [
    f"{metric}_{statistic}"
    for metric in SUMMARY_METRICS
    for statistic in ("n", "mean", "sd", "ci_low", "ci_high")
]
COMPARISON_COLUMNS = [
    "dataset",
    "method",
    "metric",
    "n_pairs",
    "seeds",
    "mean_diff",
    "sd_diff",
    "ci_low",
    "ci_high",
    "t_stat",
    "t_p",
    "t_p_holm",
    "wilcoxon_stat",
    "wilcoxon_p",
    "wilcoxon_p_holm",
    "wilcoxon_min_p",
    "effect_size_dz",
    "note",
]
RUN_COLUMNS = [
    "run_id",
    "dataset",
    "method",
    "seed",
    "status",
    *RUN_METRICS,
    "wall_s",
    "directory",
    "log",
    "error",
]
SPEED_COLUMNS = [
    "dataset",
    "method",
    "target_val_loss",
    "runs",
    "reached",
    "steps_mean",
    "steps_sd",
    "seconds_mean",
    "seconds_sd",
    "step_time_median_s",
    "baseline_step_time_median_s",
    "overhead_percent",
]


def write_csvs(directory: Path, analysis: Analysis) -> None:
    """summary.csv, comparison.csv, speed_cost.csv and runs.csv: one line per row of the
    analysis (runs.csv: per run, its directory and log relative to the report)."""
    _write_csv(directory / "summary.csv", SUMMARY_COLUMNS, [_summary_record(r) for r in analysis.summaries])
    comparisons = [_comparison_record(r) for r in analysis.comparisons]
    _write_csv(directory / "comparison.csv", COMPARISON_COLUMNS, comparisons)
    _write_csv(directory / "speed_cost.csv", SPEED_COLUMNS, [_speed_record(r) for r in analysis.speeds])
    _write_csv(directory / "runs.csv", RUN_COLUMNS, [_run_record(r) for r in analysis.runs])


def _summary_record(row: SummaryRow) -> dict:
    """A summary.csv line: the runs by status, then n, mean, sd and CI of each metric."""
    record = {
        "dataset": row.dataset,
        "method": row.method,
        "runs": row.runs,
        "done": row.done,
        "diverged": row.diverged,
        "failed": row.failed,
        "unfinished": row.unfinished,
    }
    for metric in SUMMARY_METRICS:
        s = row.summary(metric)
        record |= {
            f"{metric}_n": s.n,
            f"{metric}_mean": s.mean,
            f"{metric}_sd": s.sd,
            f"{metric}_ci_low": s.ci_low,
            f"{metric}_ci_high": s.ci_high,
        }
    return record


def _comparison_record(row: ComparisonRow) -> dict:
    """A comparison.csv line: the paired comparison and its Holm-adjusted p-values."""
    c = row.comparison
    return {
        "dataset": row.dataset,
        "method": row.method,
        "metric": row.metric,
        "n_pairs": c.n_pairs,
        "seeds": " ".join(str(s) for s in c.seeds),
        "mean_diff": c.mean_diff,
        "sd_diff": c.sd_diff,
        "ci_low": c.ci_low,
        "ci_high": c.ci_high,
        "t_stat": c.t_stat,
        "t_p": c.t_p,
        "t_p_holm": row.t_p_holm,
        "wilcoxon_stat": c.wilcoxon_stat,
        "wilcoxon_p": c.wilcoxon_p,
        "wilcoxon_p_holm": row.wilcoxon_p_holm,
        "wilcoxon_min_p": c.wilcoxon_min_p,
        "effect_size_dz": c.effect_size,
        "note": c.note,
    }


def _speed_record(r: SpeedRow) -> dict:
    """A speed_cost.csv line: steps and seconds to the target, and the step-time overhead."""
    return {
        "dataset": r.dataset,
        "method": r.method,
        "target_val_loss": r.target_val_loss,
        "runs": r.runs,
        "reached": r.reached,
        "steps_mean": r.steps.mean,
        "steps_sd": r.steps.sd,
        "seconds_mean": r.seconds.mean,
        "seconds_sd": r.seconds.sd,
        "step_time_median_s": r.overhead.method_median_s,
        "baseline_step_time_median_s": r.overhead.baseline_median_s,
        "overhead_percent": r.overhead.percent,
    }


def _run_record(r: RunRow) -> dict:
    """A runs.csv line: the run, its finals, and the last line of its error."""
    return {
        "run_id": r.run_id,
        "dataset": r.dataset,
        "method": r.method,
        "seed": r.seed,
        "status": r.status,
        **r.finals,
        "wall_s": r.wall_s,
        "directory": r.directory,
        "log": r.log,
        "error": (r.error or "").strip().splitlines()[-1] if r.error else "",
    }


def write_tests_csv(directory: Path, columns: list[str], records: list[dict]) -> None:
    """tests.csv: the hypotheses' and contrasts' lines (`verdict.tests_records`)."""
    _write_csv(directory / "tests.csv", columns, records)


def _csv_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    # float() first: numpy scalars subclass float, and their repr is "np.float64(…)".
    return repr(float(value)) if isinstance(value, float) else str(value)


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([[_csv_value(row.get(c)) for c in columns] for row in rows])

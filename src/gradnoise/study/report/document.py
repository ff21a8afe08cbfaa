"""The report as a document: sections of text, tables and plots (`render` lays them out
as Markdown and HTML), and how a number is written in a cell or a sentence.

    Section("shakespeare_char", tables=[Table("Final metrics", ["method", "val loss"], rows)])
    mean_sd(summary)     # "1.4692 ± 0.0031", "1.4692 (n=1)" or "—"
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from gradnoise.study.stats import Comparison, Summary

MISSING = "—"


@dataclass(frozen=True)
class Link:
    """A table cell that links to a file of the study (a path relative to the report)."""

    text: str
    href: str

    def __str__(self) -> str:
        return self.text


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str | Link]]
    notes: list[str] = field(default_factory=list)


@dataclass
class Section:
    """A heading with text, tables and plots, rendered the same way in Markdown and HTML."""

    title: str
    tables: list[Table] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    text: list[str] = field(default_factory=list)


# ---- numbers as text ------------------------------------------------------------------------


def number(x: float | None, digits: int = 4) -> str:
    if x is None or math.isnan(x):
        return MISSING
    return f"{x:.{digits}f}"


def mean_sd(summary: Summary, digits: int = 4) -> str:
    if summary.n == 0:
        return MISSING
    if summary.n == 1:
        return f"{number(summary.mean, digits)} (n=1)"
    return f"{number(summary.mean, digits)} ± {number(summary.sd, digits)}"


def mean_sd_ci(summary: Summary, digits: int = 4) -> str:
    if summary.n < 2:
        return mean_sd(summary, digits)
    ci = f"[{number(summary.ci_low, digits)}, {number(summary.ci_high, digits)}]"
    return f"{mean_sd(summary, digits)} {ci}"


def p_value(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def p_equals(p: float) -> str:
    """A p-value inside a sentence: "p = 0.012", "p < 0.001" or "p n/a"."""
    if math.isnan(p):
        return "p n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def signed(x: float, digits: int = 4) -> str:
    return MISSING if math.isnan(x) else f"{x:+.{digits}f}"


def difference(c: Comparison) -> str:
    if c.n_pairs < 2 or math.isnan(c.ci_low):
        return signed(c.mean_diff)
    return f"{signed(c.mean_diff)} [{signed(c.ci_low)}, {signed(c.ci_high)}]"


def scientific(x: float | None) -> str:
    if x is None or math.isnan(x):
        return MISSING
    return f"{x:.3g}"


def value_text(x) -> str:
    """A config value as the methods table shows it."""
    if isinstance(x, float):
        return f"{x:g}"
    return "none" if x is None else str(x)

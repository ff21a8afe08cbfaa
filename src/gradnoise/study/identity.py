"""Which code made a study's runs, from the store's per-run identity (gradnoise.lm.training.provenance).

    groups = code_groups(store.runs())   # [(label, [run ids])], largest first; finished runs
    mixed(groups)                        # True: the runs came from more than one code

Two runs came from the same code when their source hashes are equal. A run recorded
before runs recorded their code (an older store) is "unknown": a study whose runs are
all unknown cannot say, and is not called mixed; unknown beside known runs is, since
nothing shows that they are the same code.
"""

from __future__ import annotations

from gradnoise.errors import UserError
from gradnoise.lm.storage import runlog
from gradnoise.lm.training import provenance
from gradnoise.study.store import run_code, run_numerics


def code_groups(rows: list[dict]) -> list[tuple[str, list[str]]]:
    """(code label, run ids) per code among the finished runs, the most runs first."""
    groups: dict[str | None, tuple[str, list[str]]] = {}
    for row in rows:
        if row["status"] not in runlog.FINISHED:
            continue
        code = run_code(row)
        key = code["source_sha256"] if code else None
        groups.setdefault(key, (provenance.code_label(code), []))[1].append(row["id"])
    return sorted(groups.values(), key=lambda group: -len(group[1]))


def mixed(groups: list[tuple[str, list[str]]]) -> bool:
    return len(groups) > 1


def describe(groups: list[tuple[str, list[str]]]) -> str:
    """`0.1.0 @ 1a2b3c4d5e6f (12 runs)`, or for mixed code every group with its run ids."""
    if not groups:
        return "no finished run yet"
    if not mixed(groups):
        ((label, ids),) = groups
        return f"{label} (all {len(ids)} finished runs)"
    return "; ".join(f"{label}: {len(ids)} run(s) {', '.join(ids)}" for label, ids in groups)


def numerics_summary(rows: list[dict]) -> str:
    """The distinct numerics of the finished runs: `torch 2.13.0, AMD EPYC, float32, 1 thread`."""
    seen = []
    for row in rows:
        if row["status"] in runlog.FINISHED:
            numerics = run_numerics(row)
            text = (
                "unknown"
                if numerics is None
                else f"torch {numerics['torch']}, {numerics['device_model']}, {numerics['dtype']}, "
                f"{numerics['threads']} thread(s)" + (", compiled" if numerics["compile"] else "")
            )
            if text not in seen:
                seen.append(text)
    return "; ".join(seen) if seen else "no finished run yet"


def refuse_mixed(name: str, groups: list[tuple[str, list[str]]]) -> None:
    """UserError naming each code's runs, where they came from more than one code."""
    if mixed(groups):
        raise UserError(
            f"study {name}'s runs came from different code, and their numbers need not be "
            f"comparable: {describe(groups)}; rerun the study from one commit, or compare them "
            "anyway with --allow-mixed-code"
        )


def differs_from_here(rows: list[dict]) -> list[tuple[str, list[str]]]:
    """The code groups of finished runs whose code is not this process's (unknown included)."""
    here = provenance.code_identity()
    return code_groups([row for row in rows if not provenance.same_code(run_code(row), here)])

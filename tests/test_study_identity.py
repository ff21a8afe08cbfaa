"""Which code made a study's runs: the store's per-run identity in `study status`, the
report (refused for mixed code unless asked) and `study run`'s warning."""

import logging

import pytest

from gradnoise.cli import main
from gradnoise.cli.common import configure_logging
from gradnoise.errors import UserError
from gradnoise.lm.training import provenance
from gradnoise.study.identity import code_groups
from gradnoise.study.report import write_report
from gradnoise.study.runner import study_status, warn_if_other_code
from gradnoise.study.store import Store
from helpers.fabricated import FINALS, SPEC, fabricated_result, fill_store

NUMERICS = {
    "torch": "2.13.0",
    "device": "cpu",
    "device_model": "Some CPU",
    "dtype": "float32",
    "threads": 1,
    "compile": False,
    "replicas": 1,
}


def code(sha: str, commit: str = "c" * 40) -> dict:
    return {"version": "0.1.0", "commit": commit, "dirty": False, "source_sha256": sha * 64}


def made_by(code_: dict) -> dict:
    return {"code": code_, "numerics": NUMERICS, "attempts": 1, "consistent": True}


def record_code(directory, codes: dict) -> None:
    """Record the done runs again, run "method-seed" with codes[run id] (no entry: unknown)."""
    with Store(directory / "study.sqlite") as store:
        for method, seeds in FINALS.items():
            for seed, finals in seeds.items():
                run_id = f"{method}-{seed}"
                result, curves = fabricated_result(method, *finals)
                if run_id in codes:
                    result["provenance"] = made_by(codes[run_id])
                store.record_result(run_id, result, curves)


@pytest.fixture
def study(tmp_path):
    fill_store(tmp_path, SPEC)
    return tmp_path


def done_ids():
    return [f"{method}-{seed}" for method, seeds in FINALS.items() for seed in seeds]


def test_runs_of_one_code_are_shown_in_status_and_at_the_top_of_the_report(study):
    record_code(study, dict.fromkeys(done_ids(), code("a")))
    # The diverged run (exp-3) was recorded without an identity: unknown, so mixed.
    with Store(study / "study.sqlite", readonly=True) as store:
        groups = code_groups(store.runs())
    assert groups == [("0.1.0 @ cccccccccccc", done_ids()), ("unknown", ["exp-3"])]
    with Store(study / "study.sqlite") as store:
        result, curves = fabricated_result("exp", 9.0, float("nan"))
        result |= {"status": "diverged", "error": "nan", "provenance": made_by(code("a"))}
        store.record_result("exp-3", result, curves[:2])
    status = study_status(study)
    assert "code: 0.1.0 @ cccccccccccc (all 7 finished runs)" in status
    assert "numerics: torch 2.13.0, Some CPU, float32, 1 thread(s)" in status
    report = (write_report(study) / "report.md").read_text()
    head = report.split("## Caveats")[0]
    assert "Runs made by code: 0.1.0 @ cccccccccccc (all 7 finished runs)" in head
    assert "MIXED CODE" not in report


def test_a_study_of_mixed_code_is_refused_naming_its_runs_unless_allowed(study, capsys):
    codes = dict.fromkeys(done_ids(), code("a"))
    codes["exp-1"] = code("b", commit="d" * 40)
    record_code(study, codes)
    with pytest.raises(UserError) as refused:
        write_report(study)
    message = str(refused.value)
    assert "different code" in message and "--allow-mixed-code" in message
    assert "0.1.0 @ dddddddddddd: 1 run(s) exp-1" in message
    assert "unknown: 1 run(s) exp-3" in message
    assert not (study / "report").exists()
    assert main(["study", "report", str(study)]) == 2
    assert "gradnoise: error: study synthetic's runs came from different code" in capsys.readouterr().err
    assert main(["study", "report", str(study), "--allow-mixed-code"]) == 0
    head = (study / "report" / "report.md").read_text().split("## Caveats")[0]
    assert "MIXED CODE, compared anyway (--allow-mixed-code)" in head and "exp-1" in head


def test_an_older_study_shows_its_code_as_unknown_and_is_not_mixed(study):
    assert "code: unknown (all 7 finished runs)" in study_status(study)
    assert "Runs made by code: unknown" in (write_report(study) / "report.md").read_text()


def test_study_run_warns_when_the_stored_runs_came_from_other_code(study, capsys):
    configure_logging(logging.INFO)
    here = provenance.code_identity()
    record_code(study, dict.fromkeys(done_ids(), here))
    with Store(study / "study.sqlite") as store:
        rows = [r for r in store.runs() if r["id"] != "exp-3"]  # exp-3 has no identity
    capsys.readouterr()
    warn_if_other_code(rows, study)
    assert "warning" not in capsys.readouterr().err
    record_code(study, dict.fromkeys(done_ids(), here) | {"baseline-0": code("b")})
    with Store(study / "study.sqlite") as store:
        rows = store.runs()
    warn_if_other_code(rows, study)
    (warning,) = capsys.readouterr().err.splitlines()
    assert warning.startswith("gradnoise: warning: this process runs gradnoise")
    assert "came from other code" in warning and "baseline-0" in warning
    assert "exp-3" in warning  # unknown is not known to be this code

"""Pinned numerics: the golden run's first losses and ‖noise‖ (tests/golden/golden_run.json).

A change to initialization, data order, eval batches or the noise stream changes them and
fails here until the file is regenerated on purpose (tests/golden/regenerate.py says how;
its commit says that numerics changed and which committed studies must be rerun)."""

import json

from golden.regenerate import CONFIG, GOLDEN_FILE, PINNED, differences, measure


def test_the_golden_run_computes_its_pinned_numbers(one_thread):
    golden = json.loads(GOLDEN_FILE.read_text())
    assert golden["config"] == CONFIG, "the golden config changed: regenerate tests/golden/golden_run.json"
    assert {key.split("/")[0] for key in golden["values"]} == set(PINNED)
    off = differences(measure(threads=1), golden["values"], golden["tolerance"])
    assert not off, (
        "the golden run's numbers changed (numerics changed: initialization, data order, eval "
        "batches or noise stream?):\n  " + "\n  ".join(off) + "\nIf intended, regenerate with "
        "`PYTHONPATH=src python tests/golden/regenerate.py` and say in the commit which committed "
        "studies must be rerun."
    )

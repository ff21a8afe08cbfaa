"""The Ray executor, for real, on a local Ray instance: tasks train in-process and send
their results back; the driver alone writes the store."""

import json
import socket

import pytest
import yaml

from gradnoise.lm.data import corpora
from gradnoise.lm.storage.runlog import read_curves
from gradnoise.lm.training.group import read_group
from gradnoise.study import ray_executor
from gradnoise.study.runner import run_study
from gradnoise.study.spec import load_spec
from gradnoise.study.store import Store
from helpers.configs import STUDY

ray = pytest.importorskip("ray")

TINY = STUDY


@pytest.fixture(scope="module")
def ray_instance():
    """A local 2-CPU Ray whose workers inherit the tests' private data home."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_executor_end_to_end(tmp_path, ray_instance):
    spec_path = tmp_path / "ray.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "name": "ray",
                "datasets": ["shakespeare_char"],
                "seeds": 1,
                "overrides": TINY,
                "methods": {
                    "baseline": {},
                    "exp": {"noise": "exp:sigma0=0.01,gamma=0.9"},
                    "broken": {"block_size": 200_000},
                },  # fails inside the task
            }
        )
    )
    spec = load_spec(spec_path)
    study_dir = tmp_path / "study"
    summary = run_study(spec, study_dir, executor="ray", progress=False)
    assert (summary["done"], summary["failed"], summary["ran"]) == (2, 1, 3)

    with Store(study_dir / "study.sqlite") as store:
        runs = {r["method"]: r for r in store.runs()}
        finals = {f["method"]: f for f in store.finals()}
        curves = store.curves()
    assert "block_size=200000" in runs["broken"]["error"]
    assert runs["broken"]["status"] == "failed"
    for method in ("baseline", "exp"):
        row = runs[method]
        assert (row["status"], row["attempts"], row["host"]) == ("done", 1, socket.gethostname())
        # The workers see the study directory here, so each run wrote its own run_dir.
        run_dir = study_dir / "runs" / row["id"]
        result = json.loads((run_dir / "result.json").read_text())
        assert finals[method]["val_loss"] == result["finals"]["val_loss"]
        assert finals[method]["steps"] == TINY["max_iters"]
        mine = sorted((p["kind"], p["step"], p["val_loss"]) for p in curves if p["run_id"] == row["id"])
        on_disk = read_curves(run_dir)
        assert mine == sorted((p["kind"], p["step"], p.get("val_loss")) for p in on_disk)
    # The noise acted: same seed, same start, different end.
    assert finals["baseline"]["val_loss"] != finals["exp"]["val_loss"]

    again = run_study(spec, study_dir, executor="ray", progress=False)
    assert (again["skipped"], again["ran"], again["done"]) == (2, 1, 2)


def test_a_worker_without_the_study_directory_trains_in_a_local_run_dir(tmp_path, ray_instance):
    """On a cluster without a shared filesystem the task trains under $GRADNOISE_HOME."""
    config = load_spec("quick", TINY).runs[0].config.to_dict()
    elsewhere = tmp_path / "not-on-this-node" / "mystudy"
    output = ray_executor.train_in_worker({"abc123": config}, str(elsewhere), None)
    run_dir = corpora.gradnoise_home() / "study-runs" / "mystudy" / "abc123"
    assert not elsewhere.exists()
    assert output["results"]["abc123"]["status"] == "done"
    assert output["results"]["abc123"] == json.loads((run_dir / "result.json").read_text())
    assert output["curves"]["abc123"] == read_curves(run_dir)
    assert output["host"] == socket.gethostname()


def test_ray_trains_a_group_in_one_task(tmp_path, ray_instance):
    spec_path = tmp_path / "raygroup.yaml"
    methods = {"baseline": {}, "exp": {"noise": "exp:sigma0=0.01,gamma=0.9"}}
    data = {"name": "raygroup", "datasets": ["shakespeare_char"], "overrides": TINY, "methods": methods}
    spec_path.write_text(yaml.safe_dump(data | {"seeds": 1}))
    spec = load_spec(spec_path)
    study_dir = tmp_path / "study"
    summary = run_study(spec, study_dir, executor="ray", batch_models=2, progress=False)
    assert (summary["done"], summary["ran"]) == (2, 2)
    (group_dir,) = (study_dir / "groups").iterdir()
    assert [m.run_id for m in read_group(group_dir)] == [run.run_id for run in spec.runs]
    with Store(study_dir / "study.sqlite") as store:
        runs, finals = store.runs(), {f["id"]: f for f in store.finals()}
    assert [(r["status"], r["attempts"], r["host"]) for r in runs] == [("done", 1, socket.gethostname())] * 2
    for run in spec.runs:
        result = json.loads((study_dir / "runs" / run.run_id / "result.json").read_text())
        assert finals[run.run_id]["val_loss"] == result["finals"]["val_loss"]
        assert finals[run.run_id]["steps"] == TINY["max_iters"]

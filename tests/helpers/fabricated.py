"""A study store filled through the real Store writer API with fabricated results: two methods
(baseline, exp) × three done seeds, plus a failed and a diverged run."""

import math

from gradnoise import schedules
from gradnoise.lm.config import resolve_config
from gradnoise.study.report.analysis import analyze
from gradnoise.study.report.loading import load_study
from gradnoise.study.store import Store

MAX_ITERS = 600


EXP_SPEC = "exp:sigma0=0.01,gamma=0.99"


# Fabricated per-seed results: method → seed → (final train loss, final val loss).
FINALS = {
    "baseline": {0: (1.20, 1.50), 1: (1.22, 1.52), 2: (1.19, 1.49)},
    "exp": {0: (1.18, 1.47), 1: (1.21, 1.50), 2: (1.20, 1.48)},
}


STEP_TIME = {"baseline": 0.050, "exp": 0.055}


EVAL_STEPS = range(0, MAX_ITERS + 1, 100)


def val_curve(final: float, step: int) -> float:
    return final + (2.5 - final) * (1 - step / MAX_ITERS) ** 2


PARAMETERS = 40_000


# ‖g‖ logged at the train lines: the baseline's (after clipping) cycle through these.
GRAD_NORMS = (0.5, 0.75, 1.0)


def fabricated_result(method: str, train: float, val: float) -> tuple[dict, list[dict]]:
    schedule = schedules.parse(EXP_SPEC) if method == "exp" else None
    curves = [
        {
            "kind": "train",
            "step": s,
            "loss": val_curve(val, s) + 0.05,
            "lr": 1e-3,
            "sigma": schedule(s) if schedule else 0.0,
            "time_s": s * STEP_TIME[method],
            "tokens_per_s": 15000.0,
            "grad_norm": GRAD_NORMS[(s // 50) % 3],
            "noise_norm": schedule(s) * math.sqrt(PARAMETERS) if schedule else 0.0,
            "noise_to_grad": (schedule(s) * math.sqrt(PARAMETERS) if schedule else 0.0)
            / GRAD_NORMS[(s // 50) % 3],
        }
        for s in range(50, MAX_ITERS + 1, 50)
    ] + [
        {
            "kind": "eval",
            "step": s,
            "train_loss": val_curve(train, s),
            "val_loss": val_curve(val, s),
            "time_s": s * STEP_TIME[method],
        }
        for s in EVAL_STEPS
    ]
    finals = {
        "steps": MAX_ITERS,
        "train_loss": train,
        "train_loss_window": train - 0.2,
        "train_loss_last_batch": train - 0.25,
        "val_loss": val,
        "best_val_loss": val,
        "best_val_step": MAX_ITERS,
        "val_loss_full": val + 0.001,
        "test_loss_full": None,
        "train_bpc": train / math.log(2),
        "val_bpc": val / math.log(2),
        "best_val_bpc": val / math.log(2),
        "val_bpc_full": (val + 0.001) / math.log(2),
        "test_bpc_full": None,
        "wall_s": 40.0,
        "train_s": 30.0,
        "step_time_median_s": STEP_TIME[method],
        "tokens_per_s": 15000.0,
        "final_sigma": schedule(MAX_ITERS - 1) if schedule else 0.0,
        "parameters": PARAMETERS,
    }
    result = {"status": "done", "error": None, "device": "cpu", "host": "test", "finals": finals}
    return result, curves


SPEC = {
    "name": "synthetic",
    "description": "two methods, three seeds",
    "preset": "tiny",
    "datasets": ["shakespeare_char"],
    "seeds": 4,
    "baseline": "baseline",
    "overrides": {"max_iters": MAX_ITERS},
    "methods": {"baseline": {}, "exp": {"noise": EXP_SPEC}},
    "caveats": ["A made-up study for the tests."],
    "table": {
        "title": "Table 9",
        "caption": "a made-up paper's layout",
        "metrics": ["train_loss_window", "val_loss", "best_val_step"],
        "labels": {"val_loss": "val", "train_loss_window": "train"},
    },
    # In YAML order best val before train; the report shows the final metrics' order.
    "published": {
        "source": "a made-up paper",
        "values": {"shakespeare_char": {"best_val_loss": 1.25, "train_loss_last_batch": 0.96}},
        "how": {"train_loss_last_batch": "the last minibatch, in train mode"},
    },
}


DATASET = "shakespeare_char"


def fill_store(directory, spec: dict) -> None:
    """2 methods × 3 done seeds, plus seed 3: baseline failed, exp diverged."""
    with Store(directory / "study.sqlite") as store:
        store.create_study(spec["name"], spec)
        for method, noise in (("baseline", "none"), ("exp", EXP_SPEC)):
            for seed in range(4):
                config = resolve_config(
                    DATASET, "tiny", {"max_iters": MAX_ITERS, "noise": noise, "seed": seed}
                ).to_dict()
                run_id = f"{method}-{seed}"
                store.add_runs([(run_id, DATASET, method, seed, config)])
                store.mark_running(run_id, "test", "cpu")
                if seed in FINALS[method]:
                    store.record_result(run_id, *fabricated_result(method, *FINALS[method][seed]))
                elif method == "baseline":
                    store.record_failure(run_id, "Traceback ...\nRuntimeError: out of memory")
                else:
                    result, curves = fabricated_result(method, 9.0, float("nan"))
                    result |= {"status": "diverged", "error": "loss is nan at step 12"}
                    store.record_result(run_id, result, curves[:2])


def done_runs_spec(name: str, methods: dict, seeds, dataset: str, **more) -> dict:
    """The spec of a study that store_done_runs stores: the tiny preset for 100 steps, each
    method against "baseline"; then `more` (hypotheses, dose_response, …)."""
    return {
        "name": name,
        "preset": "tiny",
        "datasets": [dataset],
        "seeds": len(seeds),
        "baseline": "baseline",
        "overrides": {"max_iters": 100},
        "methods": methods,
        **more,
    }


def store_done_runs(directory, spec: dict, methods: dict, seeds, dataset: str, result_of) -> None:
    """A store in `directory` holding `spec`'s study with one done run per method × seed (the
    tiny preset for 100 steps with the method's overrides); result_of(method, index of the
    seed, seed) → (finals, curves)."""
    with Store(directory / "study.sqlite") as store:
        store.create_study(spec["name"], spec)
        for method, overrides in methods.items():
            for index, seed in enumerate(seeds):
                config = resolve_config(dataset, "tiny", {"max_iters": 100, **overrides, "seed": seed})
                run_id = f"{method}-{seed}"
                store.add_runs([(run_id, dataset, method, seed, config.to_dict())])
                finals, curves = result_of(method, index, seed)
                store.record_result(run_id, {"status": "done", "finals": finals}, curves)


def analyzed(study_dir):
    """The report's analysis of the study stored in study_dir."""
    with Store(study_dir / "study.sqlite") as store:
        return analyze(load_study(store))

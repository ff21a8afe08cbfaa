"""`bench_train`: one run of the harness trainer (`gradnoise.lm.training.trainer.train`)
in a temporary directory: wall time including evaluation, median ms/step, tokens/s.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from gradnoise.errors import UserError
from gradnoise.lm.config import resolve_config
from gradnoise.lm.training.trainer import train


def bench_train(
    dataset: str = "shakespeare_char",
    preset: str = "paper",
    overrides: dict | None = None,
    progress: bool = True,
) -> dict:
    """Run the harness trainer once in a temporary directory and time it.

    Returns {"device", "dataset", "preset", "steps", "wall_s" (the whole
    `train` call: setup, compilation, training, evals, checkpoints, the final
    exact eval), "to_last_step_s" (from the call to the end of the last
    optimizer step: setup, compilation, training and every eval but the one
    after the last step), "train_s" (optimizer steps only), "step_ms_median",
    "tokens_per_s", "val_loss", "best_val_loss", "config"}.
    """
    cfg = resolve_config(dataset, preset, overrides)
    last_step_at = []

    def mark_step(step, inputs, targets) -> None:
        if step == cfg.max_iters:
            last_step_at.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="gradnoise-bench-") as run_dir:
        start = time.perf_counter()
        result = train(cfg, Path(run_dir) / "run", progress=progress, on_step=mark_step)
        wall_s = time.perf_counter() - start
    finals = result["finals"]
    if result["status"] != "done":
        raise UserError(f"the benchmark run did not finish: {result['status']}: {result['error']}")
    step_s = finals["step_time_median_s"]
    return {
        "device": result["device"],
        "dataset": dataset,
        "preset": preset,
        "steps": finals["steps"],
        "wall_s": wall_s,
        "to_last_step_s": last_step_at[0] - start if last_step_at else None,
        "train_s": finals["train_s"],
        "step_ms_median": None if step_s is None else 1e3 * step_s,
        "tokens_per_s": finals["tokens_per_s"],
        "val_loss": finals["val_loss"],
        "best_val_loss": finals["best_val_loss"],
        "config": cfg.to_dict(),
    }


def format_train_report(result: dict) -> str:
    def number(value, form: str) -> str:
        return "n/a" if value is None else format(value, form)

    return "\n".join(
        [
            f"gradnoise bench train: {result['dataset']}, preset {result['preset']}, {result['device']}",
            f"  steps            {result['steps']}",
            f"  wall time        {result['wall_s']:.1f} s (everything: setup, compile, training, "
            "evals, checkpoints, final exact eval)",
            f"  to last step     {number(result['to_last_step_s'], '.1f')} s (setup, compile, training "
            "and the evals before the last step)",
            f"  training time    {result['train_s']:.1f} s (optimizer steps only)",
            f"  ms/step          {number(result['step_ms_median'], '.2f')} (median over log windows)",
            f"  tokens/s         {number(result['tokens_per_s'], ',.0f')}",
            f"  val loss         final {number(result['val_loss'], '.4f')}, "
            f"best {number(result['best_val_loss'], '.4f')} nats",
        ]
    )

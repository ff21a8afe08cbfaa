"""`bench_batch`: the batched trainer's step (`gradnoise.lm.training.step.train_step`, M
runs of a preset as one model, seeds 0 … M−1) for each M in turn, in one process:
ms per step, runs per hour (M runs of the preset's max_iters steps, evaluation not
counted) and the speed-up in runs per hour over M = 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from gradnoise.errors import UserError
from gradnoise.lm.bench.timing import PRESETS, WARMUP_STEPS, timed_device
from gradnoise.lm.config import resolve_config
from gradnoise.lm.data import corpora
from gradnoise.lm.devices import describe_device, sync
from gradnoise.lm.training.distributed import DistributedEnv
from gradnoise.lm.training.progress import Clock
from gradnoise.lm.training.setup import Hyper, new_run, splits
from gradnoise.lm.training.step import global_batch, train_step

BATCH_STEPS = {("cpu", "tiny"): 20, ("cpu", "paper"): 2, ("cuda", "tiny"): 200, ("cuda", "paper"): 100}


def parse_models(text: str) -> list[int]:
    """ "1,2,4,8" → [1, 2, 4, 8]; UserError unless a comma-separated list of integers ≥ 1."""
    try:
        models = [int(part) for part in text.split(",")]
    except ValueError:
        models = []
    if not models or min(models) < 1:
        raise UserError(f"--models {text!r} is not allowed: give replica counts ≥ 1, e.g. 1,2,4,8,16")
    return models


def bench_batch(
    preset: str = "tiny",
    models: list[int] = (1, 2, 4, 8, 16),
    device: str = "cpu",
    steps: int | None = None,
    noise: str = "none",
    log: Callable[[str], None] | None = None,
) -> dict:
    """Time the batched step for each replica count M (see the module docstring).

    Returns {"device", "torch", "threads", "dtype", "compile", "preset", "params" (one
    replica's), "max_iters", "steps", "noise", "rows": [{"models", "step_ms",
    "runs_per_hour", "speedup", "peak_memory_gib" (CUDA; else None)}]}.
    """
    if preset not in PRESETS:
        raise UserError(f"preset={preset!r} is not allowed: use {', '.join(PRESETS)}")
    log = log or (lambda message: None)
    torch_device, dtype = timed_device(device, steps)
    cuda = torch_device.type == "cuda"
    base = resolve_config("shakespeare_char", preset, {"device": str(torch_device), "noise": noise})
    corpus = corpora.load(base.dataset)
    tokens = splits(corpus, base)["train"]
    steps = steps or BATCH_STEPS[(torch_device.type, preset)]
    result = {
        "device": describe_device(torch_device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "compile": cuda,
        "preset": preset,
        "max_iters": base.max_iters,
        "steps": steps,
        "noise": base.noise,
        "rows": [],
    }
    for count in models:
        step_s, params, peak = _time_group(base, count, corpus, tokens, torch_device, dtype, steps, log)
        result["params"] = params
        runs_per_hour = count * 3600 / (step_s * base.max_iters)
        first = result["rows"][0]["runs_per_hour"] if result["rows"] else runs_per_hour
        result["rows"].append(
            {
                "models": count,
                "step_ms": 1e3 * step_s,
                "runs_per_hour": runs_per_hour,
                "speedup": runs_per_hour / first,
                "peak_memory_gib": peak,
            }
        )
    return result


def _time_group(base, count, corpus, tokens, device, dtype, steps, log) -> tuple[float, int, float | None]:
    """Seconds per step of a group of `count` runs of `base` (seeds 0 … count−1), one replica's
    parameter count, and the peak GiB of device memory (CUDA; else None)."""
    cuda = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    cfgs = [base.replace(seed=seed) for seed in range(count)]
    if cuda:
        torch._dynamo.reset()  # each M compiles afresh, never against the previous M's cache limit
    run = new_run(cfgs, corpus.vocab_size, device, dtype, DistributedEnv(), Clock())
    params = sum(p.numel() for p in run.params) // count
    model = torch.compile(run.model) if cuda else run.model
    hyper = Hyper.of(cfgs, device)

    def next_batch(run=run):
        return global_batch(run, tokens, cfgs, corpus.vocab_size)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    log(f"M = {count}: warming up")
    for step in range(WARMUP_STEPS[device.type]):
        train_step(run, model, step, base, hyper, next_batch, autocast)
    sync(device)
    log(f"M = {count}: timing {steps} steps")
    start = time.perf_counter()
    for step in range(steps):
        train_step(run, model, step, base, hyper, next_batch, autocast)
    sync(device)
    step_s = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    del run, model
    if cuda:
        torch.cuda.empty_cache()
    return step_s, params, peak


def format_batch_report(result: dict) -> str:
    lines = [
        f"gradnoise bench batch: preset {result['preset']} ({result['params']:,} parameters per model), "
        f"{result['device']}, {result['dtype']}, compile {result['compile']}, {result['threads']} threads",
        f"  {result['steps']} timed steps per M; runs/hour = M runs of {result['max_iters']:,} steps "
        f"(evaluation not counted); noise {result['noise']}",
        "",
        f"  {'M':>4}  {'ms/step':>10}  {'ms/step/run':>11}  {'runs/hour':>10}  {'speed-up':>8}  "
        f"{'peak GiB':>8}",
    ]
    for row in result["rows"]:
        memory = "" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.2f}"
        lines.append(
            f"  {row['models']:>4}  {row['step_ms']:>10.1f}  {row['step_ms'] / row['models']:>11.2f}  "
            f"{row['runs_per_hour']:>10.1f}  {row['speedup']:>7.2f}×  {memory:>8}"
        )
    return "\n".join(lines)

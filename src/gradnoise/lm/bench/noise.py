"""`bench_noise`: what gradient noise costs. One process, one model and one
optimizer per preset; the variants take turns step by step (round-robin, the
starting variant rotating each repetition), so drift in clock speed or in
other load on the machine hits every variant alike:

    none               no noise
    loop               the per-parameter loop in a step pre-hook, as ESPnet's
                       add_gradient_noise and Chainer's GradientNoise hook do:
                       for g in grads: g.add_(torch.randn_like(g) * σ)
    gradnoise          GradientNoise (on CUDA: the fused Triton kernel)
    gradnoise-unfused  CUDA only: GradientNoise with GRADNOISE_DISABLE_TRITON=1

A step is the harness's: zero_grad, forward, backward, clip_grad_norm_(1.0),
AdamW step (bf16 autocast and torch.compile on CUDA). Then the noise op alone on
the model's gradients, against two references measured in the same run:

    fill reference  the same number of N(0, 1) samples drawn by one normal_
                    into a kept buffer: on CPU that is single-threaded (torch's
                    CPU normal_ runs on one thread), on CUDA one kernel
    copy            a large tensor copy_, bytes read + written: the device's
                    memory bandwidth, the physical bound of an in-place op

Effective bandwidth of a noise op = 8 bytes per fp32 gradient element (the
gradient read and written once) / time.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

import gradnoise
from gradnoise.errors import UserError
from gradnoise.lm.bench.timing import (
    PRESETS,
    WARMUP_STEPS,
    Timer,
    environment,
    interleaved,
    quartiles_ms,
    timed_device,
)
from gradnoise.lm.config import resolve_config
from gradnoise.lm.devices import describe_device
from gradnoise.lm.model.gpt import GPT
from gradnoise.lm.training import replicas
from gradnoise.lm.training.setup import build_optimizer

SIGMA = 0.01
BYTES_PER_ELEMENT = 8  # an fp32 gradient read and written once
# Steps per variant when --steps is not given: a paper-model step takes seconds on CPU.
# On CUDA a small model's step is bound by the host (Python and kernel launches), whose
# speed wanders by ±10% from block to block: many interleaved steps make the medians steady.
DEFAULT_STEPS = {("cpu", "tiny"): 30, ("cpu", "paper"): 3, ("cuda", "tiny"): 300, ("cuda", "paper"): 200}
COPY_BYTES = {"cpu": 256 * 2**20, "cuda": 2 * 2**30}
# Targets of the library issue.
CPU_FILL_RATIO_TARGET = 0.7  # gradnoise op ≤ 0.7 × the single-threaded normal fill
GPU_OVERHEAD_TARGET_PCT = 0.5  # of the paper model's compiled bf16 step
GPU_COPY_FRACTION_TARGET_PCT = 50.0


# --- the noise ops and their references -------------------------------------------------


def loop_noise_(grads: list[torch.Tensor], sigma: float) -> None:
    """The per-parameter way (ESPnet, Chainer): a random and an add kernel per tensor."""
    for grad in grads:
        grad.add_(torch.randn_like(grad) * sigma)


class NormalFill:
    """The fill reference: `numel` N(0, 1) samples by one `normal_` (single-threaded on CPU)."""

    def __init__(self, numel: int, device: torch.device):
        self.buffer = torch.empty(numel, device=device)
        self.generator = torch.Generator(device).manual_seed(0)

    def __call__(self) -> None:
        self.buffer.normal_(generator=self.generator)


def copy_bandwidth(device: torch.device, timer: Timer, repetitions: int = 10) -> float:
    """GB/s of a large copy_, counting the bytes read and the bytes written."""
    source = torch.ones(COPY_BYTES[device.type] // 4, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # first touch: page faults are not bandwidth
    seconds = statistics.median(timer(lambda: target.copy_(source)) for _ in range(repetitions))
    return 2 * source.numel() * 4 / seconds / 1e9


# --- bench noise ------------------------------------------------------------------------


def _percent(value: float, reference: float) -> float:
    return 100.0 * (value - reference) / reference


def bench_noise(
    presets: tuple[str, ...] = PRESETS,
    device: str = "cpu",
    steps: int | None = None,
    compile: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Time training steps and noise ops for each preset; see the module docstring.

    Returns {"device", "torch", "threads", "dtype", "compile", "copy_gb_s",
    "presets": {name: {"params", "batch_size", "block_size", "steps",
    "step_ms", "step_ms_iqr", "overhead_pct", "op_us", "op_gb_s", "op_pct_of_copy",
    "targets"}}}. Times are medians over the repetitions; step_ms_iqr holds each
    variant's quartiles (25%, 75%) as a measure of the spread.
    """
    for preset in presets:
        if preset not in PRESETS:
            raise UserError(f"preset={preset!r} is not allowed: use {', '.join(PRESETS)} or both")
    log = log or (lambda message: None)
    torch_device, dtype = timed_device(device, steps)
    cuda = torch_device.type == "cuda"
    timer = Timer(torch_device)
    log(f"measuring copy bandwidth on {describe_device(torch_device)}")
    result = {
        "device": describe_device(torch_device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "compile": bool(cuda and compile),
        "copy_gb_s": copy_bandwidth(torch_device, timer),
        "presets": {},
    }
    for preset in presets:
        repetitions = steps or DEFAULT_STEPS[(torch_device.type, preset)]
        log(f"{preset}: {repetitions} steps per variant")
        result["presets"][preset] = _bench_preset(
            preset, torch_device, dtype, repetitions, result["compile"], timer, result["copy_gb_s"], log
        )
    return result


def _bench_preset(preset, device, dtype, repetitions, use_compile, timer, copy_gb_s, log) -> dict:
    cfg = resolve_config("shakespeare_char", preset)
    optimizer, params, train_step = _training_step(cfg, device, dtype, use_compile)
    numel = sum(p.numel() for p in params)
    hooks = _noise_hooks(optimizer, params, device)
    step_samples = _time_steps(optimizer, train_step, hooks, timer, device, repetitions, preset, log)
    step_ms = {name: 1e3 * statistics.median(samples) for name, samples in step_samples.items()}
    train_step()  # the noise ops alone, on the gradients of one more backward pass
    op_seconds = _time_noise_ops([p.grad for p in params], numel, device, timer, repetitions, preset, log)
    op_gb_s = {name: BYTES_PER_ELEMENT * numel / s / 1e9 for name, s in op_seconds.items()}
    overhead = {name: _percent(ms, step_ms["none"]) for name, ms in step_ms.items() if name != "none"}
    return {
        "params": numel,
        "batch_size": cfg.batch_size,
        "block_size": cfg.block_size,
        "model": f"{cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, dropout {cfg.dropout}",
        "steps": repetitions,
        "step_ms": step_ms,
        "step_ms_iqr": {name: quartiles_ms(samples) for name, samples in step_samples.items()},
        "overhead_pct": overhead,
        "op_us": {name: 1e6 * s for name, s in op_seconds.items()},
        "op_gb_s": op_gb_s,
        "op_pct_of_copy": {name: 100 * gb / copy_gb_s for name, gb in op_gb_s.items()},
        "targets": _targets(device, op_seconds, overhead, op_gb_s["gradnoise"], copy_gb_s),
    }


def _training_step(cfg, device, dtype, use_compile):
    """The harness's step on a fixed batch: (optimizer, trainable parameters, step function)."""
    torch.manual_seed(0)
    raw_model = GPT(cfg.model_config(vocab_size=65)).to(device)
    model = torch.compile(raw_model) if use_compile else raw_model
    optimizer = build_optimizer(raw_model, cfg, device)
    replicas.WeightDecay(optimizer, [cfg.weight_decay], decoupled=True)  # the trainer's AdamW decay
    params = [p for p in raw_model.parameters() if p.requires_grad]
    batches = torch.Generator().manual_seed(0)
    x = torch.randint(65, (cfg.batch_size, cfg.block_size), generator=batches).to(device)
    y = torch.randint(65, (cfg.batch_size, cfg.block_size), generator=batches).to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()

    return optimizer, params, train_step


def _noise_hooks(optimizer, params, device) -> dict[str, Callable[[], None] | None]:
    """The noise variants, each as what a step pre-hook calls (None: no noise)."""

    def noise() -> gradnoise.GradientNoise:
        return gradnoise.GradientNoise(optimizer, gradnoise.schedules.Constant(SIGMA), attach=False)

    hooks: dict[str, Callable[[], None] | None] = {
        "none": None,
        "loop": lambda: loop_noise_([p.grad for p in params if p.grad is not None], SIGMA),
        "gradnoise": noise().apply,
    }
    if device.type == "cuda":
        unfused = noise()

        def apply_unfused() -> None:
            with environment("GRADNOISE_DISABLE_TRITON", "1"):
                unfused.apply()

        hooks["gradnoise-unfused"] = apply_unfused
    return hooks


def _time_steps(
    optimizer, train_step, hooks, timer, device, repetitions, preset, log
) -> dict[str, list[float]]:
    """Each variant's step times in seconds, the variants interleaved step by step after a warm-up."""

    def measure_step(hook) -> Callable[[], float]:
        def measure() -> float:
            handle = None
            if hook is not None:
                handle = optimizer.register_step_pre_hook(lambda *_: hook())
            try:
                return timer(train_step)
            finally:
                if handle is not None:
                    handle.remove()

        return measure

    step_measures = {name: measure_step(hook) for name, hook in hooks.items()}
    log(f"{preset}: warming up")
    interleaved(step_measures, WARMUP_STEPS[device.type])
    log(f"{preset}: timing training steps")
    return interleaved(step_measures, repetitions)


def _time_noise_ops(grads, numel, device, timer, repetitions, preset, log) -> dict[str, float]:
    """Median seconds of each noise op alone on `grads`, and of the fill reference."""
    cuda = device.type == "cuda"
    workspace: dict = {}
    generator = torch.Generator().manual_seed(0)
    fill = NormalFill(numel, device)
    calls = 20 if cuda else 1  # a CUDA op lasts tens of µs: time a batch of calls

    def gradnoise_unfused_op() -> None:
        with environment("GRADNOISE_DISABLE_TRITON", "1"):
            gradnoise.add_noise_(grads, SIGMA, generator, workspace=workspace)

    ops: dict[str, Callable[[], None]] = {
        "gradnoise": lambda: gradnoise.add_noise_(grads, SIGMA, generator, workspace=workspace),
        "loop": lambda: loop_noise_(grads, SIGMA),
        "fill_reference": fill,
    }
    if cuda:
        ops["gradnoise-unfused"] = gradnoise_unfused_op
    op_measures = {name: (lambda op=op: timer(op, repeat=calls)) for name, op in ops.items()}
    interleaved(op_measures, 2)
    log(f"{preset}: timing the noise op alone")
    op_samples = interleaved(op_measures, max(10, 3 * repetitions))
    return {name: statistics.median(samples) for name, samples in op_samples.items()}


def _targets(device, op_seconds, overhead, gradnoise_gb_s, copy_gb_s) -> dict:
    """The library issue's targets: {name: {"value", "target", "met"}}.

    CPU: the op within 0.7× the single-threaded normal fill and never slower than the
    loop. CUDA: step overhead ≤ 0.5% and the op at ≥ 50% of copy bandwidth.
    """
    loop_ratio = op_seconds["gradnoise"] / op_seconds["loop"]
    targets = {"op_vs_loop": {"value": loop_ratio, "target": "≤ 1", "met": loop_ratio <= 1.0}}
    if device.type == "cuda":
        copy_pct = 100 * gradnoise_gb_s / copy_gb_s
        targets["step_overhead_pct"] = {
            "value": overhead["gradnoise"],
            "target": f"≤ {GPU_OVERHEAD_TARGET_PCT}",
            "met": overhead["gradnoise"] <= GPU_OVERHEAD_TARGET_PCT,
        }
        targets["op_pct_of_copy"] = {
            "value": copy_pct,
            "target": f"≥ {GPU_COPY_FRACTION_TARGET_PCT}",
            "met": copy_pct >= GPU_COPY_FRACTION_TARGET_PCT,
        }
    else:
        fill_ratio = op_seconds["gradnoise"] / op_seconds["fill_reference"]
        targets["op_vs_fill"] = {
            "value": fill_ratio,
            "target": f"≤ {CPU_FILL_RATIO_TARGET}",
            "met": fill_ratio <= CPU_FILL_RATIO_TARGET,
        }
    return targets


def format_noise_report(result: dict) -> str:
    """The human-readable table of a `bench_noise` result."""
    lines = [
        f"gradnoise bench noise: {result['device']}, torch {result['torch']}, "
        f"{result['threads']} threads, {result['dtype']}, "
        f"{'torch.compile' if result['compile'] else 'eager'}",
        f"device copy bandwidth: {result['copy_gb_s']:.1f} GB/s (copy_, bytes read + written)",
    ]
    for preset, r in result["presets"].items():
        lines += [
            "",
            f"{preset}: GPT {r['model']}; {r['params'] / 1e6:.2f} M parameters; "
            f"batch {r['batch_size']} × {r['block_size']}; median of {r['steps']} interleaved "
            "steps per variant",
            f"  {'variant':<20}{'ms/step':>12}{'overhead':>11}   quartiles (ms)",
        ]
        for name, ms in r["step_ms"].items():
            overhead = "" if name == "none" else f"{r['overhead_pct'][name]:+.2f}%"
            low, high = r["step_ms_iqr"][name]
            lines.append(f"  {name:<20}{ms:>12.2f}{overhead:>11}   {low:.2f} to {high:.2f}")
        lines += [
            f"  noise op alone on the {r['params'] / 1e6:.2f} M gradient elements "
            f"({BYTES_PER_ELEMENT} bytes each):",
            f"  {'op':<20}{'µs':>12}{'GB/s':>11}{'% of copy':>11}",
        ]
        for name, us in r["op_us"].items():
            lines.append(
                f"  {name:<20}{us:>12.1f}{r['op_gb_s'][name]:>11.2f}{r['op_pct_of_copy'][name]:>10.1f}%"
            )
        lines.append("  targets:")
        for name, t in r["targets"].items():
            lines.append(
                f"    {name:<20}{t['value']:>9.3f}  (target {t['target']}): "
                f"{'met' if t['met'] else 'NOT met'}"
            )
    return "\n".join(lines)

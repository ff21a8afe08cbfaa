"""The fused CUDA kernel behind `add_noise_`: one launch, one pass over every gradient.

A launch takes any number of *jobs*, each a list of tensors with its own σ,
64-bit key and stream: every replica of a batched model, every param group,
in one launch. Each program handles BLOCK elements of one tensor of one job:
it loads g, draws ε and stores g + σ·ε. Per fp32 element that is 4 bytes read
and 4 written, the least any in-place update can move; the unfused path (fill
a buffer, then add it) moves 16.

ε comes from Philox-4x32-10 keyed by the job's whole 64-bit key (Triton's
`philox` splits a 64-bit seed into its two 32-bit key words), with the counter
(q, 0, stream_lo, stream_hi) for the q-th quadruple of the job, turned into
four normals by Box–Muller. So a job's noise does not depend on the other jobs
of its launch, and for a fixed key Philox is a bijection of the counter:
distinct (key, stream, position) never share random bits. Keys and σ's are
read on the device, so they may be computed there (no host sync).
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs have no Triton; streams.py falls back.
    triton = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK = 2048
_MAX_ELEMENTS = 2**31 - 1  # Philox counters are int32 here


@functools.cache
def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _add_noise_to(pointer, offsets, numel, noise, sigma, DTYPE: tl.constexpr):
        mask = offsets < numel
        gradient = tl.load(pointer + offsets, mask=mask)
        tl.store(pointer + offsets, (gradient.to(tl.float32) + sigma * noise).to(DTYPE), mask=mask)

    # Not specialized on the counts: one compiled kernel serves any number of tensors and jobs.
    @triton.jit(do_not_specialize=["n_tensors", "n_jobs"])
    def _add_noise_kernel(table, n_tensors, n_jobs, keys, sigmas, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        # table = [addresses (n_tensors), numels (n_tensors), streams (n_jobs),
        #          per program: tensor, start, job, the program's rank within its job]
        program = tl.program_id(0)
        entry = table + 2 * n_tensors + n_jobs + 4 * program
        tensor = tl.load(entry)
        start = tl.load(entry + 1)
        job = tl.load(entry + 2)
        rank = tl.load(entry + 3)
        pointer = tl.load(table + tensor).to(tl.pointer_type(DTYPE))
        numel = tl.load(table + n_tensors + tensor)
        key = tl.load(keys + job)
        sigma = tl.load(sigmas + job)
        stream = tl.load(table + 2 * n_tensors + job).to(tl.uint64)
        # One Philox call gives four normals: this program's quadruples are
        # rank·BLOCK/4 + i, unique within its job; the stream fills the
        # counter's upper words.
        QUARTER: tl.constexpr = BLOCK // 4
        lanes = tl.arange(0, QUARTER)
        zero = tl.zeros((QUARTER,), dtype=tl.uint32)
        r0, r1, r2, r3 = tl.philox(
            key,
            (rank * QUARTER + lanes).to(tl.uint32),
            zero,
            zero + stream.to(tl.uint32),
            zero + (stream >> 32).to(tl.uint32),
        )
        n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
        n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3))
        offsets = start + lanes
        _add_noise_to(pointer, offsets, numel, n0, sigma, DTYPE)
        _add_noise_to(pointer, offsets + QUARTER, numel, n1, sigma, DTYPE)
        _add_noise_to(pointer, offsets + 2 * QUARTER, numel, n2, sigma, DTYPE)
        _add_noise_to(pointer, offsets + 3 * QUARTER, numel, n3, sigma, DTYPE)


_TRITON_DTYPES = {}
if triton is not None:
    _TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# Room for many jobs' tables: a batched model's, and the anticorrelated second term's.
@functools.lru_cache(maxsize=256)
def _launch_table(
    addresses: tuple[int, ...],
    numels: tuple[int, ...],
    job_sizes: tuple[int, ...],
    streams: tuple[int, ...],
    device,
):
    """The kernel's table for one set of jobs (job j: the next job_sizes[j] tensors), on
    the device, cached: the caching allocator usually hands back the same addresses
    step after step, so the host builds and copies it once, not every step."""
    programs, first = [], 0
    for job, size in enumerate(job_sizes):
        rank = 0
        for tensor in range(first, first + size):
            for start in range(0, numels[tensor], _BLOCK):
                programs.append((tensor, start, job, rank))
                rank += 1
        if rank * _BLOCK > _MAX_ELEMENTS:
            raise ValueError(f"fused noise kernel handles at most {_MAX_ELEMENTS} elements per job")
        first += size
    flat = [*addresses, *numels, *streams, *(value for program in programs for value in program)]
    return _to_device(torch.tensor(flat, dtype=torch.int64), device), len(programs)


def _to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return values.to(device)  # the CPU, under TRITON_INTERPRET=1
    # From pinned memory the copy is asynchronous: the host does not wait for it.
    return values.pin_memory().to(device, non_blocking=True)


def _per_job(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The jobs' keys or σ's as one tensor on the device: numbers in one copy; values
    that are device tensors already (capturable steps) stacked there, with no host sync."""
    if not any(isinstance(value, torch.Tensor) for value in values):
        return _to_device(torch.tensor(values, dtype=dtype), device)
    return torch.stack(
        [
            value.reshape(()).to(device, dtype)
            if isinstance(value, torch.Tensor)
            else torch.tensor(value, dtype=dtype, device=device)
            for value in values
        ]
    )


def add_noise_(jobs: list[tuple[list[torch.Tensor], object, object, int]]) -> None:
    """t ← t + σ_j·ε_j for every tensor t of every job j = (tensors, σ_j, key_j, stream_j),
    all of one CUDA device and dtype, in one launch.

    σ_j: a float or a 0-d tensor on the device; key_j: the 64-bit key as an int64 (a
    signed int, or a 0-d int64 tensor on the device); 0 ≤ stream_j < 2⁴⁰. No tensor
    may be in two jobs (their programs would race).
    """
    # Gradients are contiguous; anything else is noised through a contiguous copy, in the same launch.
    targets = [[t if t.is_contiguous() else t.contiguous() for t in tensors] for tensors, *_ in jobs]
    flat = [t for tensors in targets for t in tensors]
    device = flat[0].device
    table, programs = _launch_table(
        tuple(t.data_ptr() for t in flat),
        tuple(t.numel() for t in flat),
        tuple(len(tensors) for tensors in targets),
        tuple(stream for *_, stream in jobs),
        device,
    )
    _add_noise_kernel[(programs,)](
        table,
        len(flat),
        len(jobs),
        _per_job([key for _, _, key, _ in jobs], torch.int64, device),
        _per_job([sigma for _, sigma, _, _ in jobs], torch.float32, device),
        DTYPE=_TRITON_DTYPES[flat[0].dtype],
        BLOCK=_BLOCK,
        num_warps=4,
    )
    for (tensors, *_), copies in zip(jobs, targets, strict=True):
        for tensor, target in zip(tensors, copies, strict=True):
            if target is not tensor:
                tensor.copy_(target)

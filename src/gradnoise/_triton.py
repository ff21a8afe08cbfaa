"""The fused CUDA kernel behind `add_noise_`: one launch, one pass over every gradient.

Each program handles BLOCK elements of one tensor: it loads g, draws ε and
stores g + σ·ε. Per fp32 element that is 4 bytes read and 4 written, the least
any in-place update can move; the unfused path (fill a buffer, then add it)
moves 16.

ε comes from Philox-4x32-10 keyed by the whole 64-bit step key (Triton's
`philox` splits a 64-bit seed into its two 32-bit key words), with the counter
(q, 0, stream_lo, stream_hi) for the q-th quadruple of the launch, turned into
four normals by Box–Muller. For a fixed key Philox is a bijection of the
counter, so distinct (key, stream, position) never share random bits. The key
and σ may be device tensors: then nothing is read on the host.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs have no Triton; noise.py falls back.
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

    # Not specialized on the key and stream values: one compiled kernel serves every step.
    @triton.jit(do_not_specialize=["key", "stream"])
    def _add_noise_kernel(
        table,
        n_tensors,
        sigma,
        sigma_ptr,
        key,
        key_ptr,
        stream,
        DTYPE: tl.constexpr,
        BLOCK: tl.constexpr,
        SIGMA_ON_DEVICE: tl.constexpr,
        KEY_ON_DEVICE: tl.constexpr,
    ):
        # table = [addresses (n_tensors), numels (n_tensors), per program: tensor, start]
        program = tl.program_id(0)
        tensor = tl.load(table + 2 * n_tensors + 2 * program)
        start = tl.load(table + 2 * n_tensors + 2 * program + 1)
        pointer = tl.load(table + tensor).to(tl.pointer_type(DTYPE))
        numel = tl.load(table + n_tensors + tensor)
        if SIGMA_ON_DEVICE:
            sigma = tl.load(sigma_ptr)
        if KEY_ON_DEVICE:
            key = tl.load(key_ptr)
        # One Philox call gives four normals: this program's quadruples are
        # program·BLOCK/4 + i, unique across the launch; the stream fills the
        # counter's upper words.
        QUARTER: tl.constexpr = BLOCK // 4
        lanes = tl.arange(0, QUARTER)
        zero = tl.zeros((QUARTER,), dtype=tl.uint32)
        stream = stream.to(tl.uint64)
        r0, r1, r2, r3 = tl.philox(
            key,
            (program * QUARTER + lanes).to(tl.uint32),
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


# Room for a batched model's tables too: one per replica and param group, every step.
@functools.lru_cache(maxsize=256)
def _launch_table(addresses: tuple[int, ...], numels: tuple[int, ...], device: torch.device):
    """The kernel's table for one set of tensors, on the device, cached: the
    caching allocator usually hands back the same addresses step after step,
    so the host builds and copies it once, not every step."""
    programs = [(index, start) for index, numel in enumerate(numels) for start in range(0, numel, _BLOCK)]
    if len(programs) * _BLOCK > _MAX_ELEMENTS:
        raise ValueError(f"fused noise kernel handles at most {_MAX_ELEMENTS} elements per call")
    flat = [*addresses, *numels, *(value for program in programs for value in program)]
    # From pinned memory the copy is asynchronous: a cache miss does not stall the host.
    return torch.tensor(flat, dtype=torch.int64).pin_memory().to(device, non_blocking=True), len(programs)


def add_noise_(tensors: list[torch.Tensor], sigma, key, stream: int) -> None:
    """t ← t + σ·ε for tensors of one CUDA device and dtype, in one launch.

    `sigma`: a float or a 0-d tensor on the device; `key`: the 64-bit key as an
    int64 (a signed int, or a 0-d int64 tensor on the device); `stream`: 0 ≤ stream < 2⁴⁰.
    """
    # Gradients are contiguous; anything else is noised through a contiguous copy, in the same launch.
    targets = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    table, programs = _launch_table(
        tuple(t.data_ptr() for t in targets), tuple(t.numel() for t in targets), targets[0].device
    )
    sigma_on_device = isinstance(sigma, torch.Tensor)
    key_on_device = isinstance(key, torch.Tensor)
    _add_noise_kernel[(programs,)](
        table,
        len(targets),
        0.0 if sigma_on_device else float(sigma),
        sigma.reshape(1).float() if sigma_on_device else table,  # not read when σ is a float
        0 if key_on_device else key,
        key.reshape(1).to(torch.int64) if key_on_device else table,  # not read when the key is an int
        stream,
        DTYPE=_TRITON_DTYPES[targets[0].dtype],
        BLOCK=_BLOCK,
        SIGMA_ON_DEVICE=sigma_on_device,
        KEY_ON_DEVICE=key_on_device,
        num_warps=4,
    )
    for tensor, target in zip(tensors, targets, strict=True):
        if target is not tensor:
            tensor.copy_(target)

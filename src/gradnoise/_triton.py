"""The fused CUDA kernel behind `add_noise_`: one launch, one pass over every gradient.

Each program handles BLOCK elements of one tensor: it loads g, draws ε with
Philox (`tl.randn4x`, four normals per counter; counters unique across the
launch, key = the call's seed) and stores g + σ·ε. Per fp32 element that is 4
bytes read and 4 written, the least any in-place update can move; the unfused
path (fill a buffer, then add it) moves 16.
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

    @triton.jit
    def _add_noise_kernel(
        table,
        n_tensors,
        sigma,
        sigma_ptr,
        seed,
        DTYPE: tl.constexpr,
        BLOCK: tl.constexpr,
        SIGMA_ON_DEVICE: tl.constexpr,
    ):
        # table = [addresses (n_tensors), numels (n_tensors), per program: tensor, start]
        program = tl.program_id(0)
        tensor = tl.load(table + 2 * n_tensors + 2 * program)
        start = tl.load(table + 2 * n_tensors + 2 * program + 1)
        pointer = tl.load(table + tensor).to(tl.pointer_type(DTYPE))
        numel = tl.load(table + n_tensors + tensor)
        if SIGMA_ON_DEVICE:
            sigma = tl.load(sigma_ptr)
        # One Philox call gives four normals: this program's counters are
        # program·BLOCK/4 + i, unique across the launch.
        QUARTER: tl.constexpr = BLOCK // 4
        lanes = tl.arange(0, QUARTER)
        n0, n1, n2, n3 = tl.randn4x(seed, (program * QUARTER + lanes).to(tl.int32))
        offsets = start + lanes
        _add_noise_to(pointer, offsets, numel, n0, sigma, DTYPE)
        _add_noise_to(pointer, offsets + QUARTER, numel, n1, sigma, DTYPE)
        _add_noise_to(pointer, offsets + 2 * QUARTER, numel, n2, sigma, DTYPE)
        _add_noise_to(pointer, offsets + 3 * QUARTER, numel, n3, sigma, DTYPE)


_TRITON_DTYPES = {}
if triton is not None:
    _TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@functools.lru_cache(maxsize=16)
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


def add_noise_(tensors: list[torch.Tensor], sigma, seed: int) -> None:
    """t ← t + σ·ε for tensors of one CUDA device and dtype, in one launch."""
    contiguous = [t for t in tensors if t.is_contiguous()]
    others = [t for t in tensors if not t.is_contiguous()]
    if others:  # rare (gradients are contiguous); noise them through a contiguous copy
        copies = [t.contiguous() for t in others]
        add_noise_(copies, sigma, seed ^ 0x5DEECE66D)
        for tensor, copy in zip(others, copies, strict=True):
            tensor.copy_(copy)
    if not contiguous:
        return
    table, programs = _launch_table(
        tuple(t.data_ptr() for t in contiguous), tuple(t.numel() for t in contiguous), contiguous[0].device
    )
    on_device = isinstance(sigma, torch.Tensor)
    _add_noise_kernel[(programs,)](
        table,
        len(contiguous),
        0.0 if on_device else float(sigma),
        sigma.reshape(1).float() if on_device else table,  # not read when σ is a float
        seed % (2**31 - 1),
        DTYPE=_TRITON_DTYPES[contiguous[0].dtype],
        BLOCK=_BLOCK,
        SIGMA_ON_DEVICE=on_device,
        num_warps=4,
    )

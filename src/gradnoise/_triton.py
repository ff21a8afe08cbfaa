"""The fused CUDA kernel behind `add_noise_`: one launch, one pass over every gradient.

Each program handles BLOCK elements of one tensor: it loads g, draws ε with
Philox (`tl.randn`, counter = the element's index across all tensors of the
call, key = the call's seed) and stores g + σ·ε. Per fp32 element that is 4
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
_BLOCK = 4096
_MAX_ELEMENTS = 2**31 - 1  # Philox counters are int32 here


@functools.cache
def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _add_noise_kernel(
        addresses, numels, first_index, block_tensor, block_start, sigma_ptr, seed,
        DTYPE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        program = tl.program_id(0)
        tensor = tl.load(block_tensor + program)
        start = tl.load(block_start + program)
        numel = tl.load(numels + tensor)
        pointer = tl.load(addresses + tensor).to(tl.pointer_type(DTYPE))
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < numel
        gradient = tl.load(pointer + offsets, mask=mask)
        counters = (tl.load(first_index + tensor) + offsets).to(tl.int32)
        noise = tl.randn(seed, counters)
        sigma = tl.load(sigma_ptr)
        tl.store(pointer + offsets, (gradient.to(tl.float32) + sigma * noise).to(DTYPE), mask=mask)


_TRITON_DTYPES = {}
if triton is not None:
    _TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@functools.lru_cache(maxsize=64)
def _block_table(numels: tuple[int, ...], device: torch.device):
    """Per program: which tensor and where in it; per tensor: its first global index."""
    block_tensor, block_start, first_index, total = [], [], [], 0
    for index, numel in enumerate(numels):
        first_index.append(total)
        total += numel
        for start in range(0, numel, _BLOCK):
            block_tensor.append(index)
            block_start.append(start)

    def as_tensor(values):
        return torch.tensor(values, dtype=torch.int64, device=device)

    return (as_tensor(list(numels)), as_tensor(first_index), as_tensor(block_tensor),
            as_tensor(block_start), total)


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
    device = contiguous[0].device
    numels, first_index, block_tensor, block_start, total = _block_table(
        tuple(t.numel() for t in contiguous), device)
    if total > _MAX_ELEMENTS:
        raise ValueError(f"fused noise kernel handles at most {_MAX_ELEMENTS} elements per call, got {total}")
    addresses = torch.tensor([t.data_ptr() for t in contiguous], dtype=torch.int64)
    addresses = addresses.to(device, non_blocking=True)
    if isinstance(sigma, torch.Tensor):
        sigma_tensor = sigma.reshape(1).to(device=device, dtype=torch.float32)
    else:
        sigma_tensor = torch.full((1,), float(sigma), device=device, dtype=torch.float32)
    _add_noise_kernel[(block_tensor.numel(),)](
        addresses, numels, first_index, block_tensor, block_start, sigma_tensor,
        seed % (2**31 - 1),
        DTYPE=_TRITON_DTYPES[contiguous[0].dtype], BLOCK=_BLOCK, num_warps=8,
    )

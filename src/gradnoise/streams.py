"""Keyed noise streams, and `add_noise_`: the batched op that draws and adds them.

Streams that never repeat. GradientNoise keys step t with
k_t = splitmix64(seed ⊕ splitmix64(t)) (`mix`), a bijection of 64-bit integers
for a fixed seed, so every step of a run has its own key. Within a step each group of
gradients (param group × device × dtype) is a *stream* of that key, and every
random number is drawn from a generator whose state holds (key, stream,
position) verbatim:

* CPU: the gradients are cut into fixed chunks of `_CPU_CHUNK` elements; chunk
  c gets an mt19937 generator whose state words hold the 64-bit key, the
  stream and c, the other 618 words hashed from them with SplitMix64 (see
  `_chunk_states`). Distinct (key, stream, chunk) give distinct generator
  states, hence distinct streams. (torch's `manual_seed` keeps only 32 bits
  of a seed: among N draws about N²/2³³ pairs would repeat.)
* CUDA, fused kernel: Philox keyed by the 64-bit key, the stream in the upper
  counter words, the element's position in the lower ones.

`add_noise_` is the batched kernel: on CUDA one fused Triton kernel generates
and adds the noise for every tensor in a single pass over the gradients (8
bytes per fp32 element); on CPU the chunks are filled and added on every core,
each chunk's noise added while it is still in cache; elsewhere one flat buffer
per (device, dtype) and one `torch._foreach_add_`.

The interface GradientNoise uses: a step's noise work is a list of `NoiseJob`s
(tensors, σ, key, stream) — one per replica, param group and (device, dtype) —
and `add_noise_jobs` adds them all in one launch or one pass, each job's noise a
function of its own (key, stream) alone; `mix(seed, t)` is step t's key and
`group_by_device_dtype` the grouping that numbers the streams.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

from gradnoise.errors import UserError

__all__ = ["NoiseJob", "add_noise_", "add_noise_jobs", "group_by_device_dtype", "mix"]

# --- keys: SplitMix64 on Python ints and on int64 tensors ------------------------------

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """The int64 whose two's-complement bits are those of the 64-bit unsigned `value`."""
    value &= _MASK64
    return value - (1 << 64) if value >> 63 else value


# SplitMix64's constants as int64, so that they multiply int64 tensors too.
_GAMMA = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _wrap(x):
    """x mod 2⁶⁴: int64 tensors wrap by themselves, Python ints need the mask."""
    return x if isinstance(x, torch.Tensor) else x & _MASK64


def _shift_right(x, bits: int):
    """Logical shift of a 64-bit value (torch's >> is arithmetic on int64)."""
    shifted = x >> bits
    shifted &= (1 << (64 - bits)) - 1
    return shifted


def _splitmix64(x):
    """SplitMix64's step and output function: a bijection of 64-bit integers that mixes well.

    Works on Python ints (returns 0 ≤ value < 2⁶⁴) and on int64 tensors (the
    same bits, as int64), so a key can be computed on the device. On tensors
    the augmented assignments work in place on a new tensor, not the argument.
    """
    x = _wrap(x + _GAMMA)
    x ^= _shift_right(x, 30)
    x *= _MIX1
    x = _wrap(x)
    x ^= _shift_right(x, 27)
    x *= _MIX2
    x = _wrap(x)
    x ^= _shift_right(x, 31)
    return x


def mix(key, *indices):
    """A key for (key, indices), like JAX's fold_in: key ← splitmix64(key ⊕ splitmix64(index)).

    A bijection of `key` for fixed indices and of the last index for a fixed
    key. Python ints give 0 ≤ key < 2⁶⁴; if any argument is an int64 tensor the
    result is one (the same bits).
    """
    on_tensor = isinstance(key, torch.Tensor) or any(isinstance(i, torch.Tensor) for i in indices)
    if on_tensor and not isinstance(key, torch.Tensor):
        key = _signed(key)
    for index in indices:
        if on_tensor and not isinstance(index, torch.Tensor):
            index = _signed(index)
        key = _splitmix64(key ^ _splitmix64(index))
    return key


def _as_int(key) -> int:
    """A key as a Python int in [0, 2⁶⁴) (a host sync if it is a device tensor)."""
    return int(key) & _MASK64


def _draw_key(generator: torch.Generator | None) -> int:
    device = generator.device if generator is not None else "cpu"
    low, high = -(1 << 63), (1 << 63) - 1
    return _as_int(torch.randint(low, high, (1,), generator=generator, device=device, dtype=torch.int64))


# --- CPU: chunked mt19937 streams ----------------------------------------------------------

# Elements per chunk: small enough that each chunk's noise is added while it is
# in cache and that the threads share the work evenly, large enough that the
# per-chunk Python work stays a few percent of drawing it.
_CPU_CHUNK = 1 << 16
# Each add_ covers at most this many elements: ATen runs it on the calling
# thread alone (its OpenMP threads would only contend with ours).
_SERIAL_ADD = 1 << 15
_MT_WORDS = 624
# torch's CPU generator state, read as int64: [initial seed, left | seeded << 32,
# next, the 624 mt19937 words, the cached normals]; `set_state` takes it back.
_STATE_INT64 = 632
_STATE_MT = slice(3, 3 + _MT_WORDS)
_FILLER_PAIRS = (_MT_WORDS - 6) // 2  # SplitMix64 outputs filling words 6…623, two words each
# States are built this many chunks at a time: every op stays under ATen's
# grain size and so on the calling thread, away from the OpenMP threads, which
# stall whenever another process holds a core.
_STATE_BLOCK = _SERIAL_ADD // _STATE_INT64

_thread_pool: ThreadPoolExecutor | None = None
# One reusable generator per accelerator device (unfused path), re-seeded at every use.
_device_generators: dict[torch.device, torch.Generator] = {}


def _reset_after_fork() -> None:
    # A forked child (a DataLoader worker) inherits the pool object, not its threads.
    global _thread_pool
    _thread_pool = None


os.register_at_fork(after_in_child=_reset_after_fork)


def _worker_count() -> int:
    return max(1, torch.get_num_threads())


def _pool() -> ThreadPoolExecutor:
    global _thread_pool
    if _thread_pool is None:
        _thread_pool = ThreadPoolExecutor(max(1, os.cpu_count() or 1), "gradnoise")
    return _thread_pool


@functools.cache
def _generator_state_template() -> torch.Tensor:
    """A CPU generator's state as int64 words, ready to take new mt19937 words.

    Checks that torch lays the state out as `_chunk_states` writes it (seed,
    left = 1, seeded, next = 0, then mt19937's init_genrand words).
    """
    seed = 0x5EED
    state = torch.Generator().manual_seed(seed).get_state()
    words = state.view(torch.int64) if state.numel() % 8 == 0 else state
    first = seed & 0xFFFFFFFF
    second = (1812433253 * (first ^ (first >> 30)) + 1) & 0xFFFFFFFF
    expected = [seed, 1 | 1 << 32, 0, first, second]
    if words.dtype != torch.int64 or words.numel() != _STATE_INT64 or words[:5].tolist() != expected:
        raise RuntimeError(
            f"gradnoise: torch {torch.__version__}'s CPU generator state ({state.numel()} bytes) is not "
            "laid out as gradnoise expects (5056 bytes: seed, left, seeded, next, 624 mt19937 words); "
            "please report this with your torch version"
        )
    return words.clone()


@functools.lru_cache(maxsize=16)
def _filler_hashes(stream: int, chunks: int) -> torch.Tensor:
    """(chunks, 309) int64: h_ci = f(f(u_c) ⊕ f(2⁶³ + i)), f = splitmix64, u_c = stream·2²⁴ + c.

    u_c is one-to-one for stream < 2³⁹ and c < 2²⁴ and stays below 2⁶³, apart
    from the word indices 2⁶³ + i; so h_ci ≠ h_c'i whenever c ≠ c'.
    """
    if stream >= 1 << 39 or chunks > 1 << 24:
        raise ValueError(f"gradnoise: stream {stream} or {chunks} chunks out of range")
    per_chunk = _splitmix64(torch.arange(chunks, dtype=torch.int64) + (stream << 24))
    per_word = _splitmix64(torch.arange(_FILLER_PAIRS, dtype=torch.int64) + _signed(1 << 63))
    return _splitmix64(per_chunk[:, None] ^ per_word[None, :])


def _chunk_states(key: int, stream: int, chunks: int) -> torch.Tensor:
    """(chunks, 5056) uint8: the CPU generator state of each chunk of stream (key, stream).

    mt19937 words: 0 = 2³¹ (only its top bit is state, and a set bit keeps the
    state from being all zero), 1–2 = the key, 3–4 = the stream, 5 = the chunk
    index c, and words 6 + 2i, 7 + 2i the 64 bits of f(k ⊕ h_ci) (see
    `_filler_hashes`).

    The first outputs come after a twist (left = 1), which is a bijection of
    the state, so distinct (key, stream, chunk) give distinct output streams.
    The states also differ in (almost) every word, which independence needs,
    mt19937 being linear and slow to diffuse a difference of a few words: two
    chunks of one (key, stream) differ in every filler word by construction;
    for two keys k ≠ k', a word agrees only where k ⊕ k' = h_ci ⊕ h_c'i, which
    varies with i, so never in more than a few words at once.
    """
    hashes = _filler_hashes(stream, chunks)
    header = torch.tensor([1 << 31, key & 0xFFFFFFFF, key >> 32, stream & 0xFFFFFFFF, stream >> 32, 0])
    template = _generator_state_template()
    states = torch.empty(chunks, _STATE_INT64, dtype=torch.int64)
    for first in range(0, chunks, _STATE_BLOCK):
        block = states[first : first + _STATE_BLOCK]
        block[:, : _STATE_MT.start] = template[: _STATE_MT.start]
        block[:, 0] = _signed(key)  # reported as the generator's initial_seed()
        block[:, _STATE_MT.stop :] = template[_STATE_MT.stop :]
        words = block[:, _STATE_MT]
        words[:, :6] = header
        words[:, 5] = torch.arange(first, first + len(block))
        filler = _splitmix64(hashes[first : first + len(block)] ^ _signed(key))
        # Each 64-bit value as its two 32-bit words, low first (set_state keeps 32 bits of each).
        words[:, 6:] = filler.view(torch.int32)
    return states.view(torch.uint8)


@functools.lru_cache(maxsize=64)
def _chunk_pieces(numels: tuple[int, ...]) -> tuple[tuple[tuple[int, int, int, int], ...], ...]:
    """The tensors laid end to end, cut into chunks of `_CPU_CHUNK` elements:
    per chunk, its pieces (tensor index, start, stop, offset in the chunk),
    none longer than `_SERIAL_ADD`."""
    chunks: list[list[tuple[int, int, int, int]]] = []
    filled = _CPU_CHUNK
    for index, numel in enumerate(numels):
        start = 0
        while start < numel:
            if filled == _CPU_CHUNK:
                chunks.append([])
                filled = 0
            stop = min(numel, start + _CPU_CHUNK - filled, start + _SERIAL_ADD)
            chunks[-1].append((index, start, stop, filled))
            filled += stop - start
            start = stop
    return tuple(tuple(pieces) for pieces in chunks)


def _add_noise_cpu(jobs: list[tuple[list[torch.Tensor], float, int, int]]) -> None:
    """t ← t + σ_j·ε_j for the CPU tensors (one dtype) of every job j = (tensors, σ_j,
    key_j, stream_j), in one pass on every core; ε_j from the chunk generators of
    (key_j, stream_j).

    The threads claim (job, chunk) items in turn; what a chunk gets depends on its
    job and index alone, so the result depends neither on the number of threads
    nor on the other jobs of the call.
    """
    targets = [[t if t.is_contiguous() else t.contiguous() for t in tensors] for tensors, *_ in jobs]
    flats = [[t.view(-1) for t in tensors] for tensors in targets]
    pieces = [_chunk_pieces(tuple(t.numel() for t in flat)) for flat in flats]
    # One tensor per state: set_state crashes on a view at an offset.
    states = [
        [state.clone() for state in _chunk_states(key, stream, len(chunks))]
        for (_, _, key, stream), chunks in zip(jobs, pieces, strict=True)
    ]
    items = [(job, chunk) for job, chunks in enumerate(pieces) for chunk in range(len(chunks))]
    claim = itertools.count().__next__  # atomic under the GIL

    # Grad mode is per thread: the helpers need their own no_grad to write into parameters.
    @torch.no_grad()
    def work() -> None:
        generator = torch.Generator()
        scratch = torch.empty(_CPU_CHUNK, dtype=flats[0][0].dtype)
        while (item := claim()) < len(items):
            job, chunk = items[item]
            flat, sigma, chunk_pieces = flats[job], jobs[job][1], pieces[job][chunk]
            generator.set_state(states[job][chunk])
            noise = scratch[: chunk_pieces[-1][3] + chunk_pieces[-1][2] - chunk_pieces[-1][1]]
            noise.normal_(generator=generator)
            for tensor, start, stop, offset in chunk_pieces:
                flat[tensor][start:stop].add_(noise[offset : offset + stop - start], alpha=sigma)

    helpers = [_pool().submit(work) for _ in range(min(_worker_count(), len(items)) - 1)]
    try:
        work()
    finally:
        for helper in helpers:
            helper.result()
    for (tensors, *_), copies in zip(jobs, targets, strict=True):
        for tensor, target in zip(tensors, copies, strict=True):
            if target is not tensor:
                tensor.copy_(target)


# --- other devices ---------------------------------------------------------------------------


def _use_triton(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cuda" or os.environ.get("GRADNOISE_DISABLE_TRITON") == "1":
        return False
    from gradnoise import _triton

    return _triton.available() and dtype in _triton.DTYPES


def _add_noise_unfused(tensors, sigma, key: int, stream: int, workspace: dict | None) -> None:
    """Any device: one flat buffer filled by the device's generator, then one `_foreach_add_`.

    The generator is seeded with mix(key, stream), 64 bits (CUDA's Philox keeps them all).
    """
    device, dtype, numels = tensors[0].device, tensors[0].dtype, [t.numel() for t in tensors]
    slot = (device, dtype, sum(numels))  # a batched model's replicas share one buffer
    buffer = None if workspace is None else workspace.get(slot)
    if buffer is None:
        buffer = torch.empty(sum(numels), device=device, dtype=dtype)
        if workspace is not None:
            workspace[slot] = buffer
    generator = _device_generators.get(device)
    if generator is None:
        generator = _device_generators[device] = torch.Generator(device)
    generator.manual_seed(mix(key, stream))
    buffer.normal_(generator=generator)
    noise = [view.view_as(t) for t, view in zip(tensors, buffer.split(numels), strict=True)]
    if isinstance(sigma, torch.Tensor):
        torch._foreach_mul_(noise, sigma)
        torch._foreach_add_(tensors, noise)
    else:
        torch._foreach_add_(tensors, noise, alpha=sigma)


# --- the batched op ---------------------------------------------------------------------------


class NoiseJob(NamedTuple):
    """t ← t + σ·ε for every tensor t, ε drawn from stream `stream` of `key` alone.

    tensors: of one device and dtype; sigma: a float, or a 0-d tensor on their
    device; key: 64 bits, an int or a 0-d int64 tensor (the same bits); stream: an
    integer < 2³⁹ telling apart the jobs of one key.
    """

    tensors: list[torch.Tensor]
    sigma: float | torch.Tensor
    key: int | torch.Tensor
    stream: int

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype


def group_by_device_dtype(tensors: Sequence[torch.Tensor]) -> list[tuple[torch.device, torch.dtype, list]]:
    """The tensors as [(device, dtype, tensors)], in order of first appearance."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        if not tensor.dtype.is_floating_point:
            raise UserError(f"add_noise_: tensors must be floating point, got {tensor.dtype}")
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    return [(device, dtype, group) for (device, dtype), group in groups.items()]


def add_noise_jobs(jobs: Iterable[NoiseJob], workspace: dict | None = None) -> None:
    """Every job's t ← t + σ·ε: per (device, dtype) one fused launch (CUDA) or one pass on
    every core (CPU) for all its jobs, elsewhere one fill and one add per job. Job j's noise
    is stream_j of key_j alone, whatever else the call holds; no tensor may be in two jobs
    of one call. `workspace`: see `add_noise_`."""
    by_device: dict[tuple[torch.device, torch.dtype], list[NoiseJob]] = {}
    for job in jobs:
        by_device.setdefault((job.device, job.dtype), []).append(job)
    for (device, dtype), group in by_device.items():
        if _use_triton(device, dtype):
            from gradnoise import _triton

            _triton.add_noise_(
                [
                    (tensors, sigma, key if isinstance(key, torch.Tensor) else _signed(key), stream)
                    for tensors, sigma, key, stream in group
                ]
            )
        elif device.type == "cpu":
            _add_noise_cpu(
                [(tensors, float(sigma), _as_int(key), stream) for tensors, sigma, key, stream in group]
            )
        else:
            for tensors, sigma, key, stream in group:
                _add_noise_unfused(tensors, sigma, _as_int(key), stream, workspace)


@torch.no_grad()
def add_noise_(
    tensors: Iterable[torch.Tensor],
    sigma: float | torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    key: int | torch.Tensor | None = None,
    workspace: dict | None = None,
) -> None:
    """In place: t ← t + σ · ε for every tensor, ε ~ N(0, I) independent across elements.

    Batched: one fused kernel (CUDA, Triton), chunks filled and added on every
    core (CPU), or one RNG fill and one `_foreach_add_` per (device, dtype);
    never a random and an add kernel per tensor. fp32, bf16 and fp16 tensors;
    the noise is drawn in each tensor's own dtype.

    Args:
        sigma: a float, or a 0-d tensor on the tensors' device (no host sync
            when σ is computed on the device).
        generator: where the 64-bit key is drawn from when `key` is None (the
            default generator if None as well).
        key: the noise is a function of this 64-bit key alone: an int, or a
            0-d int64 tensor (the fused CUDA kernel reads it on the device).
        workspace: a dict owned by the caller, keeping the unfused path's flat
            buffers between calls.
    """
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return
    if isinstance(sigma, (int, float)):
        if not math.isfinite(sigma) or sigma < 0:
            raise UserError(f"add_noise_: sigma={sigma!r} must be a finite number ≥ 0")
        if sigma == 0:
            return
    if key is None:
        key = _draw_key(generator)
    elif isinstance(key, bool) or not (
        isinstance(key, torch.Tensor) or (isinstance(key, int) and 0 <= key <= _MASK64)
    ):
        # An int outside 64 bits would wrap onto another key's noise.
        raise UserError(f"add_noise_: key={key!r} must be an integer in [0, 2**64) or a 0-d int64 tensor")
    # (device, dtype) group i is stream i of the key.
    groups = group_by_device_dtype(tensors)
    add_noise_jobs(
        [NoiseJob(group, sigma, key, index) for index, (_, _, group) in enumerate(groups)], workspace
    )

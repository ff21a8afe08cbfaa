"""Devices and dtypes: one place that turns "auto", "cpu", "cuda" or "cuda:N" into a device.

device = resolve_device("auto")          # cuda if there is one, else cpu
dtype = resolve_dtype("auto", device)    # bfloat16 on a CUDA device that has it, else float32
"""

from __future__ import annotations

import re

import torch

from gradnoise.errors import UserError

DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device_name(requested: str, what: str = "device") -> str:
    """`requested` if it is auto, cpu, cuda or cuda:N (whether or not that device exists)."""
    if not isinstance(requested, str) or re.fullmatch(DEVICE_PATTERN, requested) is None:
        raise UserError(f"{what}={requested!r} is not allowed; use auto, cpu, cuda or cuda:N")
    return requested


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """The torch.device for auto | cpu | cuda | cuda:N, made current; UserError if absent.

    "cuda" means cuda:local_rank (torchrun's LOCAL_RANK; 0 alone). On CUDA, TF32
    matmuls are allowed, as nanoGPT does.
    """
    check_device_name(requested)
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"device={requested!r} but CUDA is not available here; use device=cpu")
    index = local_rank if requested == "cuda" else int(requested.split(":")[1])
    if index >= torch.cuda.device_count():
        raise UserError(f"device={requested!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return device


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on a CUDA device that supports it, else float32. float16 needs CUDA."""
    if requested == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if requested not in DTYPES:
        raise UserError(f"dtype={requested!r} is not allowed; use auto, {', '.join(DTYPES)}")
    if requested == "float16" and device.type != "cuda":
        raise UserError("dtype='float16' needs a CUDA device (GradScaler); use bfloat16 or float32")
    return DTYPES[requested]


def describe_device(device: torch.device) -> str:
    """ "cpu", or "cuda:0 NVIDIA H100 80GB HBM3": what a result records as its device."""
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    return str(device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`; to CUDA through pinned memory, without blocking the host."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

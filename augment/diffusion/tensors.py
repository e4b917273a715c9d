"""Image <-> tensor conversions and the precision context, shared by training, sampling and the classifiers."""

from __future__ import annotations

import contextlib

import numpy as np
import torch


def to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C)."""
    x = ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def bf16_native() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 bf16 / AMX); emulated bf16 would be slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(device: torch.device, mixed_precision: str) -> str:
    """`auto` -> `bf16` where the device computes it natively (a CPU with AVX-512 bf16/AMX, a GPU with bf16), else
    `no`; `no` and `bf16` as given."""
    if mixed_precision != "auto":
        return mixed_precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if device.type == "cpu" and bf16_native() else "no"


def autocast(device: torch.device, mixed_precision: str):
    if resolve_precision(device, mixed_precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

"""Image <-> tensor conversions and the precision context, shared by training, sampling and the classifiers."""

from __future__ import annotations

import contextlib
import functools

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


@functools.cache
def _cpu() -> tuple[str, frozenset[str]]:
    """(model name, feature flags) from /proc/cpuinfo; empty flags where there is none."""
    import platform

    flags, model = frozenset(), platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.startswith("flags") and not flags:
                flags = frozenset(line.partition(":")[2].split())
            elif line.startswith("model name"):
                model = line.partition(":")[2].strip()
    except OSError:
        pass
    return model, flags


def bf16_native() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 bf16 / AMX) and oneDNN may use it. oneDNN also "supports"
    bf16 on plain AVX-512 by emulating it, which is slower and would make this machine's samples differ from an
    AVX2 machine's for nothing: that does not count."""
    try:
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    return supported and bool({"avx512_bf16", "amx_bf16"} & _cpu()[1])


def cpu_kind() -> str:
    """What decides this machine's speed, for logs and benchmarks: the CPU's vector extensions (AMX, AVX-512 with
    or without bf16, AVX2), the level torch's kernels run at, whether bf16 is native, and any cap the environment
    sets (ONEDNN_MAX_CPU_ISA and friends: how an AMX machine imitates an AVX2 one)."""
    import os

    model, flags = _cpu()
    kind = ("AMX" if "amx_bf16" in flags else "AVX-512 bf16" if "avx512_bf16" in flags else
            "AVX-512 without bf16" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2")
    parts = [f"{model}: {kind}", f"torch kernels {torch.backends.cpu.get_cpu_capability()}",
             "bf16 native" if bf16_native() else "no native bf16 (fp32)"]
    caps = [f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")
            if os.environ.get(k)]
    return ", ".join(parts + (["capped by " + " ".join(caps)] if caps else []))


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

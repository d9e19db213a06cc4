"""Device, precision, seeding and worker choices."""

from __future__ import annotations

import functools
import os
import random

import torch

from .errors import UsageError


def resolve_device(name: str) -> torch.device:
    """auto -> cuda if present, else mps, else cpu; an unavailable device is a one-line error."""
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for CUDA but no CUDA GPU is available; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s); pick a smaller index")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name} asked for MPS but it is not available; use --device cpu or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for --amp on this device, or None for fp32."""
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "fp16":
            return torch.float16
        if amp == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if device.type == "mps":
        return torch.float16 if amp in ("auto", "fp16") else torch.bfloat16
    # CPU: bf16 only where the CPU computes it natively (AVX512-BF16/AMX): there it measured 3.7x
    # fp32 for the default CNN (benchmarks/README.md); elsewhere emulated bf16 is slower than fp32.
    if amp == "auto":
        return torch.bfloat16 if cpu_has_bf16() else None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def use_channels_last(device: torch.device, flag: str) -> bool:
    if flag == "auto":
        # On CPU, oneDNN's convolutions are faster channels-last (1.6x fp32, 1.5x bf16 measured).
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())
    return flag == "true"


def default_num_workers(requested: int) -> int:
    if requested >= 0:
        return requested
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device

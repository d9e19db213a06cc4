"""Device, precision, seeding and worker choices."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import random

from dataclasses import dataclass

import torch
from torch import nn

from data.cache import usable_cpus

from .errors import UsageError


@dataclass
class Precision:
    """How tensors are laid out and computed on the training device."""
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(self.device, non_blocking=True, memory_format=memory_format)
        return images, labels.to(self.device, non_blocking=True)

    def batches(self, loader):
        """The batch prologue of every loop over a loader: (position from 1, inputs, targets) on
        the device, a batch whose files were all unreadable (None) skipped."""
        for position, batch in enumerate(loader, start=1):
            if batch is not None:
                yield (position, *self.to_device(*batch))

    def scaler(self) -> torch.amp.GradScaler:
        """The one place a GradScaler is made: it scales the loss for fp16 only (bf16 and fp32
        have fp32's range)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)


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
def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def _isa_cap() -> str:
    """oneDNN's instruction-set cap (ONEDNN_MAX_CPU_ISA, e.g. AVX2), upper case; '' when unset."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    return "" if cap in ("ALL", "DEFAULT") else cap


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX) and oneDNN may
    use them: ONEDNN_MAX_CPU_ISA=AVX2 (how benchmarks/README.md measures an AVX2-only CPU on a
    newer one) leaves bf16 emulated, slower than fp32."""
    flags = _cpuinfo()
    cap = _isa_cap()
    if cap and not any(unit in cap for unit in ("BF16", "AMX", "AVX10")):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_description() -> str:
    """The CPU's model name, core count and bf16 units, for benchmark headers: speed figures only
    mean something beside the CPU they came from."""
    info = _cpuinfo().splitlines()
    names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name") and ":" in line]
    name = names[0] if names else platform.processor() or platform.machine()
    flags = next((line for line in info if line.startswith("flags")), "")
    units = [unit for unit, flag in (("AVX512-BF16", "avx512_bf16"), ("AMX", "amx_bf16")) if f" {flag}" in flags]
    bf16 = f"bf16 units: {', '.join(units)}" if units else "no bf16 units (fp32)"
    if _isa_cap():
        bf16 += f"; capped to {_isa_cap()} (ONEDNN_MAX_CPU_ISA){'' if cpu_has_bf16() else ': runs as without bf16 units'}"
    return f"{name}, {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores, {bf16}"


def cuda_has_native_bf16(device: torch.device) -> bool:
    """bf16 tensor cores exist from compute capability 8.0 (Ampere) on. torch.cuda.is_bf16_supported()
    also counts emulated bf16 (T4, V100), which runs slower than fp16, and asks the current device."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def configure_backends(device: torch.device) -> None:
    """Fast CUDA defaults: cuDNN picks the best convolution algorithm for the (fixed) input shape,
    and fp32 matmuls/convolutions may use TF32 tensor cores (as autocast-off runs expect on Ampere+)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for --amp on this device, or None for fp32."""
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "fp16":
            return torch.float16
        if amp == "bf16" or cuda_has_native_bf16(device):
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
        # oneDNN's CPU convolutions are faster channels-last with or without bf16 units: fp32 on
        # AVX2 1.22x trainA's CNN, 1.17x ResNet50, 1.5x Lite0; bf16 on AMX 1.5x (benchmarks/README.md).
        return device.type in ("cuda", "cpu")
    return flag == "true"


def default_num_workers(requested: int) -> int:
    if requested >= 0:
        return requested
    return min(8, usable_cpus())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def make_precision(cfg, device_name: str) -> Precision:
    """Device, autocast dtype and memory format for a config's --amp/--channels_last."""
    device = resolve_device(device_name)
    configure_backends(device)
    return Precision(device, autocast_dtype(device, cfg.amp), use_channels_last(device, cfg.channels_last))


def prepare_model(model: nn.Module, precision: Precision) -> nn.Module:
    model = model.to(precision.device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model

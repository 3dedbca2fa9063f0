"""Device, precision and autocast: one meaning for extraction and fine-tuning alike.

``precision="auto"`` is fp32 on a CPU and fp16 on a CUDA device (fine-tuning adds a gradient
scaler; extraction recomputes in fp32 any batch whose fp16 features overflow). Not bf16: its 8-bit
mantissa cost real ImageNet weights' embeddings too much (H100, MobileNetV2, mean-centred cosine
to fp32 min 0.76, mean 0.92; fp16 0.9998 — README, "Measured on a GPU"). fp16 needs a CUDA
device; bf16 stays selectable, and runs on a CPU when asked for explicitly.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from .config import PRECISIONS  # one list: the extract/finetune setting
from .errors import ConfigError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; an explicit cuda device without CUDA is an error."""
    if isinstance(device, torch.device):
        device = str(device)
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"--device {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """The concrete precision (fp32 | bf16 | fp16) for ``precision`` on ``device``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a GPU; use fp32 or bf16 on the CPU")
    return precision


def autocast_context(device: torch.device, precision: str):
    """The autocast region for a resolved precision (nothing for fp32)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)

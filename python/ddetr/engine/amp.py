"""Mixed precision: bfloat16 autocast on the CPU, float16 (with a gradient scaler) or
bfloat16 autocast on CUDA."""

from __future__ import annotations

import contextlib

import torch

MODES = ("off", "bf16", "fp16", "auto")


def resolve(mode: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on the CPU, ``fp16`` on CUDA; ``fp16`` on the CPU is refused."""
    if mode not in MODES:
        raise ValueError(f"amp: expected one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "fp16" if device.type == "cuda" else "bf16"
    if mode == "fp16" and device.type != "cuda":
        raise ValueError("amp: fp16 needs CUDA; use bf16 on the CPU")
    return mode


def autocast(mode: str, device: torch.device):
    """The autocast context for a resolved mode (a no-op context for ``off``)."""
    if mode == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(mode: str, device: torch.device):
    """A ``GradScaler`` for fp16, None otherwise."""
    return torch.amp.GradScaler(device.type) if mode == "fp16" else None

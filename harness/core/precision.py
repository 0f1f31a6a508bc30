"""Mixed precision of the training step: ``performance.precision`` (fp32 | bf16).

Owns the autocast context the training forward runs under, and the check that the device
can do the precision asked for. With bf16 the forward runs in bfloat16 under
``torch.autocast``; the loss is computed in fp32 and the backward runs outside autocast, as
PyTorch's AMP notes recommend. Parameters, gradients and optimizer state stay fp32: bf16 has
fp32's exponent range, so no ``GradScaler`` is needed. Evaluation, sharpness and gradcheck
stay fp32 (fp64) whatever the config says.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

from harness.errors import InputError

def forward_context(precision: str, device_type: str) -> Callable[[], ContextManager]:
    """A factory of the context the training forward runs under (a fresh one per forward): a null
    context for fp32; for bf16 autocast with the weight-cast cache off, which saves nothing with one
    forward per region and which a CUDA graph cannot capture (PyTorch's CUDA-graph notes)."""
    if precision == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False)


def precision_unsupported_reason(precision: str, device_type: str, cuda_has_bf16: bool) -> str | None:
    """Why ``precision`` cannot run on ``device_type`` (None when it can); pure, so it is testable without a GPU."""
    if precision == "bf16" and device_type == "cuda" and not cuda_has_bf16:
        return "bf16 on a CUDA device without bfloat16 support (torch.cuda.is_bf16_supported() is false)"
    return None


def check_precision(precision: str, device_type: str) -> None:
    """Refuse a precision the training device cannot do, before anything starts (launching/preflight.py)."""
    cuda_has_bf16 = device_type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    reason = precision_unsupported_reason(precision, device_type, cuda_has_bf16)
    if reason:
        raise InputError(f"performance.precision: {reason}; expected fp32 on this device")

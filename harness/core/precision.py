"""Mixed precision of the training step: ``performance.precision`` (fp32 | bf16).

Owns the one autocast context the training forward runs under, and the check that
the device can do the precision asked for. With bf16 the forward (the model's
matmuls and activations) runs in bfloat16 under ``torch.autocast``; the loss is
computed in fp32 from the bf16 logits, and the backward runs outside autocast, as
PyTorch's AMP notes recommend. Parameters, their gradients and the optimizer state
stay fp32: bf16 has fp32's exponent range, so no ``GradScaler`` is needed (that is
fp16's underflow problem).

It does not own where the context is used (core/step.py's autograd engine, through
core/backprop.py's ``autograd_backward``), nor evaluation, sharpness and
``harness gradcheck``, which stay in fp32 (fp64 for gradcheck) whatever the config says.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

from harness.errors import InputError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16}


def forward_context(precision: str, device_type: str) -> Callable[[], ContextManager]:
    """A factory of the context the training forward runs under (a fresh one per forward).

    fp32: a null context, so an fp32 run is the very code it was before the key existed.
    bf16: ``torch.autocast(device_type, bfloat16)`` with the weight-cast cache off: the cache
    only saves work across several forwards in one region (we have one), and a CUDA graph
    cannot capture it (PyTorch's CUDA-graph notes: autocast in capture needs ``cache_enabled=False``).
    """
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = AUTOCAST_DTYPES[precision]
    return lambda: torch.autocast(device_type, dtype=dtype, cache_enabled=False)


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

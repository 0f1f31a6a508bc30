"""What a model's forward returns: logits (scored by cross-entropy), or, for a model built with
``model.output: loss``, its own mean loss over the batch from ``forward(features, labels)``.

The mark is an attribute set on the module when it is built (core/model.py), not state: checkpoints do
not see it. It lives here, below core/, so the measurements (per-example gradients, Hessian-vector
products) and the training loop read one definition.
"""

from __future__ import annotations

import torch

RETURNS_LOSS = "harness_returns_loss"


def returns_loss(model: torch.nn.Module) -> bool:
    """Does ``model`` (or the module a DistributedDataParallel wraps) return its own mean loss, not logits?"""
    return bool(getattr(getattr(model, "module", model), RETURNS_LOSS, False))

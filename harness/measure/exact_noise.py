"""The exact gradient noise scale at fixed parameters, from per-example gradients.

B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, App. A), with G the mean
of the per-example gradients g_i of the cross-entropy over N fixed examples and
tr(Sigma) = sum_i |g_i - G|^2 / (N - 1), the unbiased per-example covariance's
trace. The g_i come from torch.func: ``vmap`` of ``grad`` of one example's loss
through a ``functional_call`` of the model, in chunks so memory stays at
``chunk_size`` gradients (a 784-500-10 MLP has ~0.4 M parameters: 1.6 MB each).

This is the check of the training-time estimator (measure/grad_noise.py), which
infers the same two quantities from batch gradients at two sizes. Pure: a model
and tensors in, numbers out; no process group, no I/O. The caller chooses the
examples (the training loop takes the first ``metrics.exact_noise_samples``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap


@dataclass(frozen=True)
class ExactNoiseScale:
    grad_sq_norm: float  # |G|^2
    trace_cov: float  # tr(Sigma), per example
    b_simple: float  # trace_cov / grad_sq_norm (NaN if |G|^2 is 0)


def exact_noise_scale(model: torch.nn.Module, features: torch.Tensor, targets: torch.Tensor,
                      chunk_size: int = 64) -> ExactNoiseScale:
    """|G|^2, tr(Sigma) and B_simple of the mean cross-entropy of ``model`` over ``features``/``targets``."""
    count = len(targets)
    if count < 2:
        raise ValueError(f"need at least 2 examples for a covariance, got {count}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_of_one(weights, x, y):
        logits = functional_call(model, weights, (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    per_example_grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0))
    # Float64 sums: tr(Sigma) is a difference of two sums over N examples.
    grad_sum = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
    sq_norm_sum = torch.zeros((), dtype=torch.float64, device=features.device)
    for lo in range(0, count, chunk_size):
        grads = per_example_grads(params, features[lo:lo + chunk_size], targets[lo:lo + chunk_size])
        for name, g in grads.items():
            g = g.double()
            grad_sum[name] += g.sum(0)
            sq_norm_sum += g.flatten(1).pow(2).sum()
    mean_sq_norm = sum(float(s.pow(2).sum()) for s in grad_sum.values()) / count**2  # |G|^2
    # sum_i |g_i - G|^2 = sum_i |g_i|^2 - N |G|^2
    trace_cov = (float(sq_norm_sum) - count * mean_sq_norm) / (count - 1)
    b_simple = trace_cov / mean_sq_norm if mean_sq_norm > 0 else float("nan")
    return ExactNoiseScale(grad_sq_norm=mean_sq_norm, trace_cov=trace_cov, b_simple=b_simple)

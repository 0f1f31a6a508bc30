"""Measurements that explain batch-size effects, as pure functions.

Tensors or numbers in, numbers out: no I/O, no process groups, so each one is
tested against a problem whose answer is known (tests/test_metrics.py).

- gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, App. A)
- steps-to-target (Shallue et al. 2018's steps-to-result)
- sharpness: the top eigenvalue of the loss Hessian by power iteration on
  Hessian-vector products
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch


# --- gradient noise scale ----------------------------------------------------


def noise_scale_components(small_grad_sq_norm: float, big_grad_sq_norm: float,
                           small_batch_size: float, big_batch_size: float) -> tuple[float, float]:
    """Unbiased estimates of (|G|^2, tr(Sigma)) from gradient norms at two batch sizes.

    McCandlish et al. 2018, Appendix A: with ``E|G_B|^2 = |G|^2 + tr(Sigma)/B``,
    ``|G|^2 = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)`` and
    ``tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)``.
    """
    if not big_batch_size > small_batch_size > 0:
        raise ValueError(f"need big_batch_size > small_batch_size > 0, got {big_batch_size}, {small_batch_size}")
    grad_sq_norm = ((big_batch_size * big_grad_sq_norm - small_batch_size * small_grad_sq_norm)
                    / (big_batch_size - small_batch_size))
    trace_cov = (small_grad_sq_norm - big_grad_sq_norm) / (1.0 / small_batch_size - 1.0 / big_batch_size)
    return grad_sq_norm, trace_cov


def simple_noise_scale(grad_sq_norm: float, trace_cov: float) -> float:
    """B_simple = tr(Sigma) / |G|^2; NaN while |G|^2 is not yet estimated positive."""
    return trace_cov / grad_sq_norm if grad_sq_norm > 0 else math.nan


def debiased_average(average, decay: float, updates: int):
    """An exponential moving average started at zero, divided by 1 - decay**updates
    (Adam's bias correction) so early values are not pulled towards zero.

    McCandlish et al. 2018 average the two squared norms over steps before taking
    their ratio, because each single-step estimate is very noisy. Works on floats
    and on tensors alike (grad_noise.NoiseProbe keeps its averages on the device).
    """
    if updates <= 0:
        raise ValueError(f"no updates yet (updates={updates})")
    return average / (1 - decay ** updates)


# --- steps to target ---------------------------------------------------------


@dataclass(frozen=True)
class TargetReached:
    steps: int
    epochs: float  # may be a fraction: evaluations fall inside epochs
    samples: int
    seconds: float


def first_reaching(values: Sequence[float], target: float) -> Optional[int]:
    """Index of the first value >= target, else None."""
    for index, value in enumerate(values):
        if value >= target:
            return index
    return None


def steps_to_target(val_accuracy: Sequence[float], steps: Sequence[int], samples: Sequence[int],
                    seconds: Sequence[float], target: float,
                    epochs: Optional[Sequence[int]] = None) -> Optional[TargetReached]:
    """The first evaluation whose validation accuracy reaches ``target``.

    Shallue et al. 2018 measure steps-to-result at evaluation points; so do we.
    ``steps``, ``samples`` and ``seconds`` are cumulative at each evaluation;
    ``epochs`` gives the epochs done at each evaluation (default 1, 2, ...; a
    fraction where evaluations fall inside epochs). The training loop passes one
    evaluation at a time (core/evaluation.py, every few steps) until the target is reached.
    """
    index = first_reaching(val_accuracy, target)
    if index is None:
        return None
    epoch = float(epochs[index]) if epochs is not None else index + 1
    return TargetReached(steps=int(steps[index]), epochs=epoch, samples=int(samples[index]),
                         seconds=float(seconds[index]))


# --- sharpness ---------------------------------------------------------------


def top_hessian_eigenvalue(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                           iterations: int = 20, tolerance: float = 1e-4, seed: int = 0) -> float:
    """Largest-magnitude eigenvalue of the Hessian of ``loss_fn()`` w.r.t. ``params``.

    Power iteration on Hessian-vector products (Pearlmutter's trick: the gradient
    of ``g . v``), stopping when the Rayleigh quotient changes by less than
    ``tolerance`` (relative). Near a minimum the top eigenvalue is positive and
    the dominant one, which is what sharpness means here.
    """
    params = [p for p in params if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator).to(p) for p in params]
    vector = _normalised(vector)
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    eigenvalue = 0.0
    for _ in range(iterations):
        grad_dot_v = sum((g * v).sum() for g, v in zip(grads, vector))
        hvp = torch.autograd.grad(grad_dot_v, params, retain_graph=True)
        new_eigenvalue = float(sum((h * v).sum() for h, v in zip(hvp, vector)))
        vector = _normalised([h.detach() for h in hvp])
        if abs(new_eigenvalue - eigenvalue) <= tolerance * max(abs(new_eigenvalue), 1e-12):
            return new_eigenvalue
        eigenvalue = new_eigenvalue
    return eigenvalue


def _normalised(vectors: list[torch.Tensor]) -> list[torch.Tensor]:
    norm = torch.sqrt(sum((v * v).sum() for v in vectors))
    return [v / norm for v in vectors]

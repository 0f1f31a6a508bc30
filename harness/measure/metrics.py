"""Measurements that explain batch-size effects, as pure functions: tensors or numbers in, numbers out,
no I/O, no process groups, so each one is tested against a problem whose answer is known.

- gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, App. A)
- sharpness: the largest and smallest algebraic eigenvalues of the loss Hessian,
  by Lanczos (scipy's ARPACK) on Hessian-vector products
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
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
    """An exponential moving average started at zero, divided by 1 - decay**updates (Adam's bias
    correction) so early values are not pulled towards zero. Floats or tensors.

    McCandlish et al. 2018 average the two squared norms over steps before taking their ratio, because
    each single-step estimate is very noisy.
    """
    if updates <= 0:
        raise ValueError(f"no updates yet (updates={updates})")
    return average / (1 - decay ** updates)


# --- sharpness ---------------------------------------------------------------

# ARPACK's maxiter counts restarts of the Lanczos process, each ~ncv (20) new
# Hessian-vector products, so a small number already allows hundreds of them.
DEFAULT_LANCZOS_RESTARTS = 20


@dataclass(frozen=True)
class HessianExtremes:
    """The largest and smallest algebraic eigenvalues of a Hessian, and how they were found: ``top`` or
    ``bottom`` is NaN (and ``converged`` False) when its Lanczos run did not converge within the allowed
    restarts; ``hessian_vector_products`` counts every product the solver asked for (its cost)."""

    top: float
    bottom: float
    converged: bool
    hessian_vector_products: int
    tolerance: float


def hessian_extremes(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                     tolerance: float = 1e-3, iterations: int = DEFAULT_LANCZOS_RESTARTS,
                     seed: int = 0) -> HessianExtremes:
    """Largest and smallest ALGEBRAIC eigenvalues of the Hessian of ``loss_fn()`` w.r.t. ``params``.

    ARPACK's implicitly restarted Lanczos (scipy's ``eigsh``) on Hessian-vector products (Pearlmutter's
    trick), in two runs, with rho = max |eigenvalue| (the spectral radius):

    1. ``which='LM'`` finds the eigenvalue of largest magnitude, +-rho: the top one if positive, the
       bottom one if negative (power iteration alone would report a negative "sharpness" there).
    2. The other end, as the largest eigenvalue of H + 2 rho I (top) or 2 rho I - H (bottom). The shift
       keeps the Krylov space and puts that eigenvalue in [rho, 3 rho], so ARPACK's relative stopping
       rule becomes an absolute one on the scale of rho, even for an eigenvalue near zero.

    Each value has a Ritz residual at most ``tolerance * rho``, so an eigenvalue of H lies within that
    distance of it. ``iterations`` caps ARPACK's restarts per run; ``seed`` fixes the start vector.
    """
    # Imported here: scipy.sparse.linalg takes ~0.3 s to load, and only this end-of-run probe needs it.
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    params = [p for p in params if p.requires_grad]
    hvp, size, counter = _hessian_vector_product(loss_fn, params)
    start = torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    if size < 3:  # too small for ARPACK (k < ncv <= n): the Hessian itself, column by column
        dense = np.stack([hvp(column) for column in np.eye(size)])
        eigenvalues = np.linalg.eigvalsh((dense + dense.T) / 2)
        return HessianExtremes(float(eigenvalues[-1]), float(eigenvalues[0]), True, counter[0], tolerance)

    def largest(matvec, which: str, tol: float) -> float:
        try:
            return float(eigsh(LinearOperator((size, size), matvec=matvec, dtype=np.float64), k=1, which=which,
                               v0=start, tol=tol, maxiter=iterations, return_eigenvectors=False)[0])
        except ArpackNoConvergence:
            return math.nan

    dominant = largest(hvp, "LM", tolerance)
    if not math.isfinite(dominant):
        return HessianExtremes(math.nan, math.nan, False, counter[0], tolerance)
    radius = abs(dominant)
    # tolerance / 3: the shifted eigenvalue is at most 3 rho, so its residual stays under tolerance * rho.
    if dominant >= 0:
        top = dominant
        bottom = 2 * radius - largest(lambda v: 2 * radius * v - hvp(v), "LA", tolerance / 3)
    else:
        bottom = dominant
        top = largest(lambda v: hvp(v) + 2 * radius * v, "LA", tolerance / 3) - 2 * radius
    return HessianExtremes(top, bottom, math.isfinite(top) and math.isfinite(bottom), counter[0], tolerance)


def _hessian_vector_product(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor]):
    """``(hvp, size, counter)``: hvp maps a flat float64 numpy vector to H v (float64), counter[0] counts
    calls. The gradient graph is built once; each product differentiates ``g . v`` through it again."""
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    sizes = [p.numel() for p in params]
    counter = [0]

    def hvp(flat: np.ndarray) -> np.ndarray:
        counter[0] += 1
        pieces = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float64).reshape(-1)).split(sizes)
        vector = [piece.reshape(p.shape).to(p) for piece, p in zip(pieces, params)]
        grad_dot_v = sum((g * v).sum() for g, v in zip(grads, vector))
        products = torch.autograd.grad(grad_dot_v, params, retain_graph=True)
        return torch.cat([h.detach().reshape(-1).to(device="cpu", dtype=torch.float64) for h in products]).numpy()

    return hvp, sum(sizes), counter

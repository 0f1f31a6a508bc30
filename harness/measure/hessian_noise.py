"""The Hessian-weighted noise scale B_noise at fixed parameters, from Hessian-vector products.

B_noise = tr(H Sigma) / (G^T H G) (McCandlish et al. 2018, section 2.2): the batch size at which the
loss improvement of an optimally sized step is half its full-batch value, the critical batch size
B_crit it predicts. G is the mean gradient of the loss over N fixed examples, H the Hessian of that
mean loss, Sigma the per-example gradient covariance with the unbiased factor, as in exact_noise.py:
Sigma = sum_i (g_i - G)(g_i - G)^T / (N - 1). B_noise equals B_simple = tr(Sigma) / |G|^2 where H is a
multiple of the identity.

tr(H Sigma) = N/(N - 1) * mean_i (g_i - G)^T H (g_i - G) is estimated from a random subsample of the
examples, without replacement, one Hessian-vector product per sampled deviation; G^T H G takes one more.
G, |G|^2 and tr(Sigma) come from exact_noise.py's sums; this module owns only the Hessian's part.
Pure: a model and tensors in, numbers out. The model's forward must be deterministic (no dropout, no
batch-norm in training mode): H and the g_i are derivatives of one fixed function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

from harness.measure.exact_noise import ExactNoiseScale, LossFn, gradient_sums, mean_loss, per_example_gradients


@dataclass(frozen=True)
class HessianNoiseScale:
    grad_hess_grad: float  # G^T H G
    trace_hess_cov: float  # tr(H Sigma), estimated from `deviations` examples (exact when all N)
    trace_hess_cov_std_error: float  # its standard error, from the subsample's spread (0 when all N)
    b_noise: float  # trace_hess_cov / grad_hess_grad; NaN where G^T H G is not positive (see `reason`)
    b_noise_rel_error: float  # trace_hess_cov_std_error / |trace_hess_cov|: G^T H G carries no sampling error
    deviations: int  # examples whose deviation g_i - G was sampled
    simple: ExactNoiseScale  # B_simple and its components over the same N examples
    reason: Optional[str] = None  # why b_noise is NaN; None where it is not


def hessian_noise_scale(model: torch.nn.Module, features: torch.Tensor, targets: torch.Tensor,
                        deviations: int = 32, seed: int = 0, chunk_size: int = 64, method: str = "auto",
                        loss_fn: LossFn = F.cross_entropy) -> HessianNoiseScale:
    """B_noise of the mean ``loss_fn`` (cross-entropy unless given) of ``model`` over ``features``/``targets``.

    ``deviations``: how many examples (drawn without replacement with ``seed``; all N where it is N or more)
    estimate tr(H Sigma). ``chunk_size``: examples or vectors per ``vmap`` pass. ``method``: how
    exact_noise_scale forms the gradient sums (``auto``, ``layers`` or ``vmap``). Costs one pass of
    exact_noise_scale, ``deviations`` per-example gradients and ``deviations`` + 1 Hessian-vector products.
    """
    if deviations < 2:
        raise ValueError(f"need at least 2 deviations for a standard error, got {deviations}")
    sums = gradient_sums(model, features, targets, chunk_size, method, loss_fn)
    count, mean_gradient = sums.count, sums.mean_gradient()  # G, float64
    sample = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:deviations]
    sample = sample.to(features.device)
    sampled_gradients = torch.cat([_flat(chunk) for chunk in per_example_gradients(
        model, features[sample], targets[sample], chunk_size, loss_fn)])
    vectors = torch.cat([mean_gradient[None], sampled_gradients.double() - mean_gradient])  # G, then g_i - G
    products = hessian_vector_products(model, features, targets, vectors, chunk_size, loss_fn)
    quadratic_forms = (vectors * products).sum(1)  # v^T H v, float64
    grad_hess_grad, per_deviation = float(quadratic_forms[0]), quadratic_forms[1:]
    sampled, unbiased = len(per_deviation), count / (count - 1)
    trace_hess_cov = unbiased * float(per_deviation.mean())
    # Drawn without replacement from N: the finite-population factor 1 - n/N makes the error vanish
    # when every example is used, where the estimate is exact.
    std_error = unbiased * math.sqrt((1 - sampled / count) * float(per_deviation.var()) / sampled)
    reason = None
    if not grad_hess_grad > 0:
        # B_noise's derivation takes an optimal step along G, which exists only where the loss curves upward.
        reason = f"G^T H G = {grad_hess_grad:g} is not positive: no optimal step size along the mean gradient"
    b_noise = trace_hess_cov / grad_hess_grad if reason is None else math.nan
    rel_error = std_error / abs(trace_hess_cov) if reason is None and trace_hess_cov != 0 else math.nan
    return HessianNoiseScale(grad_hess_grad=grad_hess_grad, trace_hess_cov=trace_hess_cov,
                             trace_hess_cov_std_error=std_error, b_noise=b_noise, b_noise_rel_error=rel_error,
                             deviations=sampled, simple=sums.noise_scale(), reason=reason)


def hessian_vector_products(model: torch.nn.Module, features: torch.Tensor, targets: torch.Tensor,
                            vectors: torch.Tensor, chunk_size: int = 64,
                            loss_fn: LossFn = F.cross_entropy) -> torch.Tensor:
    """H v for each row v of ``vectors`` (k, P), float64, H the Hessian of the mean loss over the examples.

    Forward-over-reverse (``jvp`` of ``grad``, Pearlmutter 1994), ``vmap``-ed over the rows, ``chunk_size``
    at a time; rows are flat in model.named_parameters() order and are cast to the model's dtype."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_of(weights):
        return mean_loss(model, weights, features, targets, loss_fn)

    def product(vector):
        pieces = vector.split([p.numel() for p in params.values()])
        tangent = {name: piece.view_as(p) for (name, p), piece in zip(params.items(), pieces)}
        return _flat(jvp(grad(loss_of), (params,), (tangent,))[1], batched=False)

    dtype = next(iter(params.values())).dtype
    return vmap(product, chunk_size=chunk_size)(vectors.to(dtype)).double()


def _flat(tensors: dict[str, torch.Tensor], batched: bool = True) -> torch.Tensor:
    """Per-parameter tensors as one vector per example (``batched``: leading dimension kept) or one vector."""
    return torch.cat([t.reshape(len(t), -1) if batched else t.flatten() for t in tensors.values()], -1)

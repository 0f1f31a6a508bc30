"""The exact gradient noise scale at fixed parameters, from per-example gradients.

B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, App. A), with G the mean of the per-example
gradients g_i of the cross-entropy (or another mean loss, ``loss_fn``) over N fixed examples and
tr(Sigma) = sum_i |g_i - G|^2 / (N - 1). Only two sums over the examples are needed: sum_i g_i and sum_i |g_i|^2.

For a model made only of ``nn.Linear`` layers, each applied once (the harness's MLP), both come from
one batched backward pass: example i's gradient of a layer's weight is the outer product delta_i a_i^T,
so |g_i|^2 = sum over layers of |delta_i|^2 (|a_i|^2 + 1), the 1 for the bias (Goodfellow 2015), about
a hundred times faster than per-example gradients. Any other model goes through torch.func: ``vmap`` of
``grad`` of one example's loss, in chunks of ``chunk_size`` gradients.

This checks the training-time estimator (core/noise_probe.py), which infers the same two quantities
from batch gradients at two sizes. Its sums and per-example gradients also feed B_noise
(measure/hessian_noise.py). Pure: a model and tensors in, numbers out.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from harness.measure.objective import returns_loss


# loss_fn(outputs, targets) -> the mean loss over the batch, as F.cross_entropy returns by default.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExactNoiseScale:
    grad_sq_norm: float  # |G|^2
    trace_cov: float  # tr(Sigma), per example
    b_simple: float  # trace_cov / grad_sq_norm (NaN if |G|^2 is 0)


@dataclass(frozen=True)
class GradientSums:
    """Two sums over N examples' gradients g_i, float64: all B_simple needs, and G = grad_sum / count."""

    count: int
    grad_sum: dict[str, torch.Tensor]  # sum_i g_i, per parameter, in model.named_parameters() order
    sq_norm_sum: torch.Tensor  # sum_i |g_i|^2

    def mean_gradient(self) -> torch.Tensor:
        """G, flattened in model.named_parameters() order."""
        return torch.cat([s.flatten() for s in self.grad_sum.values()]) / self.count

    def noise_scale(self) -> ExactNoiseScale:
        mean_sq_norm = sum(float(s.pow(2).sum()) for s in self.grad_sum.values()) / self.count**2  # |G|^2
        # sum_i |g_i - G|^2 = sum_i |g_i|^2 - N |G|^2
        trace_cov = (float(self.sq_norm_sum) - self.count * mean_sq_norm) / (self.count - 1)
        return ExactNoiseScale(grad_sq_norm=mean_sq_norm, trace_cov=trace_cov,
                               b_simple=trace_cov / mean_sq_norm if mean_sq_norm > 0 else float("nan"))


# How many standard errors of an estimated trace a population noise scale must stay bounded over.
RESOLVED_WITHIN_STD_ERRORS = 2.0


def population_noise_scale(trace: float, quadratic: float, count: int, trace_std_error: float = 0.0) -> float:
    """A noise scale of the population ``count`` examples were drawn from: ``trace`` / (``quadratic`` -
    ``trace`` / count). The mean gradient of N examples has E|G_N|^2 = |G|^2 + tr(Sigma)/N (and
    E G_N^T H G_N = G^T H G + tr(H Sigma)/N), so B_simple (B_noise) over the N examples alone is low by a
    factor 1 + B/N; with the unbiased tr(Sigma) (tr(H Sigma)) the difference is unbiased. NaN where
    nothing is left of the denominator (B not small against N: more examples are needed).

    ``trace_std_error``: the trace's sampling error where it is estimated (B_noise's tr(H Sigma), from a
    subsample). The value's relative error is the trace's times 1 + B/N, so where B is large against N a
    modest error in the trace leaves the value unbounded: +inf (unresolved) where the trace at
    RESOLVED_WITHIN_STD_ERRORS standard errors above its estimate leaves nothing of the denominator."""
    denominator = quadratic - trace / count
    if trace_std_error > 0 and quadratic - (trace + RESOLVED_WITHIN_STD_ERRORS * trace_std_error) / count <= 0:
        return math.inf if trace > 0 else math.nan
    return trace / denominator if denominator > 0 else math.nan


def exact_noise_scale(model: torch.nn.Module, features: torch.Tensor, targets: torch.Tensor,
                      chunk_size: int = 64, method: str = "auto",
                      loss_fn: LossFn = F.cross_entropy) -> ExactNoiseScale:
    """|G|^2, tr(Sigma) and B_simple of the mean ``loss_fn`` of ``model`` over ``features``/``targets``.

    ``method``: ``layers`` (the per-layer norm identity, ``nn.Linear`` layers only), ``vmap`` (any model),
    or ``auto`` (``layers`` where it applies). ``chunk_size``: examples per ``vmap`` pass.
    """
    return gradient_sums(model, features, targets, chunk_size, method, loss_fn).noise_scale()


def gradient_sums(model: torch.nn.Module, features: torch.Tensor, targets: torch.Tensor,
                  chunk_size: int = 64, method: str = "auto", loss_fn: LossFn = F.cross_entropy) -> GradientSums:
    """sum_i g_i and sum_i |g_i|^2 over the examples; arguments as ``exact_noise_scale``'s."""
    count = len(targets)
    if count < 2:
        raise ValueError(f"need at least 2 examples for a covariance, got {count}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if method not in ("auto", "layers", "vmap"):
        raise ValueError(f"method must be auto, layers or vmap, got {method!r}")
    linears = None if returns_loss(model) else linear_layers_only(model)  # the layer identity reads logits
    if method == "layers" and linears is None:
        raise ValueError("method 'layers' needs a model whose parameters are all nn.Linear weights and biases")
    by_layers = (_sums_by_layers(model, linears, features, targets, loss_fn)
                 if method != "vmap" and linears else None)
    # By vmap where asked for, or where a layer was not applied exactly once.
    grad_sum, sq_norm_sum = by_layers or _sums_by_vmap(model, features, targets, chunk_size, loss_fn)
    return GradientSums(count=count, grad_sum=grad_sum, sq_norm_sum=sq_norm_sum)


def per_example_gradients(model: torch.nn.Module, features: torch.Tensor, targets: torch.Tensor,
                          chunk_size: int = 64, loss_fn: LossFn = F.cross_entropy
                          ) -> Iterator[dict[str, torch.Tensor]]:
    """Each example's gradient of its own loss, ``chunk_size`` examples at a time (torch.func: ``vmap`` of
    ``grad``): per chunk, parameter name -> (chunk, *shape), in the model's dtype and named_parameters() order."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_of_one(weights, x, y):
        return mean_loss(model, weights, x.unsqueeze(0), y.unsqueeze(0), loss_fn)

    gradients_of_chunk = vmap(grad(loss_of_one), in_dims=(None, 0, 0))
    for lo in range(0, len(targets), chunk_size):
        yield gradients_of_chunk(params, features[lo:lo + chunk_size], targets[lo:lo + chunk_size])


def mean_loss(model: torch.nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
              loss_fn: LossFn) -> torch.Tensor:
    """The mean loss of ``model`` with ``weights`` over (x, y): ``loss_fn`` of its outputs, or the loss a
    model built with model.output "loss" returns itself."""
    if returns_loss(model):
        return functional_call(model, weights, (x, y))
    return loss_fn(functional_call(model, weights, (x,)), y)


def linear_layers_only(model: torch.nn.Module) -> Optional[list[torch.nn.Linear]]:
    """The model's ``nn.Linear`` layers if its parameters are exactly theirs; else None."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    own = {id(p) for m in linears for p in m.parameters()}
    return linears if linears and own == {id(p) for p in model.parameters()} else None


def _sums_by_layers(model: torch.nn.Module, linears: list[torch.nn.Linear], features: torch.Tensor,
                    targets: torch.Tensor, loss_fn: LossFn
                    ) -> Optional[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """(sum_i g_i per parameter, sum_i |g_i|^2), float64, from one backward pass of the summed loss:
    row i of a layer's output gradient is example i's delta. None if a layer ran other than once."""
    inputs, outputs = [], []

    def keep(module, args, output):
        inputs.append(args[0])
        outputs.append(output)

    handles = [layer.register_forward_hook(keep) for layer in linears]
    try:
        with torch.enable_grad():
            # An input that requires grad puts every layer's output in the graph, whatever the parameters say.
            logits = model(features.detach().requires_grad_())
            if len(outputs) != len(linears):
                return None
            loss = loss_fn(logits, targets) * len(targets)  # the sum: row i of each delta is example i's
            deltas = torch.autograd.grad(loss, outputs)
    finally:
        for handle in handles:
            handle.remove()
    sums_by_id = {}
    sq_norm_sum = torch.zeros((), dtype=torch.float64, device=features.device)
    for layer, a, delta in zip(linears, inputs, deltas):
        a, delta = a.detach().double(), delta.double()
        delta_sq = delta.pow(2).sum(1)
        sq_norm_sum += (delta_sq * a.pow(2).sum(1)).sum()
        sums_by_id[id(layer.weight)] = delta.T @ a  # sum_i delta_i a_i^T
        if layer.bias is not None:
            sq_norm_sum += delta_sq.sum()
            sums_by_id[id(layer.bias)] = delta.sum(0)
    return {name: sums_by_id[id(p)] for name, p in model.named_parameters()}, sq_norm_sum


def _sums_by_vmap(model: torch.nn.Module, features: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                  loss_fn: LossFn) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(sum_i g_i per parameter, sum_i |g_i|^2), float64, from per-example gradients (torch.func)."""
    # Float64 sums: tr(Sigma) is a difference of two sums over N examples.
    grad_sum = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in model.named_parameters()}
    sq_norm_sum = torch.zeros((), dtype=torch.float64, device=features.device)
    for grads in per_example_gradients(model, features, targets, chunk_size, loss_fn):
        for name, g in grads.items():
            g = g.double()
            grad_sum[name] += g.sum(0)
            sq_norm_sum += g.pow(2).sum()
    return grad_sum, sq_norm_sum

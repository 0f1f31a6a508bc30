"""B_noise = tr(H Sigma) / (G^T H G), measure/hessian_noise.py.

Checked against dense matrices (the full Hessian, a loop of per-example backward passes) with every example
used; against B_simple where the Hessian is a multiple of the identity (SCIENCE.md: there the two agree);
and, with a subsample of deviations, against the exact value over many seeds.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from harness.core.model import MLP
from harness.measure.exact_noise import exact_noise_scale
from harness.measure.hessian_noise import hessian_noise_scale
from test_exact_noise import SharedLayer, per_example_gradients_by_loop


class TinyConv(nn.Module):
    """A convolution over a length-6 signal, then a linear head: not an MLP, so per-example gradients by vmap."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 3)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x.unsqueeze(1))).flatten(1))


class Point(nn.Module):
    """Outputs its parameter theta for every example: under ``half_squared_distance(c)`` example i's gradient
    is c (theta - y_i) and the Hessian of the mean loss is exactly c I."""

    def __init__(self, size: int, generator: torch.Generator):
        super().__init__()
        self.theta = nn.Parameter(torch.randn(size, generator=generator, dtype=torch.float64))

    def forward(self, x):
        return self.theta.expand(len(x), -1)


def half_squared_distance(c: float):
    return lambda outputs, targets: c / 2 * (outputs - targets).pow(2).sum(1).mean()


class Temperature(nn.Module):
    """Logits s (W x) with W fixed, under cross-entropy: one parameter, so its 1x1 Hessian is a multiple of
    the identity."""

    def __init__(self, generator: torch.Generator):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
        self.register_buffer("weight", torch.randn(3, 5, generator=generator, dtype=torch.float64))

    def forward(self, x):
        return self.scale * (x @ self.weight.T)


def classification_problem(name: str, count: int = 40, seed: int = 0):
    """A float64 model ("mlp": 5-4-3 sigmoid; "conv"; "shared": one layer applied twice), N examples, 3 classes."""
    torch.manual_seed(seed)  # the layers' own initialisation, then overwritten
    generator = torch.Generator().manual_seed(seed)
    model = {"mlp": lambda: MLP((5, 4, 3), "sigmoid"), "conv": TinyConv, "shared": SharedLayer}[name]().double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
    x = torch.randn(count, 5 if name == "mlp" else 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (count,), generator=generator)
    return model, x, y


def dense_noise_terms(model, x, y) -> tuple[float, float]:
    """(tr(H Sigma), G^T H G) from the dense Hessian of the flat-parameter loss and the (N, P) gradient matrix."""
    names, params = zip(*[(name, p.detach()) for name, p in model.named_parameters()])

    def loss_of_flat(flat):
        pieces = flat.split([p.numel() for p in params])
        weights = {name: piece.view_as(p) for name, piece, p in zip(names, pieces, params)}
        return F.cross_entropy(functional_call(model, weights, (x,)), y)

    hessian = torch.autograd.functional.hessian(loss_of_flat, torch.cat([p.flatten() for p in params]))
    gradients = per_example_gradients_by_loop(model, x, y)
    mean = gradients.mean(0)
    covariance = (gradients - mean).T @ (gradients - mean) / (len(y) - 1)
    return float(torch.trace(hessian @ covariance)), float(mean @ hessian @ mean)


@pytest.mark.parametrize("name", ["mlp", "conv", "shared"])
def test_with_every_example_b_noise_equals_the_dense_hessian_and_covariance(name):
    model, x, y = classification_problem(name)
    trace_hess_cov, grad_hess_grad = dense_noise_terms(model, x, y)
    assert grad_hess_grad > 0  # the problem has a B_noise to compare
    got = hessian_noise_scale(model, x, y, deviations=len(y))
    assert got.deviations == len(y) and got.trace_hess_cov_std_error == 0 and got.reason is None
    assert got.trace_hess_cov == pytest.approx(trace_hess_cov, rel=1e-6)
    assert got.grad_hess_grad == pytest.approx(grad_hess_grad, rel=1e-6)
    assert got.b_noise == pytest.approx(trace_hess_cov / grad_hess_grad, rel=1e-6)


def point_problem():
    generator = torch.Generator().manual_seed(1)
    targets = torch.randn(50, 6, generator=generator, dtype=torch.float64) + 0.5
    return Point(6, generator), torch.zeros(50, 1, dtype=torch.float64), targets, half_squared_distance(3.0)


def temperature_problem():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(50, 5, generator=generator, dtype=torch.float64)
    return Temperature(generator), x, torch.randint(0, 3, (50,), generator=generator), F.cross_entropy


@pytest.mark.parametrize("make_problem", [point_problem, temperature_problem])
def test_b_noise_equals_b_simple_where_the_hessian_is_a_multiple_of_the_identity(make_problem):
    model, x, y, loss_fn = make_problem()
    want = exact_noise_scale(model, x, y, loss_fn=loss_fn).b_simple
    got = hessian_noise_scale(model, x, y, deviations=len(y), loss_fn=loss_fn)
    assert got.b_noise == pytest.approx(want, rel=1e-10)
    assert got.simple.b_simple == pytest.approx(want, rel=1e-12)


def test_a_subsample_is_unbiased_and_its_standard_error_matches_the_spread_over_seeds():
    model, x, y = classification_problem("mlp", count=64, seed=3)
    exact = hessian_noise_scale(model, x, y, deviations=len(y)).trace_hess_cov
    readings = [hessian_noise_scale(model, x, y, deviations=16, seed=seed) for seed in range(60)]
    estimates = torch.tensor([r.trace_hess_cov for r in readings], dtype=torch.float64)
    std_errors = torch.tensor([r.trace_hess_cov_std_error for r in readings], dtype=torch.float64)
    spread = float(estimates.std())
    # The mean of 60 independent subsamples sits within 4 of its standard errors of the exact value ...
    assert abs(float(estimates.mean()) - exact) < 4 * spread / math.sqrt(len(readings))
    # ... and the reported error (root mean square: its square is the unbiased one) is the spread seen;
    # the spread of 60 readings is itself known to about 10%.
    assert 0.7 < spread / float(std_errors.pow(2).mean().sqrt()) < 1.4


def test_b_noise_is_nan_with_a_reason_where_the_loss_curves_down_along_the_mean_gradient():
    model, x, y, _ = point_problem()
    got = hessian_noise_scale(model, x, y, deviations=len(y), loss_fn=half_squared_distance(-3.0))
    assert got.grad_hess_grad < 0
    assert math.isnan(got.b_noise) and math.isnan(got.b_noise_rel_error)
    assert "not positive" in got.reason

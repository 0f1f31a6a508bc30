"""Each measurement against a problem whose answer is known."""

import math

import pytest
import torch

from harness.core.distributed import DistContext
from harness.measure.grad_noise import NoiseProbe
from harness.measure.metrics import (debiased_average, first_reaching, noise_scale_components, simple_noise_scale,
                             steps_to_target, top_hessian_eigenvalue)


def test_noise_scale_recovers_known_gradient_mean_and_covariance():
    # Per-example gradients g_i = G + noise, noise ~ N(0, diag(sigma^2)): |G|^2 and
    # tr(Sigma) are known exactly, and so is B_simple = tr(Sigma) / |G|^2. The
    # training loop's own probe (one rank: half batches) averages the draws.
    generator = torch.Generator().manual_seed(0)
    true_mean = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    sigma = torch.tensor([3.0, 1.0, 2.0, 4.0], dtype=torch.float64)
    big, draws = 64, 4000
    probe = NoiseProbe(DistContext(), global_batch_size=big, decay=0.999)
    param = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    small_sq, big_sq = [], []
    for _ in range(draws):
        per_example = true_mean + sigma * torch.randn(big, 4, generator=generator, dtype=torch.float64)
        halves = per_example[:big // 2].mean(0), per_example[big // 2:].mean(0)
        param.grad = per_example.mean(0)
        small_sq.append(float(sum(h.pow(2).sum() for h in halves) / 2))
        big_sq.append(float(param.grad.pow(2).sum()))
        probe.record(torch.tensor(small_sq[-1], dtype=torch.float64), [param])
    grad_sq, trace = noise_scale_components(sum(small_sq) / draws, sum(big_sq) / draws, big // 2, big)
    true_grad_sq, true_trace = float(true_mean.pow(2).sum()), float(sigma.pow(2).sum())
    assert grad_sq == pytest.approx(true_grad_sq, rel=0.05)
    assert trace == pytest.approx(true_trace, rel=0.05)
    assert simple_noise_scale(grad_sq, trace) == pytest.approx(true_trace / true_grad_sq, rel=0.05)
    measured = probe.epoch_metrics()
    assert measured["grad_noise_scale"] == pytest.approx(true_trace / true_grad_sq, rel=0.1)
    assert measured["grad_sq_norm_estimate"] == pytest.approx(true_grad_sq, rel=0.1)


def test_debiased_average_of_a_constant_is_that_constant():
    average, decay = 0.0, 0.9
    for updates in range(1, 6):
        average = decay * average + (1 - decay) * 7.0
        assert debiased_average(average, decay, updates) == pytest.approx(7.0)
    with pytest.raises(ValueError):
        debiased_average(0.0, decay, 0)


def test_noise_scale_components_are_exact_on_their_defining_equations():
    grad_sq, trace = 2.0, 30.0
    small, big = 4, 32
    estimate = noise_scale_components(grad_sq + trace / small, grad_sq + trace / big, small, big)
    assert estimate == pytest.approx((grad_sq, trace))


def test_noise_scale_is_nan_until_gradient_norm_is_positive():
    assert math.isnan(simple_noise_scale(-1.0, 5.0))
    assert NoiseProbe(DistContext(), global_batch_size=64, decay=0.9).epoch_metrics() == {}
    with pytest.raises(ValueError):
        noise_scale_components(1.0, 1.0, 8, 8)


def test_steps_to_target_takes_the_first_evaluation_that_reaches_it():
    reached = steps_to_target([0.5, 0.79, 0.81, 0.9], steps=[10, 20, 30, 40], samples=[100, 200, 300, 400],
                              seconds=[1.0, 2.0, 3.0, 4.0], target=0.8)
    assert (reached.steps, reached.epochs, reached.samples, reached.seconds) == (30, 3, 300, 3.0)
    assert steps_to_target([0.5, 0.6], [1, 2], [1, 2], [1.0, 2.0], target=0.8) is None
    assert first_reaching([0.8], 0.8) == 0


def test_top_hessian_eigenvalue_of_a_quadratic():
    # L(x) = 1/2 x^T A x has Hessian A; build A with eigenvalues 7, 3, 1, 0.5.
    generator = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(4, 4, generator=generator, dtype=torch.float64))
    matrix = basis @ torch.diag(torch.tensor([7.0, 3.0, 1.0, 0.5], dtype=torch.float64)) @ basis.T
    x = torch.randn(4, generator=generator, dtype=torch.float64, requires_grad=True)
    value = top_hessian_eigenvalue(lambda: 0.5 * x @ matrix @ x, [x], iterations=200, tolerance=1e-10)
    assert value == pytest.approx(7.0, rel=1e-6)


def test_top_hessian_eigenvalue_over_several_parameter_tensors():
    # Separable quadratic over two tensors: the top eigenvalue is the largest coefficient.
    a = torch.ones(3, dtype=torch.float64, requires_grad=True)
    b = torch.ones(2, 2, dtype=torch.float64, requires_grad=True)
    coeff_a = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    coeff_b = torch.tensor([[4.0, 0.1], [0.2, 0.3]], dtype=torch.float64)
    value = top_hessian_eigenvalue(lambda: 0.5 * (coeff_a * a * a).sum() + 0.5 * (coeff_b * b * b).sum(), [a, b],
                                   iterations=300, tolerance=1e-12)
    assert value == pytest.approx(4.0, rel=1e-6)

"""Each measurement against a problem whose answer is known."""

import math

import numpy as np
import pytest
import torch

from conftest import CONFIGS
from harness.core.config import load_config
from harness.core.distributed import DistContext
from harness.errors import InputError
from harness.core.noise_probe import NoiseProbe
from harness.measure.metrics import debiased_average, hessian_extremes, noise_scale_components, simple_noise_scale
from user_models import tiny_cnn


def top_hessian_eigenvalue(loss_fn, params, iterations, tolerance):
    """The sharpness alone: the top of :func:`hessian_extremes`."""
    return hessian_extremes(loss_fn, params, tolerance, iterations).top


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


def quadratic_with_spectrum(extremes, size, seed):
    """L(x) = 1/2 x^T A x, A = Q diag(eigenvalues) Q^T: the two given extremes, the rest uniform in (-3, 3)."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    middle = torch.rand(size - 2, generator=generator, dtype=torch.float64) * 6 - 3
    matrix = basis @ torch.diag(torch.cat([torch.tensor(extremes, dtype=torch.float64), middle])) @ basis.T
    x = torch.randn(size, generator=generator, dtype=torch.float64, requires_grad=True)
    return (lambda: 0.5 * x @ matrix @ x), x, matrix


@pytest.mark.parametrize("extremes", [(-9.0, 4.0), (9.0, -4.0), (-9.0, -3.5)])
def test_hessian_extremes_are_the_algebraic_ones_even_when_a_negative_eigenvalue_dominates(extremes):
    # (-9, 4): |lambda_min| > lambda_max, where power iteration returned -9 as "sharpness".
    # (-9, -3.5): every eigenvalue negative, the top one included.
    loss, x, matrix = quadratic_with_spectrum(extremes, size=200, seed=2)
    expected = np.linalg.eigvalsh(matrix.numpy())  # dense, independent of the Hessian-vector products
    tolerance = 1e-6
    found = hessian_extremes(loss, [x], tolerance=tolerance, iterations=200)
    radius = np.abs(expected).max()
    assert found.converged and found.tolerance == tolerance
    assert abs(found.top - expected[-1]) <= tolerance * radius
    assert abs(found.bottom - expected[0]) <= tolerance * radius
    assert top_hessian_eigenvalue(loss, [x], iterations=200, tolerance=tolerance) == pytest.approx(found.top)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_hessian_extremes_of_a_small_network_match_its_explicit_hessian(kind):
    # A 5-7-3 sigmoid MLP, or a user's CNN on 4x4 images (tests/user_models.py), at its random start: an
    # indefinite Hessian. The explicit Hessian (torch.autograd.functional.hessian over the flat parameters,
    # 80 x 80 and 47 x 47) and numpy's dense eigvalsh are the independent answer.
    torch.manual_seed(0)
    if kind == "mlp":
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Sigmoid(), torch.nn.Linear(7, 3)).double()
    else:
        model = tiny_cnn(side=4, channels=2, classes=3).double()
    inputs = torch.randn(40, 5 if kind == "mlp" else 16, dtype=torch.float64)
    targets = torch.randint(0, 3, (40,))
    params = list(model.parameters())
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]

    def loss_of_flat(flat):
        pieces = [piece.reshape(shape) for piece, shape in zip(flat.split(sizes), shapes)]
        names = [name for name, _ in model.named_parameters()]
        logits = torch.func.functional_call(model, dict(zip(names, pieces)), (inputs,))
        return torch.nn.functional.cross_entropy(logits, targets)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    explicit = torch.autograd.functional.hessian(loss_of_flat, flat).numpy()
    expected = np.linalg.eigvalsh((explicit + explicit.T) / 2)
    assert expected[0] < 0 < expected[-1]  # indefinite: both ends are worth checking
    tolerance = 1e-8
    found = hessian_extremes(lambda: torch.nn.functional.cross_entropy(model(inputs), targets), params,
                             tolerance=tolerance, iterations=200)
    radius = np.abs(expected).max()
    assert found.converged
    assert abs(found.top - expected[-1]) <= tolerance * radius
    assert abs(found.bottom - expected[0]) <= tolerance * radius


def test_hessian_extremes_report_non_convergence_instead_of_a_value():
    # One restart (~20 products) cannot resolve 600 eigenvalues spread over (-3, 3) to 1e-12.
    loss, x, _ = quadratic_with_spectrum((-3.0, 3.0), size=600, seed=3)
    found = hessian_extremes(loss, [x], tolerance=1e-12, iterations=1)
    assert not found.converged
    assert math.isnan(found.top) or math.isnan(found.bottom)
    assert found.hessian_vector_products > 0


def test_hessian_extremes_are_deterministic_given_the_seed():
    loss, x, _ = quadratic_with_spectrum((-5.0, 4.0), size=100, seed=4)
    first = hessian_extremes(loss, [x], tolerance=1e-4, seed=3)
    assert hessian_extremes(loss, [x], tolerance=1e-4, seed=3) == first


def test_hessian_extremes_of_a_two_parameter_loss():
    # Below ARPACK's minimum size the Hessian is formed column by column: diag(2, -1) here.
    x = torch.tensor([0.3, 0.4], dtype=torch.float64, requires_grad=True)
    found = hessian_extremes(lambda: x[0] ** 2 - 0.5 * x[1] ** 2, [x])
    assert (found.top, found.bottom, found.converged) == (pytest.approx(2.0), pytest.approx(-1.0), True)


@pytest.mark.parametrize("value", ["0", "1", "-0.01"])
def test_sharpness_tolerance_outside_zero_one_is_refused_naming_the_key(value):
    with pytest.raises(InputError, match=r"^metrics\.sharpness_tolerance: expected a number in \(0, 1\)"):
        load_config(CONFIGS / "smoke.yaml", [f"metrics.sharpness_tolerance={value}"])
    assert load_config(CONFIGS / "smoke.yaml", ["metrics.sharpness_tolerance=0.0001"]).metrics.sharpness_tolerance \
        == 1e-4

"""The exact noise scale, and the probe's windowed estimator checked against it.

exact_noise_scale (torch.func per-example gradients) is checked against a plain
loop of one autograd backward per example; the probe's two-batch estimator,
averaged over a window of steps at fixed parameters, is checked against the
exact value; the window averages the two components before dividing
(SCIENCE.md: each component is unbiased, their ratio is not).
"""

import math
import statistics

import pytest
import torch

from harness.core.backprop import autograd_backward
from harness.core.distributed import DistContext
from harness.core.model import MLP
from harness.measure.objective import RETURNS_LOSS
from harness.core import noise_probe as grad_noise
from harness.measure.exact_noise import exact_noise_scale, population_noise_scale
from harness.core.noise_probe import NoiseProbe
from harness.measure.metrics import noise_scale_components
from user_models import tiny_cnn, tiny_cnn_with_its_loss


def small_problem(count=96, seed=0, dtype=torch.float64, kind="mlp"):
    """The note's MLP (12-16-5 sigmoid), or a user's CNN (tests/user_models.py) on 4x4 images, at random weights;
    "cnn_loss": the CNN returning its own mean loss (model.output loss)."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        model = MLP((12, 16, 5), "sigmoid").to(dtype)
    else:
        model = (tiny_cnn if kind == "cnn" else tiny_cnn_with_its_loss)(side=4, channels=3, classes=5).to(dtype)
        setattr(model, RETURNS_LOSS, kind == "cnn_loss")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=dtype) * 0.5)
    x = torch.rand(count, 12 if kind == "mlp" else 16, generator=generator, dtype=dtype)
    y = torch.randint(0, 5, (count,), generator=generator)
    return model, x, y


def per_example_gradients_by_loop(model, x, y) -> torch.Tensor:
    """One autograd backward per example: the (N, P) matrix of flattened gradients."""
    rows = []
    for i in range(len(y)):
        autograd_backward(model, x[i:i + 1], y[i:i + 1])
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(rows)


@pytest.mark.parametrize("method,kind", [("vmap", "mlp"), ("layers", "mlp"), ("auto", "cnn"), ("auto", "cnn_loss")])
def test_exact_noise_scale_equals_a_loop_of_per_example_backward_passes(method, kind):
    model, x, y = small_problem(kind=kind)
    g = per_example_gradients_by_loop(model, x, y)
    mean = g.mean(0)
    want_grad_sq = float(mean @ mean)
    want_trace = float(((g - mean) ** 2).sum() / (len(y) - 1))
    for chunk in (1, 7, 96, 1000):  # chunks that divide N, do not, and exceed it (vmap's passes)
        got = exact_noise_scale(model, x, y, chunk_size=chunk, method=method)
        assert got.grad_sq_norm == pytest.approx(want_grad_sq, rel=1e-10)
        assert got.trace_cov == pytest.approx(want_trace, rel=1e-10)
        assert got.b_simple == pytest.approx(want_trace / want_grad_sq, rel=1e-10)


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "tanh"])
def test_the_layer_identity_matches_per_example_gradients_on_the_notes_network_in_float32(activation):
    """784-500-10 in float32 at a point off its initialisation, N = 256: the two float32 computations
    (outer products never formed, and formed by vmap) agree to float32 rounding."""
    torch.manual_seed(0)
    model = MLP((784, 500, 10), activation)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, y = torch.rand(256, 784), torch.randint(0, 10, (256,))
    by_layers = exact_noise_scale(model, x, y, method="layers")
    by_vmap = exact_noise_scale(model, x, y, method="vmap")
    assert by_layers.grad_sq_norm == pytest.approx(by_vmap.grad_sq_norm, rel=1e-5)
    assert by_layers.trace_cov == pytest.approx(by_vmap.trace_cov, rel=1e-5)
    assert exact_noise_scale(model, x, y) == by_layers  # auto takes the identity for an MLP


class SharedLayer(torch.nn.Module):
    """One nn.Linear applied twice: the per-layer identity does not hold (a layer's gradient is a sum of two
    outer products), and auto must fall back to per-example gradients."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(6, 6).double()
        self.head = torch.nn.Linear(6, 3).double()

    def forward(self, x):
        return self.head(torch.tanh(self.layer(torch.tanh(self.layer(x)))))


def test_a_model_the_identity_does_not_cover_goes_through_per_example_gradients():
    torch.manual_seed(1)
    model = SharedLayer()
    x, y = torch.rand(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    g = per_example_gradients_by_loop(model, x, y)
    mean = g.mean(0)
    got = exact_noise_scale(model, x, y)
    assert got.trace_cov == pytest.approx(float(((g - mean) ** 2).sum() / (len(y) - 1)), rel=1e-10)
    assert got.grad_sq_norm == pytest.approx(float(mean @ mean), rel=1e-10)
    not_only_linear = torch.nn.Sequential(torch.nn.Linear(6, 3).double(), torch.nn.Tanh())
    not_only_linear.register_parameter("scale", torch.nn.Parameter(torch.ones((), dtype=torch.float64)))
    with pytest.raises(ValueError, match="nn.Linear weights and biases"):
        exact_noise_scale(not_only_linear, x, y, method="layers")


def test_exact_noise_scale_refuses_fewer_than_two_examples():
    model, x, y = small_problem(count=1)
    with pytest.raises(ValueError, match="at least 2"):
        exact_noise_scale(model, x, y)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_windowed_probe_agrees_with_the_exact_noise_scale_at_fixed_parameters(kind):
    # 600 two-batch measurements (B=32 split in halves of 16) of batches drawn with
    # replacement from the same N examples; the parameters never move, so both
    # estimate the same tr(Sigma) and |G|^2 (here B_simple ~ 4.9). Seen with these seeds:
    # tr(Sigma) 1.4% low, |G|^2 1.1% high, B_simple 2.5% low; the bounds leave room
    # for the sampling error of 600 steps: 10% (tr), 20% (|G|^2), B_simple within 1.25x.
    model, x, y = small_problem(count=512, seed=3, kind=kind)
    exact = exact_noise_scale(model, x, y)
    probe = NoiseProbe(DistContext(), global_batch_size=32, decay=0.95)
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(4)
    backward = lambda bx, by, normalizer: autograd_backward(model, bx, by, normalizer)  # noqa: E731
    for _ in range(600):
        batch = torch.randint(0, len(y), (32,), generator=generator)
        probe.measured_gradients(backward, x[batch], y[batch], 32.0, params, None)
    probe.close_window()
    # All 600 in one window; one window is what this test reads.
    probe_metrics = _window_components(probe.closed_windows[-1], probe)
    assert probe_metrics[1] == pytest.approx(exact.trace_cov, rel=0.10)
    assert probe_metrics[0] == pytest.approx(exact.grad_sq_norm, rel=0.20)
    ratio = (probe_metrics[1] / probe_metrics[0]) / exact.b_simple
    assert 1 / 1.25 < ratio < 1.25, (probe_metrics, exact)


def _window_components(window: torch.Tensor, probe: NoiseProbe) -> tuple[float, float]:
    small_sum, big_sum, count = window.tolist()
    return noise_scale_components(small_sum / count, big_sum / count, probe.small_batch_size, probe.big_batch_size)


def _record(probe: NoiseProbe, small_sq: float, big_sq: float) -> None:
    """Feed the probe one step whose (small, big) squared norms are given: big through a fake gradient."""
    param = torch.zeros(1, dtype=torch.float64)
    param.grad = torch.tensor([math.sqrt(big_sq)], dtype=torch.float64)
    probe.record(torch.tensor(small_sq, dtype=torch.float64), [param])


def test_window_averages_the_components_before_dividing():
    probe = NoiseProbe(DistContext(), global_batch_size=8, decay=0.9)  # halves of 4
    pairs = [(5.0, 3.0), (2.0, 1.9), (9.0, 4.0), (4.0, 3.5)]
    for small, big in pairs:
        _record(probe, small, big)
    probe.close_window()
    assert probe.window.tolist() == [0.0, 0.0, 0.0]  # reset at the evaluation
    metrics = probe.window_metrics()
    # The components are linear in the norms: the window's are the mean of the per-step ones ...
    per_step = [noise_scale_components(s, b, 4, 8) for s, b in pairs]
    mean_grad_sq = sum(c[0] for c in per_step) / len(pairs)
    mean_trace = sum(c[1] for c in per_step) / len(pairs)
    assert metrics["grad_sq_norm_at_target"] == pytest.approx(mean_grad_sq)
    assert metrics["grad_trace_cov_at_target"] == pytest.approx(mean_trace)
    # ... and B_simple is their ratio, not the mean of the per-step ratios (which differs here).
    assert metrics["grad_noise_scale_at_target"] == pytest.approx(mean_trace / mean_grad_sq)
    mean_of_ratios = sum(t / g for g, t in per_step) / len(pairs)
    assert abs(mean_of_ratios - mean_trace / mean_grad_sq) > 0.1
    assert metrics["grad_noise_scale_measured_steps_at_target"] == 4


def test_window_at_target_takes_older_windows_until_enough_measured_steps(monkeypatch):
    monkeypatch.setattr(grad_noise, "MIN_MEASURED_STEPS_AT_TARGET", 3)
    probe = NoiseProbe(DistContext(), global_batch_size=8, decay=0.9)
    for per_window in ([(1.0, 0.5)] * 5, [(3.0, 1.0)], [], [(2.0, 1.0)]):  # oldest to newest
        for small, big in per_window:
            _record(probe, small, big)
        probe.close_window()
    metrics = probe.window_metrics()
    # Newest first: 1 step, 0 steps (two windows, 1 step), then 1 more, then 5: stop at >= 3 steps.
    assert metrics["grad_noise_scale_windows_at_target"] == 4
    assert metrics["grad_noise_scale_measured_steps_at_target"] == 7
    want = noise_scale_components((2.0 + 3.0 + 5 * 1.0) / 7, (1.0 + 1.0 + 5 * 0.5) / 7, 4, 8)
    assert metrics["grad_sq_norm_at_target"] == pytest.approx(want[0])


def test_window_survives_a_checkpoint():
    probe = NoiseProbe(DistContext(), global_batch_size=8, decay=0.9)
    _record(probe, 2.0, 1.0)
    probe.close_window()
    _record(probe, 3.0, 1.5)  # an open window
    restored = NoiseProbe(DistContext(), global_batch_size=8, decay=0.9)
    restored.load_state_dict(probe.state_dict())
    assert torch.equal(restored.window, probe.window) and torch.equal(restored.closed_windows, probe.closed_windows)


def test_the_population_noise_scale_removes_what_n_examples_add_to_the_squared_mean_gradient():
    # Per-example gradients drawn from a population with mean G and covariance sigma^2 I in d dimensions:
    # B_simple = d sigma^2 / |G|^2 = 100. Over N = 100 examples the plain ratio reads about 100 / (1 + 100/100).
    generator = torch.Generator().manual_seed(0)
    d, sigma, n = 50, 2.0, 100
    mean = torch.full((d,), 0.2, dtype=torch.float64)
    truth = d * sigma**2 / float(mean.pow(2).sum())
    plain, population = [], []
    for _ in range(400):
        g = mean + sigma * torch.randn(n, d, generator=generator, dtype=torch.float64)
        sq_norm = float(g.mean(0).pow(2).sum())
        trace = float((g - g.mean(0)).pow(2).sum()) / (n - 1)
        plain.append(sq_norm)
        population.append(sq_norm - trace / n)
        assert population_noise_scale(trace, sq_norm, n) == pytest.approx(trace / (sq_norm - trace / n))
    true_sq_norm = float(mean.pow(2).sum())
    assert sum(population) / 400 == pytest.approx(true_sq_norm, rel=0.02)  # unbiased
    assert sum(plain) / 400 == pytest.approx(true_sq_norm + d * sigma**2 / n, rel=0.02)  # high by tr(Sigma)/N
    assert truth == pytest.approx(100) and math.isnan(population_noise_scale(10.0, 0.05, 100))  # nothing left: NaN


@pytest.mark.parametrize("truth_over_n", [0.25, 8.0])
def test_a_subsampled_trace_leaves_the_population_value_unresolved_where_its_error_allows_any_size(truth_over_n):
    """B_noise's tr(H Sigma) is a mean over a subsample of deviations (measure/hessian_noise.py). Known truth:
    Gaussian per-example gradients with H = I, B = tr(Sigma) / |G|^2 set to truth_over_n x N. Where B is small
    against N every draw is resolved and centred on B; where it is 8N the plain correction reads some draws
    above 10x B, and the trace's standard error marks those unresolved (+inf): no resolved draw exceeds 3x B."""
    generator = torch.Generator().manual_seed(0)
    n, d, sampled = 256, 100, 16
    truth = truth_over_n * n
    mean = torch.full((d,), math.sqrt(1 / truth), dtype=torch.float64)  # |G|^2 = d / truth, tr(Sigma) = d
    plain, ruled = [], []
    for _ in range(200):
        g = mean + torch.randn(n, d, generator=generator, dtype=torch.float64)
        quadratic = float(g.mean(0).pow(2).sum())
        deviations = (g - g.mean(0)).pow(2).sum(1)[torch.randperm(n, generator=generator)[:sampled]]
        trace = n / (n - 1) * float(deviations.mean())
        std_error = n / (n - 1) * math.sqrt((1 - sampled / n) * float(deviations.var()) / sampled)
        plain.append(population_noise_scale(trace, quadratic, n))
        ruled.append(population_noise_scale(trace, quadratic, n, std_error))
    resolved = [v for v in ruled if math.isfinite(v)]
    if truth_over_n < 1:
        assert len(resolved) == 200 and statistics.median(resolved) == pytest.approx(truth, rel=0.05)
    else:
        assert max(v for v in plain if math.isfinite(v)) > 10 * truth
        assert ruled.count(math.inf) >= 50 and max(resolved) < 3 * truth

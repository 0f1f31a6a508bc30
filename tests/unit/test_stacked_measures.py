"""What a stack measures per member equals what the member's trial measures alone, and the known answers:
the stacked noise probe against the exact per-example noise scale and against a run alone's probe fed the
same batches; a member's sharpness against its explicit Hessian."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.core.config import Config
from harness.core.data import Split
from harness.core.distributed import DistContext
from harness.core.stacked import StackedTrainer, point_at_row
from harness.core.model import build_model
from harness.core.backprop import autograd_backward
from harness.measure.exact_noise import exact_noise_scale
from harness.core.noise_probe import NoiseProbe
from harness.measure.metrics import hessian_extremes, noise_scale_components

BATCH = 32



def member_model(stack, k, cfg):
    """An MLP whose parameters are views of row k of the stack (a member's model in the loop)."""
    model = build_model(cfg)
    point_at_row(model, stack, k)
    return model

def _members(count: int, features: int = 12, hidden: int = 16) -> list[Config]:
    base = {"data": {"dataset": "synthetic", "validation_size": 0,
                     "synthetic": {"num_train": 512, "num_test": 64, "num_features": features, "num_classes": 5}},
            "model": {"hidden_sizes": [hidden], "activation": "sigmoid"},
            "optim": {"global_batch_size": BATCH, "lr": 0.1}, "tracking": {"enabled": False},
            "metrics": {"noise_scale": True, "noise_scale_ema_decay": 0.95}}
    return [Config.from_dict({**base, "name": f"m{k}", "seed": k}) for k in range(count)]


def _problem(count=512, features=12, seed=3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(count, features, generator=generator)
    y = torch.randint(0, 5, (count,), generator=generator)
    return Split(x, y)


def test_stacked_probe_records_what_each_members_probe_alone_records_and_agrees_with_the_exact_noise_scale():
    # Parameters held fixed (gradients only, no update): every member's probe, fed 600 measured steps
    # (each member its own batches), is compared with (a) a run alone's NoiseProbe fed the same
    # batches through autograd on the member's own MLP -- to float rounding -- and (b) the exact
    # per-example noise scale of that member at those parameters -- within the sampling error
    # bounds of tests/test_exact_noise.py (tr 10%, |G|^2 20%, B_simple 1.25x).
    members = _members(3)
    data = _problem()
    stack = StackedTrainer(members, [data] * 3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights of tests/test_exact_noise.py's scale: a noise scale of a few samples
        for tensor in stack.model.parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
    alone = [NoiseProbe(DistContext(), global_batch_size=BATCH, decay=0.95) for _ in members]
    models = [member_model(stack, k, cfg) for k, cfg in enumerate(members)]
    generator = torch.Generator().manual_seed(4)
    for _ in range(600):
        batches = torch.randint(0, len(data), (3, BATCH), generator=generator)
        x, y = stack.data.batch(batches)
        stack._gradients_in_halves(batches, float(BATCH))
        for k, model in enumerate(models):
            params = list(model.parameters())
            backward = lambda bx, by, n, model=model: autograd_backward(model, bx, by, n)  # noqa: E731
            alone[k].measured_gradients(backward, x[k], y[k], float(BATCH), params, None)
    for k, model in enumerate(models):
        ours = stack.probe.members[k]
        assert torch.allclose(ours.ema, alone[k].ema, rtol=1e-5), k
        assert torch.allclose(ours.window, alone[k].window, rtol=1e-5), k
        ours.close_window()
        small, big, count = ours.closed_windows[-1].tolist()
        grad_sq, trace = noise_scale_components(small / count, big / count, ours.small_batch_size,
                                                ours.big_batch_size)
        exact = exact_noise_scale(model, data.features, data.targets)
        assert trace == pytest.approx(exact.trace_cov, rel=0.10), k
        assert grad_sq == pytest.approx(exact.grad_sq_norm, rel=0.20), k
        assert 1 / 1.25 < (trace / grad_sq) / exact.b_simple < 1.25, k


def test_a_members_sharpness_is_the_extreme_eigenvalues_of_its_own_explicit_hessian():
    # Member 1 of a stack of three 5-7-5 MLPs: its view's Lanczos extremes against numpy's eigvalsh of
    # the explicit 82 x 82 Hessian of member 1's loss, built from member 1's rows of the stack (a
    # member reading its neighbour's weights would fail this).
    members = _members(3, features=5, hidden=7)
    data = _problem(count=40, features=5)
    stack = StackedTrainer(members, [data] * 3)
    model = member_model(stack, 1, members[1])
    rows = [t[1].detach().double() for t in stack.model.parameters()]
    shapes, sizes = [t.shape for t in rows], [t.numel() for t in rows]
    x, y = data.features.double(), data.targets

    def loss_of_flat(flat):
        w1, b1, w2, b2 = [piece.reshape(shape) for piece, shape in zip(flat.split(sizes), shapes)]
        return F.cross_entropy(torch.sigmoid(x @ w1.T + b1) @ w2.T + b2, y)

    explicit = torch.autograd.functional.hessian(loss_of_flat, torch.cat([r.reshape(-1) for r in rows])).numpy()
    expected = np.linalg.eigvalsh((explicit + explicit.T) / 2)
    model = model.double()  # a copy in float64: Lanczos to 1e-8 needs it, as the explicit Hessian does
    found = hessian_extremes(lambda: F.cross_entropy(model(x), y), list(model.parameters()), tolerance=1e-8,
                             iterations=200)
    radius = np.abs(expected).max()
    assert found.converged
    assert abs(found.top - expected[-1]) <= 1e-6 * radius
    assert abs(found.bottom - expected[0]) <= 1e-6 * radius

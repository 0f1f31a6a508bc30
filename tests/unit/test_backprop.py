"""The note's hand-written backward pass equals autograd, and trains along the same path."""

import sys

import pytest
import torch

from conftest import CONFIGS, REPO, run_command
from harness.core.backprop import activation_backward, autograd_backward, manual_backward
from harness.core.model import MLP


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
@pytest.mark.parametrize("layer_sizes", [(784, 500, 10), (20, 10), (16, 12, 9, 5), (8, 7, 6, 5, 4, 3)])
@pytest.mark.parametrize("batch", [1, 13])
def test_hand_written_gradients_equal_autograd_float64(activation, layer_sizes, batch):
    torch.manual_seed(0)
    model = MLP(layer_sizes, activation).double()
    x = torch.randn(batch, layer_sizes[0], dtype=torch.float64)
    y = torch.randint(0, layer_sizes[-1], (batch,))
    manual_loss = manual_backward(model, x, y)
    manual = _grads(model)
    auto_loss = autograd_backward(model, x, y)
    torch.testing.assert_close(manual_loss, auto_loss, rtol=1e-10, atol=0)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(manual[name], grad, rtol=1e-10, atol=1e-14, msg=name)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_activation_backward_is_autograds_own_to_the_bit(activation):
    # The stacked step's backward (core/stacked.py) uses it where a run alone's autograd does.
    z = torch.randn(3, 7, 11, requires_grad=True)
    a = getattr(torch, activation)(z)
    grad = torch.randn_like(a)
    (expected,) = torch.autograd.grad(a, z, grad)
    assert torch.equal(activation_backward(activation, grad, z.detach(), a.detach()), expected)


def test_normalizer_scales_loss_and_gradients():
    torch.manual_seed(1)
    model = MLP((6, 5, 3), "sigmoid").double()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    mean_loss = manual_backward(model, x, y)
    mean_grads = _grads(model)
    half_loss = manual_backward(model, x, y, normalizer=8.0)
    torch.testing.assert_close(half_loss, mean_loss / 2)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, mean_grads[name] / 2)


def test_fifty_manual_sgd_steps_follow_autograd_float32():
    torch.manual_seed(2)
    manual_model = MLP((30, 20, 10), "sigmoid")
    auto_model = MLP((30, 20, 10), "sigmoid")
    auto_model.load_state_dict(manual_model.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (manual_model, auto_model)]
    data = torch.Generator().manual_seed(3)
    for _ in range(50):
        x = torch.randn(16, 30, generator=data)
        y = torch.randint(0, 10, (16,), generator=data)
        manual_backward(manual_model, x, y)
        autograd_backward(auto_model, x, y)
        for opt in opts:
            opt.step()
    for (name, a), b in zip(manual_model.named_parameters(), auto_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_gradcheck_command_reports_every_parameter():
    result = run_command([sys.executable, "-m", "harness.cli", "gradcheck", "--config", str(CONFIGS / "seed.yaml")],
                         cwd=REPO)
    assert result.returncode == 0, result.stderr
    for name in ("linears.0.weight", "linears.0.bias", "linears.1.weight", "linears.1.bias"):
        assert name in result.stdout
    assert result.stdout.strip().endswith(": ok")

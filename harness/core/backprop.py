"""The note's backward pass, written by hand in matrix form.

Notation (rows are samples; ``n`` samples, layer ``l`` maps ``d_{l-1}`` to ``d_l``):

- ``a[0] = x``                                   shape (n, d_0)
- ``z[l] = a[l-1] @ W[l].T + b[l]``             pre-activation, shape (n, d_l)
- ``a[l] = sigma(z[l])`` for hidden layers; the last layer's ``z[L]`` are logits
- loss ``C = sum_i CE(z[L]_i, y_i) / normalizer`` (``normalizer = n`` is the batch mean)
- ``delta[L] = (softmax(z[L]) - onehot(y)) / normalizer``        = dC/dz[L]
- ``delta[l] = sigma'(z[l]) * (delta[l+1] @ W[l+1])``           = dC/dz[l], l = L-1 .. 1
- ``dC/dW[l] = delta[l].T @ a[l-1]``,  ``dC/db[l] = delta[l].sum(0)``

This is the chain rule of the note, layer L down to 1, batched: the note's
column-vector ``delta^l (a^{l-1})^T`` summed over the samples is ``delta.T @ a``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from harness.core.model import MLP, summed_loss


def activation_backward(name: str, grad: torch.Tensor, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """grad * sigma'(z) in one kernel, from ``a = sigma(z)``: autograd's own backward of the activation."""
    if name == "sigmoid":
        return torch.ops.aten.sigmoid_backward(grad, a)
    if name == "tanh":
        return torch.ops.aten.tanh_backward(grad, a)
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, a, 0)
    raise ValueError(f"unknown activation {name!r}")


@torch.no_grad()
def manual_backward(model: MLP, x: torch.Tensor, y: torch.Tensor, normalizer: float | None = None,
                    accumulate: bool = False) -> torch.Tensor:
    """Forward and backward by hand; assigns ``.grad`` of every parameter (no zeroing needed), or with
    ``accumulate`` adds to it (a micro-batch after the first of a step); returns the loss."""
    normalizer = float(len(y)) if normalizer is None else float(normalizer)
    linears = list(model.linears)
    activations = [x]  # a[0] .. a[L-1]
    pre_activations = []  # z[1] .. z[L]
    for depth, linear in enumerate(linears):
        z = activations[-1] @ linear.weight.T + linear.bias
        pre_activations.append(z)
        if depth < len(linears) - 1:
            activations.append(model.activation(z))
    logits = pre_activations[-1]
    loss = F.cross_entropy(logits, y, reduction="sum") / normalizer
    delta = (torch.softmax(logits, dim=1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)) / normalizer
    for depth in range(len(linears) - 1, -1, -1):
        linear = linears[depth]
        if accumulate:
            linear.weight.grad.add_(delta.T @ activations[depth])
            linear.bias.grad.add_(delta.sum(0))
        else:
            linear.weight.grad = delta.T @ activations[depth]
            linear.bias.grad = delta.sum(0)
        if depth > 0:
            delta = activation_backward(model.activation_name, delta @ linear.weight, pre_activations[depth - 1],
                                        activations[depth])
    return loss


def autograd_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, normalizer: float | None = None,
                      set_to_none: bool = True, accumulate: bool = False,
                      forward_context=contextlib.nullcontext) -> torch.Tensor:
    """The same loss through autograd; gradients are assigned (zeroed first), or with ``accumulate`` added.

    The training step's autograd engine too: a graph step passes ``set_to_none=False``, as its captured
    graph holds the gradient buffers' addresses. ``forward_context`` (core/precision.py) wraps the
    forward only: the loss is taken from fp32 logits and the backward runs outside it.
    """
    normalizer = float(len(y)) if normalizer is None else float(normalizer)
    if not accumulate:
        model.zero_grad(set_to_none=set_to_none)
    # Autocast's bf16 logits get an fp32 softmax and loss; fp32 and fp64 (gradcheck) logits are left as they are.
    loss = summed_loss(model, x, y, forward_context) / normalizer
    loss.backward()
    return loss.detach()


def gradient_differences(model: MLP, x: torch.Tensor, y: torch.Tensor) -> list[tuple[str, float]]:
    """Per parameter, max |manual - autograd| / max(|autograd|, tiny): the gradcheck report."""
    manual_backward(model, x, y)
    manual = {name: p.grad.clone() for name, p in model.named_parameters()}
    autograd_backward(model, x, y)
    report = []
    for name, p in model.named_parameters():
        scale = p.grad.abs().max().clamp_min(torch.finfo(p.grad.dtype).tiny)
        report.append((name, float((manual[name] - p.grad).abs().max() / scale)))
    return report

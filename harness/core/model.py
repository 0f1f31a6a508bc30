"""The lecture note's DNN: a multilayer perceptron (nn.Module only).

The output layer returns raw logits, as ``CrossEntropyLoss`` expects; the note's sigmoid
before the loss would squash them into (0, 1) and flatten the softmax.
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATION_MODULES = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}


class MLP(nn.Module):
    """``layer_sizes = (784, 500, 10)`` gives Linear(784, 500) -> act -> Linear(500, 10)."""

    def __init__(self, layer_sizes: tuple[int, ...], activation: str = "sigmoid"):
        super().__init__()
        self.activation_name = activation
        self.linears = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in zip(layer_sizes, layer_sizes[1:]))
        self.activation = ACTIVATION_MODULES[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *hidden, output = self.linears
        for linear in hidden:
            x = self.activation(linear(x))
        return output(x)


def build_model(cfg) -> MLP:
    """The configured MLP, initialised from ``cfg.seed`` so every rank starts identical."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return MLP(cfg.layer_sizes, cfg.model.activation)

"""The lecture note's DNN, a multilayer perceptron, or the user's model (``model.factory``): nn.Modules only.

The MLP's output layer returns raw logits, as ``CrossEntropyLoss`` expects; the note's sigmoid
before the loss would squash them into (0, 1) and flatten the softmax. A factory's model returns
logits too (core/factories.py builds and checks it), or with ``model.output: loss`` its own mean loss
over a batch from ``forward(features, labels)``; ``summed_loss`` is the one place that tells them apart
for training (evaluation and the measurements ask ``returns_loss``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from harness.measure.objective import RETURNS_LOSS, returns_loss

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


def build_model(cfg) -> nn.Module:
    """The configured model (the MLP, or model.factory's), initialised from ``cfg.seed`` so every rank
    starts identical."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.model.factory is not None:
            from harness.core.factories import build_factory_model
            model = build_factory_model(cfg.model.factory, cfg.model.kwargs)
            setattr(model, RETURNS_LOSS, cfg.model.output == "loss")
            return model
        return MLP(cfg.layer_sizes, cfg.model.activation)


def summed_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                forward_context=contextlib.nullcontext) -> torch.Tensor:
    """The loss summed over the batch: cross-entropy of the logits (bf16 or fp16 logits scored in fp32), or a
    loss-returning model's mean loss times the batch. ``forward_context`` (core/precision.py) wraps the
    model's forward only."""
    with forward_context():
        output = model(x, y) if returns_loss(model) else model(x)
    if output.dtype in (torch.bfloat16, torch.float16):
        output = output.float()
    return output * len(y) if returns_loss(model) else F.cross_entropy(output, y, reduction="sum")


def is_mlp(cfg) -> bool:
    """Does ``cfg`` train the note's MLP (what the hand-written backward and the stacked step know)?"""
    return cfg.model.factory is None


def weight_shapes(cfg) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Every tensor of the model's state_dict: its shape and whether it is floating-point (a module's
    buffers may count things): what a checkpoint of ``cfg`` must hold."""
    if is_mlp(cfg):
        shapes = {}
        for index, (n_in, n_out) in enumerate(zip(cfg.layer_sizes, cfg.layer_sizes[1:])):
            shapes.update({f"linears.{index}.weight": ((n_out, n_in), True), f"linears.{index}.bias": ((n_out,), True)})
        return shapes
    return {name: (tuple(t.shape), t.is_floating_point()) for name, t in build_model(cfg).state_dict().items()}


def describe_model(cfg) -> str:
    """``784-500-10 sigmoid``, or ``examples.cnn:build(channels=8)``."""
    if is_mlp(cfg):
        return "-".join(map(str, cfg.layer_sizes)) + f" {cfg.model.activation}"
    from harness.core.factories import describe_factory
    return describe_factory(cfg.model.factory, cfg.model.kwargs)

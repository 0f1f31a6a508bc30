"""A small convolutional network for 28x28 grey images (Fashion-MNIST), as a model factory.

    model: {factory: "examples.cnn:small_cnn", kwargs: {channels: 8}}

The harness hands it each batch as rows of 784 pixels (data.dataset fashion-mnist): the network views
them as 1x28x28 images. No batch norm or dropout, so every measurement (per-example gradients,
Hessian-vector products) sees one fixed function of the weights.
"""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv(1 -> c, 5x5) -> ReLU -> 2x2 max pool -> conv(c -> 2c, 5x5) -> ReLU -> 2x2 max pool -> linear -> logits."""

    def __init__(self, channels: int = 8, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),           # 28x28 -> 14x14
            nn.Conv2d(channels, 2 * channels, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # -> 7x7
        )
        self.classifier = nn.Linear(2 * channels * 7 * 7, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.reshape(-1, 1, 28, 28)
        return self.classifier(self.features(images).flatten(1))


def small_cnn(channels: int = 8, classes: int = 10) -> nn.Module:
    return SmallCNN(channels, classes)

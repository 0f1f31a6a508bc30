"""A user's own code, as tests hand it to the harness: ``model.factory: "tests.user_models:tiny_cnn"``.

tiny_cnn is a network that is not an MLP (a convolution, a pool, a linear head) for 28x28 or 8x8 grey
images; tiny_cnn_with_its_loss the same returning its own loss (model.output loss); with_batch_norm one
that cannot be stacked; pixels_as_images a data factory; the rest are
factories that fail in each way a user's can, each refused with exit code 2.
"""

import math

import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, side: int, channels: int, classes: int):
        super().__init__()
        self.side = side
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.head = nn.Linear(channels * (side // 2) ** 2, classes)

    def forward(self, x):
        images = x.reshape(-1, 1, self.side, self.side)
        return self.head(torch.nn.functional.max_pool2d(torch.tanh(self.conv(images)), 2).flatten(1))


def tiny_cnn(side: int = 28, channels: int = 4, classes: int = 10) -> nn.Module:
    return TinyCNN(side, channels, classes)


def pixels_as_images(count: int = 300, side: int = 8, seed: int = 0):
    """Data as a factory returns it: a map-style Dataset of (image [1, side, side], label) for training and a
    pair of tensors for testing; noise with one quadrant brighter, the label says which."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 1, side, side, generator=generator)
    labels = torch.randint(0, 4, (count,), generator=generator)
    half = side // 2
    for label, (rows, cols) in enumerate([(slice(0, half), slice(0, half)), (slice(0, half), slice(half, side)),
                                          (slice(half, side), slice(0, half)), (slice(half, side), slice(half, side))]):
        images[labels == label, 0, rows, cols] += 0.5
    cut = math.ceil(count * 0.8)
    train = torch.utils.data.TensorDataset(images[:cut], labels[:cut])
    return train, (images[cut:], labels[cut:])


class TinyCNNWithItsLoss(TinyCNN):
    """tiny_cnn scoring itself: forward(images, labels) is the batch's mean cross-entropy (model.output loss)."""

    def forward(self, x, labels):
        return torch.nn.functional.cross_entropy(super().forward(x), labels)


def tiny_cnn_with_its_loss(side: int = 28, channels: int = 4, classes: int = 10) -> nn.Module:
    return TinyCNNWithItsLoss(side, channels, classes)


def loss_per_sample(side: int = 28) -> nn.Module:
    """Returns a loss per sample, where model.output loss expects the batch's mean."""
    class PerSample(TinyCNN):
        def forward(self, x, labels):
            return torch.nn.functional.cross_entropy(super().forward(x), labels, reduction="none")
    return PerSample(side, 2, 10)


def with_batch_norm(classes: int = 10) -> nn.Module:
    """A model with state besides its parameters (batch norm's running statistics): not stackable."""
    return nn.Sequential(nn.Linear(784, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, classes))


def raises():
    raise RuntimeError("the user's bug")


def returns_a_number():
    return 3


def no_parameters():
    return nn.Flatten()


def one_part_only():
    return (torch.rand(10, 4), torch.zeros(10, dtype=torch.long))


def float_labels():
    return (torch.rand(10, 4), torch.rand(10)), (torch.rand(5, 4), torch.rand(5))


NOT_A_FUNCTION = 7

"""A tabular data set from a package (scikit-learn's bundled breast-cancer table: 569 samples, 30
features, 2 classes, offline) as a data factory, and a small network for it as a model factory.

    data: {factory: "examples.tabular:breast_cancer", kwargs: {test_fraction: 0.2}}
    model: {factory: "examples.tabular:tabular_net", kwargs: {features: 30, hidden: 64}}

Features are standardised with the training part's mean and spread; the test part is a seeded draw.
"""

from __future__ import annotations

import numpy as np
from torch import nn


def breast_cancer(test_fraction: float = 0.2, seed: int = 0):
    """(train, test): each a pair (features float32 [n, 30], labels int64 [n])."""
    from sklearn.datasets import load_breast_cancer

    table = load_breast_cancer()
    x, y = table.data.astype(np.float32), table.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    test_count = int(round(test_fraction * len(y)))
    test, train = np.sort(order[:test_count]), np.sort(order[test_count:])
    mean, spread = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / spread
    return (x[train], y[train]), (x[test], y[test])


def tabular_net(features: int = 30, hidden: int = 64, classes: int = 2) -> nn.Module:
    """features -> hidden -> hidden -> classes, tanh between."""
    return nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, classes))

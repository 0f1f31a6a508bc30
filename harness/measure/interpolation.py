"""Keskar et al. (2017)'s 1-D interpolation between two solutions, as pure computation.

θ(α) = (1 − α)·θ_a + α·θ_b for α on a grid (Keskar: α from −1 to 2, 25 points), and
what a caller-given ``score`` says of the network at each θ(α). Owns the grid, the
mixing of two state dicts and the walk along the line; knows no data set, file or
MLflow (the scoring, the CSV, the plot and the record are harness/analysis/interpolation.py's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from harness.errors import InputError


@dataclass(frozen=True)
class InterpolationPoint:
    alpha: float
    scores: dict[str, float]  # e.g. train_loss, train_accuracy, test_loss, test_accuracy


MAX_POINTS = 10_000
MAX_ALPHA = 100.0  # Keskar et al. draw -1..2; far beyond, the weights are the ends' difference magnified


def alpha_grid(alpha_min: float, alpha_max: float, points: int) -> list[float]:
    """``points`` evenly spaced values from ``alpha_min`` to ``alpha_max``, both included."""
    if not 2 <= points <= MAX_POINTS:
        raise InputError(f"--points: {points}; expected 2 (both ends of the α range) to {MAX_POINTS} (each point "
                         "scores the whole training and test sets)")
    for name, alpha in (("--alpha-min", alpha_min), ("--alpha-max", alpha_max)):
        if not -MAX_ALPHA <= alpha <= MAX_ALPHA:  # NaN fails too
            raise InputError(f"{name}: {alpha:g}; expected a number in [-{MAX_ALPHA:g}, {MAX_ALPHA:g}] (beyond, "
                             "(1 − α)·θ_a + α·θ_b leaves the float range or says nothing about the two solutions)")
    if not alpha_min < alpha_max:
        raise InputError(f"--alpha-min: {alpha_min:g} is not below --alpha-max {alpha_max:g}; expected a "
                         "non-empty α range (Keskar et al. use -1 to 2)")
    # float64 linspace: the ends are exact, so α = 0 and α = 1 are hit when the grid contains them.
    return torch.linspace(alpha_min, alpha_max, points, dtype=torch.float64).tolist()


def interpolate_state(state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor],
                      alpha: float) -> dict[str, torch.Tensor]:
    """(1 − α)·a + α·b, tensor by tensor; the two must hold the same names and shapes."""
    if state_a.keys() != state_b.keys():
        raise ValueError(f"the two states hold different tensors: {sorted(state_a.keys() ^ state_b.keys())}")
    mixed = {}
    for name, a in state_a.items():
        b = state_b[name]
        if a.shape != b.shape:
            raise ValueError(f"{name}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
        # Computed in float64, then stored in the parameter's own dtype: at α = 0 and 1 this returns
        # a and b bit for bit (0·x + 1·y = y exactly), so the ends are the two solutions themselves.
        mixed[name] = ((1.0 - alpha) * a.double() + alpha * b.double()).to(a.dtype)
    return mixed


def interpolation_curve(model: torch.nn.Module, state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor],
                        alphas: list[float], score: Callable[[torch.nn.Module], dict[str, float]]
                        ) -> list[InterpolationPoint]:
    """``score(model)`` with the model's parameters set to θ(α), for every α in ``alphas``; ``model`` is
    overwritten, the caller's two states are left as they are."""
    points = []
    with torch.no_grad():
        for alpha in alphas:
            model.load_state_dict(interpolate_state(state_a, state_b, alpha))
            points.append(InterpolationPoint(alpha, dict(score(model))))
    return points

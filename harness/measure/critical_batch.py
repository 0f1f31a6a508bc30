"""The critical batch size from the steps/examples trade-off, as pure functions.

McCandlish et al. 2018 (eq. 2.11) and Shallue et al. 2018: with S(B) the fewest
steps to a fixed target at batch size B (the LR tuned for that B) and E = B S the
examples, S = S_min (1 + B_crit / B), i.e. S = S_min + E_min / B with
E_min = S_min B_crit, equivalently (S/S_min - 1)(E/E_min - 1) = 1.

Two fits of that curve. The primary one has relative errors (least squares on log S):
S spans orders of magnitude across B, and least squares in steps lets the small batch
sizes (many steps) decide the fit. Ordinary least squares of S on 1/B (S_min the
intercept, E_min the slope) stays beside it as a second number. A bootstrap over
seeds *and the LR choice* gives an interval; leaving one batch size out at a time
says how much any one point decides B_crit.

Numbers in, numbers out: which trials reached the target and what is logged are
harness/analysis's business; this module fits and resamples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

MIN_BATCH_SIZES = 3
RELATIVE_ERROR = "relative-error fit"
LEAST_SQUARES = "least squares on 1/B"
# The relative-error fit searches B_crit up to this factor beyond the batch sizes tried; an optimum on
# that edge is the curve's limit (flat, or perfect scaling throughout), not a batch size the data give.
EXTRAPOLATION = 1000.0
GRID_SPACING = 0.2  # in log B_crit: the coarse search, which Gauss-Newton then refines
GAUSS_NEWTON_STEPS = 30


class NotEnoughBatchSizes(ValueError):
    """Fewer than 3 distinct batch sizes reached the target: two points fit any curve of this family."""


@dataclass(frozen=True)
class StepsFit:
    """S(B) = s_min + e_min / B; b_crit = e_min / s_min (NaN when the fit is not :attr:`valid`);
    ``method``: which fit (:data:`RELATIVE_ERROR` or :data:`LEAST_SQUARES`)."""

    s_min: float
    e_min: float
    b_crit: float
    method: str = RELATIVE_ERROR

    @property
    def valid(self) -> bool:
        """Both coefficients positive: only then is the curve the trade-off's hyperbola and b_crit a batch size."""
        return self.s_min > 0 and self.e_min > 0 and math.isfinite(self.b_crit)

    @property
    def problem(self) -> str:
        """One line saying why the fit is not valid ('' when it is)."""
        if self.valid:
            return ""
        if not self.e_min > 0:
            return (f"the fitted E_min = {self.e_min:.4g} is not positive: steps to target do not fall as the "
                    f"batch size grows, so there is no critical batch size to read")
        return (f"the fitted S_min = {self.s_min:.4g} is not positive: steps to target have not levelled off "
                f"at the largest batch sizes (still perfect scaling), so B_crit is above the batch sizes tried")

    def steps_at(self, batch_size: float) -> float:
        """Steps to target the fit predicts at ``batch_size``."""
        return self.s_min + self.e_min / batch_size


def _check_points(batch_sizes: Sequence[float], steps: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    batch_array = np.asarray(batch_sizes, dtype=np.float64)
    steps_array = np.asarray(steps, dtype=np.float64)
    if batch_array.shape != steps_array.shape or batch_array.ndim != 1:
        raise ValueError(f"batch_sizes and steps must be two flat sequences of one length, "
                         f"got shapes {batch_array.shape} and {steps_array.shape}")
    if not (np.all(np.isfinite(batch_array)) and np.all(batch_array > 0)):
        raise ValueError(f"batch sizes must be finite and positive, got {list(batch_sizes)}")
    if not (np.all(np.isfinite(steps_array)) and np.all(steps_array > 0)):
        raise ValueError(f"steps to target must be finite and positive (leave out trials that did not reach "
                         f"the target), got {list(steps)}")
    distinct = len(np.unique(batch_array))
    if distinct < MIN_BATCH_SIZES:
        raise NotEnoughBatchSizes(f"only {distinct} batch size(s) reached the target; fitting "
                                  f"S = S_min + E_min/B needs at least {MIN_BATCH_SIZES}")
    return batch_array, steps_array


def fit_least_squares(batch_sizes: Sequence[float], steps: Sequence[float]) -> StepsFit:
    """Ordinary least squares of S on 1/B: S_min the intercept, E_min the slope.

    ``batch_sizes`` may repeat (one point per seed); at least 3 distinct batch sizes are needed, else
    :class:`NotEnoughBatchSizes`. The residuals are in steps, so the small batch sizes (many steps) weigh
    most. A fit with S_min <= 0 or E_min <= 0 comes back with ``valid`` False, b_crit NaN and ``problem``
    saying why: never a negative critical batch size.
    """
    batch_array, steps_array = _check_points(batch_sizes, steps)
    inverse = 1.0 / batch_array
    centred = inverse - inverse.mean()
    e_min = float((steps_array * centred).sum() / (centred * centred).sum())
    s_min = float(steps_array.mean() - e_min * inverse.mean())
    return StepsFit(s_min, e_min, e_min / s_min if s_min > 0 and e_min > 0 else math.nan, LEAST_SQUARES)


def fit_relative_error(batch_sizes: Sequence[float], steps: Sequence[float]) -> StepsFit:
    """Least squares on log S: residuals log S_i - log(S_min + E_min/B_i), with S_min, E_min > 0.

    Same inputs and refusals as :func:`fit_least_squares`. An optimum with B_crit more than
    :data:`EXTRAPOLATION` times below the smallest batch size (steps flat: E_min reads 0) or above the largest
    (perfect scaling throughout: S_min reads 0) comes back not ``valid``, with ``problem`` saying which.
    """
    batch_array, steps_array = _check_points(batch_sizes, steps)
    s_min, e_min, b_crit = (float(v[0]) for v in _fit_log_steps(batch_array, steps_array[None, :]))
    return StepsFit(s_min, e_min, b_crit, RELATIVE_ERROR)


def _fit_log_steps(batch_sizes: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The relative-error fit of every row of ``steps`` (rows x points; NaN or inf: no point there) at
    once, so a bootstrap fits all its resamples together. Returns (s_min, e_min, b_crit) per row; b_crit
    NaN where the row is not a valid fit (see :func:`fit_relative_error`; fewer than 3 distinct batch
    sizes: all three NaN)."""
    weight = np.isfinite(steps) & (steps > 0)
    log_steps = np.where(weight, np.log(np.where(weight, steps, 1.0)), 0.0)
    log_batch = np.log(batch_sizes)
    log_b_crit, at_low_edge, at_high_edge = _best_log_b_crit(log_batch, log_steps, weight)
    log_s_min, _ = _profile(log_b_crit[:, None], log_batch, log_steps, weight)
    s_min, b_crit = np.exp(log_s_min[:, 0]), np.exp(log_b_crit)
    e_min = np.where(at_low_edge, 0.0, s_min * b_crit)  # flat: no trade-off to read
    s_min = np.where(at_high_edge, 0.0, s_min)  # perfect scaling throughout: S_min below anything measured
    enough = np.array([len(np.unique(batch_sizes[row])) >= MIN_BATCH_SIZES for row in weight])
    valid = enough & ~at_low_edge & ~at_high_edge
    nan = np.full(len(steps), np.nan)
    return np.where(enough, s_min, nan), np.where(enough, e_min, nan), np.where(valid, b_crit, nan)


def _profile(log_b_crit: np.ndarray, log_batch: np.ndarray, log_steps: np.ndarray,
             weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(best log S_min, residuals) of every row at its log B_crit (rows x 1). With k = log B_crit,
    log S_i = log S_min + log(1 + e^(k - log B_i)): for fixed k the best log S_min is a mean."""
    shape = np.logaddexp(0.0, log_b_crit - log_batch)
    log_s_min = ((log_steps - shape) * weight).sum(axis=1, keepdims=True) / np.maximum(
        weight.sum(axis=1, keepdims=True), 1)
    return log_s_min, (log_steps - log_s_min - shape) * weight


def _best_log_b_crit(log_batch: np.ndarray, log_steps: np.ndarray,
                     weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fit is one-dimensional in k = log B_crit (variable projection): a grid over k finds every row's
    basin, and Gauss-Newton steps, each kept inside the grid cells next to the best point, converge in it.
    Returns (k, whether the best grid point is the grid's low edge, its high edge) per row."""
    low, high = log_batch.min() - math.log(EXTRAPOLATION), log_batch.max() + math.log(EXTRAPOLATION)
    grid = np.linspace(low, high, int(math.ceil((high - low) / GRID_SPACING)) + 1)
    rows = len(log_steps)
    sums = np.stack([(_profile(np.full((rows, 1), k), log_batch, log_steps, weight)[1] ** 2).sum(axis=1)
                     for k in grid], axis=1)
    best = sums.argmin(axis=1)
    k = grid[best][:, None]
    lower, upper = grid[np.maximum(best - 1, 0)][:, None], grid[np.minimum(best + 1, len(grid) - 1)][:, None]
    counts = np.maximum(weight.sum(axis=1, keepdims=True), 1)
    for _ in range(GAUSS_NEWTON_STEPS):
        _, residuals = _profile(k, log_batch, log_steps, weight)
        slope = 1.0 / (1.0 + np.exp(log_batch - k))  # d log(1 + e^(k - log B)) / dk
        slope_centred = (slope - (slope * weight).sum(axis=1, keepdims=True) / counts) * weight
        curvature = (slope_centred ** 2).sum(axis=1, keepdims=True)
        step = (slope_centred * residuals).sum(axis=1, keepdims=True) / np.where(curvature > 0, curvature, 1.0)
        k = np.clip(k + step, lower, upper)
    return k[:, 0], best == 0, best == len(grid) - 1


@dataclass(frozen=True)
class SeedSteps:
    """One LR at one batch size, per seed: the steps to target (inf where it never reached) and, for a seed the
    race stopped, the lower bound on its steps (inf for any other; empty: no seed was stopped)."""

    steps: Sequence[float]
    race_bounds: Sequence[float] = ()

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps, the steps each seed ranks by: its steps, or the race's lower bound where it was stopped)."""
        steps = np.asarray(self.steps, dtype=np.float64)
        bounds = np.asarray(self.race_bounds if len(self.race_bounds) else [math.inf] * len(steps), dtype=np.float64)
        if steps.ndim != 1 or steps.shape != bounds.shape or len(steps) == 0:
            raise ValueError(f"steps and race bounds must be two flat, non-empty sequences of one length, got "
                             f"{list(self.steps)} and {list(self.race_bounds)}")
        if np.any(np.isnan(steps)) or np.any(steps <= 0) or np.any(np.isnan(bounds)) or np.any(bounds <= 0):
            raise ValueError(f"steps and race bounds must be positive (inf: not reached, not stopped), got "
                             f"{list(self.steps)} and {list(self.race_bounds)}")
        return steps, np.minimum(steps, bounds)


@dataclass(frozen=True)
class BootstrapInterval:
    """A percentile interval of b_crit; ``used`` resamples gave a valid fit, ``skipped`` did not."""

    low: float
    high: float
    used: int
    skipped: int


def _median_of_finite(values: np.ndarray) -> np.ndarray:
    """Median along the last axis over the finite entries (NaN where there is none)."""
    ordered = np.sort(np.where(np.isfinite(values), values, np.inf), axis=-1)
    count = np.isfinite(ordered).sum(axis=-1)
    below, above = np.maximum((count - 1) // 2, 0), np.maximum(count // 2, 0)
    middle = (np.take_along_axis(ordered, below[..., None], -1) + np.take_along_axis(ordered, above[..., None], -1))
    return np.where(count > 0, middle[..., 0] / 2, np.nan)


def tuned_medians(grid_by_batch: Mapping[float, Sequence[SeedSteps]], resamples: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap resamples of the tuned steps: (batch sizes ascending, resamples x batch sizes medians).

    In every (batch size, LR) cell, as many seeds as it has, drawn with replacement. Per batch size the LR
    with the fewest median steps wins (a seed that never reached counts as inf, one the race stopped as its
    lower bound; ties: the first LR of the grid, so list them ascending), as the tuning does; the batch
    size's value is the median over that LR's drawn seeds that reached. NaN where no LR's median reached,
    or only stopped seeds make up the winner's.
    """
    batch_sizes = sorted(grid_by_batch)
    medians = np.full((resamples, len(batch_sizes)), np.nan)
    for column, batch_size in enumerate(batch_sizes):
        ranked_medians, reached_medians = [], []
        for cell in grid_by_batch[batch_size]:
            steps, ranked = cell.arrays()
            draws = rng.integers(0, len(steps), size=(resamples, len(steps)))
            ranked_medians.append(np.median(ranked[draws], axis=1))
            reached_medians.append(_median_of_finite(steps[draws]))
        ranked_table = np.stack(ranked_medians, axis=1)
        winner = ranked_table.argmin(axis=1)
        chosen = np.take_along_axis(np.stack(reached_medians, axis=1), winner[:, None], axis=1)[:, 0]
        medians[:, column] = np.where(np.isfinite(ranked_table.min(axis=1)), chosen, np.nan)
    return np.asarray(batch_sizes, dtype=np.float64), medians


def bootstrap_interval(grid_by_batch: Mapping[float, Sequence[SeedSteps]], resamples: int = 1000, seed: int = 0,
                       level: float = 0.9) -> BootstrapInterval:
    """Percentile bootstrap of the relative-error fit's b_crit over seeds and the LR choice (Efron's
    percentile interval): :func:`tuned_medians`, then the fit of every resample.

    ``grid_by_batch`` maps a batch size to its LR grid, one :class:`SeedSteps` per LR in ascending LR
    order. Resamples whose fit is not valid (fewer than 3 batch sizes reached, or an optimum on the search's
    edge) are counted in ``skipped``; the interval is over the rest (NaN, NaN when none is valid). With one
    LR and one seed per batch size the interval has zero width: it says nothing about seed noise then.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    batch_sizes, medians = tuned_medians(grid_by_batch, resamples, np.random.default_rng(seed))
    b_crit = _fit_log_steps(batch_sizes, medians)[2]
    valid = b_crit[np.isfinite(b_crit)]
    if len(valid) == 0:
        return BootstrapInterval(math.nan, math.nan, 0, resamples)
    low, high = np.quantile(valid, [(1 - level) / 2, 1 - (1 - level) / 2])
    return BootstrapInterval(float(low), float(high), len(valid), resamples - len(valid))


def leave_one_out(batch_sizes: Sequence[float], steps: Sequence[float]) -> dict[float, float]:
    """The relative-error fit's b_crit without each batch size in turn (NaN where that fit is not valid):
    how much one point decides B_crit. One point per batch size; at least 4, so 3 remain."""
    batch_array, steps_array = _check_points(batch_sizes, steps)
    if len(np.unique(batch_array)) != len(batch_array):
        raise ValueError(f"leave_one_out takes one point per batch size, got {list(batch_sizes)}")
    if len(batch_array) <= MIN_BATCH_SIZES:
        raise NotEnoughBatchSizes(f"leaving one of {len(batch_array)} batch sizes out leaves too few to fit; "
                                  f"it needs at least {MIN_BATCH_SIZES + 1}")
    without = np.where(np.eye(len(batch_array), dtype=bool), np.nan, steps_array[None, :])
    b_crit = _fit_log_steps(batch_array, without)[2]
    return {float(b): float(v) for b, v in zip(batch_array, b_crit)}

"""The critical batch size from the steps/examples trade-off, as pure functions.

McCandlish et al. 2018 (eq. 2.11) and Shallue et al. 2018: with S(B) the fewest
steps to a fixed target at batch size B (the LR tuned for that B) and E = B S the
examples, S = S_min (1 + B_crit / B), i.e. S = S_min + E_min / B with
E_min = S_min B_crit. Least squares of S on 1/B gives S_min (intercept) and
E_min (slope); B_crit = E_min / S_min. A bootstrap over seeds gives an interval.

Numbers in, numbers out: which trials reached the target, which LR is best per batch
size, and what is logged are harness/analysis's business; this module only fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

MIN_BATCH_SIZES = 3


class NotEnoughBatchSizes(ValueError):
    """Fewer than 3 distinct batch sizes reached the target: two points fit any curve of this family."""


@dataclass(frozen=True)
class StepsFit:
    """S(B) = s_min + e_min / B; b_crit = e_min / s_min (NaN when the fit is not :attr:`valid`)."""

    s_min: float
    e_min: float
    b_crit: float

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
    return 1.0 / batch_array, steps_array


def _line_through(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ordinary least squares y = intercept + slope x along the last axis, so a bootstrap fits all its
    resamples at once; x is shared."""
    x_centred = x - x.mean()
    slope = (y * x_centred).sum(axis=-1) / (x_centred * x_centred).sum()
    intercept = y.mean(axis=-1) - slope * x.mean()
    return intercept, slope


def fit_steps_curve(batch_sizes: Sequence[float], steps: Sequence[float]) -> StepsFit:
    """Least squares of S on 1/B: S = S_min + E_min / B (McCandlish et al. 2018, eq. 2.11).

    ``batch_sizes`` may repeat (one point per seed); at least 3 distinct batch sizes are needed, else
    :class:`NotEnoughBatchSizes`. The residuals are in steps, so the small batch sizes (many steps) weigh
    most. A fit with S_min <= 0 or E_min <= 0 comes back with ``valid`` False, b_crit NaN and ``problem``
    saying why: never a negative critical batch size.
    """
    s_min, e_min = map(float, _line_through(*_check_points(batch_sizes, steps)))
    return StepsFit(s_min, e_min, e_min / s_min if s_min > 0 and e_min > 0 else math.nan)


@dataclass(frozen=True)
class BootstrapInterval:
    """A percentile interval of b_crit; ``used`` resamples gave a valid fit, ``skipped`` did not."""

    low: float
    high: float
    used: int
    skipped: int


def _steps_table(steps_by_batch: Mapping[int, Sequence[float]]) -> tuple[np.ndarray, list[np.ndarray]]:
    # A batch size with no steps (no seed reached the target) drops out; the
    # error below then counts only the batch sizes that reached it.
    reached = {float(batch): np.asarray(values, dtype=np.float64)
               for batch, values in steps_by_batch.items() if len(values) > 0}
    batch_sizes = sorted(reached)
    per_batch = [reached[batch] for batch in batch_sizes]
    for batch, values in zip(batch_sizes, per_batch):
        if values.ndim != 1 or not (np.all(np.isfinite(values)) and np.all(values > 0)):
            raise ValueError(f"steps to target at batch size {batch:g} must be a flat list of finite, positive "
                             f"numbers (leave out seeds that did not reach the target), got {values.tolist()}")
    _check_points(batch_sizes, [float(np.median(values)) for values in per_batch])
    return np.asarray(batch_sizes), per_batch


def bootstrap_interval(steps_by_batch: Mapping[int, Sequence[float]], resamples: int = 1000, seed: int = 0,
                       level: float = 0.9) -> BootstrapInterval:
    """Percentile bootstrap of b_crit over seeds (Efron's percentile interval).

    Each resample draws, for every batch size independently, as many seeds as it has, with replacement,
    takes their median and refits. Resamples whose fit is not valid are counted in ``skipped``; the
    interval is over the rest (NaN, NaN when none is valid). With one seed per batch size the interval has
    zero width: it says nothing about seed noise then.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    batch_sizes, per_batch = _steps_table(steps_by_batch)
    rng = np.random.default_rng(seed)
    medians = np.empty((resamples, len(batch_sizes)))
    for column, values in enumerate(per_batch):
        draws = rng.integers(0, len(values), size=(resamples, len(values)))
        medians[:, column] = np.median(values[draws], axis=1)
    s_min, e_min = _line_through(1.0 / batch_sizes, medians)
    is_valid = (s_min > 0) & (e_min > 0)
    b_crit = e_min[is_valid] / s_min[is_valid]
    used = int(is_valid.sum())
    if used == 0:
        return BootstrapInterval(math.nan, math.nan, 0, resamples)
    low, high = np.quantile(b_crit, [(1 - level) / 2, 1 - (1 - level) / 2])
    return BootstrapInterval(float(low), float(high), used, resamples - used)


def bootstrap_fit(steps_by_batch: Mapping[int, Sequence[float]], resamples: int = 1000, seed: int = 0,
                  level: float = 0.9) -> tuple[StepsFit, float, float]:
    """The fit on each batch size's MEDIAN steps, and a ``level`` percentile interval (low, high) of b_crit
    (:func:`bootstrap_interval`). ``steps_by_batch`` maps a batch size to the steps to target of its seeds
    (at its tuned LR) that reached the target; an empty list is left out. The point fit may be invalid too:
    check ``fit.valid``.
    """
    batch_sizes, per_batch = _steps_table(steps_by_batch)
    fit = fit_steps_curve(batch_sizes, [float(np.median(values)) for values in per_batch])
    interval = bootstrap_interval(steps_by_batch, resamples, seed, level)
    return fit, interval.low, interval.high

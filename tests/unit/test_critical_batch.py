"""The critical-batch fit against answers known by construction and against numpy's own least squares."""

import math

import numpy as np
import pytest

from harness.measure.critical_batch import (NotEnoughBatchSizes, StepsFit, bootstrap_fit, bootstrap_interval,
                                            fit_steps_curve)

BATCH_SIZES = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
S_MIN, B_CRIT = 150.0, 700.0


def trade_off_steps(batch_sizes, s_min=S_MIN, b_crit=B_CRIT):
    return [s_min * (1 + b_crit / b) for b in batch_sizes]


def noisy_steps_by_batch(seeds, relative_noise, data_seed):
    """Per batch size, ``seeds`` trials whose steps scatter log-normally around the true curve."""
    rng = np.random.default_rng(data_seed)
    truth = trade_off_steps(BATCH_SIZES)
    return {b: (s * np.exp(relative_noise * rng.standard_normal(seeds))).tolist() for b, s in zip(BATCH_SIZES, truth)}


def test_fit_recovers_the_trade_off_curve_exactly():
    fit = fit_steps_curve(BATCH_SIZES, trade_off_steps(BATCH_SIZES))
    assert fit.valid and fit.problem == ""
    assert fit.s_min == pytest.approx(S_MIN, rel=1e-10)
    assert fit.e_min == pytest.approx(S_MIN * B_CRIT, rel=1e-10)
    assert fit.b_crit == pytest.approx(B_CRIT, rel=1e-10)
    # E_min = S_min B_crit, and (S/S_min - 1)(E/E_min - 1) = 1 on the curve (McCandlish et al. eq. 2.11).
    for b in (16, 700, 5000):
        steps = fit.steps_at(b)
        assert steps == pytest.approx(S_MIN * (1 + B_CRIT / b), rel=1e-10)
        assert (steps / fit.s_min - 1) * (b * steps / fit.e_min - 1) == pytest.approx(1.0, rel=1e-9)


def test_fit_agrees_with_numpy_least_squares_on_noisy_points():
    rng = np.random.default_rng(3)
    batch_sizes = np.repeat(BATCH_SIZES, 3)  # three seeds per batch size, as separate points
    steps = np.array(trade_off_steps(batch_sizes)) * np.exp(0.2 * rng.standard_normal(batch_sizes.size))
    fit = fit_steps_curve(batch_sizes.tolist(), steps.tolist())
    design = np.column_stack([np.ones(batch_sizes.size), 1.0 / batch_sizes])
    (intercept, slope), *_ = np.linalg.lstsq(design, steps, rcond=None)
    assert (fit.s_min, fit.e_min) == pytest.approx((intercept, slope), rel=1e-9)
    poly_slope, poly_intercept = np.polyfit(1.0 / batch_sizes, steps, 1)
    assert (fit.s_min, fit.e_min) == pytest.approx((poly_intercept, poly_slope), rel=1e-9)
    assert fit.b_crit == pytest.approx(slope / intercept, rel=1e-9)
    assert fit.b_crit != pytest.approx(B_CRIT, rel=1e-3)  # the noise did move it: the check above is not vacuous


def test_bootstrap_interval_covers_the_true_critical_batch_size_and_shrinks_with_less_noise():
    widths = {}
    for noise in (0.2, 0.05):
        covered = 0
        for data_seed in range(20):
            fit, low, high = bootstrap_fit(noisy_steps_by_batch(5, noise, data_seed), resamples=400, seed=data_seed)
            assert fit.valid and low <= fit.b_crit <= high
            covered += low <= B_CRIT <= high
            widths.setdefault(noise, []).append(high - low)
        # A 90% interval from 5 seeds: the percentile bootstrap of a median under-covers a little.
        assert covered >= 15, f"noise {noise}: the interval covered B_crit in only {covered} of 20 data sets"
    assert np.median(widths[0.05]) < np.median(widths[0.2]) / 2.5


def test_bootstrap_point_fit_is_the_fit_on_median_steps_and_is_reproducible():
    steps_by_batch = noisy_steps_by_batch(4, 0.1, data_seed=7)
    fit, low, high = bootstrap_fit(steps_by_batch, resamples=200, seed=1)
    medians = [float(np.median(steps_by_batch[b])) for b in BATCH_SIZES]
    assert fit == fit_steps_curve(BATCH_SIZES, medians)
    assert (low, high) == bootstrap_fit(steps_by_batch, resamples=200, seed=1)[1:]
    assert (low, high) != bootstrap_fit(steps_by_batch, resamples=200, seed=2)[1:]


def test_one_seed_per_batch_size_gives_a_zero_width_interval():
    steps_by_batch = {b: [s] for b, s in zip(BATCH_SIZES, trade_off_steps(BATCH_SIZES))}
    fit, low, high = bootstrap_fit(steps_by_batch, resamples=50)
    assert low == pytest.approx(fit.b_crit) and high == pytest.approx(fit.b_crit)


def test_fewer_than_three_batch_sizes_is_refused_with_the_count():
    with pytest.raises(NotEnoughBatchSizes, match=r"only 2 batch size\(s\) reached the target.*at least 3"):
        fit_steps_curve([64, 64, 128], [900.0, 950.0, 500.0])  # three points, two batch sizes
    # Batch sizes whose seeds never reached the target (empty lists) do not count.
    with pytest.raises(NotEnoughBatchSizes, match=r"only 1 batch size"):
        bootstrap_fit({64: [900.0, 950.0], 128: [], 256: []})
    assert issubclass(NotEnoughBatchSizes, ValueError)


def test_a_fit_without_positive_coefficients_is_invalid_not_a_negative_batch_size():
    # Perfect scaling all the way (steps halve as the batch doubles, plus noise that
    # tips the intercept below zero): B_crit lies above every batch size tried.
    perfect = [100_000.0 / b for b in (64, 128, 256, 512)]
    perfect[-1] *= 0.8
    fit = fit_steps_curve([64, 128, 256, 512], perfect)
    assert fit.s_min < 0 and not fit.valid and math.isnan(fit.b_crit)
    assert "S_min" in fit.problem and "\n" not in fit.problem
    # Steps that grow with the batch size: no trade-off at all.
    rising = fit_steps_curve([64, 128, 256], [100.0, 200.0, 300.0])
    assert rising.e_min < 0 and not rising.valid and math.isnan(rising.b_crit) and "E_min" in rising.problem


def test_bootstrap_skips_invalid_resamples_and_counts_them():
    # Near-flat steps: some resamples tip E_min below zero; they are skipped, not averaged in.
    # The medians (205, 200, 198, 197) fall a little; each seed's spread (+-25) is far wider.
    steps_by_batch = {256: [180.0, 230.0, 205.0], 512: [175.0, 235.0, 200.0], 1024: [185.0, 225.0, 198.0],
                      2048: [180.0, 230.0, 197.0]}
    assert fit_steps_curve([256, 512, 1024, 2048], [205.0, 200.0, 198.0, 197.0]).valid
    interval = bootstrap_interval(steps_by_batch, resamples=500, seed=0)
    assert interval.skipped > 0 and interval.used + interval.skipped == 500
    assert 0 < interval.low <= interval.high


@pytest.mark.parametrize("bad", [{"batch_sizes": [16, 32], "steps": [1.0, 2.0, 3.0]},
                                 {"batch_sizes": [16, 32, 0], "steps": [1.0, 2.0, 3.0]},
                                 {"batch_sizes": [16, 32, 64], "steps": [1.0, math.nan, 3.0]}])
def test_malformed_points_are_refused(bad):
    with pytest.raises(ValueError):
        fit_steps_curve(**bad)


def test_steps_fit_keeps_its_interface():
    fit = StepsFit(s_min=10.0, e_min=5000.0, b_crit=500.0)
    assert fit.valid and fit.steps_at(500) == pytest.approx(20.0)

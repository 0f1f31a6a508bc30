"""The critical-batch fits and their bootstrap against answers known by construction, numpy's own least
squares and scipy's own optimiser."""

import math

import numpy as np
import pytest
from scipy.optimize import least_squares

from harness.measure.critical_batch import (LEAST_SQUARES, RELATIVE_ERROR, NotEnoughBatchSizes, SeedSteps, StepsFit,
                                            bootstrap_interval, fit_least_squares, fit_relative_error, leave_one_out,
                                            tuned_medians)

BATCH_SIZES = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
S_MIN, B_CRIT = 150.0, 700.0
# The study's tuned medians (docs/study.md, one H100): SCIENCE.md reads about 83 by least squares on 1/B.
STUDY_STEPS = [626, 627, 368, 212, 135, 126, 105, 84, 96, 70]


def trade_off_steps(batch_sizes, s_min=S_MIN, b_crit=B_CRIT):
    return [s_min * (1 + b_crit / b) for b in batch_sizes]


def scipy_relative_fit(batch_sizes, steps):
    """Independently: scipy's least squares of log S - log(S_min + E_min/B) over (log S_min, log E_min)."""
    batch_sizes, steps = np.asarray(batch_sizes, float), np.asarray(steps, float)
    start = np.log([steps.min(), steps.max() * batch_sizes.min()])
    solution = least_squares(lambda p: np.log(steps) - np.log(np.exp(p[0]) + np.exp(p[1]) / batch_sizes), start,
                             xtol=1e-15, ftol=1e-15, gtol=1e-15)
    s_min, e_min = np.exp(solution.x)
    return s_min, e_min


@pytest.mark.parametrize("fit_curve", [fit_relative_error, fit_least_squares])
@pytest.mark.parametrize("s_min, b_crit", [(S_MIN, B_CRIT), (40.0, 20.0), (3000.0, 9000.0)])
def test_both_fits_recover_the_trade_off_curve_exactly(fit_curve, s_min, b_crit):
    fit = fit_curve(BATCH_SIZES, trade_off_steps(BATCH_SIZES, s_min, b_crit))
    assert fit.valid and fit.problem == ""
    assert fit.s_min == pytest.approx(s_min, rel=1e-9)
    assert fit.e_min == pytest.approx(s_min * b_crit, rel=1e-9)
    assert fit.b_crit == pytest.approx(b_crit, rel=1e-9)
    # E_min = S_min B_crit, and (S/S_min - 1)(E/E_min - 1) = 1 on the curve (McCandlish et al. eq. 2.11).
    for b in (16, 700, 5000):
        steps = fit.steps_at(b)
        assert steps == pytest.approx(s_min * (1 + b_crit / b), rel=1e-9)
        assert (steps / fit.s_min - 1) * (b * steps / fit.e_min - 1) == pytest.approx(1.0, rel=1e-8)


def test_each_fit_says_which_method_it_is():
    assert fit_relative_error(BATCH_SIZES, trade_off_steps(BATCH_SIZES)).method == RELATIVE_ERROR
    assert fit_least_squares(BATCH_SIZES, trade_off_steps(BATCH_SIZES)).method == LEAST_SQUARES


def test_least_squares_fit_agrees_with_numpy_least_squares_on_noisy_points():
    rng = np.random.default_rng(3)
    batch_sizes = np.repeat(BATCH_SIZES, 3)  # three seeds per batch size, as separate points
    steps = np.array(trade_off_steps(batch_sizes)) * np.exp(0.2 * rng.standard_normal(batch_sizes.size))
    fit = fit_least_squares(batch_sizes.tolist(), steps.tolist())
    design = np.column_stack([np.ones(batch_sizes.size), 1.0 / batch_sizes])
    (intercept, slope), *_ = np.linalg.lstsq(design, steps, rcond=None)
    assert (fit.s_min, fit.e_min) == pytest.approx((intercept, slope), rel=1e-9)
    assert fit.b_crit == pytest.approx(slope / intercept, rel=1e-9)
    assert fit.b_crit != pytest.approx(B_CRIT, rel=1e-3)  # the noise did move it: the check above is not vacuous


@pytest.mark.parametrize("batch_sizes, steps", [
    (BATCH_SIZES, STUDY_STEPS),
    (np.repeat(BATCH_SIZES, 3).tolist(),  # three seeds per batch size, as separate points
     (np.array(trade_off_steps(np.repeat(BATCH_SIZES, 3)))
      * np.exp(0.3 * np.random.default_rng(5).standard_normal(30))).tolist())])
def test_relative_error_fit_is_scipys_least_squares_on_log_steps(batch_sizes, steps):
    fit = fit_relative_error(batch_sizes, steps)
    s_min, e_min = scipy_relative_fit(batch_sizes, steps)
    assert (fit.s_min, fit.e_min, fit.b_crit) == pytest.approx((s_min, e_min, e_min / s_min), rel=1e-6)


def test_on_the_studys_table_relative_errors_read_about_twice_the_least_squares_b_crit():
    """SCIENCE.md: the two fits give about 83 and 160 on the study's table; the small batch sizes decide least
    squares on 1/B."""
    assert fit_least_squares(BATCH_SIZES, STUDY_STEPS).b_crit == pytest.approx(83, abs=1)
    assert fit_relative_error(BATCH_SIZES, STUDY_STEPS).b_crit == pytest.approx(162, abs=1)


def test_leave_one_out_is_the_fit_without_each_batch_size():
    left_out = leave_one_out(BATCH_SIZES, STUDY_STEPS)
    assert list(left_out) == BATCH_SIZES
    for k, batch_size in enumerate(BATCH_SIZES):
        rest = [b for b in BATCH_SIZES if b != batch_size], STUDY_STEPS[:k] + STUDY_STEPS[k + 1:]
        assert left_out[batch_size] == pytest.approx(fit_relative_error(*rest).b_crit, rel=1e-9)
    assert left_out[16] == pytest.approx(221, abs=1)  # the study's smallest batch size moves B_crit the most


def test_leave_one_out_needs_four_batch_sizes_and_one_point_each():
    with pytest.raises(NotEnoughBatchSizes, match="at least 4"):
        leave_one_out([16, 32, 64], [300.0, 200.0, 150.0])
    with pytest.raises(ValueError, match="one point per batch size"):
        leave_one_out([16, 16, 32, 64], [300.0, 310.0, 200.0, 150.0])


def grid_from(steps_by_lr_by_batch):
    return {b: [SeedSteps(seeds) for seeds in by_lr] for b, by_lr in steps_by_lr_by_batch.items()}


def draw_sweep(rng, seeds, lr_slowdowns, relative_noise):
    """A sweep's steps: per batch size and LR, ``seeds`` trials scattered log-normally around the true curve
    times the LR's slowdown (1 for the best LR)."""
    truth = trade_off_steps(BATCH_SIZES)
    return {b: [s * slowdown * np.exp(relative_noise * rng.standard_normal(seeds)) for slowdown in lr_slowdowns]
            for b, s in zip(BATCH_SIZES, truth)}


def point_fit(sweep):
    """The tuning and fit harness/analysis/critical.py does: the LR with the fewest median steps, the
    relative-error fit of those medians."""
    tuned = [min(by_lr, key=np.median) for by_lr in sweep.values()]
    return fit_relative_error(list(sweep), [float(np.median(seeds)) for seeds in tuned])


def test_bootstrap_interval_covers_the_true_critical_batch_size_about_as_often_as_it_claims():
    """The 90% interval from resampling seeds and re-picking the LR covers the true B_crit in about 90% of
    synthetic sweeps (10 batch sizes, 3 LRs, 4 seeds, log-normal seed noise)."""
    rng = np.random.default_rng(11)
    draws, covered = 200, 0
    for draw in range(draws):
        sweep = draw_sweep(rng, seeds=4, lr_slowdowns=(1.0, 1.5, 2.0), relative_noise=0.2)
        interval = bootstrap_interval(grid_from(sweep), resamples=200, seed=draw)
        covered += interval.low <= B_CRIT <= interval.high
    assert 0.8 <= covered / draws <= 0.97, f"covered the true B_crit in {covered} of {draws} sweeps"


def test_resampling_the_lr_choice_widens_the_interval_where_two_lrs_tie():
    """At every batch size two LRs have the same median steps: the smaller LR (the tuned one) with a small seed
    spread, the larger with a wide one. Held fixed at the tuned LR the interval sees only the small spread;
    re-picking the LR in every resample lets the other LR's fast resamples win, as they could have in the data."""
    truth = trade_off_steps(BATCH_SIZES)
    rng = np.random.default_rng(2)
    tight, wide = [0.95, 0.98, 1.02, 1.05], [0.7, 0.9, 1.1, 1.3]
    sweep = {b: [s * rng.permutation(tight), s * rng.permutation(wide)] for b, s in zip(BATCH_SIZES, truth)}
    tuned_only = {b: by_lr[:1] for b, by_lr in sweep.items()}
    repicked, fixed = (bootstrap_interval(grid_from(g), resamples=1000, seed=0) for g in (sweep, tuned_only))
    assert repicked.high - repicked.low > 2 * (fixed.high - fixed.low) > 0


@pytest.mark.parametrize("bound, wins", [(80.0, True), (120.0, False)])
def test_a_trial_the_race_stopped_ranks_at_its_lower_bound_and_leaves_no_steps(bound, wins):
    """The race's lower bound decides whether its LR wins a resample; a winner whose seeds were all stopped has
    no steps to fit: that batch size is missing from the resample (NaN)."""
    grid = {64: [SeedSteps([100.0]), SeedSteps([math.inf], race_bounds=[bound])]}
    _, medians = tuned_medians(grid, resamples=3, rng=np.random.default_rng(0))
    assert np.isnan(medians).all() if wins else (medians == 100.0).all()


def test_a_seed_that_never_reached_counts_as_infinite_in_the_ranking_and_is_left_out_of_the_steps():
    # LR 0.1: two of three seeds never reach, so its median is infinite unless a resample draws the fast seed
    # twice or more; LR 0.2 reaches with every seed.
    grid = {64: [SeedSteps([10.0, math.inf, math.inf]), SeedSteps([50.0, 60.0, 70.0])]}
    _, medians = tuned_medians(grid, resamples=2000, rng=np.random.default_rng(0))
    fast = medians[:, 0] == 10.0
    assert 0.15 < fast.mean() < 0.35  # P(at least two of three draws are the fast seed) = 7/27
    assert set(np.unique(medians[~fast, 0])) <= {50.0, 60.0, 70.0}


def test_bootstrap_interval_is_reproducible_from_its_seed():
    sweep = grid_from(draw_sweep(np.random.default_rng(7), seeds=4, lr_slowdowns=(1.0, 1.2), relative_noise=0.1))
    first = bootstrap_interval(sweep, resamples=200, seed=1)
    assert first == bootstrap_interval(sweep, resamples=200, seed=1)
    assert first != bootstrap_interval(sweep, resamples=200, seed=2)
    assert first.used == 200 and first.low < first.high


def test_one_seed_per_batch_size_gives_a_zero_width_interval():
    fit = fit_relative_error(BATCH_SIZES, trade_off_steps(BATCH_SIZES))
    interval = bootstrap_interval({b: [SeedSteps([s])] for b, s in zip(BATCH_SIZES, trade_off_steps(BATCH_SIZES))},
                                  resamples=50)
    assert interval.low == pytest.approx(fit.b_crit) and interval.high == pytest.approx(fit.b_crit)


@pytest.mark.parametrize("fit_curve", [fit_relative_error, fit_least_squares])
def test_fewer_than_three_batch_sizes_is_refused_with_the_count(fit_curve):
    with pytest.raises(NotEnoughBatchSizes, match=r"only 2 batch size\(s\) reached the target.*at least 3"):
        fit_curve([64, 64, 128], [900.0, 950.0, 500.0])  # three points, two batch sizes
    assert issubclass(NotEnoughBatchSizes, ValueError)


@pytest.mark.parametrize("fit_curve", [fit_relative_error, fit_least_squares])
def test_a_fit_without_positive_coefficients_is_invalid_not_a_negative_batch_size(fit_curve):
    # Perfect scaling all the way (steps halve as the batch doubles, and the last point falls faster still):
    # B_crit lies above every batch size tried.
    perfect = [100_000.0 / b for b in (64, 128, 256, 512)]
    perfect[-1] *= 0.8
    fit = fit_curve([64, 128, 256, 512], perfect)
    assert not fit.s_min > 0 and not fit.valid and math.isnan(fit.b_crit)
    assert "S_min" in fit.problem and "\n" not in fit.problem
    # Steps that grow with the batch size: no trade-off at all.
    rising = fit_curve([64, 128, 256], [100.0, 200.0, 300.0])
    assert not rising.e_min > 0 and not rising.valid and math.isnan(rising.b_crit) and "E_min" in rising.problem


def test_bootstrap_skips_invalid_resamples_and_counts_them():
    # Near-flat steps: some resamples rise with the batch size; they are skipped, not averaged in.
    # The medians (205, 200, 198, 197) fall a little; each seed's spread (+-25) is far wider.
    steps_by_batch = {256: [180.0, 230.0, 205.0], 512: [175.0, 235.0, 200.0], 1024: [185.0, 225.0, 198.0],
                      2048: [180.0, 230.0, 197.0]}
    assert fit_relative_error(list(steps_by_batch), [205.0, 200.0, 198.0, 197.0]).valid
    interval = bootstrap_interval({b: [SeedSteps(s)] for b, s in steps_by_batch.items()}, resamples=500, seed=0)
    assert interval.skipped > 0 and interval.used + interval.skipped == 500
    assert 0 < interval.low <= interval.high


@pytest.mark.parametrize("fit_curve", [fit_relative_error, fit_least_squares])
@pytest.mark.parametrize("bad", [{"batch_sizes": [16, 32], "steps": [1.0, 2.0, 3.0]},
                                 {"batch_sizes": [16, 32, 0], "steps": [1.0, 2.0, 3.0]},
                                 {"batch_sizes": [16, 32, 64], "steps": [1.0, math.nan, 3.0]}])
def test_malformed_points_are_refused(fit_curve, bad):
    with pytest.raises(ValueError):
        fit_curve(**bad)


@pytest.mark.parametrize("cell", [SeedSteps([]), SeedSteps([1.0, math.nan]), SeedSteps([1.0, 2.0], [3.0]),
                                  SeedSteps([0.0])])
def test_malformed_seed_steps_are_refused(cell):
    with pytest.raises(ValueError):
        bootstrap_interval({16: [cell], 32: [SeedSteps([5.0])], 64: [SeedSteps([4.0])]}, resamples=5)


def test_steps_fit_keeps_its_interface():
    fit = StepsFit(s_min=10.0, e_min=5000.0, b_crit=500.0)
    assert fit.valid and fit.steps_at(500) == pytest.approx(20.0) and fit.method == RELATIVE_ERROR


def test_the_report_reads_b_simple_and_b_noise_as_the_training_sets_from_their_logged_components():
    from harness.analysis.critical import population_noise_scales

    final = {"grad_trace_cov_exact_at_target_0.8": 8.0, "grad_sq_norm_exact_at_target_0.8": 0.1,
             "grad_noise_scale_exact_at_target_0.8": 80.0,  # the ratio over the 1024 examples alone
             "grad_trace_hess_cov_at_target": 3.0, "grad_hess_grad_at_target": 0.01,
             "grad_noise_scale_hessian_at_target": 300.0}
    out = population_noise_scales(final, {"metrics.exact_noise_samples": "1024",
                                          "metrics.hessian_noise_samples": "256"})
    assert out["grad_noise_scale_exact_at_target_0.8"] == pytest.approx(8.0 / (0.1 - 8.0 / 1024))
    # 0.01 - 3/256 < 0: B_noise is not small against 256 examples, and nothing is read.
    assert "grad_noise_scale_hessian_at_target" not in out
    assert population_noise_scales(final, {}) == final  # without the counts, as logged


@pytest.mark.parametrize("std_error, expected", [(0.2, 1.0 / (0.01 - 1.0 / 256)), (0.8, math.inf)],
                         ids=["resolved", "unresolved"])
def test_b_noise_is_unresolved_where_two_standard_errors_of_its_trace_leave_no_denominator(std_error, expected):
    from harness.analysis.critical import population_noise_scales

    final = {"grad_trace_hess_cov_at_target_0.85": 1.0, "grad_hess_grad_at_target_0.85": 0.01,
             "grad_trace_hess_cov_std_error_at_target_0.85": std_error}
    out = population_noise_scales(final, {"metrics.hessian_noise_samples": "256"})
    # 0.01 - (1 + 2 x 0.2) / 256 > 0, the value bounded; 0.01 - (1 + 2 x 0.8) / 256 < 0: any size fits.
    assert out["grad_noise_scale_hessian_at_target_0.85"] == pytest.approx(expected)

"""The equal-training-loss view of a sweep (harness/results/minima.py) and the escape experiment."""

from __future__ import annotations


import pytest

from harness.results import minima
from harness.results.report import TrialRecord


def heavy_ball_stays_bounded(curvature: float, lr: float, momentum: float, steps: int = 4000) -> bool:
    """PyTorch's SGD (dampening 0) on f(x) = curvature/2 x^2 from x = 1: does |x| stay bounded?"""
    x, buf = 1.0, 0.0
    for _ in range(steps):
        buf = momentum * buf + curvature * x
        x -= lr * buf
        if abs(x) > 1e6:
            return False
    return True


@pytest.mark.parametrize("lr,momentum", [(0.1, 0.9), (0.05, 0.0), (0.4, 0.5)])
def test_stability_limit_is_where_heavy_ball_on_a_quadratic_starts_to_diverge(lr, momentum):
    # Independent of the formula: simulate the optimizer the harness uses on a quadratic
    # just below and just above 2(1+β)/η.
    limit = minima.stability_limit(lr, momentum)
    assert heavy_ball_stays_bounded(limit * 0.99, lr, momentum)
    assert not heavy_ball_stays_bounded(limit * 1.01, lr, momentum)


def trial(batch_size: int, seed: int, final: dict, diverged: bool = False, lr: float = 0.1) -> TrialRecord:
    return TrialRecord(run_id=f"r{batch_size}-{seed}", name=f"t-bs{batch_size}-seed{seed}", lr_rule="sqrt",
                       batch_size=batch_size, lr=lr, seed=seed, status="FINISHED", diverged=diverged, final=final,
                       momentum=0.9, target_train_loss=0.2)


def test_a_trial_that_ran_out_of_budget_is_counted_but_not_averaged_into_the_equal_loss_columns():
    reached = {"steps_to_train_loss_target": 100.0, "epochs_to_train_loss_target": 2.0, "test_accuracy": 0.85,
               "test_loss": 0.44, "train_loss": 0.199, "generalization_gap_accuracy": 0.08,
               "generalization_gap_loss": 0.24, "top_hessian_eigenvalue": 12.0}
    out_of_budget = {"test_accuracy": 0.70, "test_loss": 0.9, "train_loss": 0.6, "top_hessian_eigenvalue": 3.0}
    rows = minima.equal_loss_rows([trial(32, 0, reached), trial(32, 1, out_of_budget)])
    (row,) = rows
    assert (row.seeds, row.reached) == (2, 1)
    assert row.stats["test_accuracy"] == (0.85, 0.0)
    assert row.stats["sharpness"] == (12.0, 0.0)
    assert row.limit == pytest.approx(2 * 1.9 / 0.1)
    table = minima.markdown(rows, 0.2)
    assert "| sqrt | 32 | 0.1 | 1/2 | 100 ± 0 |" in table


def test_the_interpolation_pair_is_the_smallest_and_largest_healthy_batch_of_one_seed():
    ok = {"steps_to_train_loss_target": 10.0}
    trials = [trial(16, 0, {}, diverged=True), trial(32, 1, ok), trial(32, 0, ok), trial(256, 0, ok),
              trial(2048, 0, {}),  # never reached the loss: not healthy
              trial(1024, 0, ok), trial(1024, 1, ok)]
    small, large = minima.interpolation_pair(trials)
    assert (small.batch_size, small.seed, large.batch_size, large.seed) == (32, 0, 1024, 0)
    assert minima.interpolation_pair([trial(32, 0, ok)]) is None

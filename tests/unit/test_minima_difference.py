"""The poor-minima table's test of its claim: test accuracy at the smallest batch minus at the largest, with
Welch's interval and p-value, over the seeds that reached the training-loss target."""

import math

import pytest
from scipy import stats

from harness.analysis.minima import extremes_difference
from harness.analysis.report import TrialRecord

SMALL = [0.853, 0.850, 0.856, 0.851, 0.855]
LARGE = [0.841, 0.832, 0.850, 0.838, 0.844]


def record(batch_size, seed, accuracy, reached=True):
    final = {"test_accuracy": accuracy, **({"steps_to_train_loss_target": 100.0} if reached else {})}
    return TrialRecord(f"r{batch_size}-{seed}", "t", "sqrt", batch_size, 0.1, seed, False, final,
                       target_train_loss=0.2)


def trials():
    return ([record(32, s, a) for s, a in enumerate(SMALL)] + [record(256, s, 0.9) for s in range(5)]
            + [record(2048, s, a) for s, a in enumerate(LARGE)] + [record(2048, 9, 0.1, reached=False)]
            + [record(4096, 0, 0.5)])  # one seed: too few to compare


def test_the_difference_of_the_extremes_is_welchs_interval_and_p_value_computed_by_hand():
    (difference,) = extremes_difference(trials())
    assert (difference.small, difference.large) == (32, 2048)  # 4096 has one seed; 256 lies between
    n1, n2 = len(SMALL), len(LARGE)
    m1, m2 = sum(SMALL) / n1, sum(LARGE) / n2
    v1 = sum((a - m1) ** 2 for a in SMALL) / (n1 - 1) / n1
    v2 = sum((a - m2) ** 2 for a in LARGE) / (n2 - 1) / n2
    dof = (v1 + v2) ** 2 / (v1 ** 2 / (n1 - 1) + v2 ** 2 / (n2 - 1))  # Welch-Satterthwaite
    half = stats.t.ppf(0.975, dof) * math.sqrt(v1 + v2)
    assert difference.difference == pytest.approx(m1 - m2, abs=1e-12)
    assert (difference.low, difference.high) == pytest.approx((m1 - m2 - half, m1 - m2 + half), rel=1e-9)
    assert difference.p_value == pytest.approx(2 * stats.t.sf((m1 - m2) / math.sqrt(v1 + v2), dof), rel=1e-9)
    assert "+0.0120" in difference.line() and "5 and 5 seeds" in difference.line()


@pytest.mark.parametrize("param, expected", [("0.2", 0.2), ("(0.3, 0.2)", 0.2), ("None", None), (None, None)])
def test_a_trial_is_compared_at_its_smallest_training_loss_target(param, expected):
    from harness.analysis.report import _smallest_loss_target

    assert _smallest_loss_target(param) == expected

"""The lines a sweep's report opens with say the tables' numbers in words, and say in one line what a
sweep's design cannot support (one LR per batch size: no B_crit; one seed: no interval) instead of printing it.

Trials are synthetic records with steps S = S_MIN (1 + B_CRIT / B) at the best LR (the other LR 1.5x
slower), so the tuned steps, the scaling factors and the gaps are known here without the analysis.
"""

import math

import pytest

from harness.analysis import answer, critical
from harness.analysis.report import TrialRecord

S_MIN, B_CRIT = 80.0, 150.0
SIZES = (32, 128, 512, 2048)


def trial(batch_size, lr, seed, steps, gap):
    final = {"steps_to_target": steps, "generalization_gap_accuracy": gap}
    return TrialRecord("id", "name", "none", batch_size, lr, seed, False, final)


def sweep(lrs=(0.05, 0.1, 0.2), seeds=(0, 1, 2), gap_at=lambda batch_size, seed: 0.010 + 0.001 * seed):
    """Best LR 0.1 everywhere (the others take 1.5x the steps); a seed adds a step."""
    return [trial(b, lr, s, (1.0 if lr == 0.1 else 1.5) * S_MIN * (1 + B_CRIT / b) + s, gap_at(b, s))
            for b in SIZES for lr in lrs for s in seeds]


def results_of(trials):
    return [critical.critical_batch("none", critical.tune(trials), resamples=200)]


def test_the_answer_says_the_tuned_steps_the_scaling_b_crit_with_its_interval_and_the_gap():
    results = results_of(sweep())
    lines = answer.plain_answer(results, [], stopped_at_target=True, target_text="0.8")
    steps = {b: S_MIN * (1 + B_CRIT / b) + 1 for b in SIZES}  # the median seed adds one step
    assert lines[0] == ("The answer: 36 trials, batch 32 to 2048, 3 LRs x 3 seeds per batch size, trained to "
                        "held-out accuracy 0.8.")
    assert lines[1].endswith(", ".join(f"{b}: {steps[b]:.0f}" for b in SIZES) + ".")
    cuts = [steps[small] / steps[large] for small, large in zip(SIZES, SIZES[1:])]
    assert all(f"({large // small}x the batch): {cut:.2g}x fewer" in lines[2]
               for (small, large), cut in zip(zip(SIZES, SIZES[1:]), cuts))
    fit = results[0].fit
    assert fit.b_crit == pytest.approx(B_CRIT, rel=0.05)
    assert lines[3].startswith(f"- Critical batch size B_crit = {fit.b_crit:.0f} (90% interval "
                               f"{results[0].low:.0f}..{results[0].high:.0f} over seeds and the LR choice)")
    assert lines[4] == ("- Generalization gap (train minus test accuracy) when each run stopped at the target: "
                        "0.0110 ± 0.0010 at batch 32, 0.0110 ± 0.0010 at batch 2048: the same within the seeds' "
                        "spread.")


def test_a_gap_beyond_the_seeds_spread_is_called_larger_and_a_best_lr_on_the_grids_edge_is_named():
    trials = sweep(lrs=(0.1, 0.2),
                   gap_at=lambda batch_size, seed: 0.010 + 0.001 * seed + (0.02 if batch_size == 2048 else 0))
    lines = answer.plain_answer(results_of(trials), [], stopped_at_target=False)
    assert lines[4] == ("- The best LR sits on the grid's edge at batch 32 (smallest), 128 (smallest), 512 (smallest), "
                        "2048 (smallest): a wider grid may find fewer steps there.")
    gap = lines[-1]
    assert gap.startswith("- Generalization gap (train minus test accuracy) at the end of each run")
    assert gap.endswith("larger at the larger batch, by 0.0200.")


def test_one_lr_per_batch_size_gives_no_b_crit_and_says_why_in_one_line():
    results = results_of(sweep(lrs=(0.1,)))
    assert results[0].fit is None and "one LR per batch size" in results[0].why_no_fit
    single, _series = critical.parent_metrics(results)
    assert "critical_batch_size" not in single
    lines = answer.plain_answer(results, [], stopped_at_target=True)
    assert sum("B_crit" in line for line in lines) == 1
    assert lines[3] == ("- No B_crit for lr rule none: one LR per batch size, so no batch size's steps are its fewest "
                        "(B_crit is read from steps with the LR tuned per batch size); sweep.lr_factors with 2 or more "
                        "values tunes it.")


def test_one_seed_gives_b_crit_without_an_interval():
    results = results_of(sweep(seeds=(0,)))
    assert results[0].fit is not None and math.isnan(results[0].low) and math.isnan(results[0].high)
    single, _series = critical.parent_metrics(results)
    assert "critical_batch_size" in single and "critical_batch_size_low" not in single
    line = answer.plain_answer(results, [], stopped_at_target=True)[3]
    assert f"B_crit = {results[0].fit.b_crit:.0f} ({critical.NO_INTERVAL})" in line
    assert critical.NO_INTERVAL in critical.answer_line(results[0]) and ".." not in critical.answer_line(results[0])


def test_a_sweep_without_a_target_answers_with_test_accuracy_per_batch_size():
    from harness.analysis.minima import CellRow

    rows = [CellRow("none", b, lr, 0.9, 2, 0, 0, {"test_accuracy": (acc, 0.01)})
            for b, lr, acc in ((64, 0.1, 0.86), (64, 0.2, 0.85), (8192, 0.1, 0.70))]
    assert answer.plain_answer([], rows, stopped_at_target=False) == [
        "The answer: no target (metrics.target_val_accuracy), so no steps to compare and no B_crit; the same budget "
        "for every batch size gives test accuracy (best LR, mean over seeds) 64: 0.8600, 8192: 0.7000."]

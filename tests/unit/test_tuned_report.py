"""The report of a sweep with an LR grid, read from a real MLflow store: the tuned LR per batch size,
the grid-edge flag, B_crit from the fits of S(B) with its bootstrap interval, per target, the parent's
metrics and the figures.

The child runs are synthetic but written through MlflowClient into a SQLite store, exactly where
a sweep's trials put them: steps to each of two targets follow S = S_min (1 + B_crit/B) with seeded
noise, times a penalty that grows with the distance from a known best LR, so the right answer is known.
Expected numbers are computed here independently (scipy's and numpy's least squares, statistics.median).
"""

import math
import statistics

import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from scipy.optimize import least_squares

from conftest import seeded_store
from harness.analysis import critical
from harness.analysis.report import build_report
from harness.sweeps.sweep import where_the_time_went

S_MIN, B_CRIT = 100.0, 200.0
# The sweep logs numbers for two held-out accuracy targets; the unsuffixed keys hold the larger one's.
EASY_TARGET, TARGET = 0.7, 0.8
EASY_S_MIN, EASY_B_CRIT = 40.0, 50.0
BATCH_SIZES = (16, 32, 64, 128, 256, 512, 1024)
LRS = (0.01, 0.03, 0.1)
SEEDS = (0, 1, 2)
# Index of the best LR: the middle of the grid, except on its two edges.
BEST = {16: 0, 1024: 2}
BEST_DEFAULT = 1
# At B=64, LR 0.1 has one seed far faster than anything else but two seeds that never reach the
# target: its median is infinite and it must not win. At B=512 one seed of the best LR never reaches.
TRAP = (64, 2)
BEST_SEED_MISSING = (512, 1)
FIGURES = ("tuned_steps_vs_batch.png", "tuned_samples_vs_batch.png", "pareto_front.png")
PER_TARGET_FIGURE = "critical_batch_vs_target.png"


def best_index(batch_size):
    return BEST.get(batch_size, BEST_DEFAULT)


def synthetic_steps(batch_size, lr_index, seed, rng, s_min=S_MIN, b_crit=B_CRIT):
    """Steps to target, or None where the trial never reached it."""
    if (batch_size, lr_index) == TRAP:
        return s_min * (1 + b_crit / batch_size) * 0.3 if seed == 2 else None
    if (batch_size, seed) == BEST_SEED_MISSING and lr_index == best_index(batch_size):
        return None
    penalty = 1 + 0.6 * abs(lr_index - best_index(batch_size))
    return round(s_min * (1 + b_crit / batch_size) * penalty * rng.lognormal(0.0, 0.03))


def noise_scales(batch_size, seed, target=TARGET):
    """(probe, exact, B_noise) a trial logs at its target: distinct per trial and target, so a median can
    be checked."""
    probe = (150.0 + 10 * seed + batch_size / 64) * (1 if target == TARGET else 0.5)
    return probe, 1.7 * probe, 2.3 * probe


def target_metrics(steps, batch_size, seed, target):
    """A trial's numbers at one target, with the keys' suffix f"_{target:g}"."""
    probe, exact, hessian = noise_scales(batch_size, seed, target)
    return {f"{key}_{target:g}": value for key, value in
            {"steps_to_target": steps, "samples_to_target": steps * batch_size, "grad_noise_scale_at_target": probe,
             "grad_noise_scale_exact_at_target": exact, "grad_noise_scale_hessian_at_target": hessian}.items()}


def log_sweep(uri, batch_sizes=BATCH_SIZES, lrs=LRS, reached=lambda b: True, time_probe=False, two_targets=False):
    """A parent run tagged as a sweep and one child per (batch size, LR, seed), as the trackers write them;
    ``two_targets``: each trial also logs its numbers per target (suffixed keys), the easier target too."""
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("tuned")
    parent = client.create_run(experiment, run_name="grid", tags={"run_kind": "sweep"}).info.run_id
    client.log_param(parent, "metrics.target_val_accuracy", "0.8")
    rng = np.random.default_rng(7)
    expected = {}
    for batch_size in batch_sizes:
        for lr_index, lr in enumerate(lrs):
            for seed in SEEDS:
                steps = synthetic_steps(batch_size, lr_index, seed, rng) if reached(batch_size) else None
                expected[(batch_size, lr, seed)] = steps
                name = f"grid-none-bs{batch_size}-lr{lr:.6g}-seed{seed}"
                tags = {"mlflow.parentRunId": parent, "trial": name}
                if steps is None and seed == 0:
                    tags["diverged"] = "true"
                run = client.create_run(experiment, run_name=f"bs{batch_size} lr{lr:.4g} s{seed} none", tags=tags)
                run_id = run.info.run_id
                params = {"batch_size": batch_size, "lr": lr, "seed": seed, "lr_rule": "none"}
                metrics = {"test_accuracy": 0.8 if steps else 0.5, "time_train_s": 2.0, "time_eval_s": 0.25,
                           "time_tracking_s": 0.125}
                if time_probe:
                    metrics["time_probe_s"] = 0.5
                if steps is not None:
                    probe, exact, hessian = noise_scales(batch_size, seed)
                    metrics.update(steps_to_target=steps, samples_to_target=steps * batch_size,
                                   grad_noise_scale_at_target=probe, grad_noise_scale_exact_at_target=exact,
                                   grad_noise_scale_hessian_at_target=hessian)
                if two_targets:  # a trial that never reached the larger target did not reach the easier one here
                    easy = steps and synthetic_steps(batch_size, lr_index, seed, rng, EASY_S_MIN, EASY_B_CRIT)
                    expected[(batch_size, lr, seed, EASY_TARGET)] = easy
                    metrics.update(target_metrics(steps, batch_size, seed, TARGET) if steps else {})
                    metrics.update(target_metrics(easy, batch_size, seed, EASY_TARGET) if easy else {})
                client.log_batch(run_id, metrics=[Metric(k, v, 0, 1) for k, v in metrics.items()],
                                 params=[Param(k, str(v)) for k, v in params.items()])
                client.set_terminated(run_id, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return client, parent, expected


@pytest.fixture(scope="module")
def tuned_sweep(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tuned")
    uri = seeded_store(directory)
    client, parent, expected = log_sweep(uri, two_targets=True)
    report = build_report(uri, "tuned", sweep_run_id=parent, out_dir=directory / "reports")
    return client, parent, expected, report


def median_with_misses(values):
    return statistics.median([math.inf if v is None else v for v in values])


def expected_tuned(expected, target=TARGET):
    """Independently of harness/analysis/critical.py: the best LR is known by construction."""
    out = {}
    for batch_size in BATCH_SIZES:
        lr = LRS[best_index(batch_size)]
        seeds = [expected[(batch_size, lr, s) + (() if target == TARGET else (target,))] for s in SEEDS]
        out[batch_size] = (lr, median_with_misses(seeds), [v for v in seeds if v is not None])
    return out


def history(client, run_id, key):
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_report_picks_the_known_best_lr_and_ignores_an_lr_whose_median_never_reached(tuned_sweep):
    client, parent, expected, report = tuned_sweep
    tuned = {t.batch_size: t for t in report.critical[-1].tuned}  # the largest target's
    want = expected_tuned(expected)
    assert {b: t.best.lr for b, t in tuned.items()} == {b: w[0] for b, w in want.items()}
    # The trap: one seed of LR 0.1 at B=64 is the fastest trial of that batch size, yet two seeds never reached.
    fastest = min((expected[(64, lr, s)], lr) for lr in LRS for s in SEEDS if expected[(64, lr, s)] is not None)
    assert fastest[1] == LRS[TRAP[1]] and tuned[64].best.lr != LRS[TRAP[1]]
    # A seed that never reached counts as infinitely many steps in the median.
    assert tuned[512].best.median_steps == want[512][1] == max(want[512][2])
    assert history(client, parent, "tuned_lr") == {b: pytest.approx(w[0]) for b, w in want.items()}
    assert history(client, parent, "tuned_steps_to_target") == {b: pytest.approx(w[1]) for b, w in want.items()}
    samples = {b: median_with_misses([None if expected[(b, w[0], s)] is None else expected[(b, w[0], s)] * b
                                      for s in SEEDS]) for b, w in want.items()}
    assert history(client, parent, "tuned_samples_to_target") == pytest.approx(samples)


def test_a_best_lr_on_the_grids_edge_is_flagged(tuned_sweep):
    _client, _parent, _expected, report = tuned_sweep
    edges = {t.batch_size: t.edge for t in report.critical[-1].tuned}
    assert edges == {b: {16: "smallest", 1024: "largest"}.get(b, "") for b in BATCH_SIZES}
    assert "Best LR on the grid's edge (the optimum may lie beyond it; widen the grid): 16 (smallest), " \
           "1024 (largest)." in report.markdown_table
    assert "| 1024 | 0.1 | largest | 3 |" in report.markdown_table


def relative_error_fit(batch_sizes, medians):
    """scipy's least squares of log S - log(S_min + E_min/B) over (log S_min, log E_min): (S_min, E_min)."""
    batch_sizes, medians = np.asarray(batch_sizes, float), np.asarray(medians, float)
    solution = least_squares(lambda p: np.log(medians) - np.log(np.exp(p[0]) + np.exp(p[1]) / batch_sizes),
                             np.log([medians.min(), medians.max() * batch_sizes.min()]), xtol=1e-15, ftol=1e-15)
    return tuple(np.exp(solution.x))


def test_b_crit_is_recovered_within_its_interval_and_matches_scipys_fit_of_log_steps(tuned_sweep):
    client, parent, expected, report = tuned_sweep
    metrics = client.get_run(parent).data.metrics
    b_crit, low, high = (metrics[k] for k in ("critical_batch_size", "critical_batch_size_low",
                                              "critical_batch_size_high"))
    assert low < B_CRIT < high and low < b_crit < high
    assert b_crit == pytest.approx(B_CRIT, rel=0.1)
    want = expected_tuned(expected)
    medians = [statistics.median(want[b][2]) for b in BATCH_SIZES]  # over the tuned seeds that reached
    s_min, e_min = relative_error_fit(BATCH_SIZES, medians)
    assert metrics["min_steps_to_target"] == pytest.approx(s_min, rel=1e-6)
    assert metrics["min_samples_to_target"] == pytest.approx(e_min, rel=1e-6)
    assert b_crit == pytest.approx(e_min / s_min, rel=1e-6)
    assert metrics["critical_batch_size_resamples_skipped"] == report.critical[-1].resamples_skipped == 0


def test_least_squares_on_inverse_batch_size_is_logged_and_reported_beside_it(tuned_sweep):
    client, parent, expected, report = tuned_sweep
    metrics = client.get_run(parent).data.metrics
    want = expected_tuned(expected)
    design = np.array([[1.0, 1.0 / b] for b in BATCH_SIZES])
    medians = np.array([statistics.median(want[b][2]) for b in BATCH_SIZES])
    (s_min, e_min), *_ = np.linalg.lstsq(design, medians, rcond=None)
    assert metrics["critical_batch_size_least_squares"] == pytest.approx(e_min / s_min, rel=1e-9)
    assert (f"B_crit = {metrics['critical_batch_size']:.4g} (relative-error fit, 90% interval "
            f"{metrics['critical_batch_size_low']:.4g}..{metrics['critical_batch_size_high']:.4g} over seeds and the "
            f"LR choice); least squares on 1/B gives {e_min / s_min:.4g}") in report.markdown_table


def test_leave_one_batch_size_out_is_reported_with_the_most_b_crit_moves(tuned_sweep):
    client, parent, _expected, report = tuned_sweep
    result = report.critical[-1]
    assert list(result.leave_one_out) == list(BATCH_SIZES)
    moves = ", ".join(f"B={b} → {v:.4g}" for b, v in result.leave_one_out.items())
    ratio = max(max(v, result.fit.b_crit) / min(v, result.fit.b_crit) for v in result.leave_one_out.values())
    assert f"Leaving one batch size out (relative-error fit): {moves}; B_crit moves by at most a factor of " \
           f"{ratio:.2f}." in report.markdown_table
    metrics = client.get_run(parent).data.metrics
    assert metrics["critical_batch_size_leave_one_out_max_ratio"] == pytest.approx(ratio)


def test_noise_scale_is_the_median_over_the_tuned_trials_around_b_crit(tuned_sweep):
    client, parent, expected, _report = tuned_sweep
    run = client.get_run(parent)
    assert run.data.tags["grad_noise_scale_batch_sizes_none"] == "128,256"  # B_crit ~ 200 lies between
    want = expected_tuned(expected)
    trials = [(b, s) for b in (128, 256) for s in SEEDS if expected[(b, want[b][0], s)] is not None]
    assert run.data.metrics["grad_noise_scale_at_target"] == pytest.approx(
        statistics.median(noise_scales(b, s)[0] for b, s in trials))
    assert run.data.metrics["grad_noise_scale_exact"] == pytest.approx(
        statistics.median(noise_scales(b, s)[1] for b, s in trials))
    assert run.data.metrics["grad_noise_scale_hessian"] == pytest.approx(
        statistics.median(noise_scales(b, s)[2] for b, s in trials))


def test_each_target_gets_its_own_fit_and_the_parent_plots_b_crit_against_the_target(tuned_sweep):
    client, parent, expected, report = tuned_sweep
    easy, hard = report.critical
    assert (easy.target, hard.target) == (EASY_TARGET, TARGET)
    assert easy.low < easy.fit.b_crit < easy.high and easy.fit.b_crit == pytest.approx(EASY_B_CRIT, rel=0.15)
    medians = [statistics.median(w[2]) for w in expected_tuned(expected, EASY_TARGET).values()]
    assert easy.fit.b_crit == pytest.approx(np.divide(*relative_error_fit(BATCH_SIZES, medians)[::-1]), rel=1e-6)
    metrics = client.get_run(parent).data.metrics
    assert history(client, parent, "critical_batch_size_by_target") == {
        700: pytest.approx(easy.fit.b_crit), 800: pytest.approx(metrics["critical_batch_size"])}
    assert history(client, parent, "grad_noise_scale_hessian_by_target")[800] == metrics["grad_noise_scale_hessian"]
    assert set(history(client, parent, "critical_batch_size_high_by_target")) == {700, 800}
    for b_crit_text in (f"| 0.7 | {easy.fit.b_crit:.4g} ({easy.low:.4g}..{easy.high:.4g}) |",
                        f"| 0.8 | {hard.fit.b_crit:.4g} ({hard.low:.4g}..{hard.high:.4g}) |"):
        assert b_crit_text in report.markdown_table
    assert "| batch | 0.7 | 0.8 |" in report.markdown_table  # the tuned steps per target
    assert (report.directory / PER_TARGET_FIGURE).stat().st_size > 0
    assert f"report/{PER_TARGET_FIGURE}" in {a.path for a in client.list_artifacts(parent, "report")}


def test_targets_come_from_the_suffixed_keys_and_a_race_bound_holds_only_where_the_trial_had_not_reached():
    reached_both = critical_trial(32, 0.1, 0, 400.0)
    reached_both.final.update({"steps_to_target_0.7": 200.0, "steps_to_target_0.8": 400.0})
    stopped = critical_trial(32, 0.3, 0, None)  # reached 0.7 at step 300, stopped by the race at 500
    stopped.final.update({"steps_to_target_0.7": 300.0, critical.RACE_BOUND: 500.0})
    assert critical.targets([reached_both, stopped]) == [0.7, 0.8]
    easy, hard = (critical.at_target(stopped, t, 0.8) for t in (0.7, 0.8))
    assert (critical.steps_of(easy), critical.race_bound(easy)) == (300.0, math.inf)
    assert (critical.steps_of(hard), critical.race_bound(hard)) == (math.inf, 500.0)
    assert critical.steps_of(critical.at_target(reached_both, 0.8, 0.8)) == 400.0
    assert critical.targets([critical_trial(32, 0.1, 0, 400.0)]) == [None]  # one target: the unsuffixed keys


def test_report_writes_the_figures_and_states_b_crit_beside_b_simple(tuned_sweep):
    client, parent, _expected, report = tuned_sweep
    for name in FIGURES:
        assert (report.directory / name).stat().st_size > 0, name
    assert {f"report/{name}" for name in FIGURES} <= {a.path for a in client.list_artifacts(parent, "report")}
    metrics = client.get_run(parent).data.metrics
    ratio = metrics["critical_batch_size"] / metrics["grad_noise_scale_at_target"]
    assert f"B_crit / B_simple = {ratio:.2f}" in report.markdown_table
    assert "at batch sizes 128, 256 (the nearest to B_crit)" in report.markdown_table


def test_time_is_summed_over_trials_and_a_missing_metric_is_not_recorded(tuned_sweep):
    _client, _parent, _expected, report = tuned_sweep
    trials = len(BATCH_SIZES) * len(LRS) * len(SEEDS)
    assert report.time_spent == {"time_train_s": 2.0 * trials, "time_eval_s": 0.25 * trials,
                                 "time_epoch_eval_s": None, "time_probe_s": None, "time_sharpness_s": None,
                                 "time_tracking_s": 0.125 * trials, "time_replay_s": None}
    line = where_the_time_went(report.time_spent, elapsed_s=2.0 * trials * 2)
    minutes, seconds = divmod(round(2.0 * trials), 60)
    assert f"training {minutes}m{seconds:02d}s (50%)" in line and "probes not recorded" in line
    assert "epoch-end evaluation not recorded" in line
    assert "sharpness not recorded" in line
    assert "evaluation / training = 12%" in line  # 0.25 s of evaluation per 2 s of training
    # Resumed: the trials' times hold an earlier launch's too, and the shares are of their sum, never above 100%.
    resumed = where_the_time_went(report.time_spent, elapsed_s=1.0)
    assert "share of their sum " in resumed and f"training {minutes}m{seconds:02d}s (84%)" in resumed


def test_fewer_than_three_batch_sizes_reaching_the_target_says_why_and_logs_no_fit(tmp_path):
    uri = seeded_store(tmp_path)
    client, parent, _ = log_sweep(uri, batch_sizes=(16, 32, 64), lrs=(0.01, 0.03), reached=lambda b: b < 64)
    report = build_report(uri, "tuned", sweep_run_id=parent, out_dir=tmp_path / "reports")
    why = "no fit of S(B) for lr rule none: 2 batch size(s) reached the target (16, 32); it needs at least 3"
    assert report.critical[0].why_no_fit == why and why in report.markdown_table
    metrics = client.get_run(parent).data.metrics
    assert "critical_batch_size" not in metrics and "grad_noise_scale_at_target" not in metrics
    assert set(history(client, parent, "tuned_lr")) == {16, 32}
    assert "| 64 | none reached | no | 2 | not reached |" in report.markdown_table
    for name in FIGURES:
        assert (report.directory / name).stat().st_size > 0, name


def test_steps_that_grow_with_the_batch_size_give_no_critical_batch_size(tmp_path):
    """An invalid fit (E_min < 0) is reported with its reason, never logged as a negative B_crit."""
    trials = [critical_trial(b, lr, s, (100.0 + b / 4 + s) * (1 if lr == 0.1 else 2))
              for b in (16, 64, 256) for lr in (0.1, 0.3) for s in SEEDS]
    result = critical.critical_batch("none", critical.tune(trials))
    assert result.fit is None and "E_min" in result.why_no_fit and "is not positive" in result.why_no_fit
    single, _series = critical.parent_metrics([result])
    assert "critical_batch_size" not in single and "min_steps_to_target" not in single


def critical_trial(batch_size, lr, seed, steps, diverged=False):
    from harness.analysis.report import TrialRecord

    final = {} if steps is None else {"steps_to_target": steps}
    return TrialRecord("id", "name", "none", batch_size, lr, seed, diverged, final)


def test_one_lr_per_batch_size_is_never_on_an_edge_and_a_diverged_trial_never_wins():
    single = critical.tune([critical_trial(32, 0.1, 0, 50.0)])
    assert single[0].best.lr == 0.1 and single[0].edge == ""
    tuned = critical.tune([critical_trial(32, 0.1, 0, 50.0), critical_trial(32, 1.0, 0, 10.0, diverged=True),
                           critical_trial(32, 0.3, 0, 40.0)])
    assert tuned[0].best.lr == 0.3 and tuned[0].edge == ""  # 0.3 sits inside the grid 0.1, 0.3, 1.0


@pytest.mark.parametrize("sizes, b_crit, near", [((16, 64, 256), 100.0, (64, 256)), ((16, 64, 256), 64.0, (16, 64)),
                                                 ((16, 64, 256), 5.0, (16,)), ((16, 64, 256), 1e4, (256,)),
                                                 ((16, 64), math.nan, ())])
def test_batch_sizes_near_b_crit_bracket_it(sizes, b_crit, near):
    assert critical.nearest_batch_sizes(list(sizes), b_crit) == near


def test_with_two_lr_rules_the_fixed_names_hold_rule_none_and_each_rule_gets_suffixed_names():
    # Each rule an LR grid of two, the second LR 1.5x slower: each rule's tuned steps are its first LR's.
    trials = [critical_trial(b, lr, s, factor * S_MIN * (1 + B_CRIT / b) + s) for b in (16, 64, 256, 1024)
              for lr, factor in ((0.1, 1), (0.15, 1.5)) for s in SEEDS]
    trials += [critical_trial(b, lr, s, factor * 2 * S_MIN * (1 + B_CRIT / b) + s) for b in (16, 64, 256, 1024)
               for lr, factor in ((0.2, 1), (0.3, 1.5)) for s in SEEDS]
    for trial in trials[len(trials) // 2:]:
        trial.lr_rule = "linear"
    tuned = critical.tune(trials)
    results = [critical.critical_batch(rule, tuned, resamples=50) for rule in ("linear", "none")]
    single, series = critical.parent_metrics(results)
    assert single["critical_batch_size"] == single["critical_batch_size_none"] == results[1].fit.b_crit
    assert single["min_steps_to_target_linear"] == pytest.approx(2 * single["min_steps_to_target"], rel=0.05)
    assert series["tuned_lr"] == {b: 0.1 for b in (16, 64, 256, 1024)}
    assert series["tuned_lr_linear"] == {b: 0.2 for b in (16, 64, 256, 1024)}


def test_per_batch_series_are_repeated_against_log2_of_the_batch_size():
    from harness.analysis.report import log2_batch_series

    assert log2_batch_series({"by_batch/test_accuracy_none": {32: 0.8, 1024: 0.7}, "tuned_lr": {32: 0.1}}) == {
        "by_log2_batch/test_accuracy_none": {5: 0.8, 10: 0.7}, "by_log2_batch/tuned_lr": {5: 0.1}}
    # A batch size that is not a power of two: hundredths of log2, named so.
    assert log2_batch_series({"tuned_lr": {32: 0.1, 48: 0.2}}) == {"by_log2_batch_x100/tuned_lr": {500: 0.1, 558: 0.2}}

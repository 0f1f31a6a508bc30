"""The steps-to-target race (sweep.race_stop): trials that cannot become their batch size's tuned one
stop early, recorded FINISHED with a lower bound on their steps, and the study's answer does not move."""

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import seeded_store, trial_runs
from harness.analysis.report import build_report
from harness.core.config import Config
from harness.core.distributed import DistContext
from harness.sweeps.sweep import SweepParent, expand_trials, pending_stacks, run_sweep

# 3 batch sizes x 3 LRs x 2 seeds on digits, each batch size one stack; LR x1/8 is far slower than the
# others at every batch size, so the race stops it.
SWEEP = {"name": "race", "data": {"dataset": "digits", "validation_size": 200},
         "model": {"hidden_sizes": [32], "activation": "sigmoid"},
         "optim": {"lr": 0.2, "momentum": 0.9, "global_batch_size": 64},
         "train": {"epochs": 6, "progress": False, "stop_at_target": True},
         "metrics": {"target_val_accuracy": 0.9, "eval_every_steps": 2, "exact_noise_samples": None,
                     "hessian_noise_samples": None, "noise_scale": False, "sharpness": False},
         "tracking": {"experiment": "race"},
         "sweep": {"batch_sizes": [16, 32, 64], "seeds": [0, 1], "lr_rules": ["sqrt"], "base_batch_size": 64,
                   "lr_factors": [0.125, 0.5, 2], "stack_trials": "auto"}}


def sweep(place, race_stop):
    raw = {**SWEEP, "sweep": {**SWEEP["sweep"], "race_stop": race_stop},
           "tracking": {**SWEEP["tracking"], "uri": seeded_store(place)}, "checkpoint": {"dir": str(place / "ckpt")}}
    cfg = Config.from_dict(yaml.safe_load(yaml.safe_dump(raw)))
    parent = run_sweep(cfg, DistContext())
    report = build_report(cfg.tracking.uri, "race", sweep_run_id=parent.run_id, out_dir=place / "reports",
                          interpolate=False)
    runs = trial_runs(MlflowClient(cfg.tracking.uri), [report.experiment_id], parent.run_id)
    return report, runs


def test_the_race_stops_slow_trials_finished_with_a_bound_and_leaves_the_tuned_table_and_b_crit(tmp_path):
    raced, raced_runs = sweep(tmp_path / "raced", 2.0)
    full, _ = sweep(tmp_path / "full", None)
    stopped = [r for r in raced_runs if "race_stopped_step" in r.data.tags]
    assert stopped and all(r.info.status == "FINISHED" for r in raced_runs)
    for run in stopped:
        assert run.data.tags["steps_to_target"] == "slower than the best by more than 2x"
        assert run.data.metrics["steps_to_target_lower_bound"] == int(run.data.tags["race_stopped_step"])
    (a,), (b,) = raced.critical, full.critical
    assert [(t.batch_size, t.best.lr, t.best.steps) for t in a.tuned] == \
        [(t.batch_size, t.best.lr, t.best.steps) for t in b.tuned]
    assert (a.fit.b_crit, a.low, a.high) == pytest.approx((b.fit.b_crit, b.low, b.high), rel=0, abs=0)
    assert not any(t.race_doubt for t in a.tuned)
    assert "stopped by the race)" in raced.markdown_table and "stopped by the race" not in full.markdown_table


@pytest.mark.parametrize("race_stop", [2.0, None], ids=["race", "no race"])
def test_trials_one_by_one_race_the_rules_lr_first_then_out_from_it(race_stop):
    raw = {**SWEEP, "sweep": {**SWEEP["sweep"], "race_stop": race_stop, "stack_trials": 1, "batch_sizes": [16, 32],
                              "lr_factors": [0.25, 0.5, 1, 2], "seeds": [0]}}
    cfg = Config.from_dict(yaml.safe_load(yaml.safe_dump(raw)))
    trials = expand_trials(cfg)
    order = [trials[i].name.split("-lrx")[1] for (i,) in pending_stacks(cfg, trials, SweepParent(None))]
    factors = ["0.25", "0.5", "1", "2"]
    expected = ["1", "0.5", "2", "0.25"] if race_stop else factors  # |log factor|: 0, log 2 (twice), log 4
    assert order == [f"{f}-seed0" for f in expected * 2]

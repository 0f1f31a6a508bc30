"""sweep.stack_trials: a sweep whose trials train as stacks records what the same sweep records
trial by trial: the same MLflow child runs, params and metric histories, and the same report."""

import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, run_command, seeded_store, trial_runs

pytestmark = pytest.mark.slow

# 2 batch sizes x 3 LRs x 2 seeds = 12 trials: stacks of up to 4 make three stacks per batch
# size... of 4 and 2 (6 trials each). Batch 64 leaves an uneven last batch (1237 = 19 * 64 + 21);
# warmup covers the first half epoch; LR x4 at batch 64 stops at the target early, the others train on.
SWEEP = """
name: stacks
data: {dataset: digits, validation_size: 200}
model: {hidden_sizes: [32], activation: sigmoid}
optim: {lr: 0.2, momentum: 0.9, global_batch_size: 64, weight_decay: 0.0001}
train: {epochs: 2, progress: false, stop_at_target: true}
metrics: {target_val_accuracy: 0.9, eval_every_steps: 4, exact_noise_samples: 128, noise_scale_interval: 1}
tracking: {experiment: stacks, log_model: false}
sweep: {batch_sizes: [32, 64], seeds: [0, 1], lr_rules: [sqrt], base_batch_size: 64, warmup_epochs: 0.5,
        lr_factors: [0.5, 1, 4], race_stop: null}
"""
# Wall-clock metrics: a member's share of its stack's time is not the time of its trial alone.
CLOCK_KEYS = ("time_", "epoch_s", "samples_per_s", "eval_fraction", "seconds_to_target",
              # Lanczos restarts until its tolerance: parameters that differ by float rounding (1e-8 here) may
              # take one restart more or less; the eigenvalues it returns are compared.
              "hessian_vector_products")


def _sweep(tmp_path, name: str, stack_trials) -> MlflowClient:
    folder = tmp_path / name
    folder.mkdir()
    config = folder / "stacks.yaml"
    config.write_text(SWEEP)
    result = run_command([sys.executable, str(REPO / "launch/sweep.py"), "--config", str(config), "--launcher",
                          "local", "--set", f"tracking.uri={seeded_store(folder)}", "--set",
                          f"sweep.stack_trials={stack_trials}", "--set", f"checkpoint.dir={folder}/ckpt",
                          "--report-dir", str(folder / "reports")], cwd=folder, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db"), result.stdout


def _children(client: MlflowClient) -> dict:
    experiment = client.get_experiment_by_name("stacks").experiment_id
    (parent,) = client.search_runs([experiment], "tags.run_kind = 'sweep'")
    assert parent.info.status == "FINISHED" and parent.data.tags["trials_failed"] == "0"
    children = trial_runs(client, [experiment], parent.info.run_id)
    assert all(c.info.status == "FINISHED" for c in children)
    return {c.data.tags["trial"]: c for c in children}


def _histories(client: MlflowClient, run) -> dict:
    return {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                     key=lambda m: (m.step, m.timestamp))]
            for key in run.data.metrics if not key.startswith(CLOCK_KEYS) and "seconds" not in key}


def test_stacked_sweep_records_the_runs_metrics_and_report_of_the_sweep_trial_by_trial(tmp_path):
    alone_client, _ = _sweep(tmp_path, "alone", 1)
    stacked_client, stacked_out = _sweep(tmp_path, "stacked", 4)
    assert "trials 1, 3, 5, 7/12 as one stack" not in stacked_out  # stacks group by batch size, in sweep order
    assert "trials 1, 2, 3, 4/12 as one stack" in stacked_out and "trials 5, 6/12 as one stack" in stacked_out
    alone, stacked = _children(alone_client), _children(stacked_client)
    assert sorted(alone) == sorted(stacked) and len(alone) == 12
    assert {c.data.tags["stack_size"] for c in stacked.values()} == {"4", "2"}
    stopped = [name for name, run in alone.items() if run.data.tags.get("stopped_at_target") == "true"]
    assert 0 < len(stopped) < 12  # some members stop at their target while their stack trains on
    for name, run in alone.items():
        twin = stacked[name]
        differing = {k for k in run.data.params if twin.data.params.get(k) != run.data.params[k]}
        assert differing == {"checkpoint.dir"} and twin.data.params.keys() == run.data.params.keys(), name
        for tag in ("steps_to_target", "stopped_at_target", "diverged"):
            assert twin.data.tags.get(tag) == run.data.tags.get(tag), (name, tag)
        ours, theirs = _histories(stacked_client, twin), _histories(alone_client, run)
        assert ours.keys() == theirs.keys(), name
        for key, points in theirs.items():
            assert [s for s, _ in ours[key]] == [s for s, _ in points], (name, key)
            # Lanczos stops within its tolerance (metrics.sharpness_tolerance, 1e-3 relative): two runs
            # whose parameters differ by rounding agree to that, not to the last digits.
            rel = 1e-3 if "hessian_eigenvalue" in key else 1e-4
            for (_, a), (_, b) in zip(ours[key], points):
                assert a == pytest.approx(b, rel=rel, abs=1e-6), (name, key)
    assert "grad_noise_scale_exact_at_target" in alone[stopped[0]].data.metrics
    report_tables = [(tmp_path / side / "reports").rglob("*.csv") for side in ("alone", "stacked")]
    assert all(list(tables) for tables in report_tables)

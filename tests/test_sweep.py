"""Sweeps through every launcher: parent/child runs in a real MLflow store, a diverged
trial that does not stop the sweep, and a report whose table matches the logged metrics."""

import csv
import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, run_command

pytestmark = pytest.mark.slow

# Linear scaling from lr 0.2 at batch 8 gives lr 25.6 at batch 1024: that trial
# blows up (relu), the other two train.
TINY_SWEEP = """
name: tiny
data: {dataset: digits, validation_size: 200}
model: {hidden_sizes: [32], activation: relu}
optim: {lr: 0.2, momentum: 0.9, global_batch_size: 8}
train: {epochs: 3, progress: false}
metrics: {target_val_accuracy: 0.5, sharpness_samples: 256, sharpness_iterations: 10}
tracking: {experiment: tiny}
sweep: {batch_sizes: [8, 32, 1024], seeds: [0], lr_rules: [linear], base_batch_size: 8}
"""
PLOTS = ("accuracy_gap_vs_batch.png", "loss_curves_epochs.png", "loss_curves_steps.png", "steps_to_target.png")


def run_sweep_command(tmp_path, *launcher_args, env=None):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_SWEEP)
    result = run_command([sys.executable, str(REPO / "launch/sweep.py"), "--config", str(config),
                          "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                          "--set", f"checkpoint.dir={tmp_path}/ckpt", "--report-dir", str(tmp_path / "reports"),
                          "--storage-path", str(tmp_path / "ray"), *launcher_args],
                         cwd=tmp_path, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def check_sweep_records(tmp_path, launcher, world_size):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("tiny").experiment_id
    parents = client.search_runs([experiment], "tags.run_kind = 'sweep'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert (parent.data.tags["trials"], parent.data.tags["trials_failed"]) == ("3", "0")
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_batch = {int(c.data.params["batch_size"]): c for c in children}
    assert sorted(by_batch) == [8, 32, 1024]
    for child in children:
        assert child.info.status == "FINISHED"
        params = child.data.params
        assert (params["lr_rule"], params["launcher"], params["world_size"]) == ("linear", launcher, str(world_size))
        assert float(params["lr"]) == pytest.approx(0.2 * int(params["batch_size"]) / 8)
    assert by_batch[1024].data.tags.get("diverged") == "true"
    assert "diverged" not in by_batch[8].data.tags
    # The report: files exist, are logged to the parent run, and say what MLflow says.
    report_dir = tmp_path / "reports" / parent.info.run_id
    for name in ("summary.csv", "summary.md", *PLOTS):
        assert (report_dir / name).stat().st_size > 0, name
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {f"report/{name}" for name in ("summary.csv", "summary.md", *PLOTS)} <= logged
    rows = {int(r["batch_size"]): r for r in csv.DictReader(open(report_dir / "summary.csv"))}
    for batch in (8, 32):
        final = by_batch[batch].data.metrics
        assert float(rows[batch]["test_accuracy_mean"]) == pytest.approx(final["test_accuracy"])
        assert float(rows[batch]["gap_accuracy_mean"]) == pytest.approx(final["generalization_gap_accuracy"])
        assert float(rows[batch]["sharpness_mean"]) == pytest.approx(final["top_hessian_eigenvalue"])
        if "steps_to_target" in final:
            assert float(rows[batch]["steps_to_target_mean"]) == pytest.approx(final["steps_to_target"])
    assert rows[1024]["diverged"] == "1"


def test_local_sweep_records_parent_children_and_report(tmp_path):
    result = run_sweep_command(tmp_path, "--launcher", "local")
    assert "3 trials, 0 failed" in result.stdout
    assert "| linear | 1024 | 25.6 | 1 |" in result.stdout
    check_sweep_records(tmp_path, "local", 1)


def test_torchrun_sweep_runs_each_trial_as_a_torchrun_job(tmp_path):
    run_sweep_command(tmp_path, "--launcher", "torchrun", "--nproc", "2")
    check_sweep_records(tmp_path, "torchrun", 2)


def test_ray_sweep_runs_trials_as_ray_train_runs(tmp_path, ray_cluster):
    run_sweep_command(tmp_path, "--launcher", "ray", "--nproc", "1",
                      env={"RAY_ADDRESS": ray_cluster["address"], "RAY_AUTH_MODE": "token"})
    check_sweep_records(tmp_path, "ray", 1)

"""Sweeps through every launcher: parent/child runs in a real MLflow store, a diverged
trial that does not stop the sweep, and a report whose table matches the logged metrics."""

import csv
import math
import re
import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, run_command, seeded_store

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


# The torchrun and Ray sweeps start processes per trial: two trials (one trains,
# one diverges) show what the launcher adds; the local sweep runs all three.
LAUNCHER_BATCH_SIZES = (8, 1024)


def run_sweep_command(tmp_path, *launcher_args, env=None, batch_sizes=(8, 32, 1024)):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_SWEEP.replace("[8, 32, 1024]", str(list(batch_sizes))))
    result = run_command([sys.executable, str(REPO / "launch/sweep.py"), "--config", str(config),
                          "--set", f"tracking.uri={seeded_store(tmp_path)}",
                          "--set", f"checkpoint.dir={tmp_path}/ckpt", "--report-dir", str(tmp_path / "reports"),
                          "--storage-path", str(tmp_path / "ray"), *launcher_args],
                         cwd=tmp_path, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def check_sweep_records(tmp_path, launcher, world_size, batch_sizes=(8, 32, 1024)):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("tiny").experiment_id
    parents = client.search_runs([experiment], "tags.run_kind = 'sweep'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert (parent.data.tags["trials"], parent.data.tags["trials_failed"]) == (str(len(batch_sizes)), "0")
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_batch = {int(c.data.params["batch_size"]): c for c in children}
    assert sorted(by_batch) == list(batch_sizes)
    for child in children:
        assert child.info.status == "FINISHED"
        params = child.data.params
        assert (params["lr_rule"], params["launcher"], params["world_size"]) == ("linear", launcher, str(world_size))
        assert float(params["lr"]) == pytest.approx(0.2 * int(params["batch_size"]) / 8)
    assert by_batch[1024].data.tags.get("diverged") == "true"
    assert "diverged" not in by_batch[8].data.tags
    check_ui_records(client, parent, by_batch)
    # The report: files exist, are logged to the parent run, and say what MLflow says.
    report_dir = tmp_path / "reports" / parent.info.run_id
    for name in ("summary.csv", "summary.md", *PLOTS):
        assert (report_dir / name).stat().st_size > 0, name
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {f"report/{name}" for name in ("summary.csv", "summary.md", *PLOTS)} <= logged
    rows = {int(r["batch_size"]): r for r in csv.DictReader(open(report_dir / "summary.csv"))}
    for batch in set(batch_sizes) - {1024}:
        final = by_batch[batch].data.metrics
        assert float(rows[batch]["test_accuracy_mean"]) == pytest.approx(final["test_accuracy"])
        assert float(rows[batch]["gap_accuracy_mean"]) == pytest.approx(final["generalization_gap_accuracy"])
        assert float(rows[batch]["sharpness_mean"]) == pytest.approx(final["top_hessian_eigenvalue"])
        if "steps_to_target" in final:
            assert float(rows[batch]["steps_to_target_mean"]) == pytest.approx(final["steps_to_target"])
    assert rows[1024]["diverged"] == "1"


def check_ui_records(client, parent, by_batch):
    """What the MLflow UI shows: names that lead with what differs, descriptions, the commit,
    metrics against optimizer steps, and the parent's metrics against batch size."""
    assert parent.data.tags["mlflow.source.git.commit"] == parent.data.tags["git_commit"] != "unknown"
    assert "batch sizes" in parent.data.tags["mlflow.note.content"]
    for batch, child in by_batch.items():
        lr = 0.2 * batch / 8
        assert child.info.run_name == f"bs{batch} lr{lr:.4g} s0 linear"
        assert child.data.tags["trial"] == f"tiny-linear-bs{batch}-seed0"
        assert child.data.params["log2_batch_size"] == str(float(math.log2(batch)))
        assert child.data.tags["mlflow.source.git.commit"] == child.data.tags["git_commit"] != "unknown"
        assert f"batch {batch}" in child.data.tags["mlflow.note.content"]
    # by_step/<metric>: the per-epoch values again, with step = the optimizer step reached at that epoch.
    run_id = by_batch[8].info.run_id
    global_steps = {m.step: int(m.value) for m in client.get_metric_history(run_id, "global_step")}
    for key in ("test_loss", "train_loss", "test_accuracy"):
        by_epoch = {global_steps[m.step]: m.value for m in client.get_metric_history(run_id, key)}
        by_step = {m.step: m.value for m in client.get_metric_history(run_id, f"by_step/{key}")}
        assert by_step == by_epoch and len(by_step) == 3, key
    # The parent: one point per batch size (step = batch size) for each summary column.
    accuracy = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "by_batch/test_accuracy_linear")}
    healthy = sorted(set(by_batch) - {1024})
    assert accuracy == {b: pytest.approx(by_batch[b].data.metrics["test_accuracy"]) for b in healthy}
    gap = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "by_batch/gap_loss_linear")}
    assert gap == {b: pytest.approx(by_batch[b].data.metrics["generalization_gap_loss"]) for b in healthy}
    diverged = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "by_batch/diverged_linear")}
    assert diverged == {b: float(b == 1024) for b in by_batch}


def test_local_sweep_records_parent_children_and_report(tmp_path):
    result = run_sweep_command(tmp_path, "--launcher", "local")
    assert "3 trials, 0 failed" in result.stdout
    # Progress over the whole sweep, and the way into the UI at the end.
    assert re.search(r"^\[sweep\] trial 1/3 \(\d+m\d\ds elapsed, ETA after the first trial\): "
                     r"bs8 lr0.2 s0 linear \(tiny-linear-bs8-seed0\)", result.stdout, re.M)
    assert re.search(r"^\[sweep\] trial 3/3 \(\d+m\d\ds elapsed, ETA \d+m\d\ds\): bs1024", result.stdout, re.M)
    assert "open the MLflow UI: " in result.stdout
    assert "?workflowType=machine_learning" in result.stdout
    assert "| linear | 1024 | 25.6 | 1 |" in result.stdout
    check_sweep_records(tmp_path, "local", 1)


def test_torchrun_sweep_runs_each_trial_as_a_torchrun_job(tmp_path):
    # One rank per job keeps this test short; two-rank torchrun runs are tested in test_launchers.py.
    run_sweep_command(tmp_path, "--launcher", "torchrun", "--nproc", "1", batch_sizes=LAUNCHER_BATCH_SIZES)
    check_sweep_records(tmp_path, "torchrun", 1, LAUNCHER_BATCH_SIZES)


def test_ray_sweep_runs_trials_as_ray_train_runs(tmp_path, ray_cluster):
    run_sweep_command(tmp_path, "--launcher", "ray", "--nproc", "1", batch_sizes=LAUNCHER_BATCH_SIZES,
                      env={"RAY_ADDRESS": ray_cluster["address"], **ray_cluster["env"]})
    check_sweep_records(tmp_path, "ray", 1, LAUNCHER_BATCH_SIZES)


def test_killed_sweep_resumes_skipping_finished_trials_into_the_same_parent(tmp_path):
    """SIGKILL the whole sweep process during its second trial, start it again with --resume."""
    import os
    import signal
    import subprocess
    import time

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_SWEEP.replace("epochs: 3", "epochs: 4").replace("[8, 32, 1024]", "[32, 64, 128]")
                      .replace("data: {dataset: digits, validation_size: 200}",
                               "data: {dataset: fashion-mnist, validation_size: 1000, train_subset: 8192}")
                      .replace("hidden_sizes: [32]", "hidden_sizes: [256]"))
    uri = seeded_store(tmp_path)
    command = [sys.executable, str(REPO / "launch/sweep.py"), "--config", str(config), "--launcher", "local",
               "--set", f"tracking.uri={uri}", "--set", f"checkpoint.dir={tmp_path}/ckpt",
               "--report-dir", str(tmp_path / "reports")]
    sweep = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = tmp_path / "ckpt" / "tiny-linear-bs64-seed0" / "epoch-0002.pt"
    deadline = time.monotonic() + 300
    while not second.exists():
        assert sweep.poll() is None and time.monotonic() < deadline, "the sweep ended before its second trial"
        time.sleep(0.1)
    os.kill(sweep.pid, signal.SIGKILL)
    sweep.wait()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny").experiment_id
    first_run = client.search_runs([experiment], "tags.trial = 'tiny-linear-bs32-seed0'")[0]
    assert first_run.info.status == "FINISHED"

    result = run_command(command + ["--resume"], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[tiny-linear-bs32-seed0] finished in an earlier attempt: skipped" in result.stdout
    parents = client.search_runs([experiment], "tags.run_kind = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert sorted(c.data.tags["trial"] for c in children) == [f"tiny-linear-bs{b}-seed0" for b in (128, 32, 64)]
    by_name = {c.data.tags["trial"]: c for c in children}
    assert by_name["tiny-linear-bs32-seed0"].info.end_time == first_run.info.end_time  # not run again
    assert by_name["tiny-linear-bs64-seed0"].data.tags.get("resumed") == "true"
    for child in children:
        assert child.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "test_accuracy")]
        assert steps == [1, 2, 3, 4], (child.data.tags["trial"], steps)

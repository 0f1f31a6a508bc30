"""Sweeps through every launcher: parent/child runs in a real MLflow store, a diverged
trial that does not stop the sweep, and a report whose table matches the logged metrics."""

import csv
import math
import re
import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, run_command, seeded_store, trial_runs

pytestmark = pytest.mark.slow

# Linear scaling from lr 0.2 at batch 8 gives lr 25.6 at batch 1024: that trial
# blows up (relu), the other two train.
TINY_SWEEP = """
name: tiny
data: {dataset: digits, validation_size: 200}
model: {hidden_sizes: [32], activation: relu}
optim: {lr: 0.2, momentum: 0.9, global_batch_size: 8}
train: {epochs: 3, progress: false}
metrics: {target_val_accuracy: 0.5, sharpness: true, sharpness_samples: 256, sharpness_iterations: 10}
tracking: {experiment: tiny, log_model: false}
sweep: {batch_sizes: [8, 32, 1024], seeds: [0], lr_rules: [linear], base_batch_size: 8}
"""
PLOTS = ("accuracy_gap_vs_batch.png", "loss_curves_epochs.png", "loss_curves_steps.png", "steps_to_target.png")


# The torchrun sweep starts processes per trial: two trials (one trains, one diverges)
# show what the launcher adds; the local sweep runs all three. A sweep on Ray: tests/e2e/test_tune.py.
LAUNCHER_BATCH_SIZES = (8, 1024)


def run_sweep_command(tmp_path, *launcher_args, env=None, batch_sizes=(8, 32, 1024), store=None):
    """The sweep; its MLflow store in ``store`` (default: ``tmp_path``), the URI quoted as a YAML string."""
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_SWEEP.replace("[8, 32, 1024]", str(list(batch_sizes))))
    result = run_command([sys.executable, str(REPO / "launch/sweep.py"), "--config", str(config),
                          "--set", f"tracking.uri={seeded_store(store or tmp_path)!r}",
                          "--set", f"checkpoint.dir={tmp_path}/ckpt", "--report-dir", str(tmp_path / "reports"),
                          "--storage-path", str(tmp_path / "ray"), *launcher_args],
                         cwd=tmp_path, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def check_sweep_records(tmp_path, launcher, world_size, batch_sizes=(8, 32, 1024), store=None):
    client = MlflowClient(tracking_uri=f"sqlite:///{store or tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("tiny").experiment_id
    parents = client.search_runs([experiment], "tags.run_kind = 'sweep'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert (parent.data.tags["trials"], parent.data.tags["trials_failed"]) == (str(len(batch_sizes)), "0")
    children = trial_runs(client, [experiment], parent.info.run_id)
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
    # Named by what it swept; its description opens with the report's answer, then what the sweep ran.
    sizes = sorted(by_batch)
    assert parent.info.run_name == f"tiny: batch {sizes[0]}-{sizes[-1]}" and parent.data.tags["sweep_name"] == "tiny"
    assert parent.data.tags["mlflow.note.content"].startswith(f"The answer: {len(sizes)} trials")
    assert "batch sizes" in parent.data.tags["mlflow.note.content"].split("\n---\n")[1]
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
    # The same series against log2 of the batch size: powers of two evenly spaced on MLflow's step axis.
    history = client.get_metric_history(parent.info.run_id, "by_log2_batch/test_accuracy_linear")
    log2 = {m.step: m.value for m in history}
    assert log2 == {int(math.log2(b)): value for b, value in accuracy.items()}


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local_sweep")
    return tmp, run_sweep_command(tmp, "--launcher", "local")


def test_local_sweep_records_parent_children_and_report(local_sweep):
    tmp_path, result = local_sweep
    assert "3 trials, 0 failed" in result.stdout
    # Progress over the whole sweep, and the way into the UI at the end.
    assert re.search(r"^\[sweep\] trial 1/3 \(\d+m\d\ds elapsed, ETA after the first trial\): "
                     r"bs8 lr0.2 s0 linear \(tiny-linear-bs8-seed0\)", result.stdout, re.M)
    assert re.search(r"^\[sweep\] trial 3/3 \(\d+m\d\ds elapsed, ETA \d+m\d\ds\): bs1024", result.stdout, re.M)
    assert "open the MLflow UI: " in result.stdout
    assert "?workflowType=machine_learning" in result.stdout
    assert "| linear | 1024 | 25.6 | 1 |" in result.stdout
    check_sweep_records(tmp_path, "local", 1)


def test_a_second_report_reuses_the_interpolation_the_sweep_nested_under_its_parent(local_sweep):
    tmp_path, _ = local_sweep
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("tiny").experiment_id
    (parent,) = client.search_runs([experiment], "tags.run_kind = 'sweep'")
    (first,) = client.search_runs([experiment], "tags.run_kind = 'interpolation'")
    assert first.data.tags["mlflow.parentRunId"] == parent.info.run_id
    again = run_command([sys.executable, "-m", "harness.cli", "report", "--latest", "--experiment", "tiny",
                         "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--out", str(tmp_path / "again")],
                        cwd=REPO, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.startswith("The answer: 3 trials") and "interpolating" not in again.stdout
    assert f"MLflow run {first.info.run_id}" in again.stdout
    assert [r.info.run_id for r in client.search_runs([experiment], "tags.run_kind = 'interpolation'")] == [
        first.info.run_id]
    assert (tmp_path / "again" / parent.info.run_id / "interpolation" / "interpolation.png").stat().st_size > 0


@pytest.fixture(scope="module")
def torchrun_sweep(tmp_path_factory):
    """One torchrun sweep for the two tests below: its folder, and its store's (a name with ' #' in it)."""
    tmp = tmp_path_factory.mktemp("torchrun_sweep")
    # One rank per job keeps this short; two-rank torchrun runs are tested in test_launchers.py.
    run_sweep_command(tmp, "--launcher", "torchrun", "--nproc", "1", batch_sizes=LAUNCHER_BATCH_SIZES,
                      store=tmp / "runs #1")
    return tmp, tmp / "runs #1"


def test_torchrun_sweep_runs_each_trial_as_a_torchrun_job(torchrun_sweep):
    tmp, store = torchrun_sweep
    check_sweep_records(tmp, "torchrun", 1, LAUNCHER_BATCH_SIZES, store=store)


def test_torchrun_sweep_trials_use_a_tracking_uri_with_space_hash_as_given(torchrun_sweep):
    """`--set tracking.uri=...` re-parsed as YAML would cut the URI at ' #' and send the
    trials to a stray store; the resolved config goes to the trials as JSON instead."""
    tmp, store = torchrun_sweep
    client = MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.data.tags.get("run_kind") != "interpolation"]
    assert len(trials) == len(LAUNCHER_BATCH_SIZES) and {t.info.status for t in trials} == {"FINISHED"}
    assert all("test_accuracy" in t.data.metrics for t in trials)
    assert not (tmp / "runs").exists()  # where the URI cut at " #" would have put a store


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
                      .replace("hidden_sizes: [32]", "hidden_sizes: [256]")
                      .replace("sharpness: true", "sharpness: false"))
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
    children = trial_runs(client, [experiment], parents[0].info.run_id)
    assert sorted(c.data.tags["trial"] for c in children) == [f"tiny-linear-bs{b}-seed0" for b in (128, 32, 64)]
    by_name = {c.data.tags["trial"]: c for c in children}
    assert by_name["tiny-linear-bs32-seed0"].info.end_time == first_run.info.end_time  # not run again
    assert by_name["tiny-linear-bs64-seed0"].data.tags.get("resumed") == "true"
    for child in children:
        assert child.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "test_accuracy")]
        assert steps == [1, 2, 3, 4], (child.data.tags["trial"], steps)


# --- the LR grid: sweep.lrs / sweep.lr_factors crossed with batch sizes and seeds ---------------

def grid_config(**sweep):
    from harness.core.config import Config

    return Config.from_dict({"name": "grid", "data": {"dataset": "digits", "validation_size": 200},
                             "optim": {"lr": 0.1}, "tracking": {"enabled": False},
                             "sweep": {"batch_sizes": [8, 32], "seeds": [0, 1], "base_batch_size": 8, **sweep}})


def test_explicit_lrs_are_crossed_with_every_batch_size_and_seed_under_unique_names():
    from harness.sweeps.sweep import expand_trials

    trials = expand_trials(grid_config(lrs=[0.01, 0.3], lr_rules=["none", "sqrt"]))
    assert len(trials) == 2 * 2 * 2 * 2 and len({t.name for t in trials}) == len(trials)
    # Explicit LRs are used as given at every batch size: the rule (sqrt) only adds its warmup.
    assert {(t.trial.lr_rule, t.optim.global_batch_size, t.optim.lr) for t in trials} == \
        {(r, b, lr) for r in ("none", "sqrt") for b in (8, 32) for lr in (0.01, 0.3)}
    assert trials[0].name == "grid-none-bs8-lr0.01-seed0" and trials[-1].name == "grid-sqrt-bs32-lr0.3-seed1"


def test_lr_factors_multiply_the_scaling_rules_lr():
    from harness.records.tracking import display_name
    from harness.sweeps.sweep import expand_trials

    factors = [0.25, 0.5, 1.0, 2.0, 4.0]
    trials = expand_trials(grid_config(lr_factors=factors, lr_rules=["linear"], seeds=[0]))
    by_batch = {}
    for t in trials:
        by_batch.setdefault(t.optim.global_batch_size, []).append(t.optim.lr)
    # linear scaling from lr 0.1 at B=8: 0.1 at 8, 0.4 at 32, each times the factors (log-spaced: ratio 2).
    assert by_batch == {8: pytest.approx([0.1 * f for f in factors]), 32: pytest.approx([0.4 * f for f in factors])}
    assert [t.name for t in trials[:2]] == ["grid-linear-bs8-lrx0.25-seed0", "grid-linear-bs8-lrx0.5-seed0"]
    assert display_name(trials[-1]) == "bs32 lr1.6 s0 linear"


def test_without_a_grid_trials_keep_their_names_and_lrs():
    from harness.sweeps.sweep import expand_trials

    trials = expand_trials(grid_config(lr_rules=["linear"]))
    assert [(t.name, t.optim.lr) for t in trials] == [
        ("grid-linear-bs8-seed0", 0.1), ("grid-linear-bs8-seed1", 0.1),
        ("grid-linear-bs32-seed0", pytest.approx(0.4)), ("grid-linear-bs32-seed1", pytest.approx(0.4))]


@pytest.mark.parametrize("sweep_keys, expected", [
    ("lrs: []", "sweep.lrs: expected a non-empty list of positive numbers, got []"),
    ("lr_factors: [0.5, 0]", "sweep.lr_factors: expected a non-empty list of positive numbers"),
    ("lrs: [0.1, -0.1]", "sweep.lrs: expected a non-empty list of positive numbers"),
    ("{lrs: [0.1], lr_factors: [1.0]}", "sweep.lr_factors: given together with sweep.lrs; expected at most one"),
    ("lrs: [0.1, 0.10000001]", "sweep.lrs: values that agree to 6 significant digits"),
    ("lrs: [0.1, 0.1]", "sweep.lrs: expected distinct values (repeated: 0.1)"),
])
def test_a_bad_lr_grid_exits_2_with_one_line_before_anything_starts(tmp_path, monkeypatch, capsys, sweep_keys,
                                                                   expected):
    import importlib.util

    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("launch_sweep_grid", REPO / "launch" / "sweep.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    config = tmp_path / "grid.yaml"
    keys = sweep_keys if sweep_keys.startswith("{") else "{" + sweep_keys + "}"
    config.write_text(TINY_SWEEP.split("sweep: {")[0] + f"sweep: {keys}\n")
    status = launcher.main(["--config", str(config)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and expected in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]


def test_local_sweep_with_an_lr_grid_records_the_tuned_lr_on_the_parent(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_SWEEP.replace("lr_rules: [linear], base_batch_size: 8",
                                         "lr_rules: [none], base_batch_size: 8, lr_factors: [0.25, 1.0]")
                      .replace("[8, 32, 1024]", "[8, 16, 32]").replace("activation: relu", "activation: tanh")
                      .replace("epochs: 3", "epochs: 1").replace("sharpness: true", "sharpness: false"))
    result = run_command([sys.executable, str(REPO / "launch/sweep.py"), "--config", str(config), "--launcher",
                          "local", "--set", f"tracking.uri={seeded_store(tmp_path)}",
                          "--set", f"checkpoint.dir={tmp_path}/ckpt", "--report-dir", str(tmp_path / "reports")],
                         cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "6 trials, 0 failed" in result.stdout
    assert re.search(r"^where the time went \(summed over trials, share of \d+m\d\ds\): training ", result.stdout, re.M)
    assert "### LR tuned per batch size (lr rule none)" in result.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("tiny").experiment_id
    parent = client.search_runs([experiment], "tags.run_kind = 'sweep'")[0]
    children = trial_runs(client, [experiment], parent.info.run_id)
    assert sorted(c.data.tags["trial"] for c in children) == sorted(
        f"tiny-none-bs{b}-lrx{f}-seed0" for b in (8, 16, 32) for f in ("0.25", "1"))
    assert {c.info.run_name for c in children} == {f"bs{b} lr{lr:.4g} s0 none" for b in (8, 16, 32)
                                                   for lr in (0.05, 0.2)}
    # The parent's tuned LR per batch size is, at every batch size that reached the target, the LR of the
    # child with the fewest steps (one seed: the median is the value).
    steps = {}
    for c in children:
        if "steps_to_target" in c.data.metrics and c.data.tags.get("diverged") != "true":
            key = int(c.data.params["batch_size"])
            steps[key] = min(steps.get(key, (math.inf, 0)), (c.data.metrics["steps_to_target"],
                                                               float(c.data.params["lr"])))
    tuned = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "tuned_lr")}
    assert steps and tuned == {b: pytest.approx(lr) for b, (_s, lr) in steps.items()}

"""Stacks on Ray: with sweep.stack_trials, launch/sweep.py --launcher ray trains each stack as one
Ray Tune trial (one TorchTrainer on a real local Ray cluster); every member is its own
MLflow run and ends where its trial run alone ends; a worker SIGKILLed mid-epoch is restarted by
Ray Train and every member resumes exactly from its own file in Ray's checkpoint; SIGTERM to the sweep
then ends every run KILLED, leaves no placement group behind, and --resume reopens the same runs."""

import os
import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, run_command, seeded_store, trial_runs
from harness.core.data import load_dataset
from harness.core.distributed import DistContext
from harness.launching.runs import train_trials
from test_tune import live_placement_groups
from test_stacked_torchrun import EPOCHS, SWEEP, _assert_members_match_solo, _trials
import test_stacked_torchrun


solo = test_stacked_torchrun.solo  # the fixture: each trial run alone, its final parameters


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The same stack trained in this process, uninterrupted: each member's MLflow run, by trial name."""
    folder = tmp_path_factory.mktemp("straight")
    uri = seeded_store(folder)
    members = [t.replace(**{"tracking.uri": uri, "checkpoint.dir": str(folder / "ckpt")}) for t in _trials()]
    results = train_trials(members, DistContext(), dataset=load_dataset(members[0]))
    client = MlflowClient(tracking_uri=uri)
    return client, {m.name: client.get_run(r.run_id) for m, r in zip(members, results)}


@pytest.mark.slow
def test_ray_stack_resumes_from_rays_checkpoint_after_a_sigkill_and_from_its_own_after_sigterm(
        tmp_path, ray_cluster, solo, straight):
    """The stack's one Ray Train worker SIGKILLs itself in the middle of epoch 2: Ray Train restarts it and
    every member resumes from its own file in Ray's epoch-1 checkpoint. Then the worker is held in the middle
    of epoch 3 and the sweep gets SIGTERM: it exits 143, the parent and all three members end KILLED and no
    placement group is left. --resume reopens the same runs and resumes every member from its epoch-2
    checkpoint in the run's folder; each ends where the uninterrupted stack and its trial alone end,
    every (metric, step) logged once across both interruptions. One worker: a stack over two DDP ranks is
    tests/e2e/test_stacked_torchrun.py's, DDP on Ray tests/e2e/test_launchers.py's; each worker is seconds of
    start-up on the test machine's two cores."""
    import signal
    import subprocess
    import time

    config = tmp_path / "stk.yaml"
    config.write_text(SWEEP)
    killed, held = tmp_path / "killed", tmp_path / "held"
    command = [sys.executable, str(REPO / "launch/sweep.py"), "--config", str(config), "--launcher", "ray",
               "--nproc", "1", "--max-failures", "1", "--set", f"tracking.uri={seeded_store(tmp_path)}",
               "--set", f"checkpoint.dir={tmp_path}/ckpt", "--set", "sweep.stack_trials=auto",
               "--report-dir", str(tmp_path / "reports"), "--storage-path", str(tmp_path / "ray")]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"], **ray_cluster["env"]}
    log = open(tmp_path / "first.log", "w")
    sweep = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                             env={**env, "HARNESS_INJECT_FAULT": f"step:2:0:{killed}",
                                  "HARNESS_INJECT_HOLD": f"step:3:0:{held}"})
    try:
        deadline = time.monotonic() + 300
        while not held.exists():
            assert sweep.poll() is None and time.monotonic() < deadline, \
                "the stack never reached epoch 3: " + (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        sweep.send_signal(signal.SIGTERM)
        assert sweep.wait(120) == 143
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
        log.close()
    first = (tmp_path / "first.log").read_text()
    assert killed.exists(), "the fault was never injected"
    assert "[sweep] Ray Tune: 3 trials in 1 stacks (a Ray Tune trial each)" in first
    assert "[sweep] trials 1, 2, 3 started as one stack" in first
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("stk").experiment_id
    (parent,) = client.search_runs([experiment], "tags.run_kind = 'sweep'")
    members = trial_runs(client, [experiment], parent.info.run_id)
    assert parent.info.status == "KILLED"
    assert sorted((r.data.tags["trial"], r.info.status) for r in members) == \
        sorted((t.name, "KILLED") for t in _trials())
    # Before --resume, only Ray's own checkpoint can have resumed them; one Ray Train run for the stack.
    assert all(r.data.tags.get("resumed") == "true" for r in members)
    assert len({r.data.tags["launch_id"] for r in members}) == 1
    # Tune stopped the running trial: its Train controller's placement group (it can be registered
    # after the controller is killed) must not hold the CPUs the resumed sweep's trial needs.
    assert live_placement_groups(ray_cluster) == []

    result = run_command(command + ["--resume"], cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "3 trials, 0 failed" in result.stdout
    (resumed,) = client.search_runs([experiment], "tags.run_kind = 'sweep'")
    assert resumed.info.run_id == parent.info.run_id and resumed.info.status == "FINISHED"
    assert resumed.data.tags["trials_failed"] == "0"
    after = {r.data.tags["trial"]: r for r in
             trial_runs(client, [experiment], parent.info.run_id)}
    # The same three runs, reopened and finished: no member started a second run.
    assert sorted(r.info.run_id for r in after.values()) == sorted(r.info.run_id for r in members)
    straight_client, uninterrupted = straight
    for name, run in after.items():
        twin = uninterrupted[name]
        assert run.info.status == "FINISHED", name
        assert (run.data.params["world_size"], run.data.tags["stack_size"]) == ("1", "3"), name
        assert run.data.metrics.keys() == twin.data.metrics.keys(), name
        for key in twin.data.metrics:  # every (metric, step) once, at the uninterrupted run's steps
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == sorted(m.step for m in straight_client.get_metric_history(twin.info.run_id, key)), \
                (name, key, steps)
    _assert_members_match_solo(tmp_path, solo)
    for trial in _trials():
        assert (tmp_path / "ckpt" / trial.name / f"epoch-{EPOCHS:04d}.pt").exists()
        assert not list((tmp_path / "ckpt" / trial.name).glob(".epoch-*")), "a half-written checkpoint was left"
    # Ray's storage holds the stack's last checkpoint with a folder per member.
    stored = [p.parent.name for p in (tmp_path / "ray").rglob(f"epoch-{EPOCHS:04d}.pt")]
    assert sorted(set(stored)) == sorted(t.name for t in _trials()), stored

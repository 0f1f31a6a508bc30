"""Two real processes on one new MLflow store, and the values a torchrun sweep hands its trials."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CONFIGS, REPO, run_command


def _finished_runs(uri, experiment):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {uri}"
    return client, client.search_runs([found.experiment_id])


@pytest.mark.slow
def test_two_runs_started_together_on_a_new_sqlite_store_both_record_everything(tmp_path):
    """Both processes find no store and would both run MLflow's schema migration;
    the harness serialises it, so neither dies and both runs are complete."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    processes = [subprocess.Popen([sys.executable, str(REPO / "launch/train.py"), "--config", str(CONFIGS / "smoke.yaml"),
                                   "--set", f"tracking.uri={uri}", "--set", f"name=run{i}", "--set", "train.epochs=1",
                                   "--set", f"checkpoint.dir={tmp_path}/checkpoints"],
                                  cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in range(2)]
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=300)[0])
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert [p.returncode for p in processes] == [0, 0], outputs
    client, runs = _finished_runs(uri, "smoke")
    assert sorted(r.info.run_name for r in runs) == ["run0", "run1"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")] == [1]


@pytest.mark.slow
def test_torchrun_sweep_trials_use_a_tracking_uri_with_space_hash_as_given(tmp_path):
    """`--set tracking.uri=...` re-parsed as YAML would cut the URI at ' #' and send the
    trials to a stray store; the resolved config goes to the trials as JSON instead."""
    store_dir = tmp_path / "runs #1"
    store_dir.mkdir()
    uri = f"sqlite:///{store_dir}/mlflow.db"
    result = run_command([sys.executable, str(REPO / "launch/sweep.py"), "--config", str(CONFIGS / "sweep.yaml"),
                          "--launcher", "torchrun", "--nproc", "1", "--report-dir", str(tmp_path / "reports"),
                          "--set", f"tracking.uri={uri!r}", "--set", "sweep.batch_sizes=[64]",
                          "--set", "data.validation_size=256", "--set", "data.train_subset=256",
                          "--set", "data.test_subset=256", "--set", "model.hidden_sizes=[16]",
                          "--set", "train.epochs=1", "--set", "metrics.sharpness=false",
                          "--set", f"checkpoint.dir={tmp_path}/checkpoints"],
                         cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client, runs = _finished_runs(uri, "minibatch-harness")
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(trials) == 1 and trials[0].info.status == "FINISHED"
    assert "test_accuracy" in trials[0].data.metrics
    assert not (tmp_path / "runs").exists()  # where the URI cut at " #" would have put a store

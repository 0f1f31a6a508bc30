"""Two real processes on one new MLflow store. (The tracking URI a torchrun sweep hands its trials
as given, space and hash included: tests/e2e/test_sweep.py, on its torchrun sweep.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CONFIGS, REPO


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
    # Named by the config's name and what the overrides changed (not where records and checkpoints go).
    assert sorted(r.info.run_name for r in runs) == ["run0 epochs=1", "run1 epochs=1"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")] == [1]

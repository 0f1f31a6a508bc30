"""How the driver ends the runs its workers could not end: a run a scheduler stopped ends FINISHED
and tagged whatever status its torn-down workers left; a failed launch ends only what is RUNNING."""

import pytest
from mlflow.tracking import MlflowClient

from conftest import seeded_store
from harness.core.config import Config
from harness.records.mlflow_store import end_runs_of_launch, end_stopped_run


def launch_run(tmp_path, status):
    uri = seeded_store(tmp_path)
    cfg = Config.from_dict({"name": "stopped", "tracking": {"uri": uri, "experiment": "ends"}})
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("ends")
    run_id = client.create_run(experiment, tags={"launch_id": "launch-1"}).info.run_id
    if status != "RUNNING":
        client.set_terminated(run_id, status=status)
    return cfg, client, run_id


@pytest.mark.parametrize("left_by_workers", ["RUNNING", "FAILED", "KILLED"])
def test_a_run_the_scheduler_stopped_ends_finished_and_tagged_whatever_its_workers_left(tmp_path, left_by_workers):
    cfg, client, run_id = launch_run(tmp_path, left_by_workers)
    assert end_stopped_run(cfg, "launch-1", {"stopped_early": "asha"}) == [run_id]
    run = client.get_run(run_id)
    assert (run.info.status, run.data.tags["stopped_early"]) == ("FINISHED", "asha")


@pytest.mark.parametrize("left_by_workers, expected", [("RUNNING", "FAILED"), ("FINISHED", "FINISHED")])
def test_a_failed_launch_ends_only_the_runs_still_running(tmp_path, left_by_workers, expected):
    cfg, client, run_id = launch_run(tmp_path, left_by_workers)
    end_runs_of_launch(cfg, "launch-1", "FAILED")
    assert client.get_run(run_id).info.status == expected

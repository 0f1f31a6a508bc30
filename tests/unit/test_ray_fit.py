"""harness.launching.ray_train.fit hands the driver rank 0's result: the MLflow run id and a divergence.

Ray Train's local mode (``num_workers=0``) runs the same worker function in this
process, with the same ``ray.train.report`` calls and ``Result.return_value``, and
needs no cluster; the cluster path is covered in test_launchers.py.
"""

from mlflow.tracking import MlflowClient

from conftest import smoke_config
from harness.launching.ray_train import RayOptions, fit


def test_ray_fit_returns_the_mlflow_run_and_a_divergence(tmp_path):
    cfg = smoke_config(tmp_path, "optim.lr=1000000.0", "train.epochs=3")
    result = fit(cfg, RayOptions(num_workers=0, storage_path=str(tmp_path / "ray")))
    run = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(result.run_id)
    assert run.data.tags.get("diverged") == "true"
    assert result.diverged and result.epochs_completed == 1

"""harness.launching.ray_train.fit hands the driver rank 0's result: the MLflow run id and a divergence;
Ray's own INFO lines stay off the console unless asked for.

Ray Train's local mode (``num_workers=0``) runs the same worker function in this
process, with the same ``ray.train.report`` calls and ``Result.return_value``, and
needs no cluster; the cluster path is covered in test_launchers.py.
"""

import pytest
from mlflow.tracking import MlflowClient

from conftest import smoke_config
from harness.launching.entrypoints import (RAY_VERBOSE, ArgumentParser, add_config_arguments, add_ray_arguments,
                                           ray_logging, ray_verbose)
from harness.launching.ray_train import RayOptions, build_trainer, fit, prepare_ray_run


def test_ray_fit_returns_the_mlflow_run_and_a_divergence(tmp_path):
    cfg = smoke_config(tmp_path, "optim.lr=1000000.0", "train.epochs=3")
    result = fit(cfg, RayOptions(num_workers=0, storage_path=str(tmp_path / "ray")))
    run = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(result.run_id)
    assert run.data.tags.get("diverged") == "true"
    assert result.diverged and result.epochs_completed == 1


@pytest.mark.parametrize("flags, env, verbose", [([], {}, False), (["--verbose"], {}, True),
                                                 ([], {RAY_VERBOSE: "1"}, True)])
def test_ray_logs_its_own_info_lines_only_when_asked(tmp_path, monkeypatch, flags, env, verbose):
    """Ray Train's per-report and worker-group lines are INFO: off on the console unless --verbose (launch/ray_job.py,
    launch/sweep.py) or HARNESS_RAY_VERBOSE=1; warnings and errors always show."""
    monkeypatch.delenv(RAY_VERBOSE, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parser = ArgumentParser()
    add_config_arguments(parser)
    add_ray_arguments(parser)
    args = parser.parse_args(["--config", "configs/smoke.yaml", *flags])
    cfg, options = prepare_ray_run(smoke_config(tmp_path), 2, False, 0, str(tmp_path / "ray"),
                                   verbose=ray_verbose(args))
    assert options.verbose == verbose
    trainer = build_trainer([cfg], options, "smoke-launch")
    assert trainer.run_config.logging_config.log_level == ("INFO" if verbose else "WARNING")
    assert (ray_logging(verbose) is None) == verbose

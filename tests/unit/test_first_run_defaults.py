"""What a new user gets without asking: the README's plain run shows its epoch bar and adds no Hessian
pass, the configs whose reports read sharpness ask for it, and capacity's defaults time a short epoch
(the bench's progress lines: test_bench.py)."""

import pytest
import yaml

from conftest import CONFIGS, REPO, smoke_config, train_run
from harness import cli
from harness.core.config import load_config
from harness.core.distributed import DistContext
from harness.core.epoch_bar import epoch_bar

# Configs whose reports show the Hessian's extremes (the sharpness column, the minima study).
SHARPNESS_CONFIGS = ("configs/sweep_gpu.yaml", "configs/study.yaml", "configs/minima.yaml",
                     "examples/minima_cnn.yaml")


def test_the_readmes_plain_run_shows_its_epoch_bar_on_rank_0_only():
    cfg = load_config(CONFIGS / "fashion_mnist.yaml")
    assert cfg.train.progress
    shown = epoch_bar(cfg, DistContext(rank=0, world_size=2), total=10, epoch=1)
    hidden = epoch_bar(cfg, DistContext(rank=1, world_size=2), total=10, epoch=1)
    assert not shown.disable and hidden.disable
    shown.close(), hidden.close()


def test_the_readmes_plain_run_asks_for_no_hessian_pass():
    metrics = load_config(CONFIGS / "fashion_mnist.yaml").metrics
    assert not metrics.sharpness and metrics.sharpness_every is None


def test_a_run_that_does_not_ask_for_sharpness_computes_and_records_none(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = smoke_config(tmp_path)
    assert "sharpness" not in (CONFIGS / "smoke.yaml").read_text()  # the default, not the config, decides
    result = train_run(cfg, DistContext())
    metrics = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(result.run_id).data.metrics
    assert metrics["sharpness_readings"] == 0 and metrics["hessian_vector_products_total"] == 0
    assert not {key for key in metrics if "hessian_eigen" in key}, sorted(metrics)


@pytest.mark.parametrize("path", SHARPNESS_CONFIGS)
def test_configs_whose_reports_read_sharpness_set_it_themselves(path):
    raw = yaml.safe_load((REPO / path).read_text())
    assert raw["metrics"]["sharpness"] is True, f"{path}: metrics.sharpness must be set, the default is off"


def test_capacity_defaults_time_a_short_epoch_up_to_batch_8192():
    args = cli.build_parser().parse_args(["capacity"])
    assert (args.max_batch, args.epoch_samples) == (8192, cli.CAPACITY_EPOCH_SAMPLES) == (8192, 4096)
    # Batch 1's timed epoch is its longest: 4096 steps, not one per training sample.
    assert args.epoch_samples < load_config(CONFIGS / "fashion_mnist.yaml").train_set_size / 10


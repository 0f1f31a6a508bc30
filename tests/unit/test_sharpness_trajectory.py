"""metrics.sharpness_every: the Hessian's top eigenvalue read during training, at the steps it promises,
equal to an independent computation, with its cost recorded, and without changing the training."""

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from conftest import FailAfterEpoch, smoke_config, train_run
from harness.core.data import load_dataset
from harness.core.distributed import DistContext
from harness.core.model import build_model
from harness.core.train_loop import RunHooks

# Digits, 256 training samples in batches of 64: 4 steps an epoch. A 64-4-10 network has
# 310 parameters, few enough for the dense Hessian.
TINY = ("data.dataset=digits", "data.validation_size=200", "data.train_subset=256", "data.test_subset=120",
        "model.hidden_sizes=[4]", "optim.global_batch_size=64", "optim.lr=0.5", "metrics.target_val_accuracy=null",
        "metrics.noise_scale=false", "metrics.exact_noise_samples=null", "metrics.sharpness_samples=128",
        "metrics.sharpness_tolerance=0.00001")


def dense_hessian_extremes(cfg, state: dict) -> tuple[float, float]:
    """Largest and smallest eigenvalue of the dense Hessian of the mean cross-entropy on the first
    metrics.sharpness_samples training samples, in float64, the sigmoid MLP written out by hand."""
    train_set = load_dataset(cfg).train
    n = cfg.metrics.sharpness_samples
    x, y = train_set.features[:n].double(), train_set.targets[:n]
    shapes = [(k, state[k].shape) for k in ("linears.0.weight", "linears.0.bias", "linears.1.weight", "linears.1.bias")]
    flat = torch.cat([state[k].double().flatten() for k, _ in shapes])

    def loss(theta):
        parts, at = [], 0
        for _, shape in shapes:
            parts.append(theta[at:at + shape.numel()].view(shape))
            at += shape.numel()
        w0, b0, w1, b1 = parts
        return F.cross_entropy(torch.sigmoid(x @ w0.T + b0) @ w1.T + b1, y)

    eigenvalues = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat, vectorize=True))
    return float(eigenvalues[-1]), float(eigenvalues[0])


def trajectory(cfg, run_id, key="by_step/top_hessian_eigenvalue"):
    return {m.step: m.value for m in MlflowClient(tracking_uri=cfg.tracking.uri).get_metric_history(run_id, key)}


def test_sharpness_is_read_at_step_zero_every_n_steps_and_at_the_end_without_changing_training(tmp_path, capsys):
    cfg = smoke_config(tmp_path, *TINY, "train.max_steps=10", "metrics.sharpness=true", "metrics.sharpness_every=3")
    result = train_run(cfg, DistContext())
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("[smoke] time:") and "sharpness " in last_line and "(5 readings)" in last_line
    run = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(result.run_id)
    metrics = run.data.metrics
    top, bottom = trajectory(cfg, result.run_id), trajectory(cfg, result.run_id, "by_step/bottom_hessian_eigenvalue")
    assert list(top) == list(bottom) == [0, 3, 6, 9, 10]
    # The final reading (metrics.sharpness) is the trajectory's last point, read once.
    assert metrics["top_hessian_eigenvalue"] == top[10] and metrics["bottom_hessian_eigenvalue"] == bottom[10]
    assert metrics["sharpness_readings"] == 5 and metrics["time_sharpness_s"] > 0
    assert metrics["hessian_vector_products_total"] > metrics["hessian_vector_products"] > 0
    # Independent: the dense Hessian at the initial model and at the final checkpoint's parameters.
    for step, state in ((0, build_model(cfg).state_dict()), (10, torch.load(result.checkpoint, weights_only=True)["model"])):
        dense_top, dense_bottom = dense_hessian_extremes(cfg, state)
        assert top[step] == pytest.approx(dense_top, rel=1e-4), step
        assert bottom[step] == pytest.approx(dense_bottom, abs=1e-4 * abs(dense_top)), step
    # Reading the Hessian leaves the training alone: the same parameters as a run that never reads it.
    plain = train_run(smoke_config(tmp_path / "plain", *TINY, "train.max_steps=10", "metrics.sharpness=false",
                               "tracking.enabled=false"), DistContext())
    final, plain_final = (torch.load(r.checkpoint, weights_only=True)["model"] for r in (result, plain))
    assert all(torch.equal(final[k], plain_final[k]) for k in final)
    assert plain.metrics["sharpness_readings"] == 0 and plain.metrics["time_sharpness_s"] == 0


class KeepEpochState(RunHooks):
    """Keeps the model state of one epoch's checkpoint (older checkpoints are pruned as the run goes on)."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch, self.state = epoch, None

    def after_epoch(self, epoch, metrics, checkpoint, ctx):
        if epoch == self.epoch:
            self.state = torch.load(checkpoint, weights_only=True)["model"]


def test_sharpness_every_n_epochs_reads_at_those_epoch_ends_even_with_the_final_metric_off(tmp_path):
    cfg = smoke_config(tmp_path, *TINY, "train.epochs=4", "metrics.sharpness_every=2",
                       "metrics.sharpness_every_unit=epochs", "metrics.sharpness=false")
    epoch_two = KeepEpochState(2)
    result = train_run(cfg, DistContext(), hooks=epoch_two)
    metrics = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(result.run_id).data.metrics
    top = trajectory(cfg, result.run_id)
    assert list(top) == [0, 8, 16]  # epochs 2 and 4 end at steps 8 and 16, where the run ends too:
    assert "top_hessian_eigenvalue" not in metrics and metrics["sharpness_readings"] == 3  # read once there
    assert top[8] == pytest.approx(dense_hessian_extremes(cfg, epoch_two.state)[0], rel=1e-4)


def test_a_resumed_run_continues_the_trajectory_without_reading_or_logging_a_step_twice(tmp_path):
    # The default tolerance: here only where and how often it is read matters, not its last digits.
    cfg = smoke_config(tmp_path, *TINY, "train.max_steps=7", "metrics.sharpness_every=3",
                       "metrics.sharpness_tolerance=0.001", "metrics.sharpness=false")
    with pytest.raises(RuntimeError):
        train_run(cfg, DistContext(), hooks=FailAfterEpoch(1))  # after steps 0 and 3 were read and logged
    result = train_run(cfg, DistContext(), hooks=RunHooks(resume=True))
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    steps = [m.step for m in client.get_metric_history(result.run_id, "by_step/top_hessian_eigenvalue")]
    assert steps == [0, 3, 6, 7]
    assert client.get_run(result.run_id).data.metrics["sharpness_readings"] == 4  # the counters were checkpointed



def test_doubling_steps_reads_at_n_2n_4n_so_short_and_long_runs_get_alike_many_readings(tmp_path):
    cfg = smoke_config(tmp_path, *TINY, "train.max_steps=37", "metrics.sharpness_every=3",
                       "metrics.sharpness_every_unit=doubling_steps", "metrics.sharpness=false",
                       "metrics.sharpness_tolerance=0.001")
    result = train_run(cfg, DistContext())
    assert result.global_step == 37
    assert list(trajectory(cfg, result.run_id)) == [0, 3, 6, 12, 24, 37]  # step 0, N·2^k, the run's end

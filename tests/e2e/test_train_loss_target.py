"""train.target_train_loss: a run stops at the first evaluation whose full training loss reaches the target.

The problem is chosen so that the stopping step is known without the harness: full-batch
gradient descent (the global batch is the whole training split) on digits, evaluated
after every step, and the same descent done again by a plain torch loop from the same
initial model.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, REPO, run_command, seeded_store, smoke_config, train_run
from harness.core.checkpoint import config_fingerprint
from harness.core.config import load_config
from harness.core.data import load_dataset
from harness.core.distributed import DistContext
from harness.core.evaluation import AUTO_EVAL_COST, RunCounters, eval_floor
from harness.core.model import build_model
from harness.core.train_loop import RunHooks

TRAIN_SIZE = 256
# Digits, 256 training samples in one batch of 256: every step is a full-batch step and
# an epoch; momentum 0.9 as in smoke.yaml. The loss falls by ~0.03 a step near the
# targets used here, far above float32 rounding: the stopping step cannot flip.
FULL_BATCH = ("data.dataset=digits", "data.validation_size=200", f"data.train_subset={TRAIN_SIZE}",
              "data.test_subset=120", "model.hidden_sizes=[8]", f"optim.global_batch_size={TRAIN_SIZE}",
              "optim.lr=0.5", "train.max_steps=60", "metrics.eval_every_steps=1",
              "metrics.target_val_accuracy=null", "metrics.sharpness=false", "metrics.noise_scale=false",
              "metrics.exact_noise_samples=null")


def plain_gradient_descent(cfg, steps: int) -> list[float]:
    """The full training loss after 0..steps steps of plain full-batch SGD (with the config's momentum)."""
    train_set = load_dataset(cfg).train
    x, y = train_set.features, train_set.targets
    model = build_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    losses = []
    for _ in range(steps + 1):
        with torch.no_grad():
            losses.append(float(F.cross_entropy(model(x), y)))
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return losses


def known_stop(cfg, level: float) -> tuple[int, float, list[float]]:
    """The first step whose loss is below ``level``, and a target halfway between it and the step before."""
    losses = plain_gradient_descent(cfg, cfg.train.max_steps)
    step = next(k for k, loss in enumerate(losses) if loss < level)
    return step, (losses[step - 1] + losses[step]) / 2, losses


def test_training_loss_target_stops_at_the_step_plain_gradient_descent_first_reaches_it(tmp_path):
    step, target, losses = known_stop(smoke_config(tmp_path / "probe", *FULL_BATCH), level=0.6)
    assert 10 < step < 60 and losses[step - 1] - losses[step] > 1e-3
    cfg = smoke_config(tmp_path, *FULL_BATCH, f"train.target_train_loss={target!r}")
    result = train_run(cfg, DistContext())
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(result.run_id)
    metrics, tags = run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED"
    assert result.global_step == step == metrics["steps_to_train_loss_target"]
    assert tags["steps_to_train_loss_target"] == str(step)
    assert metrics["samples_to_train_loss_target"] == TRAIN_SIZE * step
    assert metrics["epochs_to_train_loss_target"] == pytest.approx(step)  # one full batch is one epoch
    assert metrics["seconds_to_train_loss_target"] > 0
    # Every check, logged with step = optimizer step, and the same losses as the plain loop's.
    history = [(m.step, m.value) for m in client.get_metric_history(result.run_id, "train_loss_full")]
    assert [s for s, _ in history] == list(range(1, step + 1))
    assert [v for _, v in history] == pytest.approx(losses[1:step + 1], rel=1e-4)
    assert history[-1][1] <= target < history[-2][1]
    assert metrics["train_loss_at_target_check"] == history[-1][1]
    # The final epoch metrics are those of the parameters at the stopping check.
    assert metrics["train_loss"] == pytest.approx(history[-1][1], rel=1e-6) and metrics["train_loss"] <= target
    test_set = load_dataset(cfg).test
    final = torch.load(result.checkpoint, weights_only=True)["model"]
    model = build_model(cfg)
    model.load_state_dict(final)
    with torch.no_grad():
        test_loss = float(F.cross_entropy(model(test_set.features), test_set.targets))
    assert metrics["test_loss"] == pytest.approx(test_loss, rel=1e-5)
    assert metrics["generalization_gap_loss"] == pytest.approx(metrics["test_loss"] - metrics["train_loss"])
    # A finished run trains nothing more when resumed.
    again = train_run(cfg, DistContext(), hooks=RunHooks(resume=True))
    assert again.global_step == step and again.metrics == {}
    assert len(client.get_metric_history(result.run_id, "train_loss_full")) == step


def test_each_of_several_loss_targets_is_reached_at_the_step_plain_gradient_descent_reaches_it(tmp_path):
    """A list: each target's step, suffixed by the target; unsuffixed keys and the stop are the smallest's."""
    probe = smoke_config(tmp_path / "probe", *FULL_BATCH)
    (early, high, losses), (late, low, _) = known_stop(probe, level=0.9), known_stop(probe, level=0.6)
    assert early < late
    cfg = smoke_config(tmp_path, *FULL_BATCH, f"train.target_train_loss=[{low!r}, {high!r}]")
    result = train_run(cfg, DistContext())
    run = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(result.run_id)
    metrics, tags = run.data.metrics, run.data.tags
    assert result.global_step == late and tags["steps_to_train_loss_target"] == str(late)
    for target, step in ((high, early), (low, late)):
        assert metrics[f"steps_to_train_loss_target_{target:g}"] == step, target
        assert metrics[f"samples_to_train_loss_target_{target:g}"] == TRAIN_SIZE * step
        assert metrics[f"train_loss_at_target_check_{target:g}"] == pytest.approx(losses[step], rel=1e-4)
    assert metrics["steps_to_train_loss_target"] == late
    assert metrics["train_loss_at_target_check"] == metrics[f"train_loss_at_target_check_{low:g}"]


def test_a_run_that_never_reaches_the_target_says_not_reached_and_one_that_does_stops_mid_epoch(tmp_path):
    # Batches of 64: 4 steps an epoch, so a stop can fall inside an epoch.
    minibatch = (*FULL_BATCH, "optim.global_batch_size=64", "train.max_steps=12")
    cfg = smoke_config(tmp_path / "never", *minibatch, "train.target_train_loss=0.01")
    result = train_run(cfg, DistContext())
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(result.run_id)
    assert result.global_step == 12 and run.data.tags["steps_to_train_loss_target"] == "not reached"
    assert "steps_to_train_loss_target" not in run.data.metrics
    losses = {m.step: m.value for m in client.get_metric_history(result.run_id, "train_loss_full")}
    assert list(losses) == list(range(1, 13))
    # The same run (same seed, same batches) with a target its step-k loss is the first to reach, k inside an epoch.
    step = next(k for k in range(5, 12) if k % 4 and losses[k] < min(losses[j] for j in range(1, k)))
    target = (min(losses[j] for j in range(1, step)) + losses[step]) / 2
    cfg = smoke_config(tmp_path / "reached", *minibatch, f"train.target_train_loss={target!r}")
    result = train_run(cfg, DistContext())
    metrics = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(result.run_id).data.metrics
    assert result.global_step == step == metrics["steps_to_train_loss_target"]
    assert metrics["epochs_to_train_loss_target"] == pytest.approx(step / 4)
    # The epoch-end evaluation scored the parameters of the stopping step, not the epoch's last step.
    assert metrics["train_loss"] == pytest.approx(losses[step], rel=1e-6) == metrics["train_loss_at_target_check"]


def test_the_automatic_schedule_counts_the_training_split_a_loss_target_scores():
    plain = load_config(CONFIGS / "smoke.yaml")  # 512 training samples, a subset of 256 validation samples
    with_target = load_config(CONFIGS / "smoke.yaml", ["train.target_train_loss=0.5"])
    assert eval_floor(plain) == math.ceil(256 / (3 * AUTO_EVAL_COST * 64))
    assert eval_floor(with_target) == math.ceil((256 + 512) / (3 * AUTO_EVAL_COST * 64))


def test_checkpoints_from_before_the_new_keys_still_resume():
    smoke = load_config(CONFIGS / "smoke.yaml")
    with_keys = load_config(CONFIGS / "smoke.yaml", ["train.target_train_loss=0.5", "metrics.sharpness_every=3",
                                                     "metrics.sharpness_every_unit=epochs"])
    # The fingerprint a checkpoint carries ignores the keys (as it ignores train.max_steps and metrics) ...
    assert config_fingerprint(with_keys) == config_fingerprint(smoke)
    # ... and counters saved before the new fields existed load with their defaults.
    old_progress = {"epoch": 2, "global_step": 16, "samples_seen": 1024, "train_seconds": 1.0,
                    "target_reached_epoch": 0, "target_reached_step": 0, "stopped_at_target": False,
                    "eval_seconds": 0.1, "epoch_eval_seconds": 0.1, "probe_seconds": 0.1, "tracking_seconds": 0.1}
    counters = RunCounters(**old_progress)
    assert (counters.train_loss_target_step, counters.sharpness_readings, counters.sharpness_seconds) == (0, 0, 0.0)


@pytest.mark.slow
def test_two_ranks_stop_together_at_the_step_one_process_computes(tmp_path):
    """2 gloo ranks, each half of the full batch: both stop at the plain loop's step (a rank that
    stopped elsewhere would leave the other waiting in a collective), reading sharpness on the way."""
    step, target, _ = known_stop(smoke_config(tmp_path / "probe", *FULL_BATCH), level=1.2)
    settings = [*FULL_BATCH, f"train.target_train_loss={target!r}", "metrics.sharpness_every=8",
                "metrics.sharpness_samples=64", f"tracking.uri={seeded_store(tmp_path)}",
                f"checkpoint.dir={tmp_path}/ckpt"]
    args = [str(REPO / ".venv/bin/torchrun"), "--standalone", "--nproc_per_node=2", str(REPO / "launch/train.py"),
            "--config", str(CONFIGS / "smoke.yaml")] + [a for s in settings for a in ("--set", s)]
    out = run_command(args, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    assert run.data.metrics["steps_to_train_loss_target"] == step == run.data.metrics["global_step"]
    top = client.get_metric_history(run.info.run_id, "by_step/top_hessian_eigenvalue")
    assert [m.step for m in top] == [*range(0, step, 8), step]

"""The exact step to each target: training again from the last evaluation below it finds the step an
evaluation after every step finds, for a run alone and for each member of a stack, and leaves the run's
trajectory as it was."""

import math

import pytest
import torch

from mlflow.tracking import MlflowClient

from conftest import CONFIGS, seeded_store, smoke_config
from harness.core.config import Config, load_config
from harness.core.data import load_dataset
from harness.core.distributed import DistContext
from harness.core.model import build_model
from harness.launching.runs import train_trials
from harness.measure.exact_noise import exact_noise_scale, population_noise_scale
from harness.measure.hessian_noise import hessian_noise_scale

# smoke: 8 steps an epoch of batch 64; the subset reaches 0.5 and 0.6 in its third and fourth epochs.
TARGETS = [0.5, 0.6]
COMMON = ("train.epochs=6", f"metrics.target_val_accuracy={TARGETS}",
          "metrics.eval_samples=200", "metrics.sharpness=false", "metrics.exact_noise_samples=128",
          "metrics.hessian_noise_samples=128", "metrics.hessian_noise_deviations=8")


def final_metrics(results, place):
    """Each run's last value of every metric, from its MLflow run (a target's are logged in the epoch it is reached)."""
    client = MlflowClient(tracking_uri=seeded_store(place))
    return [client.get_run(r.run_id).data.metrics for r in results]


def trials(place, k, *overrides):
    """``k`` trials (one: a run alone; more: a stack) differing in LR and seed."""
    return [smoke_config(place, *COMMON, f"name=m{i}", f"optim.lr={0.1 + 0.05 * i}", f"seed={i}", *overrides)
            for i in range(k)]


@pytest.mark.parametrize("k", [1, 3], ids=["alone", "stack of 3"])
def test_each_target_is_reached_at_the_step_an_evaluation_after_every_step_finds(tmp_path, k):
    sparse = train_trials(trials(tmp_path / "sparse", k, "metrics.eval_every_steps=7", "train.stop_at_target=true",
                                 "metrics.noise_window_steps=1"), DistContext())
    dense = train_trials(trials(tmp_path / "dense", k, "metrics.eval_every_steps=1"), DistContext())
    sparse_metrics = final_metrics(sparse, tmp_path / "sparse")
    for member, (a, metrics, b) in enumerate(zip(sparse, sparse_metrics, dense)):
        seen, every = accuracy_history(a, tmp_path / "sparse"), accuracy_history(b, tmp_path / "dense")
        assert all(every[step] == accuracy for step, accuracy in seen.items())  # one trajectory
        checks = sorted(seen)
        for t in TARGETS:
            # The first evaluation at or above t, the one before it, and the first step between them at or above t
            # (accuracy on 200 samples is noisy: it may have passed t and fallen back before an earlier one).
            found = next(i for i, step in enumerate(checks) if seen[step] >= t)
            before = checks[found - 1] if found else 0
            first = next(step for step in range(before + 1, checks[found] + 1) if every[step] >= t)
            assert metrics[f"steps_to_target_{t:g}"] == first, (member, t)
            assert metrics[f"samples_to_target_{t:g}"] == 64 * first
            assert metrics[f"steps_to_target_resolution_{t:g}"] == 1
        # What was measured at the crossing is measured on the state after that step.
        crossing = int(metrics["steps_to_target"])
        at_crossing = train_trials(trials(tmp_path / f"at{member}", k, f"train.max_steps={crossing}",
                                          "metrics.target_val_accuracy=null"), DistContext())[member]
        exact, hessian = exact_at(at_crossing.checkpoint)
        assert metrics["grad_sq_norm_exact_at_target"] == pytest.approx(exact.grad_sq_norm, rel=1e-6)
        assert metrics["grad_noise_scale_exact_at_target"] == pytest.approx(
            population_noise_scale(exact.trace_cov, exact.grad_sq_norm, 128), rel=1e-6)
        assert metrics["grad_hess_grad_at_target"] == pytest.approx(hessian.grad_hess_grad, rel=1e-6)
        b_noise = population_noise_scale(hessian.trace_hess_cov, hessian.grad_hess_grad, 128,
                                         hessian.trace_hess_cov_std_error)
        if math.isfinite(b_noise):
            assert metrics["grad_noise_scale_hessian_at_target"] == pytest.approx(b_noise, rel=1e-6)
        else:  # unresolved by 8 deviations: its components are logged, not the ratio
            assert "grad_noise_scale_hessian_at_target" not in metrics
        assert metrics["grad_trace_hess_cov_std_error_at_target"] == pytest.approx(hessian.trace_hess_cov_std_error,
                                                                                  rel=1e-6)


def accuracy_history(result, place) -> dict[int, float]:
    client = MlflowClient(tracking_uri=seeded_store(place))
    return {m.step: m.value for m in client.get_metric_history(result.run_id, "val_subset_accuracy")}


def exact_at(checkpoint):
    """The exact B_simple and B_noise (8 deviations) of a checkpoint's weights on the first 128 training samples,
    computed afresh. The training split is seed 0's: a stack's members train on its first trial's data."""
    state = torch.load(checkpoint, weights_only=True)
    model = build_model(Config.from_dict(state["config"]))
    model.load_state_dict(state["model"])
    subset = load_dataset(load_config(CONFIGS / "smoke.yaml")).train.head(128)
    return (exact_noise_scale(model, subset.features, subset.targets),
            hessian_noise_scale(model, subset.features, subset.targets, deviations=8))


@pytest.mark.parametrize("k", [1, 3], ids=["alone", "stack of 3"])
def test_finding_the_crossings_leaves_the_trajectory_as_it_was(tmp_path, k):
    replayed = train_trials(trials(tmp_path / "targets", k, "metrics.eval_every_steps=5"), DistContext())
    assert all(f"steps_to_target_{t:g}" in m for m in final_metrics(replayed, tmp_path / "targets") for t in TARGETS)
    plain = train_trials(trials(tmp_path / "none", k, "metrics.eval_every_steps=5",
                                "metrics.target_val_accuracy=0.99"), DistContext())
    for a, b in zip(replayed, plain):
        assert a.global_step == b.global_step
        wa, wb = (torch.load(r.checkpoint, weights_only=True)["model"] for r in (a, b))
        assert all(torch.equal(wa[key], wb[key]) for key in wa)


def test_the_noise_scale_at_a_target_averages_each_component_over_the_states_of_the_window(tmp_path):
    run = train_trials(trials(tmp_path / "window", 1, "metrics.eval_every_steps=7", "train.stop_at_target=true",
                              "metrics.noise_window_steps=4"), DistContext())[0]
    (metrics,) = final_metrics([run], tmp_path / "window")
    crossing = int(metrics["steps_to_target"])
    # Independent: runs stopped by their budget after each step of the window, each scored afresh.
    states = [exact_at(train_trials(trials(tmp_path / f"at{step}", 1, f"train.max_steps={step}",
                                           "metrics.target_val_accuracy=null"), DistContext())[0].checkpoint)
              [0] for step in range(crossing - 3, crossing + 1)]
    sq_norm = sum(s.grad_sq_norm for s in states) / 4
    trace = sum(s.trace_cov for s in states) / 4
    assert metrics["grad_noise_scale_exact_window_steps_at_target"] == 4
    assert metrics["grad_sq_norm_exact_at_target"] == pytest.approx(sq_norm, rel=1e-6)
    assert metrics["grad_noise_scale_exact_at_target"] == pytest.approx(trace / (sq_norm - trace / 128), rel=1e-6)

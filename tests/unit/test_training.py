"""The single-process loop: real MLflow records, FAILED on failure, reproducible, rank-0 only."""

import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, smoke_config, train_run, trial_runs
from harness.core.checkpoint import Checkpoints
from harness.core.distributed import DistContext
from harness.sweeps.sweep import expand_trials, run_sweep
from harness.core.train_loop import RunHooks, train
from harness.core.evaluation import is_evaluation_step
from harness.records.tracking import BY_STEP_KEYS, make_tracker

EPOCH_METRICS = {"train_loss_running", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss",
                 "test_accuracy", "generalization_gap_accuracy", "generalization_gap_loss", "samples_per_s",
                 "epoch_s", "global_step", "lr", "grad_sq_norm_estimate", "grad_trace_cov_estimate",
                 "time_train_s", "time_eval_s", "time_epoch_eval_s", "time_probe_s", "time_tracking_s",
                 "eval_fraction", "time_sharpness_s", "time_replay_s", "sharpness_readings",
                 "hessian_vector_products_total", "weight_norm", "train_eval_samples"}
FINAL_METRICS = {"top_hessian_eigenvalue", "bottom_hessian_eigenvalue", "hessian_eigensolver_converged",
                 "hessian_vector_products"}
TIMINGS = {"epoch_s", "samples_per_s", "time_train_s", "time_eval_s", "time_epoch_eval_s", "time_probe_s",
           "time_tracking_s", "eval_fraction", "time_sharpness_s", "time_replay_s"}


def test_smoke_run_is_recorded_in_a_real_sqlite_store(tmp_path):
    cfg = smoke_config(tmp_path, "metrics.sharpness=true")
    result = train_run(cfg, DistContext())
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.1" and run.data.params["batch_size"] == "64"
    assert run.data.params["model.hidden_sizes"] == "[32]" and run.data.params["world_size"] == "1"
    assert {"git_commit", "torch_version", "launcher"} <= set(run.data.tags)
    by_step = {f"by_step/{key}" for key in BY_STEP_KEYS}
    step_resolution = {"val_subset_accuracy", "train_loss_window"}
    assert EPOCH_METRICS | FINAL_METRICS | by_step | step_resolution <= set(run.data.metrics) <= (
        EPOCH_METRICS | FINAL_METRICS | by_step | step_resolution | {"grad_noise_scale"})
    # The subset's evaluations on the automatic schedule (its cost floor is 14 steps at batch 64), at
    # each epoch's end (8 steps: the run has a target) and at the budget's last step, logged with step = step.
    evaluated = [step for step in range(1, 17) if is_evaluation_step(cfg, step, 8)]
    assert evaluated == [8, 14, 16]
    assert [m.step for m in client.get_metric_history(result.run_id, "val_subset_accuracy")] == evaluated
    for key in by_step:  # the same values again, with step = the optimizer step at each epoch's end
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == [8, 16], key
    assert run.data.tags["steps_to_target"] == "not reached"  # smoke is far from 0.85
    for key in FINAL_METRICS:  # the Hessian's extremes, once, at the end of training
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == [2], key
    assert run.data.metrics["hessian_eigensolver_converged"] == 1.0
    assert run.data.metrics["bottom_hessian_eigenvalue"] <= run.data.metrics["top_hessian_eigenvalue"]
    for key in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == [1, 2], key
    gap = run.data.metrics["train_accuracy"] - run.data.metrics["test_accuracy"]
    assert run.data.metrics["generalization_gap_accuracy"] == pytest.approx(gap)
    assert result.global_step == 2 * 8  # 512 samples / 64 per step, 2 epochs


def test_training_loss_is_logged_at_each_evaluation_and_epoch_end_and_its_windows_average_to_the_epochs(tmp_path):
    """A point at each evaluation (8, 14, 16, 24 on smoke's schedule) and each epoch's end; each the mean loss
    of the samples since the point before, so an epoch's points, weighted by their steps (every batch full),
    average to that epoch's train_loss_running."""
    cfg = smoke_config(tmp_path, "train.epochs=3")
    result = train_run(cfg, DistContext())
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    points = sorted((m.step, m.value) for m in client.get_metric_history(result.run_id, "train_loss_window"))
    assert [step for step, _ in points] == [8, 14, 16, 24]
    epochs = {m.step: m.value for m in client.get_metric_history(result.run_id, "train_loss_running")}
    previous = 0
    for epoch in (1, 2, 3):
        inside = [(step, value) for step, value in points if 8 * (epoch - 1) < step <= 8 * epoch]
        weighted = sum((step - start) * value for (start, _), (step, value) in zip([(previous, 0)] + inside, inside))
        assert weighted / 8 == pytest.approx(epochs[epoch], rel=1e-9), epoch
        previous = inside[-1][0]


class FailAfterFirstEpoch(RunHooks):
    def after_epoch(self, epoch, metrics, checkpoint, ctx):
        if epoch == 1:
            raise RuntimeError("injected failure")


def test_failing_run_is_marked_failed_not_running(tmp_path):
    cfg = smoke_config(tmp_path)
    tracker = make_tracker(cfg, DistContext())
    with pytest.raises(RuntimeError, match="injected failure"):
        train([cfg], DistContext(), [tracker], hooks=FailAfterFirstEpoch())
    assert MlflowClient(tracking_uri=cfg.tracking.uri).get_run(tracker.run_id).info.status == "FAILED"


def test_same_config_twice_gives_identical_metrics_and_parameters(tmp_path):
    runs = [train_run(smoke_config(tmp_path / str(i), "tracking.enabled=false"), DistContext()) for i in range(2)]
    assert runs[0].metrics.keys() == runs[1].metrics.keys()
    for key in runs[0].metrics:
        if key not in TIMINGS:
            assert runs[0].metrics[key] == runs[1].metrics[key], key
    states = [torch.load(r.checkpoint, weights_only=True)["model"] for r in runs]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_manual_engine_trains_like_autograd(tmp_path):
    auto = train_run(smoke_config(tmp_path / "a", "tracking.enabled=false"), DistContext())
    manual = train_run(smoke_config(tmp_path / "m", "tracking.enabled=false", "train.grad_engine=manual"), DistContext())
    assert manual.metrics["train_loss"] == pytest.approx(auto.metrics["train_loss"], rel=1e-3)
    assert manual.metrics["test_accuracy"] == pytest.approx(auto.metrics["test_accuracy"], abs=0.01)


def test_non_zero_rank_writes_nothing(tmp_path):
    cfg = smoke_config(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}  # the empty store
    tracker = make_tracker(cfg, DistContext(rank=1, world_size=1))
    tracker.start()
    tracker.log_metrics({"x": 1.0}, step=1)
    tracker.set_tags({"y": 2})
    assert Checkpoints(cfg, DistContext(rank=1, world_size=1)).save({"a": 1}, 1) is None
    tracker.finish()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_resume_continues_the_same_run_and_ends_where_an_uninterrupted_run_ends(tmp_path):
    straight = train_run(smoke_config(tmp_path / "straight", "train.epochs=3"), DistContext())
    cfg = smoke_config(tmp_path / "resumed", "train.epochs=3")
    with pytest.raises(RuntimeError):
        train_run(cfg, DistContext(), hooks=FailAfterFirstEpoch())
    resumed = train_run(cfg, DistContext(), hooks=RunHooks(resume=True))
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    assert client.get_run(resumed.run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name("smoke").experiment_id])) == 1
    for key in ("train_loss", "test_accuracy", "epoch_s"):
        assert [m.step for m in client.get_metric_history(resumed.run_id, key)] == [1, 2, 3]
    a = torch.load(straight.checkpoint, weights_only=True)["model"]
    b = torch.load(Checkpoints(cfg).newest(), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_in_process_sweep_nests_one_child_per_batch_size(tmp_path):
    cfg = smoke_config(tmp_path, "sweep={batch_sizes: [32, 128], seeds: [0], lr_rules: [linear], base_batch_size: 64}")
    trials = expand_trials(cfg)
    assert [(t.optim.global_batch_size, t.optim.lr) for t in trials] == [(32, 0.05), (128, 0.2)]
    outcomes = run_sweep(cfg, DistContext()).outcomes
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name("smoke").experiment_id
    parents = client.search_runs([experiment], "tags.trials = '2'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = trial_runs(client, [experiment], parents[0].info.run_id)
    assert sorted(int(c.data.params["batch_size"]) for c in children) == [32, 128]
    assert {o.result.run_id for o in outcomes} == {c.info.run_id for c in children}


def test_tracking_off_never_imports_mlflow(tmp_path):
    code = ("import sys; from harness.core.config import load_config; from harness.core.distributed import DistContext; "
            "from harness.launching.runs import train_trials; "
            f"cfg = load_config({str(CONFIGS / 'smoke.yaml')!r}, ['tracking.enabled=false', "
            f"'checkpoint.dir={tmp_path}']); train_trials([cfg], DistContext()); print('mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_step_budget_stops_mid_epoch_at_exactly_that_many_steps(tmp_path):
    cfg = smoke_config(tmp_path, "tracking.enabled=false", "train.max_steps=11")  # 8 steps per epoch
    assert cfg.total_epochs == 2
    result = train_run(cfg, DistContext())
    assert (result.global_step, result.epochs_completed) == (11, 2)


def test_console_counts_the_epochs_a_step_budget_runs_not_train_epochs(tmp_path, capsys):
    # 8 steps per epoch: 20 steps run 3 epochs, while smoke.yaml says train.epochs: 2.
    cfg = smoke_config(tmp_path, "tracking.enabled=false", "train.max_steps=20")
    train_run(cfg, DistContext())
    epochs = [line.split()[2] for line in capsys.readouterr().out.splitlines() if line.startswith(f"[{cfg.name}] epoch")]
    assert epochs == ["1/3", "2/3", "3/3"]


def test_sweep_step_budget_and_warmup_reach_the_trials(tmp_path):
    cfg = smoke_config(tmp_path, "sweep={batch_sizes: [32, 64], lr_rules: [none, sqrt], base_batch_size: 32, "
                                 "budget_steps: 20, warmup_epochs: 0.5}")
    trials = {(t.trial.lr_rule, t.optim.global_batch_size): t for t in expand_trials(cfg)}
    assert all(t.train.max_steps == 20 for t in trials.values())
    assert trials[("sqrt", 64)].optim.lr == pytest.approx(0.1 * 2 ** 0.5)
    assert trials[("none", 64)].optim.warmup_epochs == 0.0 and trials[("sqrt", 64)].optim.warmup_epochs == 0.5


def test_linear_warmup_ramps_the_lr_then_holds_it(tmp_path):
    from harness.core.data import load_dataset
    from harness.core.train_loop import build_trainer

    cfg = smoke_config(tmp_path, "optim.warmup_epochs=0.5")  # 8 steps per epoch: 4 warmup steps
    trainer = build_trainer(cfg, DistContext(), load_dataset(cfg))
    assert [float(trainer.schedule.lr_at(step)[0]) for step in range(6)] == pytest.approx(
        [0.025, 0.05, 0.075, 0.1, 0.1, 0.1])


def test_diverging_run_stops_early_and_is_tagged(tmp_path):
    cfg = smoke_config(tmp_path, "optim.lr=500", "model.activation=relu", "train.epochs=6")
    result = train_run(cfg, DistContext())
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(result.run_id)
    assert result.diverged and result.epochs_completed < 6
    assert run.info.status == "FINISHED" and run.data.tags["diverged"] == "true"


@pytest.mark.parametrize("overrides, present, absent", [
    ([], {"data.dataset", "optim.momentum"},
     {"data.synthetic.num_train", "optim.betas", "optim.batch_steps", "metrics.sharpness_samples", "data.factory"}),
    (["data.dataset=synthetic", "data.validation_size=0", "optim.global_batch_size=4", "optim.name=adam",
      "metrics.sharpness=true"],
     {"data.synthetic.num_train", "optim.betas", "metrics.sharpness_samples"}, {"optim.batch_steps"}),
])
def test_a_run_records_only_the_params_that_apply_to_it(tmp_path, overrides, present, absent):
    from harness.records.tracking import run_params

    params = run_params(smoke_config(tmp_path, *overrides), DistContext())
    assert present <= set(params) and not absent & set(params), sorted(params)
    assert None not in params.values()


@pytest.mark.parametrize("stacked", [False, True])
def test_each_runs_final_model_is_an_mlflow_model_that_loads_with_its_checkpoints_weights(tmp_path, stacked):
    """Alone, or each member of a stack of two (whose weights are views of the stack's rows): the run's
    artifact "model" loads with mlflow.pytorch.load_model and holds the final checkpoint's weights."""
    import mlflow
    import mlflow.pytorch

    from harness.launching.runs import train_trials

    lrs = (0.1, 0.05) if stacked else (0.1,)
    trials = [smoke_config(tmp_path, "tracking.log_model=true", f"optim.lr={lr}", f"name=smoke-lr{lr}")
              for lr in lrs]
    results = train_trials(trials, DistContext())
    mlflow.set_tracking_uri(trials[0].tracking.uri)
    features = torch.rand(5, 784)
    for result in results:
        model = mlflow.pytorch.load_model(f"runs:/{result.run_id}/model")
        weights = torch.load(result.checkpoint, weights_only=True)["model"]
        assert set(model.state_dict()) == set(weights)
        assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)
        assert model(features).shape == (5, 10)

"""Steps-to-target at step resolution: the periodic evaluation, stop_at_target, resume, the clock, bad input."""

import importlib.util
import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, REPO, FailAfterEpoch, smoke_config, train_run
from harness.core import evaluation
from harness.core.checkpoint import Checkpoints
from harness.core.config import load_config
from harness.core.data import load_dataset
from harness.core.distributed import DistContext
from harness.core.evaluation import AUTO_EVAL_COST, AUTO_RESOLUTION, eval_floor, is_evaluation_step
from harness.core.model import build_model
from harness.core.train_loop import RunHooks
from harness.launching.runs import train_trials
from harness.errors import InputError

# smoke: 512 training samples in batches of 64, 8 steps an epoch; the validation
# subset is the first 200 of its 256 validation samples. Seen: the subset reaches
# 0.6 in epoch 4 (step ~26), far before the 6-epoch budget of 48 steps.
STOP = ("train.epochs=6", "metrics.target_val_accuracy=0.6", "metrics.eval_every_steps=3",
        "metrics.eval_samples=200", "train.stop_at_target=true", "metrics.sharpness=true", "metrics.sharpness_samples=128",
        "metrics.exact_noise_samples=128")


def subset_accuracy(cfg, model_state) -> float:
    """The validation subset's accuracy, recomputed from a checkpoint's weights with plain torch."""
    model = build_model(cfg)
    model.load_state_dict(model_state)
    validation = load_dataset(cfg).validation
    x, y = validation.features[:cfg.metrics.eval_samples], validation.targets[:cfg.metrics.eval_samples]
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_automatic_schedule_reads_steps_to_target_to_five_percent_at_a_bounded_cost():
    cfg = load_config(CONFIGS / "smoke.yaml")  # batch 64, a validation split of 256
    # Scoring 256 samples costs about 256/3 training samples' worth: at most 10% of
    # training means at least 256 / (3 * 0.10 * 64) -> 14 steps between evaluations.
    assert eval_floor(cfg) == math.ceil(256 / (3 * AUTO_EVAL_COST * 64)) == 14
    evaluated = [step for step in range(1, 100_001) if is_evaluation_step(cfg, step)]
    gaps = [(later - earlier) / later for earlier, later in zip(evaluated, evaluated[1:])]
    assert min(b - a for a, b in zip(evaluated, evaluated[1:])) == 14
    # Past the floor every evaluation is within 5% of the previous one (2.5% at the least) ...
    late = [gap for gap, step in zip(gaps, evaluated[1:]) if step * AUTO_RESOLUTION >= 2 * 14]
    assert late and max(late) <= AUTO_RESOLUTION and min(late) > AUTO_RESOLUTION / 2 - 0.01
    # ... so about 20 evaluations per doubling of the steps, not one per step.
    assert 20 * math.log2(100_000 / (14 / AUTO_RESOLUTION)) < len(evaluated) < 20 * math.log2(100_000 / 14)
    big = load_config(CONFIGS / "smoke.yaml", ["optim.global_batch_size=512", "data.train_subset=null",
                                               "data.validation_size=5000"])
    assert eval_floor(big) == math.ceil(2000 / (3 * AUTO_EVAL_COST * 512)) == 14  # eval_samples 2000
    fixed = load_config(CONFIGS / "smoke.yaml", ["metrics.eval_every_steps=7"])
    assert [s for s in range(1, 50) if is_evaluation_step(fixed, s)] == [7, 14, 21, 28, 35, 42, 49]
    # A study that wants a finer stopping point pays for it: three times the budget, a third of the floor.
    finer = load_config(CONFIGS / "smoke.yaml", ["metrics.eval_cost=0.3"])
    assert eval_floor(finer) == math.ceil(256 / (3 * 0.3 * 64)) == 5


def test_stop_at_target_ends_at_the_first_evaluation_that_reaches_it_with_the_exact_step(tmp_path):
    cfg = smoke_config(tmp_path, *STOP)
    result = train_run(cfg, DistContext())
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stopped_at_target"] == "true"
    history = [(m.step, m.value) for m in client.get_metric_history(result.run_id, "val_subset_accuracy")]
    steps = [step for step, _ in history]
    # Every 3 steps and every epoch's end (8 steps), and none after the stop.
    assert steps == [s for s in range(1, result.global_step + 1) if s % 3 == 0 or s % 8 == 0]
    # The first evaluation at or above the target is the last one, and the run stopped there ...
    assert all(value < 0.6 for _, value in history[:-1]) and history[-1][1] >= 0.6
    # ... and the step that first reached it lies after the evaluation before.
    metrics = run.data.metrics
    reached = int(metrics["steps_to_target"])
    assert history[-2][0] < reached <= history[-1][0] == result.global_step < 48
    assert run.data.tags["steps_to_target"] == str(reached)
    assert metrics["samples_to_target"] == 64 * reached  # 512 = 8 full batches: every batch is 64
    assert metrics["epochs_to_target"] == pytest.approx(reached / 8)
    # Independent: the final checkpoint's weights, scored by plain torch, give the logged accuracy.
    final = torch.load(result.checkpoint, weights_only=True)
    assert subset_accuracy(cfg, final["model"]) == pytest.approx(history[-1][1])
    # Measured at the target, beside it: the probe's window and the exact noise scale, and the sharpness at the end.
    for key in ("grad_noise_scale_exact_at_target", "grad_sq_norm_at_target", "grad_trace_cov_at_target",
                "top_hessian_eigenvalue"):
        assert key in metrics, key
    assert metrics["eval_fraction"] == pytest.approx(metrics["time_eval_s"] / metrics["time_train_s"])
    assert all(metrics[k] >= 0 for k in ("time_eval_s", "time_probe_s", "time_tracking_s", "time_epoch_eval_s"))
    assert metrics["time_probe_s"] > 0 and metrics["time_eval_s"] > 0

    # --resume of a finished run trains nothing more and logs nothing new.
    again = train_run(cfg, DistContext(), hooks=RunHooks(resume=True))
    assert again.global_step == result.global_step and again.metrics == {}
    assert len(client.get_metric_history(result.run_id, "val_subset_accuracy")) == len(history)
    newest = torch.load(Checkpoints(cfg).newest(), weights_only=True)["model"]
    assert all(torch.equal(newest[k], final["model"][k]) for k in newest)


def test_a_run_that_never_reaches_the_target_uses_its_budget_and_says_not_reached(tmp_path):
    cfg = smoke_config(tmp_path, "train.max_steps=12", "metrics.target_val_accuracy=0.99", "train.stop_at_target=true",
                       "metrics.sharpness=false")
    result = train_run(cfg, DistContext())
    run = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(result.run_id)
    assert result.global_step == 12 and run.data.tags["steps_to_target"] == "not reached"
    # The schedule's floor is 14 steps here: the evaluations are the first epoch's end and the budget's last step.
    history = MlflowClient(tracking_uri=cfg.tracking.uri).get_metric_history(result.run_id, "val_subset_accuracy")
    assert [m.step for m in history] == [8, 12]
    assert "steps_to_target" not in run.data.metrics and "stopped_at_target" not in run.data.tags


def test_evaluations_happen_only_at_their_steps(tmp_path, monkeypatch):
    steps = []
    real = evaluation.StepEvaluations._evaluate
    monkeypatch.setattr(evaluation.StepEvaluations, "_evaluate", lambda self, step: steps.append(step) or real(self, step))
    cfg = smoke_config(tmp_path, "tracking.enabled=false", "train.max_steps=20", "metrics.eval_every_steps=4",
                       "metrics.sharpness=false")
    train_run(cfg, DistContext())
    assert steps == [4, 8, 12, 16, 20]


def test_resume_reaches_the_target_at_the_same_step_with_the_same_measurements(tmp_path):
    # A window of 4 steps before the crossing lies after the restart: a window starts no earlier than it.
    window = "metrics.noise_window_steps=4"
    straight = train_run(smoke_config(tmp_path / "straight", "tracking.enabled=false", *STOP, window), DistContext())
    cfg = smoke_config(tmp_path / "resumed", "tracking.enabled=false", *STOP, window)
    with pytest.raises(RuntimeError):
        train_run(cfg, DistContext(), hooks=FailAfterEpoch(2))  # mid-window, before the target
    resumed = train_run(cfg, DistContext(), hooks=RunHooks(resume=True))
    assert resumed.global_step == straight.global_step
    for key in ("steps_to_target", "samples_to_target", "grad_noise_scale_exact_at_target",
                "grad_sq_norm_at_target", "grad_trace_cov_at_target", "val_accuracy"):
        assert resumed.metrics[key] == pytest.approx(straight.metrics[key], rel=1e-9), key
    a = torch.load(straight.checkpoint, weights_only=True)["model"]
    b = torch.load(resumed.checkpoint, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


TARGETS_EXPECTED = "metrics.target_val_accuracy: expected a number in (0, 1], or a non-empty list of distinct such"


@pytest.mark.parametrize("overrides, expected", [
    (["metrics.eval_every_steps=0"], "metrics.eval_every_steps: expected a positive number, got 0"),
    (["metrics.eval_samples=-1"], "metrics.eval_samples: expected a positive number"),
    (["metrics.eval_cost=0"], "metrics.eval_cost: expected a number in (0, 1]"),
    (["metrics.eval_cost=1.5"], "metrics.eval_cost: expected a number in (0, 1]"),
    (["metrics.target_val_accuracy=1.5"], TARGETS_EXPECTED),
    (["metrics.target_val_accuracy=[0.8, 0.8]"], TARGETS_EXPECTED),
    (["metrics.target_val_accuracy=0"], TARGETS_EXPECTED),
    (["train.stop_at_target=true", "metrics.target_val_accuracy=null"], "train.stop_at_target: true needs a target"),
    (["train.race_stop=2"], "train.race_stop: 2 races trials to their target; expected train.stop_at_target true"),
    (["train.stop_at_target=true", "train.race_stop=1"], "train.race_stop: expected a number > 1 or null"),
    (["metrics.train_eval_samples=0"], "metrics.train_eval_samples: expected a positive number"),
])
def test_bad_evaluation_keys_are_refused_with_one_line(overrides, expected):
    with pytest.raises(InputError) as error:
        load_config(CONFIGS / "smoke.yaml", overrides)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_stop_at_target_without_a_target_exits_2_before_anything_starts(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    status = launcher.main(["--config", str(CONFIGS / "smoke.yaml"), "--set", "train.stop_at_target=true",
                            "--set", "metrics.target_val_accuracy=null"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "train.stop_at_target" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_no_target_means_no_steps_to_target(tmp_path):
    result = train_run(smoke_config(tmp_path, "tracking.enabled=false", "metrics.target_val_accuracy=null",
                                "train.max_steps=8", "metrics.sharpness=false"), DistContext())
    assert "steps_to_target" not in result.metrics and "eval_fraction" in result.metrics


class FailAtEpochEnd(RunHooks):
    """Hooks that break a run once every member's checkpoint of epoch ``epoch`` is written."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def epoch_done(self, epoch, ctx):
        if epoch == self.epoch:
            raise RuntimeError("injected failure")


@pytest.mark.parametrize("race_stop", [None, 2], ids=["no race", "race"])
def test_a_stack_resumed_after_its_first_member_stopped_at_the_target_ends_each_member_where_it_ends_unbroken(
        tmp_path, race_stop):
    def stack(place):  # member 0 reaches the target early and stops; member 1 never does (the race stops it)
        race = [f"train.race_stop={race_stop}"] if race_stop else []
        return [smoke_config(place, "tracking.enabled=false", f"name=m{k}", f"optim.lr={lr}", *STOP, *race)
                for k, lr in enumerate((0.4, 0.002))]
    straight = train_trials(stack(tmp_path / "straight"), DistContext())
    stopped_epoch = straight[0].epochs_completed
    assert stopped_epoch < straight[1].epochs_completed <= 6
    interrupted = stack(tmp_path / "resumed")
    with pytest.raises(RuntimeError, match="injected failure"):
        train_trials(interrupted, DistContext(), hooks=FailAtEpochEnd(stopped_epoch))
    resumed = train_trials(interrupted, DistContext(), hooks=RunHooks(resume=True))
    assert [r.global_step for r in resumed] == [r.global_step for r in straight]
    bound = straight[1].metrics.get("steps_to_target_lower_bound")
    # The race: member 1 stops at the first evaluation at or past twice member 0's steps, with that bound.
    assert bound == (None if race_stop is None else straight[1].global_step)
    if race_stop:
        assert straight[1].global_step >= race_stop * straight[0].metrics["steps_to_target"] > straight[1].global_step - 3
        assert resumed[1].metrics["steps_to_target_lower_bound"] == bound
    a, b = (torch.load(r.checkpoint, weights_only=True)["model"] for r in (straight[1], resumed[1]))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_epoch_training_metrics_are_an_estimate_on_fixed_samples_and_the_last_epoch_scores_the_whole_split(tmp_path):
    cfg = smoke_config(tmp_path, "metrics.train_eval_samples=100", "train.epochs=3", "metrics.sharpness=false")
    result = train_run(cfg, DistContext())
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    counts = [m.value for m in sorted(client.get_metric_history(result.run_id, "train_eval_samples"),
                                      key=lambda m: m.step)]
    assert counts == [100, 100, 512]
    model = build_model(cfg)
    model.load_state_dict(torch.load(result.checkpoint, weights_only=True)["model"])
    train = load_dataset(cfg).train
    whole = evaluation.evaluate(model, train, DistContext(), 10000)
    assert result.metrics["train_loss"] == pytest.approx(whole[0], rel=1e-6)
    spread = train.spread(100)  # evenly spaced over the split: its ends included, no repeats
    assert torch.equal(spread.targets[[0, -1]], train.targets[[0, -1]]) and len(spread) == 100


def test_members_evaluated_as_one_score_what_each_scores_alone():
    cfg = load_config(CONFIGS / "smoke.yaml", ["tracking.enabled=false"])
    split = load_dataset(cfg).test
    models = [build_model(cfg.model_copy(update={"seed": seed})) for seed in (0, 1, 2)]
    together = evaluation.evaluate_members(models, split, DistContext(), batch_size=100)
    for model, (loss, accuracy) in zip(models, together):
        alone = evaluation.evaluate(model, split, DistContext(), batch_size=10000)
        assert loss == pytest.approx(alone[0], rel=1e-6) and accuracy == alone[1]

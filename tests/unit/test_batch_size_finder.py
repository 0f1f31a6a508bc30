"""harness batch-size: McCandlish et al.'s step and sample model applied piece by piece, checked against
its closed form; the noise readings of the statistics run against the exact noise scale of the same
weights; the command end to end with its MLflow run."""

import json
import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, seeded_store
from harness.analysis.batch_prediction import (NoiseReading, at_target, lr_for, minimum_steps_and_samples, predict,
                                               predicted_steps, recommend, step_seconds_at)
from harness.bench.batch_size import read_noise_along_training
from harness.core.config import load_config
from harness.core.data import load_dataset
from harness.core.model import build_model
from harness.measure.exact_noise import exact_noise_scale, population_noise_scale


@pytest.mark.parametrize("b0", [16, 64, 256])
def test_a_constant_noise_scale_gives_the_closed_form_at_every_batch(b0):
    """With B_noise constant, S(B) = S_min (1 + B_noise / B) where S_min = S(B0) / (1 + B_noise / B0),
    E(B) = E_min (1 + B / B_noise), and B_crit = E_min / S_min is B_noise itself."""
    b_noise, measured = 120.0, 1000
    readings = [NoiseReading(step, b_noise) for step in range(0, measured, 37)]  # uneven stretches
    s_min, e_min = minimum_steps_and_samples(readings, measured, b0)
    assert s_min == pytest.approx(measured / (1 + b_noise / b0), rel=1e-12)
    assert e_min / s_min == pytest.approx(b_noise, rel=1e-12)
    for batch in (8, b0, 1000, 8192):
        steps = predicted_steps(readings, measured, b0, batch)
        assert steps == pytest.approx(s_min * (1 + b_noise / batch), rel=1e-12)
        assert steps * batch == pytest.approx(e_min * (1 + batch / b_noise), rel=1e-12)
    assert predicted_steps(readings, measured, b0, b0) == pytest.approx(measured, rel=1e-12)


def test_a_changing_noise_scale_adds_up_stretch_by_stretch():
    """Two stretches by hand: 100 steps at B_noise 32, then 300 at 256, measured at B0 = 32."""
    readings = [NoiseReading(0, 32.0), NoiseReading(100, 256.0)]
    d1, d2 = 100 / (1 + 32 / 32), 300 / (1 + 256 / 32)  # optimal steps of each stretch: 50, 33.3
    s_min, e_min = minimum_steps_and_samples(readings, 400, 32)
    assert (s_min, e_min) == pytest.approx((d1 + d2, 32 * d1 + 256 * d2), rel=1e-12)
    assert predicted_steps(readings, 400, 32, 1024) == pytest.approx(d1 * (1 + 32 / 1024) + d2 * (1 + 256 / 1024))
    result = predict(readings, 400, 32, 0.1, [32, 1024], "noise")
    assert result["b_crit"] == pytest.approx((32 * d1 + 256 * d2) / (d1 + d2))


@pytest.mark.parametrize("rule, expected", [("noise", 0.1 * (1 + 100 / 32) / (1 + 100 / 512)),
                                            ("linear", 1.6), ("sqrt", 0.4), ("none", 0.1)])
def test_the_lr_column_follows_the_rule_from_the_runs_lr(rule, expected):
    assert lr_for(rule, 512, 32, 0.1, 100.0) == pytest.approx(expected)


def test_time_per_step_beyond_the_largest_batch_is_that_many_accumulated_passes():
    measured = {1: 1.0, 2: 1.0, 4: 2.0, 8: 4.0}
    assert step_seconds_at(8, measured, 8) == (4.0, 1)
    assert step_seconds_at(32, measured, 8) == (16.0, 4)
    assert step_seconds_at(3, measured, 8)[0] == pytest.approx(math.exp(0.585 * math.log(2)), rel=1e-3)


@pytest.mark.parametrize("flat_until, binds", [(1024, "statistics bind"), (16, "hardware binds")])
def test_the_answer_says_which_limit_binds(flat_until, binds):
    readings = [NoiseReading(0, 100.0)]
    times = {b: 0.01 * max(1, b / flat_until) for b in (16, 32, 64, 128, 256, 512, 1024, 2048)}
    answer = recommend(predict(readings, 500, 32, 0.1, list(times), "noise", times, 2048), flat_until, 2048)
    assert answer["binds"].startswith(binds) and answer["fewest_samples_batch"] == 16


def test_each_noise_reading_is_the_exact_noise_scale_of_the_weights_it_was_read_at():
    """With a one-step window, the first reading (step 0, before any update) is the population-corrected
    exact B_simple of the initial weights, computed here independently."""
    cfg = load_config(CONFIGS / "smoke.yaml", ["data.dataset=digits", "data.validation_size=297", "data.train_subset=null",
                                              "metrics.exact_noise_samples=1000", "metrics.target_val_accuracy=0.6",
                                              "tracking.enabled=false"])
    run = read_noise_along_training(cfg, torch.device("cpu"), batch=16, lr=0.1, every=5, window=1, max_steps=400)
    train = load_dataset(cfg).train.head(1000)
    exact = exact_noise_scale(build_model(cfg), train.features, train.targets)
    first = run.readings[0]
    assert first["step"] == 0 and first["resolved"]
    assert first["b_noise"] == pytest.approx(population_noise_scale(exact.trace_cov, exact.grad_sq_norm, 1000),
                                             rel=1e-9)
    assert run.reached_all and 0 < run.crossings[0.6] < 400 and [r["step"] for r in run.readings][:3] == [0, 5, 10]


def test_the_command_prints_the_answer_and_records_it_as_a_finished_mlflow_run(tmp_path, monkeypatch, capsys):
    from harness.cli import main as harness_main

    monkeypatch.chdir(tmp_path)
    uri = seeded_store(tmp_path / "store")
    out = tmp_path / "answer.json"
    status = harness_main(["batch-size", "--config", str(CONFIGS / "smoke.yaml"), "--set", "data.dataset=digits",
                           "--set", "data.validation_size=297", "--set", "metrics.target_val_accuracy=[0.5, 0.7]",
                           "--set", "metrics.exact_noise_samples=128", "--batch", "16", "--lr", "0.1",
                           "--every", "10", "--window", "2", "--max-steps", "1000", "--max-batch", "256", "--device", "cpu",
                           "--json", str(out), "--out", str(tmp_path / "reports"), "--tracking-uri", uri,
                           "--experiment", "finder"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    result = json.loads(out.read_text())
    assert [a["target"] for a in result["answers"]] == [0.5, 0.7]
    rows = result["answers"][-1]["rows"]
    assert [r["batch_size"] for r in rows] == [16, 32, 64, 128, 256]
    assert all(r["step_s"] > 0 and r["wall_s"] == pytest.approx(r["steps"] * r["step_s"]) for r in rows)
    assert "To held-out accuracy 0.7: critical batch ~" in captured.out
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("finder").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["run_kind"] == "batch-size"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "batch_size/steps")) == [
        16, 32, 64, 128, 256]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "batch-size")} == {
        "batch-size/batch-size.json", "batch-size/batch-size.png"}


def test_at_the_target_the_noise_scale_is_the_last_stretchs_mean_trace_over_its_mean_gradient():
    """The last 20% of the steps' readings, their tr(Sigma) and |G|^2 averaged, corrected for N samples; the
    steps follow S(B) = S(B0) (1 + B_t / B) / (1 + B_t / B0), the run's own count at B0."""
    readings = [{"step": s, "trace": 10.0 + s, "grad_sq": 1.0, "b_noise": 10.0 + s} for s in range(0, 100, 10)]
    trace = (90 + 100) / 2  # steps 80 and 90 lie in the last 20% of 100 steps
    expected = population_noise_scale(trace, 1.0, 1000)
    assert at_target(readings, 100, 1000) == pytest.approx(expected, rel=1e-12)
    result = predict([NoiseReading(r["step"], r["b_noise"]) for r in readings], 100, 32, 0.1, [32, 4096], "noise",
                     b_at_target=expected)
    steps = {r["batch_size"]: r["steps"] for r in result["rows"]}
    assert steps[32] == pytest.approx(100) and result["b_crit"] == expected
    assert steps[4096] == pytest.approx(100 * (1 + expected / 4096) / (1 + expected / 32))

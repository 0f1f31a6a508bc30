"""``harness capacity``: every batch size measured, memory as the step's tensors, the flat range and the
cap by their definitions, and a finished MLflow run with its files (no timing asserted)."""

import json
import statistics

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, seeded_store
from harness.core.config import load_config
from harness.core.model import build_model
from harness.bench.capacity import accumulation_plans, batch_sizes, flat_until, run_capacity

SMOKE = CONFIGS / "smoke.yaml"  # 784-32-10 sigmoid, 512 training samples


def test_flat_range_ends_at_the_last_batch_within_1_5x_of_the_fastest_step_so_far():
    # Flat up to 8 (1.4x), then 16 is 1.6x: the range ends at 8 even though 32 dips back (noise past the knee).
    timings = {1: 1.0, 2: 1.1, 4: 1.2, 8: 1.4, 16: 1.6, 32: 1.45, 64: 3.0}
    assert flat_until(timings) == 8
    assert flat_until({1: 1.0, 2: 2.0}) == 1  # nothing is flat beyond batch 1
    assert flat_until({1: 1.0, 2: 1.0, 4: 1.5}) == 4  # 1.5x itself still counts as flat
    # A batch 1 slowed by a one-off does not make everything flat: 2 is the reference from there on.
    assert flat_until({1: 24.0, 2: 0.57, 4: 0.56, 8: 0.67, 16: 0.76, 32: 0.95, 64: 1.25}) == 16
    assert flat_until({}) is None


def test_batches_double_up_to_the_smaller_of_the_limit_and_the_training_set():
    assert batch_sizes(64, 512) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_sizes(100, 512) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_sizes(8192, 512) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


def test_a_global_batch_beyond_the_largest_is_micro_batches_of_the_largest_accumulated():
    plans = accumulation_plans(4096)
    assert [(p["global_batch_size"], p["micro_batch_size"], p["accumulation_steps"]) for p in plans] == [
        (8192, 4096, 2), (16384, 4096, 4), (32768, 4096, 8)]
    assert all(p["micro_batch_size"] * p["accumulation_steps"] == p["global_batch_size"] for p in plans)
    assert plans[0]["overrides"] == "--set optim.global_batch_size=8192 --set optim.micro_batch_size=4096"


def test_cpu_memory_is_the_step_tensors_counted_by_hand():
    """3 fp32 copies of the 25,450 parameters (weights, gradients, momentum), and per sample what autograd keeps:
    the gathered input (784 fp32), the hidden activation (32 fp32, saved once though two ops use it), the
    log-softmax output (10 fp32) and the int64 target; plus the loss's fp32 scalar total weight."""
    cfg = load_config(SMOKE, ["tracking.enabled=false"])
    result = run_capacity(cfg, torch.device("cpu"), max_batch=8, epoch_samples=16)
    parameters = 784 * 32 + 32 + 32 * 10 + 10
    per_sample = 4 * (784 + 32 + 10) + 8
    memory = {p["batch_size"]: p["memory_bytes"] for p in result["points"]}
    assert memory == {b: 3 * 4 * parameters + b * per_sample + 4 for b in (1, 2, 4, 8)}
    assert result["largest_batch"] == 8 and result["cap_reason"] == "--max-batch"


def test_capacity_measures_a_factory_model_whose_fixed_memory_is_three_copies_of_its_weights():
    """A factory's CNN: the step's tensors grow by the same bytes per sample at every batch, and what does not
    grow is its parameters, gradients and momentum (4 bytes each) and the loss's scalar."""
    cfg = load_config(SMOKE, ["tracking.enabled=false", "model.factory=tests.user_models:tiny_cnn"])
    result = run_capacity(cfg, torch.device("cpu"), max_batch=8, epoch_samples=16)
    assert result["model"] == "tests.user_models:tiny_cnn()" and result["layer_sizes"] is None
    memory = {p["batch_size"]: p["memory_bytes"] for p in result["points"]}
    per_sample = memory[2] - memory[1]
    assert per_sample > 0 and all(memory[b] == memory[1] + (b - 1) * per_sample for b in (4, 8))
    parameters = sum(p.numel() for p in build_model(cfg).parameters())
    assert memory[1] - per_sample == 3 * 4 * parameters + 4


@pytest.mark.slow
def test_cpu_capacity_run_writes_every_batch_a_plot_and_a_finished_mlflow_run(tmp_path, monkeypatch, capsys):
    from harness.cli import main as harness_main

    # The command's main() in this process (the capacity run is in its process either way), from a folder of
    # its own: what it writes outside --out and --json would show up there.
    monkeypatch.chdir(tmp_path)
    uri = seeded_store(tmp_path / "store")
    out = tmp_path / "capacity.json"
    status = harness_main(["capacity", "--config", str(SMOKE), "--device", "cpu", "--max-batch", "32",
                           "--epoch-samples", "64", "--json", str(out), "--out", str(tmp_path / "reports"),
                           "--tracking-uri", uri, "--experiment", "capacity"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    data = json.loads(out.read_text())
    points = data["points"]
    assert [p["batch_size"] for p in points] == [1, 2, 4, 8, 16, 32]
    memory = [p["memory_bytes"] for p in points]
    assert memory == sorted(memory) and memory[0] > 0
    for p in points:
        assert p["step_s"] > 0 and abs(p["sample_s"] * p["batch_size"] - p["step_s"]) < 1e-12
        # At least 5 timed steps and at least 0.25 s of them (or 500): the median of the timed steps.
        timed = p["step_s_all"]
        assert len(timed) >= 5 and (sum(timed) >= 0.25 or len(timed) == 500) and p["epoch_samples"] == 64
        assert p["step_s"] == statistics.median(timed)
    assert data["largest_batch"] == 32 and data["flat_until_batch"] in (1, 2, 4, 8, 16, 32)
    assert "| 32 |" in captured.out and "flat until batch" in captured.out
    plot = tmp_path / "reports" / "capacity-cpu-smoke" / "capacity.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("capacity").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["run_kind"] == "capacity"
    assert run.data.params["device"] == "cpu" and run.data.params["config"] == str(SMOKE)
    history = client.get_metric_history(run.info.run_id, "capacity/step_s")
    assert sorted(m.step for m in history) == [1, 2, 4, 8, 16, 32]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "capacity")} == {
        "capacity/capacity.json", "capacity/capacity.png"}

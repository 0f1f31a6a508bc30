"""The equal-training-loss view of a sweep (harness/analysis/minima.py) and the escape experiment."""

from __future__ import annotations

import csv
import re
import sys


import pytest
import torch

from mlflow.tracking import MlflowClient

from conftest import REPO, run_command, seeded_store, trial_runs
from harness.analysis import minima
from harness.analysis.report import TrialRecord


def heavy_ball_stays_bounded(curvature: float, lr: float, momentum: float, steps: int = 4000) -> bool:
    """PyTorch's SGD (dampening 0) on f(x) = curvature/2 x^2 from x = 1: does |x| stay bounded?"""
    x, buf = 1.0, 0.0
    for _ in range(steps):
        buf = momentum * buf + curvature * x
        x -= lr * buf
        if abs(x) > 1e6:
            return False
    return True


@pytest.mark.parametrize("lr,momentum", [(0.1, 0.9), (0.05, 0.0), (0.4, 0.5)])
def test_stability_limit_is_where_heavy_ball_on_a_quadratic_starts_to_diverge(lr, momentum):
    # Independent of the formula: simulate the optimizer the harness uses on a quadratic
    # just below and just above 2(1+β)/η.
    limit = minima.stability_limit(lr, momentum)
    assert heavy_ball_stays_bounded(limit * 0.99, lr, momentum)
    assert not heavy_ball_stays_bounded(limit * 1.01, lr, momentum)


def trial(batch_size: int, seed: int, final: dict, diverged: bool = False, lr: float = 0.1) -> TrialRecord:
    return TrialRecord(run_id=f"r{batch_size}-{seed}", name=f"t-bs{batch_size}-seed{seed}", lr_rule="sqrt",
                       batch_size=batch_size, lr=lr, seed=seed, diverged=diverged, final=final,
                       momentum=0.9, target_train_loss=0.2)


def test_a_trial_that_ran_out_of_budget_is_counted_but_not_averaged_into_the_equal_loss_columns():
    reached = {"steps_to_train_loss_target": 100.0, "epochs_to_train_loss_target": 2.0, "test_accuracy": 0.85,
               "test_loss": 0.44, "train_loss": 0.199, "generalization_gap_accuracy": 0.08,
               "generalization_gap_loss": 0.24, "top_hessian_eigenvalue": 12.0}
    out_of_budget = {"test_accuracy": 0.70, "test_loss": 0.9, "train_loss": 0.6, "top_hessian_eigenvalue": 3.0}
    rows = minima.equal_loss_rows([trial(32, 0, reached), trial(32, 1, out_of_budget)])
    (row,) = rows
    assert (row.seeds, row.reached) == (2, 1)
    assert row.stats["test_accuracy"] == (0.85, 0.0)
    assert row.stats["sharpness"] == (12.0, 0.0)
    assert row.limit == pytest.approx(2 * 1.9 / 0.1)
    table = minima.markdown(rows, 0.2)
    assert "| sqrt | 32 | 0.1 | 1/2 | 100 ± 0 |" in table


def test_the_interpolation_pair_is_the_smallest_and_largest_healthy_batch_of_one_seed():
    ok = {"steps_to_train_loss_target": 10.0}
    trials = [trial(16, 0, {}, diverged=True), trial(32, 1, ok), trial(32, 0, ok), trial(256, 0, ok),
              trial(2048, 0, {}),  # never reached the loss: not healthy
              trial(1024, 0, ok), trial(1024, 1, ok)]
    small, large = minima.interpolation_pair(trials)
    assert (small.batch_size, small.seed, large.batch_size, large.seed) == (32, 0, 1024, 0)
    assert minima.interpolation_pair([trial(32, 0, ok)]) is None


MINIMA_SWEEP = """
name: tinymin
seed: 0
data: {dataset: digits, validation_size: 200}
model: {hidden_sizes: [32], activation: sigmoid}
optim: {lr: 0.1, momentum: 0.9, global_batch_size: 64}
train: {epochs: 200, target_train_loss: 0.3, progress: false}
metrics: {target_val_accuracy: null, noise_scale: false, exact_noise_samples: null, sharpness: true,
          sharpness_every: 10, sharpness_every_unit: epochs, sharpness_samples: 256, eval_every_steps: 4}
tracking: {experiment: tiny, log_model: false}
sweep: {batch_sizes: [16, 512], seeds: [0], lr_rules: [sqrt], base_batch_size: 64}
"""


@pytest.fixture(scope="module")
def minima_sweep(tmp_path_factory):
    """A finished sweep at equal training loss on digits, in its own store (made once: two tests read it)."""
    place = tmp_path_factory.mktemp("minima")
    (place / "tiny.yaml").write_text(MINIMA_SWEEP)
    uri = seeded_store(place)
    result = run_command([sys.executable, str(REPO / "launch/sweep.py"), "--config", "tiny.yaml",
                          "--set", f"tracking.uri={uri}", "--report-dir", "reports"], cwd=place, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return place, uri, result


@pytest.mark.slow
def test_a_sweep_at_equal_training_loss_reports_the_table_the_sharpness_paths_and_the_interpolation(minima_sweep):
    place, uri, result = minima_sweep
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny").experiment_id
    (parent,) = client.search_runs([experiment], "tags.run_kind = 'sweep'")
    trials = trial_runs(client, [experiment], parent.info.run_id)
    for trial in trials:  # every trial stopped at the target: the table compares equal losses
        assert trial.data.metrics["train_loss"] <= 0.3
        assert trial.data.tags["steps_to_train_loss_target"] == str(int(trial.data.metrics["global_step"]))
        final = torch.load(trial.data.tags["checkpoint_path"], weights_only=True)["model"]
        norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in final.values())))
        assert trial.data.metrics["weight_norm"] == pytest.approx(norm, rel=1e-9)
    assert "### Batch sizes at equal training loss (0.3, full training split)" in result.stdout
    assert re.search(r"^\| sqrt \| 16 \| 0\.05 \| 1/1 \| ", result.stdout, re.M)
    assert re.search(r"^\| sqrt \| 512 \| 0\.2828 \| 1/1 \| ", result.stdout, re.M)
    report = place / "reports" / parent.info.run_id
    assert (report / "sharpness_vs_steps.png").stat().st_size > 0
    # Keskar's interpolation between the two ends: a run of its own naming both trials, its
    # end points the two trials' own training losses (evaluated here by the loop, there by the line).
    (line,) = client.search_runs([experiment], "tags.run_kind = 'interpolation'")
    assert line.info.status == "FINISHED"
    by_batch = {int(t.data.params["batch_size"]): t for t in trials}
    assert (line.data.tags["source_a_run_id"], line.data.tags["source_b_run_id"]) == \
        (by_batch[16].info.run_id, by_batch[512].info.run_id)
    rows = list(csv.DictReader(open(next(report.glob("interpolate-*/interpolation.csv")))))
    assert len(rows) == 25
    at = {float(r["alpha"]): float(r["train_loss"]) for r in rows}
    assert at[0.0] == pytest.approx(by_batch[16].data.metrics["train_loss"], rel=1e-5)
    assert at[1.0] == pytest.approx(by_batch[512].data.metrics["train_loss"], rel=1e-5)


@pytest.mark.slow
def test_escape_continues_both_ends_with_each_others_batch_and_their_own(minima_sweep):
    place, uri, _ = minima_sweep
    result = run_command([sys.executable, "-m", "harness.cli", "escape", "--latest", "--epochs", "2",
                          "--tracking-uri", uri, "--experiment", "tiny"], cwd=place,
                         env={"PYTHONPATH": str(REPO)}, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny").experiment_id
    (sweep,) = client.search_runs([experiment], "tags.run_kind = 'sweep'")
    (escape,) = client.search_runs([experiment], "tags.run_kind = 'escape'")
    assert escape.info.status == "FINISHED" and escape.data.tags["escape_of"] == sweep.info.run_id
    sources = {int(t.data.params["batch_size"]): t for t in
               trial_runs(client, [experiment], sweep.info.run_id)}
    continuations = trial_runs(client, [experiment], escape.info.run_id)
    pairs = set()
    for run in continuations:
        assert run.info.status == "FINISHED"
        source_batch = int(run.data.tags["trial"].split("-bs")[1].split("-")[0])
        source = sources[source_batch]
        assert run.data.tags["init_from"] == source.info.run_id
        pairs.add((source_batch, int(run.data.params["batch_size"])))
        assert run.data.params["lr"] == sources[int(run.data.params["batch_size"])].data.params["lr"]
        # Its first sharpness reading is of the source's final weights: the source's own final reading.
        history = client.get_metric_history(run.info.run_id, "by_step/top_hessian_eigenvalue")
        first = min(history, key=lambda m: m.step)
        assert first.step == 0
        assert first.value == pytest.approx(source.data.metrics["top_hessian_eigenvalue"], rel=1e-3)
        assert len(history) == 3  # step 0 and after each of the 2 epochs
    assert pairs == {(512, 16), (512, 512), (16, 512), (16, 16)}
    assert "| B=512 | B=16 | 0.05 | 1 |" in result.stdout
    assert "| B=16 | B=512 | 0.2828 | 1 |" in result.stdout


@pytest.mark.parametrize("args, expected", [
    (["--epochs", "0"], "error: --epochs: 0; expected a positive number of epochs"),
    (["--sweep-run-id", "0" * 32], "error: --sweep-run-id 00000000000000000000000000000000: no such run"),
])
def test_escape_refuses_bad_input_with_one_line(tmp_path, monkeypatch, capsys, args, expected):
    from harness.cli import main as harness_main

    # In this process, as test_bad_input.py runs the harness command's other refusals: the same
    # main() the command line calls, without a new interpreter's imports.
    monkeypatch.chdir(tmp_path)
    uri = seeded_store(tmp_path)
    capsys.readouterr()  # the store's making may log (the session's first); only the command's lines count
    status = harness_main(["escape", "--tracking-uri", uri, *args])
    stderr = capsys.readouterr().err
    assert status == 2
    assert stderr.strip() == stderr.strip().splitlines()[0]
    assert stderr.startswith(expected), stderr


@pytest.mark.slow
def test_escape_from_a_tampered_source_is_refused_in_one_line_before_any_run(minima_sweep, monkeypatch, capsys):
    from harness.cli import main as harness_main

    place, uri, _ = minima_sweep
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny").experiment_id
    (sweep,) = client.search_runs([experiment], "tags.run_kind = 'sweep'")
    source = next(t for t in trial_runs(client, [experiment], sweep.info.run_id)
                  if t.data.params["batch_size"] == "512")
    path = source.data.tags["checkpoint_path"]
    kept = open(path, "rb").read()
    runs_before = len(client.search_runs([experiment]))
    state = torch.load(path, weights_only=True)
    state["model"]["linears.0.weight"][0, 0] = float("nan")
    torch.save(state, path)
    monkeypatch.chdir(place)
    capsys.readouterr()
    try:
        status = harness_main(["escape", "--sweep-run-id", sweep.info.run_id, "--epochs", "1", "--tracking-uri", uri])
    finally:
        open(path, "wb").write(kept)  # the module's other tests read this sweep
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err == [f"error: --sweep-run-id: {path}: model weight linears.0.weight holds NaN or "
                                   "infinite values; expected finite weights"], err
    assert len(client.search_runs([experiment])) == runs_before

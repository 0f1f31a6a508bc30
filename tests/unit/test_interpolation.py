"""Keskar's interpolation (harness interpolate) on two real runs: its ends are the two models,
its middle the average of their weights, and the command leaves one FINISHED MLflow run with both
sources and the files."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from conftest import smoke_config, train_run
from harness.core.data import load_dataset
from harness.core.distributed import DistContext
from harness.core.model import MLP
from harness.measure.interpolation import interpolate_state, interpolation_curve

# Digits and a 32-unit layer: two runs of three epochs each take about two seconds, and leave
# the near-uniform start (test accuracy about 0.7 and 0.36), so the two ends differ clearly.
TINY = ("data.dataset=digits", "metrics.sharpness=false", "metrics.noise_scale=false",
        "metrics.exact_noise_samples=null", "metrics.target_val_accuracy=null", "train.epochs=3")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A small-batch and a large-batch run in one real SQLite store: (uri, small result, large result)."""
    place = tmp_path_factory.mktemp("runs")
    # MLflow fixes a SQLite store's artifact root (./mlruns) when this process first opens it: from here, so
    # that the artifacts the tests log land in this folder, not in the working directory of the test session.
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(place)
        small = train_run(smoke_config(place, "name=small", "optim.global_batch_size=32", "optim.lr=0.2", *TINY),
                      DistContext())
        large = train_run(smoke_config(place, "name=large", "optim.global_batch_size=256", "optim.lr=1.0", *TINY),
                      DistContext())
    return f"sqlite:///{place / 'mlflow.db'}", small, large


def _state(checkpoint: Path) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)


def _direct_scores(checkpoint: Path) -> dict[str, float]:
    """The model of a checkpoint, built and scored here without the harness's evaluate or interpolation."""
    state = _state(checkpoint)
    from harness.core.config import Config

    cfg = Config.from_dict(state["config"])
    model = MLP(cfg.layer_sizes, cfg.model.activation)
    model.load_state_dict(state["model"])
    data = load_dataset(cfg)
    scores = {}
    with torch.no_grad():
        for name, split in (("train", data.train), ("test", data.test)):
            logits = model(split.features)
            scores[f"{name}_loss"] = F.cross_entropy(logits, split.targets).item()
            scores[f"{name}_accuracy"] = (logits.argmax(1) == split.targets).double().mean().item()
    return scores


def test_ends_of_the_line_equal_the_two_models_evaluated_directly(two_runs, tmp_path):
    from harness.analysis.interpolation import run_interpolation

    uri, small, large = two_runs
    # -1, 0, 1, 2: the grid holds both ends exactly.
    result = run_interpolation(str(small.checkpoint), str(large.checkpoint), tracking_uri=uri, experiment="interp",
                               points=4, out_dir=tmp_path, device="cpu", log_to_mlflow=False)
    by_alpha = {row["alpha"]: row for row in result.rows}
    assert sorted(by_alpha) == [-1.0, 0.0, 1.0, 2.0]
    for alpha, checkpoint in ((0.0, small.checkpoint), (1.0, large.checkpoint)):
        direct = _direct_scores(checkpoint)
        for key, value in direct.items():
            assert by_alpha[alpha][key] == pytest.approx(value, rel=1e-5), (alpha, key)
    # The two runs differ, so the ends are two different points of the line, not one model twice.
    assert by_alpha[0.0]["train_loss"] != pytest.approx(by_alpha[1.0]["train_loss"], rel=1e-3)
    assert result.csv_path.read_text().splitlines()[0] == "alpha,train_loss,train_accuracy,test_loss,test_accuracy"
    assert len(result.csv_path.read_text().splitlines()) == 1 + 4
    assert result.plot_path.stat().st_size > 0 and result.run_id is None


def test_midpoint_parameters_are_the_average_of_the_two_state_dicts(two_runs):
    _, small, large = two_runs
    a, b = _state(small.checkpoint)["model"], _state(large.checkpoint)["model"]
    seen = []
    model = MLP((64, 32, 10), "sigmoid")

    def record(network):
        seen.append({k: v.clone() for k, v in network.state_dict().items()})
        return {}

    interpolation_curve(model, a, b, [0.0, 0.5, 1.0], record)
    for name in a:
        average = (a[name].double() + b[name].double()) / 2
        assert torch.allclose(seen[1][name].double(), average, rtol=0, atol=1e-7), name
        assert torch.equal(seen[0][name], a[name]) and torch.equal(seen[2][name], b[name]), name
        assert not torch.equal(a[name], b[name]), name  # else the midpoint check proves nothing
    assert torch.equal(interpolate_state(a, b, 0.5)["linears.0.weight"], seen[1]["linears.0.weight"])


def test_cli_records_one_finished_run_naming_both_sources_with_csv_and_png(two_runs, tmp_path, capsys):
    from harness.cli import main as harness_main

    uri, small, large = two_runs
    # A by run id (through its checkpoint_path tag), B by its checkpoint folder (the newest epoch-*.pt).
    status = harness_main(["interpolate", "--run-a", small.run_id, "--run-b", str(large.checkpoint.parent),
                           "--tracking-uri", uri, "--experiment", "interp", "--points", "5", "--device", "cpu",
                           "--out", str(tmp_path / "reports")])
    assert status == 0, capsys.readouterr().err
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("interp")
    runs = client.search_runs([experiment.experiment_id], "tags.run_kind = 'interpolation'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["source_a"] == small.run_id and tags["source_a_run_id"] == small.run_id
    assert tags["source_a_checkpoint"] == str(small.checkpoint.resolve())
    assert tags["source_b_checkpoint"] == str(large.checkpoint.resolve())
    assert tags["source_b_run_id"] == large.run_id  # read from the checkpoint itself
    assert (tags["source_a_label"], tags["source_b_label"]) == ("B=32", "B=256")
    assert run.data.params["points"] == "5" and run.data.params["alpha_min"] == "-1.0"
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "interpolation")}
    assert artifacts == {"interpolation/interpolation.csv", "interpolation/interpolation.png"}
    alphas = client.get_metric_history(run.info.run_id, "interpolation/alpha")
    assert [(m.step, m.value) for m in sorted(alphas, key=lambda m: m.step)] == \
        [(0, -1.0), (1, -0.25), (2, 0.5), (3, 1.25), (4, 2.0)]
    assert len(client.get_metric_history(run.info.run_id, "interpolation/test_accuracy")) == 5


def test_run_whose_artifacts_cannot_be_stored_ends_failed_not_running(two_runs, tmp_path):
    """An artifact store that refuses the files (here its folder lies under a file): the run that was
    already created is ended FAILED, and the error reaches the caller."""
    from harness.analysis.interpolation import run_interpolation

    uri, small, large = two_runs
    (tmp_path / "afile").write_text("a file, not a folder")
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("unstorable", artifact_location=str(tmp_path / "afile" / "artifacts"))
    with pytest.raises(OSError):
        run_interpolation(str(small.checkpoint), str(large.checkpoint), tracking_uri=uri, experiment="unstorable",
                          points=3, out_dir=tmp_path / "reports", device="cpu")
    experiment = client.get_experiment_by_name("unstorable")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"


def test_a_label_with_an_unpaired_dollar_is_drawn_as_text(tmp_path):
    from harness.analysis import plots

    rows = [{"alpha": a, "train_loss": 1.0 + a * a, "train_accuracy": 0.9, "test_loss": 1.1 + a * a,
             "test_accuracy": 0.8} for a in (-1.0, 0.0, 1.0, 2.0)]
    path = plots.interpolation(rows, tmp_path / "line.png", "$cheap run", "B=2048 (50% $)")
    assert path.stat().st_size > 0

"""The user's own model and data (model.factory, data.factory, core/factories.py): trained by the loop every
launcher shares, scored and checkpointed like the note's MLP, and each bad factory refused in one line with
exit code 2 before anything starts. (Two torchrun ranks and a Ray job train the factory CNN in
tests/e2e/test_launchers.py; the study's measurements on it: test_exact_noise.py, test_metrics.py.)"""

import importlib.util
import math

import pytest
import torch

from conftest import CONFIGS, REPO, smoke_config, train_run
from harness.core.config import load_config
from harness.core.distributed import DistContext
from harness.core.model import describe_model, weight_shapes

CNN = "model.factory=tests.user_models:tiny_cnn"
LOSS_CNN = "model={factory: 'tests.user_models:tiny_cnn_with_its_loss', output: loss}"
# 8x8 images from a data factory: a map-style Dataset for training, a pair of tensors for testing.
IMAGES = ["data.factory=tests.user_models:pixels_as_images", "data.validation_size=40",
          "optim.global_batch_size=16", "train.epochs=3", "metrics.target_val_accuracy=null"]


@pytest.fixture(autouse=True)
def importable_from_the_repo(monkeypatch):
    """As launch/*.py run from the repository root: "tests.user_models" imports from the working directory."""
    monkeypatch.syspath_prepend(str(REPO))


def test_a_factory_model_on_factory_data_trains_and_its_checkpoint_holds_its_own_weights(tmp_path):
    cfg = smoke_config(tmp_path, CNN, "model.kwargs={side: 8}", "model.kwargs.channels=3", *IMAGES)
    assert (cfg.input_size, cfg.num_classes, cfg.train_set_size) == (64, 4, 200)
    result = train_run(cfg, DistContext())
    assert result.metrics["train_loss"] < 1.2 and result.metrics["test_accuracy"] > 0.5  # 4 classes: chance 0.25
    saved = torch.load(tmp_path / "checkpoints" / "smoke" / "epoch-0003.pt", weights_only=True)
    assert {k: (tuple(v.shape), True) for k, v in saved["model"].items()} == weight_shapes(cfg)
    assert describe_model(cfg) == "tests.user_models:tiny_cnn(side=8, channels=3)"


def test_a_model_returning_its_own_loss_trains_as_the_same_model_scored_by_the_harness(tmp_path):
    """model.output loss: the CNN's own mean cross-entropy, times the batch, is the harness's summed
    cross-entropy of its logits; the weights after 3 epochs agree to rounding, and no accuracy is made up."""
    weights, results = [], []
    for name, model in (("logits", [CNN]), ("loss", [LOSS_CNN.replace("tiny_cnn_with_its_loss'",
                                                                        "tiny_cnn_with_its_loss', kwargs: {side: 8}")])):
        cfg = smoke_config(tmp_path / name, *model, "model.kwargs={side: 8}", *IMAGES)
        results.append(train_run(cfg, DistContext()))
        weights.append(torch.load(results[-1].checkpoint, weights_only=True)["model"])
    assert max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0]) <= 1e-5
    assert abs(results[0].metrics["test_loss"] - results[1].metrics["test_loss"]) <= 1e-5
    assert results[0].metrics["test_accuracy"] > 0.5 and math.isnan(results[1].metrics["test_accuracy"])


def test_the_notes_mlp_trains_on_factory_data_as_rows_of_features(tmp_path):
    cfg = smoke_config(tmp_path, *IMAGES)
    assert cfg.layer_sizes == (64, 32, 4)
    result = train_run(cfg, DistContext())
    assert result.metrics["test_accuracy"] > 0.3


def launch_train(tmp_path, monkeypatch, *overrides):
    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["--config", str(CONFIGS / "smoke.yaml")]
    for item in overrides:
        args += ["--set", item]
    return launcher.main(args)


@pytest.mark.parametrize("overrides,expected", [
    ([CNN.replace("tiny_cnn", "raises")], "model.factory: tests.user_models:raises() raised RuntimeError: the user's bug"),
    ([CNN.replace("tiny_cnn", "returns_a_number")], "model.factory: tests.user_models:returns_a_number returned an int; "
                                                    "expected a torch.nn.Module"),
    ([CNN.replace("tiny_cnn", "no_parameters")], "returned a module with no trainable parameters"),
    ([CNN.replace("tiny_cnn", "NOT_A_FUNCTION")], "model.factory: tests.user_models has NOT_A_FUNCTION as an int"),
    ([CNN.replace("tiny_cnn", "missing")], "model.factory: tests.user_models has missing as no such name"),
    (["model.factory=no_such_module:build"], "model.factory: cannot import no_such_module (ModuleNotFoundError"),
    (["model.factory=a path/not:a function"], 'model.factory: expected "package.module:function"'),
    ([CNN, "model.kwargs={side: 9}"], "model.factory: tests.user_models:tiny_cnn cannot take a batch of the data"),
    ([CNN, "model.kwargs={classes: 3}"], "model.factory: tests.user_models:tiny_cnn maps 2 samples to [2, 3]; "
                                         "expected logits [2, 10]"),
    ([CNN, "train.grad_engine=manual"], "train.grad_engine: manual with model.factory"),
    (["model.output=loss"], "model.output: loss needs model.factory"),
    ([LOSS_CNN], "metrics.target_val_accuracy: 0.85 with model.output loss, whose model gives no accuracy"),
    ([LOSS_CNN.replace("tiny_cnn_with_its_loss", "loss_per_sample"), "metrics.target_val_accuracy=null"],
     "model.factory: tests.user_models:loss_per_sample with model.output loss returns [2] for 2 samples; expected "
     "one number"),
    (["data.factory=tests.user_models:raises"], "data.factory: tests.user_models:raises() raised RuntimeError"),
    (["data.factory=tests.user_models:one_part_only"], "data.factory: tests.user_models:one_part_only: its train "
                                                       "part is a Tensor; expected a map-style torch Dataset"),
    (["data.factory=tests.user_models:float_labels"], "labels of type torch.float32; expected integer class labels"),
    (["data.factory=tests.user_models:pixels_as_images"], "data.validation_size: 256 leaves no training data; expected < 240 for data.factory's training part"),
])
def test_a_bad_factory_exits_2_with_one_line_naming_its_key_before_anything_starts(tmp_path, monkeypatch, capsys,
                                                                                     overrides, expected):
    status = launch_train(tmp_path, monkeypatch, *overrides)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and expected in err[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("factory,stacks,says", [
    ("tiny_cnn", [[0, 1, 2]], ""),
    ("with_batch_norm", [[0], [1], [2]], "model.factory tests.user_models:with_batch_norm cannot be stacked: its forward "
                                         "keeps state besides its parameters (buffers 1.running_mean"),
])
def test_a_sweep_stacks_a_factory_model_unless_its_forward_keeps_state(capsys, factory, stacks, says):
    from harness.sweeps.sweep import SweepParent, expand_trials, pending_stacks

    cfg = load_config(CONFIGS / "smoke.yaml", [CNN.replace("tiny_cnn", factory),
                                               "sweep={batch_sizes: [32], seeds: [0, 1, 2], stack_trials: auto}"])
    parent = SweepParent.__new__(SweepParent)
    parent.skip = lambda trial: False
    assert pending_stacks(cfg, expand_trials(cfg), parent) == stacks
    out = capsys.readouterr().out
    assert (says in out) if says else "not stacked" not in out, out


def test_gradcheck_says_which_engine_a_config_trains_with(capsys):
    from harness.cli import main

    assert main(["gradcheck", "--config", str(CONFIGS / "smoke.yaml"), "--set", CNN]) == 0
    out = capsys.readouterr().out
    assert "trains with the autograd engine" in out and "tests.user_models:tiny_cnn" in out


@pytest.mark.parametrize("command", ["bench", "scaling"])
def test_the_timing_commands_refuse_a_factory_model_rather_than_time_the_mlp_in_its_place(command, capsys):
    from harness.cli import main

    assert main([command, "--config", str(CONFIGS / "smoke.yaml"), "--set", CNN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"with harness {command}, which times the note's MLP" in err[0], err


def test_the_line_between_two_runs_of_a_factory_model_ends_at_each_run(tmp_path):
    """harness interpolate on a user's model: at α = 0 and 1 the line scores each run's own weights."""
    from harness.analysis.interpolation import run_interpolation

    ends = []
    for seed in (0, 1):
        cfg = smoke_config(tmp_path / f"s{seed}", CNN, "model.kwargs={side: 8}", *IMAGES, f"seed={seed}",
                           "data.kwargs={seed: 0}", "tracking.enabled=false")
        ends.append(train_run(cfg, DistContext()))
    result = run_interpolation(str(ends[0].checkpoint), str(ends[1].checkpoint), tracking_uri=None, experiment="x",
                               alpha_min=0.0, alpha_max=1.0, points=2, out_dir=tmp_path / "out", device="cpu",
                               log_to_mlflow=False)
    for row, run in zip(result.rows, ends):
        assert row["test_accuracy"] == pytest.approx(run.metrics["test_accuracy"])


def test_ray_workers_get_the_folder_each_factory_imports_from_here():
    """What a Ray run puts on its workers' PYTHONPATH (launching/ray_train.py): the folder above each factory
    module's top package, wherever this process found it."""
    from harness.core.factories import import_roots

    assert import_roots(["tests.user_models:tiny_cnn", None, "examples:anything", "user_models:tiny_cnn"]) == \
        [str(REPO), str(REPO / "tests")]


@pytest.mark.parametrize("mode", ["accumulation", "bf16"])
def test_a_factory_model_trains_with_accumulation_and_bf16_as_the_mlp_does(tmp_path, mode):
    """Micro-batches of 4 summed into each step of 16 give the one-pass weights (<= 1e-5); a bf16 forward
    changes them, by less than 2% of their norm (test_precision.py's bound for the MLP)."""
    weights = []
    for name, extra in (("one-pass", []), (mode, ["optim.micro_batch_size=4"] if mode == "accumulation"
                                                 else ["performance.precision=bf16"])):
        cfg = smoke_config(tmp_path / name, CNN, "model.kwargs={side: 8}", *IMAGES, *extra)
        weights.append(torch.load(train_run(cfg, DistContext()).checkpoint, weights_only=True)["model"])
    plain, other = weights
    if mode == "accumulation":
        assert max(float((plain[k] - other[k]).abs().max()) for k in plain) <= 1e-5
    else:
        assert any(not torch.equal(plain[k], other[k]) for k in plain)
        assert all(float((other[k] - plain[k]).norm() / plain[k].norm()) < 0.02 for k in plain)

"""checkpoint.init_from: a run starts from another run's weights, with a fresh optimiser, says so in
its tags, finds the source by MLflow run id too, and a resumed run ignores it."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from conftest import REPO, run_command, smoke_config, train_run
from harness.core.checkpoint import newest_in
from harness.core.data import load_dataset
from harness.core.distributed import DistContext
from harness.core.model import MLP

# Digits, one 32-unit layer; the source trains 2 epochs, so its momentum buffers are far from zero.
TINY = ("data.dataset=digits", "metrics.sharpness=false", "metrics.noise_scale=false",
        "metrics.exact_noise_samples=null", "metrics.target_val_accuracy=null", "train.epochs=2", "optim.lr=0.5")
# The continuation: one full-batch step (the 512 training samples), so its update is known exactly.
ONE_FULL_BATCH_STEP = ("name=continued", "optim.global_batch_size=512", "train.max_steps=1", "optim.lr=0.3")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished run in a real SQLite store: (its folder, its result)."""
    place = tmp_path_factory.mktemp("source")
    return place, train_run(smoke_config(place, "name=source", *TINY), DistContext())


def _weights(checkpoint: Path) -> dict:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]


def _one_fresh_sgd_step(weights: dict, cfg) -> dict:
    """One SGD step from ``weights`` on the full training set with a new optimiser, computed here:
    with momentum and no buffer yet, the first step is p - lr * grad."""
    model = MLP(cfg.layer_sizes, cfg.model.activation)
    model.load_state_dict(weights)
    train_set = load_dataset(cfg).train
    F.cross_entropy(model(train_set.features), train_set.targets).backward()
    return {name: (p - cfg.optim.lr * p.grad).detach() for name, p in model.named_parameters()}


def _continued_checkpoints(cfg) -> tuple[Path, Path]:
    folder = Path(cfg.checkpoint.dir) / cfg.name
    return folder / "epoch-0000.pt", folder / "epoch-0001.pt"


def _assert_started_from(source_checkpoint: Path, cfg) -> None:
    start, after_step = _continued_checkpoints(cfg)
    source_weights = _weights(source_checkpoint)
    for name, value in _weights(start).items():  # the run's own epoch-0 checkpoint: before its first step
        assert torch.equal(value, source_weights[name]), name
    expected = _one_fresh_sgd_step(source_weights, cfg)
    for name, value in _weights(after_step).items():
        assert torch.allclose(value, expected[name], rtol=1e-5, atol=1e-6), name


def test_run_starts_from_the_sources_weights_with_a_fresh_optimizer(source, tmp_path):
    place, result = source
    assert result.global_step > 1  # the source's momentum buffers hold something to leak
    cfg = smoke_config(place, *TINY, *ONE_FULL_BATCH_STEP, f"checkpoint.dir={tmp_path}",
                       f"checkpoint.init_from={result.checkpoint}")
    continued = train_run(cfg, DistContext())
    # Parameters equal to one fresh-SGD step from the source's weights: the weights were loaded before the
    # first step, and no momentum came along (a carried buffer adds lr * 0.9 * buffer to the step).
    _assert_started_from(result.checkpoint, cfg)
    tags = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(continued.run_id).data.tags
    assert tags["init_from"] == str(result.checkpoint)
    assert tags["init_from_checkpoint"] == str(result.checkpoint.resolve())
    assert tags["init_from_run_id"] == result.run_id  # read from the source checkpoint
    assert tags["checkpoint_path"] == str(continued.checkpoint.resolve())


def test_init_from_a_run_id_finds_its_checkpoint_through_mlflow(source, tmp_path):
    place, result = source
    client = MlflowClient(tracking_uri=f"sqlite:///{place / 'mlflow.db'}")
    assert client.get_run(result.run_id).data.tags["checkpoint_path"] == str(result.checkpoint.resolve())
    cfg = smoke_config(place, *TINY, *ONE_FULL_BATCH_STEP, f"checkpoint.dir={tmp_path}",
                       f"checkpoint.init_from={result.run_id}")
    continued = train_run(cfg, DistContext())
    _assert_started_from(result.checkpoint, cfg)
    tags = client.get_run(continued.run_id).data.tags
    assert (tags["init_from"], tags["init_from_run_id"]) == (result.run_id, result.run_id)
    assert tags["init_from_checkpoint"] == str(result.checkpoint.resolve())


def test_source_weights_are_written_into_the_parameters_the_step_already_holds(source):
    """The CUDA-graph step captures the addresses of the parameters at its first step: the load must copy
    into those tensors (and the optimiser's), not swap in new ones, or the graph would train stale copies."""
    from harness.core.trainer import build_trainer, load_init_weights
    from harness.launching.runs import init_weights

    place, result = source
    cfg = smoke_config(place, *TINY, f"checkpoint.init_from={result.checkpoint}", "tracking.enabled=false")
    trainer = build_trainer(cfg, DistContext(), load_dataset(cfg))
    held = [p.data_ptr() for p in trainer.train_step.parameter_blocks]
    tags = load_init_weights(trainer, init_weights(cfg))
    assert [p.data_ptr() for p in trainer.model.parameters()] == held
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, _weights(result.checkpoint)[name]), name
    assert tags == {"init_from": str(result.checkpoint), "init_from_checkpoint": str(result.checkpoint.resolve()),
                    "init_from_run_id": result.run_id}


def test_resumed_run_ignores_init_from(source, tmp_path):
    """Its own checkpoint has the weights: a resumed run (launch/train.py --resume) must neither refuse
    nor load the source (here one of another architecture, which preflight refuses and which would not
    even load), nor tag it."""
    import importlib.util

    from harness.core.checkpoint import write_checkpoint
    from harness.core.train_loop import RunCounters, build_trainer, checkpoint_state

    place, _ = source
    first = train_run(smoke_config(place, *TINY, "name=resumed", "train.epochs=1", f"checkpoint.dir={tmp_path}"),
                  DistContext())
    other = smoke_config(place, *TINY, "model.hidden_sizes=[8]", "tracking.enabled=false")
    foreign = write_checkpoint(checkpoint_state(build_trainer(other, DistContext(), load_dataset(other)),
                                                RunCounters(), None), tmp_path / "foreign", 0)
    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    overrides = [*TINY, "name=resumed", f"checkpoint.dir={tmp_path}", f"tracking.uri=sqlite:///{place}/mlflow.db",
                 f"checkpoint.init_from={foreign}"]
    assert launcher.main(["--config", str(REPO / "configs/smoke.yaml"), "--resume",
                          *[arg for item in overrides for arg in ("--set", item)]]) == 0
    run = MlflowClient(tracking_uri=f"sqlite:///{place}/mlflow.db").get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags.get("resumed") == "true"
    assert "init_from" not in run.data.tags
    assert newest_in(tmp_path / "resumed").name == "epoch-0002.pt"


@pytest.mark.slow
def test_two_ddp_ranks_both_start_from_the_source(source, tmp_path):
    """torchrun, 2 gloo ranks: each loads the file itself (DDP broadcast the seed's weights at wrap time,
    before the load); one full-batch step then equals the single-process fresh step from the source."""
    place, result = source
    overrides = [*TINY, *ONE_FULL_BATCH_STEP, f"checkpoint.dir={tmp_path}", "tracking.enabled=false",
                 f"checkpoint.init_from={result.checkpoint}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "launch/train.py"), "--config", str(REPO / "configs/smoke.yaml")]
    for item in overrides:
        command += ["--set", item]
    run = run_command(command, cwd=tmp_path, env={"PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_started_from(result.checkpoint, smoke_config(place, *overrides))

"""The CUDA-graph step computes what the eager step computes.

On CPU the graph step's body (static index buffer, gradients zeroed in place,
the LR read from a device tensor, core/optim.py's update, the probe's
device-side count) runs uncaptured and is checked against the eager step. The
tests marked ``cuda`` capture and replay real graphs; they run where CUDA is
present (the device check, launch/gpu_check.sh) and are skipped elsewhere.
"""

import warnings

import pytest
import torch

from conftest import CONFIGS, REPO, run_command, UncapturedGraphStep, train_run
from harness.core.config import load_config
from harness.core.data import load_dataset
from harness.core.distributed import DistContext
from harness.core.graph_step import WARMUP_STEPS, graph_unavailable_reason
from harness.core.trainer import SingleRun, train_epoch
from harness.core.step import unwrap
from harness.core.sharpness import read_sharpness
from harness.core.trainer import build_trainer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# 512 samples in batches of 48: ten full batches (graph steps after the warm-up)
# and a last batch of 32 that runs eagerly in between, every epoch.
STEP_TEST_OVERRIDES = ("optim.global_batch_size=48", "optim.weight_decay=0.001", "optim.warmup_epochs=1.5",
                       "metrics.sharpness=false")


def untracked_smoke_config(tmp_path, *overrides: str):
    """configs/smoke.yaml, tracking off: these tests also run on the GPU machine, which has no MLflow."""
    return load_config(CONFIGS / "smoke.yaml", ["tracking.enabled=false", f"checkpoint.dir={tmp_path}/checkpoints",
                                                *overrides])


def trained(cfg, ctx: DistContext, graph: str, epochs: int = 2):
    """A trainer after ``epochs`` epochs with the eager step, or a graph step ("body": uncaptured)."""
    trainer = build_trainer(cfg, ctx, load_dataset(cfg).to(ctx.device))
    if graph == "body":
        trainer.train_step = UncapturedGraphStep(trainer.train_step, None)
    global_step = 0
    for epoch in range(1, epochs + 1):
        _, _, steps = train_epoch(SingleRun(trainer), epoch, global_step)
        global_step += steps
    return trainer


def assert_same_state(graph_trainer, eager_trainer, rtol: float, atol: float) -> None:
    for got, want in zip(unwrap(graph_trainer.model).parameters(), unwrap(eager_trainer.model).parameters()):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    for got, want in zip(graph_trainer.optimizer.state["momentum_buffer"],
                         eager_trainer.optimizer.state["momentum_buffer"]):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    torch.testing.assert_close(graph_trainer.noise_probe.ema, eager_trainer.noise_probe.ema, rtol=1e-4, atol=0)
    assert int(graph_trainer.noise_probe.updates) == int(eager_trainer.noise_probe.updates) > 0


def test_graph_step_body_reaches_the_eager_parameters_after_two_epochs(tmp_path):
    cfg = untracked_smoke_config(tmp_path, *STEP_TEST_OVERRIDES)
    eager = trained(cfg, DistContext(), graph="none")
    graph = trained(cfg, DistContext(), graph="body")
    assert graph.train_step.warmup_steps_left == 0  # 22 steps: 3 warm-up, 17 graph-body, 2 eager last batches
    assert graph.plan.steps_per_epoch * 2 > WARMUP_STEPS + 2
    # The same update on the same LRs: the graph body's tensors are the eager step's.
    assert_same_state(graph, eager, rtol=0, atol=0)
    # The momentum also went through graph steps with the LR still warming up (warmup_epochs 1.5).
    assert int(graph.schedule.warmup_steps[0]) > WARMUP_STEPS + 1


def test_gradients_keep_their_buffers_when_a_graph_step_is_on(tmp_path):
    cfg = untracked_smoke_config(tmp_path, *STEP_TEST_OVERRIDES)
    trainer = trained(cfg, DistContext(), graph="body", epochs=1)
    params = list(unwrap(trainer.model).parameters())
    addresses = [p.grad.data_ptr() for p in params]
    train_epoch(SingleRun(trainer), 2, trainer.plan.steps_per_epoch)
    assert [p.grad.data_ptr() for p in params] == addresses


@pytest.mark.slow
def test_graph_step_body_matches_the_eager_step_under_ddp_on_two_ranks(tmp_path):
    torchrun = REPO / ".venv/bin/torchrun"
    command = [str(torchrun) if torchrun.exists() else "torchrun", "--standalone", "--nproc_per_node=2",
               str(REPO / "tests/e2e/graph_body_under_ddp.py"), str(tmp_path)]
    result = run_command(command, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("the graph body matches the eager step under DDP") == 2


def test_graph_is_refused_for_the_manual_engine_and_for_the_cpu(tmp_path):
    on_gpu = DistContext(device=torch.device("cuda", 0))
    manual = untracked_smoke_config(tmp_path, "train.grad_engine=manual", "performance.cuda_graph=true")
    assert "train.grad_engine is 'manual'" in graph_unavailable_reason(manual, on_gpu)
    assert graph_unavailable_reason(untracked_smoke_config(tmp_path), on_gpu) is None
    assert "CUDA graphs need a CUDA device" in graph_unavailable_reason(untracked_smoke_config(tmp_path), DistContext())


# --- with CUDA: real capture and replay ----------------------------------------


@cuda
def test_captured_graph_reaches_the_eager_parameters_on_cuda(tmp_path):
    cfg = untracked_smoke_config(tmp_path, *STEP_TEST_OVERRIDES, "train.device=cuda")
    ctx = DistContext(device=torch.device("cuda", 0))
    eager = trained(cfg, ctx, graph="none")
    graph = trained(cfg.replace(**{"performance.cuda_graph": True}), ctx, graph="captured")
    assert set(graph.train_step.graphs) == {False, True}  # a plain and a noise-measuring graph were replayed
    assert_same_state(graph, eager, rtol=1e-4, atol=1e-5)


@cuda
def test_captured_graph_under_ddp_at_world_size_one_matches_eager(tmp_path):
    import os

    import torch.distributed as dist

    from harness.core.distributed import allow_collective_capture

    cfg = untracked_smoke_config(tmp_path, *STEP_TEST_OVERRIDES, "train.device=cuda")
    ctx = DistContext(device=torch.device("cuda", 0), world_size=1)
    allow_collective_capture()
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "0"
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=ctx.device)
    try:
        eager = trained(cfg, ctx, graph="none")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graph = trained(cfg.replace(**{"performance.cuda_graph": True}), ctx, graph="captured")
            # the end-of-run Hessian probe, eager autograd after the replays
            assert read_sharpness(graph.cfg, graph.ctx, graph.model, graph.train_set,
                                  graph.train_step.on_training_stream)["top_hessian_eigenvalue"] > 0
    finally:
        dist.destroy_process_group()
    assert set(graph.train_step.graphs) == {False, True}
    # Every eager step (warm-up, last batch) and the Hessian probe ran on the stream DDP was built on:
    # autograd saw no gradient arriving from another stream.
    assert not [w for w in caught if "AccumulateGrad node's stream" in str(w.message)]
    assert_same_state(graph, eager, rtol=1e-4, atol=1e-5)


@cuda
def test_graph_and_eager_runs_log_the_same_metric_names(tmp_path):
    runs = [train_run(untracked_smoke_config(tmp_path / str(on), "train.device=cuda",
                                         f"performance.cuda_graph={str(on).lower()}"),
                  DistContext(device=torch.device("cuda", 0)))
            for on in (False, True)]
    assert runs[0].metrics.keys() == runs[1].metrics.keys()
    assert runs[1].metrics["train_loss"] == pytest.approx(runs[0].metrics["train_loss"], rel=1e-3)

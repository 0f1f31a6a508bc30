"""Gradient accumulation (optim.micro_batch_size): the same parameters as one pass, the probe's micro-batches.

One rank x 4 micro-batches of B/4 and one rank x B reach the same parameters, with
either engine, over epochs whose last batch is smaller (512 samples in batches of 48:
its last batch of 32 runs as passes of 12, 12 and 8). Under DDP, 2 ranks x 2
micro-batches of B/4 against 1 rank x B run in real torchrun processes
(tests/e2e/accumulation_under_ddp.py). The noise probe's small batch is the micro-batch:
checked against each micro-batch's gradient computed apart, and against the exact
noise scale (per-example gradients) at fixed parameters.
"""

import copy

import pytest
import torch

from conftest import REPO, run_command
from harness.core.backprop import autograd_backward
from harness.core.checkpoint import config_fingerprint
from harness.core.data import load_dataset
from harness.core.distributed import DistContext
from harness.core.graph_step import GraphStep, graph_unavailable_reason
from harness.core.step import unwrap
from harness.core.train_loop import build_trainer
from harness.measure.exact_noise import exact_noise_scale
from harness.core.noise_probe import NoiseProbe
from harness.measure.metrics import noise_scale_components
from test_exact_noise import small_problem
from test_graph_step import trained, untracked_smoke_config

BATCH_OVERRIDES = ("optim.global_batch_size=48", "metrics.sharpness=false")
EPOCHS = 3


def max_abs_difference(model_a: torch.nn.Module, model_b: torch.nn.Module) -> float:
    return max(float((a.detach() - b.detach()).abs().max())
               for a, b in zip(unwrap(model_a).parameters(), unwrap(model_b).parameters()))


@pytest.mark.parametrize("engine", ["autograd", "manual"])
def test_four_micro_batches_on_one_rank_reach_the_one_pass_parameters(tmp_path, engine):
    base = (*BATCH_OVERRIDES, f"train.grad_engine={engine}")
    one_pass = trained(untracked_smoke_config(tmp_path, *base), DistContext(), "none", epochs=EPOCHS)
    cfg = untracked_smoke_config(tmp_path, *base, "optim.micro_batch_size=12")
    assert cfg.accumulation_steps() == 4
    accumulated = trained(cfg, DistContext(), "none", epochs=EPOCHS)
    assert max_abs_difference(accumulated.model, one_pass.model) <= 1e-5
    # Not trivially equal: the parameters moved, and the probe measured micro-batches of 12.
    assert max_abs_difference(accumulated.model, trained(cfg, DistContext(), "none", epochs=1).model) > 1e-3
    assert accumulated.noise_probe.small_batch_size == 12 and int(accumulated.noise_probe.updates) > 0


def test_probe_reads_each_micro_batch_gradient_on_one_rank(tmp_path):
    cfg = untracked_smoke_config(tmp_path, *BATCH_OVERRIDES, "optim.micro_batch_size=12")
    trainer = build_trainer(cfg, DistContext(), load_dataset(cfg))
    reference = copy.deepcopy(unwrap(trainer.model))
    indices, global_batch_size = next(iter(trainer.plan.local_batches(1)))

    def mean_gradient_sq(part):
        autograd_backward(reference, trainer.train_set.features[part], trainer.train_set.targets[part])
        return sum(float(p.grad.double().pow(2).sum()) for p in reference.parameters())

    want_small = sum(mean_gradient_sq(m) for m in indices.split(12)) / 4
    want_big = mean_gradient_sq(indices)
    trainer.train_step(indices, global_batch_size, 0)
    small, big, count = trainer.noise_probe.window.tolist()
    assert count == 1
    assert small == pytest.approx(want_small, rel=1e-4) and big == pytest.approx(want_big, rel=1e-4)


def test_probe_on_micro_batches_agrees_with_the_exact_noise_scale_at_fixed_parameters():
    # As test_exact_noise's windowed test, with B=32 accumulated as 4 micro-batches of 8 (the
    # small batch): 600 steps at fixed parameters, the same bounds on the sampling error.
    model, x, y = small_problem(count=512, seed=3)
    exact = exact_noise_scale(model, x, y)
    probe = NoiseProbe(DistContext(), global_batch_size=32, decay=0.95, micro_batch_size=8)
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(4)
    for _ in range(600):
        batch = torch.randint(0, len(y), (32,), generator=generator)
        # The step's accumulation loop (core/step.py), one rank: passes summed into p.grad.
        for i, part in enumerate(batch.split(8)):
            probe.before_micro_batch(params, i, reduces_in_backward=False)
            autograd_backward(model, x[part], y[part], 32.0, accumulate=i > 0)
            probe.after_micro_batch(params, len(part), 32.0)
        probe.record_micro_batches(params)
    probe.close_window()
    small_sum, big_sum, count = probe.closed_windows[-1].tolist()
    grad_sq, trace = noise_scale_components(small_sum / count, big_sum / count, 8, 32)
    assert trace == pytest.approx(exact.trace_cov, rel=0.10)
    assert grad_sq == pytest.approx(exact.grad_sq_norm, rel=0.20)
    assert 1 / 1.25 < (trace / grad_sq) / exact.b_simple < 1.25, (grad_sq, trace, exact)


@pytest.fixture(scope="module")
def two_rank_script(tmp_path_factory):
    """tests/e2e/accumulation_under_ddp.py under torchrun: its output, and its folder (rank 0's parameters)."""
    tmp = tmp_path_factory.mktemp("accumulation_ddp")
    torchrun = REPO / ".venv/bin/torchrun"
    command = [str(torchrun) if torchrun.exists() else "torchrun", "--standalone", "--nproc_per_node=2",
               str(REPO / "tests/e2e/accumulation_under_ddp.py"), str(tmp)]
    result = run_command(command, cwd=tmp, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, tmp


@pytest.mark.slow
def test_two_ranks_of_two_micro_batches_match_one_rank_one_pass(two_rank_script):
    stdout, _ = two_rank_script
    for engine in ("autograd", "manual"):
        assert stdout.count(f"{engine}: 2 ranks x 2 micro-batches match 1 rank x B") == 2


@pytest.mark.slow
def test_probe_reads_each_micro_batch_gradient_under_ddp(two_rank_script):
    stdout, _ = two_rank_script
    for engine in ("autograd", "manual"):  # DDP's comm hook reads the last pass; the manual engine reads all
        assert stdout.count(f"{engine}: the probe read each micro-batch's gradient") == 2


def test_graph_step_runs_eagerly_with_accumulation_and_says_why(tmp_path):
    cfg = untracked_smoke_config(tmp_path, *BATCH_OVERRIDES, "optim.micro_batch_size=12",
                                 "performance.cuda_graph=true")
    reason = graph_unavailable_reason(cfg, DistContext(device=torch.device("cuda", 0)))
    assert reason and "optim.micro_batch_size 12 accumulates 4 passes" in reason
    # One pass per rank is no accumulation: the graph step stays available.
    whole = untracked_smoke_config(tmp_path, *BATCH_OVERRIDES, "optim.micro_batch_size=48")
    assert graph_unavailable_reason(whole, DistContext(device=torch.device("cuda", 0))) is None


def test_graph_step_body_with_accumulation_reaches_the_eager_parameters(tmp_path):
    # Were the loop captured, this is the body a graph would hold: the uncaptured body
    # (static indices, in-place zeroing, tensor LR) over the accumulating eager step.
    cfg = untracked_smoke_config(tmp_path, *BATCH_OVERRIDES, "optim.micro_batch_size=12")
    eager = trained(cfg, DistContext(), "none", epochs=2)
    body = trained(cfg, DistContext(), "body", epochs=2)
    assert isinstance(body.train_step, GraphStep) and body.train_step.warmup_steps_left == 0
    assert max_abs_difference(body.model, eager.model) <= 1e-5


@pytest.mark.slow
def test_torchrun_restart_after_a_sigkill_mid_accumulation_resumes_exactly(two_rank_script, tmp_path):
    from test_launchers import EPOCHS as LAUNCHER_EPOCHS, final_params, only_run, torchrun

    # The script's configuration (smoke, BATCH_OVERRIDES, micro-batches of 12, autograd), through the
    # launcher. Its uninterrupted 2-rank run, trained by the same loop, is the reference: the
    # evaluations and tracking between steps change no parameter (seen bit-equal), and one
    # torchrun start fewer keeps this test short.
    assert LAUNCHER_EPOCHS == EPOCHS
    accumulate = ("--set", "optim.global_batch_size=48", "--set", "optim.micro_batch_size=12",
                  "--set", "metrics.sharpness=false")
    marker = tmp_path / "killed"
    # Rank 1 dies between the first and second pass of epoch 2's middle step: its share is half accumulated.
    # (A kill while writing a checkpoint, under torchrun: tests/e2e/test_stacked_torchrun.py.)
    torchrun(tmp_path, 2, *accumulate, env={"HARNESS_INJECT_FAULT": f"micro_batch:2:1:{marker}"}, max_restarts=1)
    assert "killed micro_batch epoch 2 rank 1" in marker.read_text()
    client, run = only_run(tmp_path)
    assert run.data.tags.get("resumed") == "true" and run.info.status == "FINISHED"
    for key in run.data.metrics:  # the resumed epoch is logged once, not again
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == sorted(set(steps)), (key, steps)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == list(range(1, EPOCHS + 1))
    resumed = final_params(tmp_path)
    straight = torch.load(two_rank_script[1] / "accumulated_autograd.pt", weights_only=True)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert not list((tmp_path / "ckpt" / "smoke").glob(".epoch-*")), "a half-written checkpoint was left"


def test_checkpoints_resume_across_micro_batch_sizes(tmp_path):
    # The same update in passes of another size: a run may resume where fewer samples fit per pass,
    # and a checkpoint written before the key existed (its config has no micro-batch) still resumes.
    plain = untracked_smoke_config(tmp_path)
    split = untracked_smoke_config(tmp_path, "optim.micro_batch_size=16")
    assert config_fingerprint(split) == config_fingerprint(plain)
    assert config_fingerprint(untracked_smoke_config(tmp_path, "optim.global_batch_size=32")) != \
        config_fingerprint(plain)

"""performance.precision: bf16 runs the training forward in bfloat16, keeps everything else fp32,
and lands near the fp32 run; gradcheck stays fp64; what cannot run is refused with one line."""

import torch

from conftest import CONFIGS, UncapturedGraphStep
from harness.core.config import load_config
from harness.core.data import load_dataset
from harness.core.distributed import DistContext
from harness.core.trainer import SingleRun, train_epoch
from harness.core.evaluation import evaluate

from harness.core.precision import precision_unsupported_reason
from harness.core.step import unwrap
from harness.core.train_loop import build_trainer

EPOCHS = 3  # smoke.yaml: 512 samples, batches of 64, so 24 SGD steps at lr 0.1, momentum 0.9
# bf16 keeps 8 significant bits: each forward value is rounded by up to 2^-9 relative. Over 24 steps
# the two runs' weights drift apart by a small fraction of their change (measured on this 2-core CPU: the
# final training losses differ by 0.04%, the weights by 0.1-0.3% of their norm), so 5% on the loss and 2% on the weights
# leave room for another CPU's kernels while still failing if bf16 changed the training (a wrong
# normalisation, a loss in bf16 with its sum of 64 samples rounded, or gradients dropped, all show up far above).
LOSS_RELATIVE_BOUND = 0.05
WEIGHT_RELATIVE_BOUND = 0.02


def smoke(tmp_path, precision: str, *overrides: str):
    return load_config(CONFIGS / "smoke.yaml", ["tracking.enabled=false", f"checkpoint.dir={tmp_path}/ck",
                                                "metrics.sharpness=false", f"performance.precision={precision}",
                                                *overrides])


def trained(cfg, graph_body: bool = False):
    """A trainer after EPOCHS epochs, and the dtypes its output layer produced during training (forward hook)."""
    trainer = build_trainer(cfg, DistContext(), load_dataset(cfg))
    if graph_body:
        trainer.train_step = UncapturedGraphStep(trainer.train_step, None)
    logits_dtypes = set()
    hook = unwrap(trainer.model).linears[-1].register_forward_hook(
        lambda _module, _inputs, output: logits_dtypes.add(output.dtype))
    global_step = 0
    for epoch in range(1, EPOCHS + 1):
        global_step += train_epoch(SingleRun(trainer), epoch, global_step)[2]
    hook.remove()
    return trainer, logits_dtypes


def test_bf16_forward_runs_in_bfloat16_while_parameters_gradients_and_momentum_stay_fp32(tmp_path):
    trainer, logits_dtypes = trained(smoke(tmp_path, "bf16"))
    assert logits_dtypes == {torch.bfloat16}
    for param in unwrap(trainer.model).parameters():
        assert param.dtype == param.grad.dtype == torch.float32
    assert {buf.dtype for buf in trainer.optimizer.state["momentum_buffer"]} == {torch.float32}


def test_fp32_forward_stays_fp32(tmp_path):
    _, logits_dtypes = trained(smoke(tmp_path, "fp32"))
    assert logits_dtypes == {torch.float32}


def test_bf16_run_lands_within_the_bound_of_the_fp32_run(tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = smoke(tmp_path, precision)
        trainer, _ = trained(cfg)
        # Scored in fp32 by the same evaluation, so only the training differs.
        loss, _ = evaluate(trainer.model, load_dataset(cfg).train, DistContext(), 512)
        runs[precision] = (loss, [p.detach().clone() for p in unwrap(trainer.model).parameters()])
    (loss32, weights32), (loss16, weights16) = runs["fp32"], runs["bf16"]
    assert loss32 < 2.0  # it trained (from ~2.3), so the comparison is between two trained models
    assert abs(loss16 - loss32) / loss32 < LOSS_RELATIVE_BOUND
    for w32, w16 in zip(weights32, weights16):
        assert (w16 - w32).norm() / w32.norm() < WEIGHT_RELATIVE_BOUND
    assert any(not torch.equal(w32, w16) for w32, w16 in zip(weights32, weights16))  # bf16 did change something


def test_graph_step_body_in_bf16_matches_the_eager_bf16_step(tmp_path):
    """The graph step captures the same autocast forward (cache off); on CPU its body runs uncaptured."""
    cfg = smoke(tmp_path, "bf16", "optim.global_batch_size=48")
    eager, _ = trained(cfg)
    graph, logits_dtypes = trained(cfg, graph_body=True)
    assert logits_dtypes == {torch.bfloat16} and graph.train_step.warmup_steps_left == 0
    for got, want in zip(unwrap(graph.model).parameters(), unwrap(eager.model).parameters()):
        # As for fp32 (test_graph_step.py): the update rounds lr*buf in another order; bf16 adds no drift
        # between the two, since both run the very same forward.
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bf16_is_refused_on_a_cuda_device_without_bf16_and_allowed_elsewhere():
    assert "bf16 on a CUDA device without bfloat16 support" in precision_unsupported_reason("bf16", "cuda", False)
    assert precision_unsupported_reason("bf16", "cuda", True) is None
    assert precision_unsupported_reason("bf16", "cpu", False) is None
    assert precision_unsupported_reason("fp32", "cuda", False) is None


def test_gradcheck_stays_float64_with_a_bf16_config(capsys):
    from harness.cli import main as harness_main

    status = harness_main(["gradcheck", "--config", str(CONFIGS / "smoke.yaml"), "--set", "performance.precision=bf16"])
    out = capsys.readouterr().out
    assert status == 0 and "float64" in out and ": ok" in out

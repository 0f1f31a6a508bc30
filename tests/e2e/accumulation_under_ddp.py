"""Run by tests/e2e/test_accumulation.py under torchrun (2 gloo ranks): gradient accumulation under DDP.

For each engine: 2 ranks x 2 micro-batches of B/4 against 1 rank x B (trained in the
same process, without a process group), over several epochs with an uneven last
batch; and the noise probe's first measured step against each micro-batch's gradient
computed independently, one plain autograd pass per micro-batch.
"""

import copy
import gc
import sys
from pathlib import Path

# The repo (harness), and tests/, tests/unit, tests/e2e (conftest and the test modules imported below).
TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS.parent), str(TESTS), str(TESTS / "unit"), str(TESTS / "e2e")]

import torch  # noqa: E402

from harness.core import distributed  # noqa: E402
from harness.core.backprop import autograd_backward  # noqa: E402
from harness.core.data import load_dataset  # noqa: E402
from harness.core.distributed import DistContext  # noqa: E402
from harness.core.step import unwrap  # noqa: E402
from harness.core.train_loop import build_trainer  # noqa: E402
from test_accumulation import BATCH_OVERRIDES, EPOCHS, max_abs_difference  # noqa: E402
from test_graph_step import trained, untracked_smoke_config  # noqa: E402


def check_parameters(tmp: Path, ctx: DistContext, engine: str) -> None:
    base = (*BATCH_OVERRIDES, f"train.grad_engine={engine}")
    one_pass = trained(untracked_smoke_config(tmp, *base), DistContext(), "none", epochs=EPOCHS)
    cfg = untracked_smoke_config(tmp, *base, "optim.micro_batch_size=12")
    assert cfg.accumulation_steps(ctx.world_size) == 2
    accumulated = trained(cfg, ctx, "none", epochs=EPOCHS)
    worst = max_abs_difference(accumulated.model, one_pass.model)
    assert worst <= 1e-5, (engine, worst)
    if engine == "autograd" and ctx.is_main:  # the uninterrupted run that test_accumulation's restart must equal
        torch.save(unwrap(accumulated.model).state_dict(), tmp / "accumulated_autograd.pt")
    print(f"rank {ctx.rank}: {engine}: 2 ranks x 2 micro-batches match 1 rank x B (max |diff| {worst:.2e})",
          flush=True)
    del accumulated


def check_probe(tmp: Path, ctx: DistContext, engine: str) -> None:
    cfg = untracked_smoke_config(tmp, *BATCH_OVERRIDES, f"train.grad_engine={engine}", "optim.micro_batch_size=12")
    trainer = build_trainer(cfg, ctx, load_dataset(cfg))
    reference = copy.deepcopy(unwrap(trainer.model))
    local, global_batch_size = next(iter(trainer.plan.local_batches(1)))
    whole = trainer.plan.permutation(1)[:global_batch_size]
    features, targets = trainer.train_set.features, trainer.train_set.targets

    def mean_gradient_sq(indices):
        autograd_backward(reference, features[indices], targets[indices])  # normalizer: the batch's own size
        return sum(float(p.grad.double().pow(2).sum()) for p in reference.parameters())

    want_small = sum(mean_gradient_sq(m) for m in local.split(12)) / 2
    want_big = mean_gradient_sq(whole)
    trainer.train_step(local, global_batch_size, 0)  # step 0 is measured (noise_scale_interval 4)
    small, big, count = trainer.noise_probe.window.tolist()
    assert count == 1 and trainer.noise_probe.small_batch_size == 12
    assert abs(small - want_small) <= 1e-4 * want_small, (engine, small, want_small)
    assert abs(big - want_big) <= 1e-4 * want_big, (engine, big, want_big)
    print(f"rank {ctx.rank}: {engine}: the probe read each micro-batch's gradient", flush=True)
    del trainer


def main() -> int:
    ctx = distributed.init_from_env("cpu")
    try:
        for engine in ("autograd", "manual"):
            check_probe(Path(sys.argv[1]), ctx, engine)
            check_parameters(Path(sys.argv[1]), ctx, engine)
    finally:
        gc.collect()  # DDP's reducers before the process group (see graph_body_under_ddp.py)
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A global batch that changes during a run (optim.batch_schedule): the steps a schedule takes against a
plain torch.optim loop walking the same permutation, each growth of the noise-scale schedule against the
exact noise scale of the weights it was read at, and the configs it refuses."""

import math

import pytest
import torch

from conftest import smoke_config, train_run
from harness.core.data import load_dataset
from harness.core.distributed import DistContext
from harness.core.model import build_model
from harness.core.step import unwrap
from harness.core.trainer import build_trainer
from harness.errors import InputError
from harness.measure.exact_noise import exact_noise_scale, population_noise_scale

DIGITS = ["data.dataset=digits", "data.validation_size=297", "data.train_subset=null", "data.test_subset=null",
          "optim.global_batch_size=16", "optim.lr=0.05", "metrics.target_val_accuracy=null", "train.epochs=2",
          "tracking.enabled=false", "metrics.noise_scale=false"]


def _batch_at(step: int, pairs, initial: int) -> int:
    return next((batch for start, batch in reversed(pairs) if start <= step), initial)


def test_a_steps_schedule_trains_as_a_plain_loop_that_takes_those_batches_with_the_sqrt_rules_lr(tmp_path):
    """Batches 16, then 64 from step 10, then 256 from step 30, each epoch's permutation walked until used up
    (the last batch smaller), the LR lr * sqrt(B / 16) of each step's own batch: torch.optim.SGD agrees."""
    pairs = [(10, 64), (30, 256)]
    cfg = smoke_config(tmp_path, *DIGITS, "optim.batch_schedule=steps", "optim.batch_steps=[[10, 64], [30, 256]]")
    result = train_run(cfg, DistContext())
    got = torch.load(result.checkpoint, weights_only=True)["model"]

    trainer = build_trainer(cfg, DistContext(), load_dataset(cfg))
    model = build_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    train = trainer.train_set
    step, sizes = 0, []
    for epoch in (1, 2):
        order, start = trainer.plan.permutation(epoch), 0
        while start < len(order):
            rows = order[start:start + _batch_at(step, pairs, 16)]
            start += len(rows)
            x, y = train.batch(rows)
            for group in optimizer.param_groups:
                group["lr"] = cfg.optim.lr * math.sqrt(len(rows) / 16)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            sizes.append(len(rows))
            step += 1
    assert result.global_step == step and sizes[9:11] == [16, 64] and sizes[29:31] == [64, 256]
    want = model.state_dict()
    assert max(float((got[k] - want[k]).abs().max()) for k in want) <= 1e-5


def test_the_noise_scale_schedule_grows_to_the_largest_power_of_two_below_the_exact_noise_scale(tmp_path):
    """At each reading: 2^k <= multiple x B_simple, B_simple computed here independently on the same weights
    and samples (corrected for the 600 samples where that leaves it at most 600); the batch never shrinks
    and stops at the cap."""
    cfg = smoke_config(
        tmp_path, *DIGITS, "optim.batch_schedule=noise_scale", "optim.batch_noise_every=5",
        "optim.batch_noise_multiple=0.5", "optim.max_global_batch_size=128", "metrics.exact_noise_samples=600")
    trainer = build_trainer(cfg, DistContext(), load_dataset(cfg))
    schedule, model = trainer.batch_schedule, unwrap(trainer.model)
    samples = trainer.train_set.head(600)
    generator = torch.Generator().manual_seed(1)
    seen = []
    for scale in (0.3, 1.0, 0.3, 3.0):  # weights of other sizes: other noise scales
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
        exact = exact_noise_scale(model, samples.features, samples.targets)
        b_simple = population_noise_scale(exact.trace_cov, exact.grad_sq_norm, 600)
        if not 0 < b_simple <= 600:  # not resolved by 600 samples: the uncorrected ratio decides
            b_simple = exact.b_simple
        before = schedule.current
        assert schedule.after_step(3) is None  # not a reading step
        schedule.after_step(5)
        want = max(before, min(128, 2 ** int(math.log2(0.5 * b_simple)) if 0.5 * b_simple >= 1 else 1))
        assert schedule.current == want and schedule.last_noise_scale == pytest.approx(b_simple, rel=1e-9)
        seen.append(schedule.current)
    assert seen == sorted(seen) and seen[-1] <= 128


@pytest.mark.parametrize("overrides, expected", [
    (["optim.batch_schedule=steps"], "optim.batch_steps: null with optim.batch_schedule steps"),
    (["optim.batch_schedule=steps", "optim.batch_steps=[[20, 64], [10, 128]]"],
     "optim.batch_steps: steps [20, 10]; expected increasing steps"),
    (["optim.batch_schedule=steps", "optim.batch_steps=[[20, 4096]]"], "optim.batch_steps: batch 4096 is larger"),
    (["optim.batch_schedule=noise_scale", "metrics.exact_noise_samples=null"],
     "metrics.exact_noise_samples: null with optim.batch_schedule noise_scale"),
    (["optim.batch_schedule=noise_scale", "optim.micro_batch_size=8"], "optim.micro_batch_size: 8 with"),
    (["optim.batch_schedule=noise_scale", "optim.schedule=cosine"], "optim.schedule: cosine"),
    (["optim.batch_schedule=noise_scale", "sweep={batch_sizes: [16, 32], stack_trials: auto}"],
     "sweep.stack_trials: auto with optim.batch_schedule noise_scale"),
])
def test_a_changing_batch_refuses_what_it_cannot_run_with_in_one_line(tmp_path, overrides, expected):
    with pytest.raises(InputError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        smoke_config(tmp_path, *DIGITS, *overrides)

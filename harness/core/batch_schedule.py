"""A global batch that changes during a run (``optim.batch_schedule``): which batch the next step takes.

``steps``: ``optim.batch_steps``' (step, batch) pairs, each batch from its step on (global_batch_size
before the first). ``noise_scale``: every ``optim.batch_noise_every`` steps the exact simple noise scale
B_simple of the current weights on the first ``metrics.exact_noise_samples`` training samples
(measure/exact_noise.py, corrected for the sample count; a corrected value beyond that count is not
resolved by it, and the uncorrected ratio, a lower bound, is used), and the batch grows to the largest power of two
at most ``batch_noise_multiple`` x B_simple: McCandlish et al.'s adaptive batch, B ~ B_noise, never
shrinking, capped by ``optim.max_global_batch_size`` and the training set, and kept divisible by the
world size. Every rank reads the same weights and samples; the ranks' choices are still reduced to one
(their maximum), so no rank can step with another batch.

The batch plan (core/data.py) asks ``current`` before each step, so a change takes effect mid-epoch;
the epoch still ends when the permutation is used up. The LR of each step follows that step's global
batch (``lr_factor``), so a step trained again (core/crossing.py) gets the LR it had. The schedule's
state is part of a checkpoint: a resumed run chooses as the run it continues did.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from harness.core.config import Config, steps_per_epoch
from harness.core.data import Split
from harness.core.distributed import DistContext
from harness.measure.exact_noise import gradient_sums, population_noise_scale


def epoch_steps_bound(cfg: Config, plan) -> int:
    """An epoch's steps at the smallest batch the run can take: what its step budget and evaluation schedule
    are planned on, the same in a run resumed at a larger batch (without a batch schedule, the plan's)."""
    if not cfg.optim.batch_grows:
        return plan.steps_per_epoch
    smallest = min([cfg.optim.global_batch_size, *(b for _, b in cfg.optim.batch_steps or ())])
    return steps_per_epoch(plan.num_samples, smallest, plan.drop_last)


def lr_factor(rule: str, batch: int, initial: int) -> float:
    """The LR of a step of ``batch`` over the LR at ``initial``, by ``rule`` (sqrt, linear, none)."""
    if rule == "linear":
        return batch / initial
    if rule == "sqrt":
        return math.sqrt(batch / initial)
    return 1.0


class BatchSchedule:
    """The global batch now, and its changes after each step."""

    def __init__(self, cfg: Config, ctx: DistContext, model: torch.nn.Module, train_set: Split):
        self.cfg, self.ctx, self.model = cfg, ctx, model
        self.current = cfg.optim.global_batch_size
        self.cap = min(cfg.optim.max_global_batch_size or len(train_set), len(train_set))
        self.noise_samples = (train_set.head(cfg.metrics.exact_noise_samples)
                              if cfg.optim.batch_schedule == "noise_scale" else None)
        self.last_noise_scale: Optional[float] = None

    def after_step(self, steps_done: int) -> Optional[int]:
        """The batch from step ``steps_done`` on, where it changes there; None where it stays."""
        optim = self.cfg.optim
        if optim.batch_schedule == "steps":
            batch = next((b for step, b in optim.batch_steps if step == steps_done), self.current)
        elif steps_done % optim.batch_noise_every == 0:
            batch = self._from_noise_scale()
        else:
            batch = self.current
        if batch == self.current:
            return None
        self.current = batch
        return batch

    def _from_noise_scale(self) -> int:
        from harness.core.step import unwrap

        count = len(self.noise_samples)
        sums = gradient_sums(unwrap(self.model), self.noise_samples.features, self.noise_samples.targets).noise_scale()
        scale = population_noise_scale(sums.trace_cov, sums.grad_sq_norm, count)
        # Beyond the sample count the correction divides by what is left of |G|^2 after the N-sample noise,
        # which may be almost nothing (readings of 10^5 were seen): N samples do not resolve such a scale,
        # and the uncorrected ratio over them, a lower bound, decides instead.
        if not (math.isfinite(scale) and 0 < scale <= count):
            scale = sums.b_simple if math.isfinite(sums.b_simple) else float(self.current)
        self.last_noise_scale = scale
        target = self.cfg.optim.batch_noise_multiple * scale
        batch = self.current
        while batch * 2 <= min(target, self.cap) and (batch * 2) % self.ctx.world_size == 0:
            batch *= 2
        if self.ctx.is_distributed:  # one choice for every rank
            chosen = torch.tensor([batch], dtype=torch.int64, device=self.ctx.device)
            torch.distributed.all_reduce(chosen, op=torch.distributed.ReduceOp.MAX)
            batch = int(chosen)
        return batch

    def state_dict(self) -> dict:
        return {"current": self.current, "last_noise_scale": self.last_noise_scale}

    def load_state_dict(self, state: dict) -> None:
        self.current, self.last_noise_scale = state["current"], state["last_noise_scale"]


def build_batch_schedule(cfg: Config, ctx: DistContext, model: torch.nn.Module,
                         train_set: Split) -> Optional[BatchSchedule]:
    """The run's schedule, or None for a constant batch."""
    return BatchSchedule(cfg, ctx, model, train_set) if cfg.optim.batch_grows else None

"""Sharpness inside a run: one reading of the Hessian's extremes, and the readings over training.

Owns ``read_sharpness`` (the Hessian's largest and smallest eigenvalues of the training
loss on the first ``metrics.sharpness_samples`` training samples) and ``SharpnessReadings``
(when a run reads it, what it costs, and the ``by_step/`` trajectory still to be logged).
Every rank reads it the same way (same subset, same Lanczos start vector), so the ranks
agree without a collective. Edge of stability (Cohen et al. 2021): full-batch GD drives
the top eigenvalue up to 2/lr (2(1 + momentum)/lr with heavy-ball momentum).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from harness.console import warn
from harness.core.config import Config
from harness.core.data import Split
from harness.core.distributed import DistContext
from harness.core.evaluation import RunCounters, timed
from harness.core.model import summed_loss
from harness.core.step import unwrap
from harness.measure.metrics import hessian_extremes


def read_sharpness(cfg: Config, ctx: DistContext, model: torch.nn.Module, train_set: Split,
                   training_stream=contextlib.nullcontext) -> Optional[dict[str, float]]:
    """The Hessian's largest and smallest algebraic eigenvalues on a fixed subset (the first N training samples).

    Metrics ``top_hessian_eigenvalue`` (sharpness), ``bottom_hessian_eigenvalue``
    (negative: the loss still curves down somewhere), ``hessian_eigensolver_converged``
    (0 when Lanczos did not converge within ``metrics.sharpness_iterations`` restarts:
    the eigenvalue it missed is left out, not guessed) and ``hessian_vector_products`` (its cost).
    None when the loss there is not finite: Lanczos on NaN products has nothing to find.
    ``training_stream``: where autograd on the parameters runs (the graph step's side stream).
    """
    model, metrics_cfg = unwrap(model), cfg.metrics
    subset = train_set.head(metrics_cfg.sharpness_samples)
    x, y = subset.features, subset.targets
    with torch.no_grad():
        if not torch.isfinite(summed_loss(model, x, y)):
            return None
    with training_stream():
        extremes = hessian_extremes(lambda: summed_loss(model, x, y) / len(y), list(model.parameters()),
                                    tolerance=metrics_cfg.sharpness_tolerance,
                                    iterations=metrics_cfg.sharpness_iterations, seed=cfg.seed)
    if not extremes.converged:
        warn(f"sharpness: Lanczos did not converge to tolerance {extremes.tolerance:g} within "
             f"{metrics_cfg.sharpness_iterations} restarts ({extremes.hessian_vector_products} Hessian-vector "
             f"products); the unconverged eigenvalue is not logged (raise metrics.sharpness_iterations)", ctx=ctx)
    return {"top_hessian_eigenvalue": extremes.top, "bottom_hessian_eigenvalue": extremes.bottom,
            "hessian_eigensolver_converged": float(extremes.converged),
            "hessian_vector_products": float(extremes.hessian_vector_products)}


def sharpness_cost_metrics(counters: RunCounters) -> dict[str, float]:
    """What reading sharpness has cost so far (cumulative; the last epoch's are the run's)."""
    return {"sharpness_readings": float(counters.sharpness_readings),
            "hessian_vector_products_total": float(counters.hessian_vector_products_total)}


class SharpnessReadings:
    """The sharpness readings of one run, on every rank.

    With ``metrics.sharpness_every`` set (``periodic``) the loop reads at step 0, when
    ``is_due_after_step`` or ``is_due_after_epoch`` says, and at the run's end; every reading
    then joins the trajectory. Without it only the final reading is taken.
    """

    def __init__(self, cfg: Config, ctx: DistContext, model: torch.nn.Module, train_set: Split,
                 counters: RunCounters, training_stream=contextlib.nullcontext):
        self.cfg, self.ctx, self.model, self.train_set, self.counters = cfg, ctx, model, train_set, counters
        self.training_stream = training_stream
        self.every, self.unit = cfg.metrics.sharpness_every, cfg.metrics.sharpness_every_unit
        self.history: list[tuple[int, dict[str, float]]] = []  # (global step, reading) not logged yet
        # The newest reading: the final one reuses it when it was taken at the same step
        # (a budget that ends on a multiple of N), rather than paying for it twice.
        self.last: Optional[tuple[int, Optional[dict[str, float]]]] = None

    @property
    def periodic(self) -> bool:
        return self.every is not None

    def is_due_after_step(self, global_step: int) -> bool:
        """Is there a reading after step ``global_step`` (1-based)? Stateless, so a resumed run keeps the schedule.

        Unit ``steps``: every N steps. Unit ``doubling_steps``: at N, 2N, 4N, 8N, ... steps, so that
        batch sizes whose runs differ tenfold in steps get about as many readings each, evenly
        spaced on the log-step axis the report plots them on."""
        if not self.periodic or global_step % self.every:
            return False
        multiple = global_step // self.every
        return self.unit == "steps" or (self.unit == "doubling_steps" and multiple & (multiple - 1) == 0)

    def is_due_after_epoch(self, epoch: int) -> bool:
        return self.unit == "epochs" and self.periodic and epoch % self.every == 0

    def read(self, global_step: int) -> Optional[dict[str, float]]:
        """Read sharpness at the current parameters (step ``global_step`` done); None when the loss is not finite."""
        if self.last is not None and self.last[0] == global_step:
            return self.last[1]
        with timed(self.counters, "sharpness_seconds", self.ctx.device):
            reading = read_sharpness(self.cfg, self.ctx, self.model, self.train_set, self.training_stream)
        self.last = (global_step, reading)
        if reading is not None:
            self.counters.sharpness_readings += 1
            self.counters.hessian_vector_products_total += int(reading["hessian_vector_products"])
            if self.periodic:
                self.history.append((global_step, reading))
        return reading

    def take_history(self) -> dict[str, list[tuple[int, float]]]:
        """``by_step/<key>`` -> [(global step, value)] not logged yet; an unconverged eigenvalue (NaN) is left out."""
        history, self.history = self.history, []
        return {f"by_step/{key}": [(step, reading[key]) for step, reading in history if reading[key] == reading[key]]
                for key in ("top_hessian_eigenvalue", "bottom_hessian_eigenvalue")}

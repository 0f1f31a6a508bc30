"""Evaluations inside a run, at step resolution, and where a run's time goes.

Owns ``evaluate`` (loss and accuracy of a split, sharded over ranks); ``StepEvaluations``
(the periodic accuracy of a fixed validation subset, on ``eval_interval``'s schedule and at
each epoch's end; which of ``metrics.target_val_accuracy``'s targets it finds reached, recorded
at the exact steps core/crossing.py finds; with ``train.target_train_loss``, the whole training
split's loss); the race; ``RunCounters`` and the clock.

Between evaluations nothing here syncs with the device: steps and samples are host
integers. Leaves the loop and what is logged when to core/train_loop.py.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from harness.core.config import DEFAULT_EVAL_COST, Config
from harness.core.data import Split
from harness.core.distributed import DistContext, all_reduce_sum
from harness.core.model import MLP, returns_loss, summed_loss
from harness.core.step import unwrap
from harness.core.noise_probe import NoiseProbe


@dataclass
class RunCounters:
    """Counters that outlive an epoch (and a restart: they are checkpointed, under the key "counters")."""

    epoch: int = 0
    global_step: int = 0
    samples_seen: int = 0
    train_seconds: float = 0.0  # training steps only (time_train_s)
    target_reached_epoch: int = 0  # 0: the subset accuracy has not reached the target yet
    target_reached_step: int = 0
    stopped_at_target: bool = False  # the run ended there (train.stop_at_target): it is finished
    eval_seconds: float = 0.0  # the periodic subset evaluations (time_eval_s)
    epoch_eval_seconds: float = 0.0  # the full train/val/test evaluations at each epoch's end
    probe_seconds: float = 0.0  # exact noise scale, the probe's readouts (time_probe_s)
    tracking_seconds: float = 0.0  # inside tracker calls (time_tracking_s)
    # Fields added later have defaults, so that older checkpoints still load.
    train_loss_target_step: int = 0  # 0: the full training loss has not reached train.target_train_loss
    sharpness_seconds: float = 0.0  # every sharpness reading, the final one included (time_sharpness_s)
    sharpness_readings: int = 0
    hessian_vector_products_total: int = 0  # of all sharpness readings: their cost in backward passes
    race_stopped_step: int = 0  # 0: not stopped by the race (train.race_stop); else the step it stopped at
    targets_reached: tuple = ()  # (target, step) of each metrics.target_val_accuracy reached, ascending
    replay_seconds: float = 0.0  # training again to find the exact step of each target (time_replay_s)
    loss_targets_reached: tuple = ()  # (target, step) of each train.target_train_loss reached, descending


def time_metrics(counters: RunCounters) -> dict[str, float]:
    """Where the run's time went so far, as metrics."""
    return {"time_train_s": counters.train_seconds, "time_eval_s": counters.eval_seconds,
            "time_epoch_eval_s": counters.epoch_eval_seconds, "time_probe_s": counters.probe_seconds,
            "time_tracking_s": counters.tracking_seconds, "time_sharpness_s": counters.sharpness_seconds,
            "time_replay_s": counters.replay_seconds,
            "eval_fraction": counters.eval_seconds / counters.train_seconds if counters.train_seconds else 0.0}


def synchronized_now(device: torch.device) -> float:
    """perf_counter after the device's queued work: only at evaluation points and epoch ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@contextlib.contextmanager
def timed(counters: RunCounters, field: str, device: torch.device):
    """Add the block's wall time (device work included) to ``counters.<field>``."""
    started = synchronized_now(device)
    try:
        yield
    finally:
        setattr(counters, field, getattr(counters, field) + synchronized_now(device) - started)


def _rank_chunks(split: Split, ctx: DistContext, rows: int):
    """This rank's contiguous shard of ``split`` (the ranks' shards sum-reduce to the whole), ``rows`` at a time."""
    shard = torch.tensor_split(torch.arange(len(split)), ctx.world_size)[ctx.rank]
    start, stop = (int(shard[0]), int(shard[-1]) + 1) if len(shard) else (0, 0)
    for lo in range(start, stop, rows):
        yield split.rows(lo, min(stop, lo + rows))


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, ctx: DistContext, batch_size: int) -> tuple[float, float]:
    """(mean loss, accuracy) over the whole split; each rank scores a contiguous shard, then a sum-reduce.
    The model scores in eval mode (a factory's dropout off, its batch norm on running statistics)."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss sum, correct, count
    scores_accuracy = not returns_loss(model)
    for x, y in _rank_chunks(split, ctx, batch_size):
        if scores_accuracy:
            logits = model(x)
            totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
            totals[1] += (logits.argmax(1) == y).sum()
        else:  # a model that returns its own loss has no accuracy: NaN
            totals[0] += summed_loss(model, x, y).double()
            totals[1] = math.nan
        totals[2] += len(y)
    model.train(was_training)
    all_reduce_sum(totals, ctx)
    count = max(float(totals[2]), 1.0)
    return float(totals[0]) / count, float(totals[1]) / count


@torch.no_grad()
def evaluate_members(models: list[torch.nn.Module], split: Split, ctx: DistContext,
                     batch_size: int) -> list[tuple[float, float]]:
    """``evaluate`` of several MLPs of one architecture at once (a stack's members): their weights stacked
    [K, ...] and one batched forward per chunk of ``batch_size`` member-samples, so K members cost one
    evaluation's passes, not K. One model is ``evaluate`` itself."""
    nets = [unwrap(m) for m in models]
    if len(models) == 1 or not all(isinstance(n, MLP) for n in nets):  # another architecture: one by one
        return [evaluate(m, split, ctx, batch_size) for m in models]
    weights = [torch.stack(layer) for layer in zip(*([l.weight for l in n.linears] for n in nets))]
    biases = [torch.stack(layer).unsqueeze(1) for layer in zip(*([l.bias for l in n.linears] for n in nets))]
    totals = torch.zeros(len(nets), 3, dtype=torch.float64, device=ctx.device)  # loss sum, correct, count
    for x, y in _rank_chunks(split, ctx, max(1, batch_size // len(nets))):
        z = torch.matmul(x, weights[0].transpose(1, 2)) + biases[0]  # [K, n, d_1]
        for w, b in zip(weights[1:], biases[1:]):
            z = torch.baddbmm(b, nets[0].activation(z), w.transpose(1, 2))
        losses = F.cross_entropy(z.flatten(0, 1), y.repeat(len(nets)), reduction="none")
        totals[:, 0] += losses.view(len(nets), -1).sum(1)
        totals[:, 1] += (z.argmax(2) == y).sum(1)
        totals[:, 2] += len(y)
    all_reduce_sum(totals, ctx)
    count = totals[:, 2].clamp(min=1.0)
    return list(zip((totals[:, 0] / count).tolist(), (totals[:, 1] / count).tolist()))


# The automatic schedule keeps evaluations under about this fraction of training
# (metrics.eval_cost, default AUTO_EVAL_COST): scoring n samples is one forward pass,
# about a third of a training step's forward and backward over n samples, so k steps
# of batch B cost 3*B*k forward samples against eval_samples per evaluation.
AUTO_EVAL_COST = DEFAULT_EVAL_COST
# ... and reads steps-to-target to about this relative resolution at any scale (a batch of
# 16 needs thousands of steps, one of 8192 a hundred: no fixed interval suits both).
AUTO_RESOLUTION = 0.05


def eval_floor(cfg: Config) -> int:
    """The fewest steps between automatic evaluations: what keeps their cost under metrics.eval_cost."""
    eval_samples = min(cfg.metrics.eval_samples, cfg.data.validation_size or cfg.metrics.eval_samples)
    if cfg.train.target_train_loss is not None:  # each evaluation then scores the whole training split too
        eval_samples += cfg.train_set_size
    return max(1, math.ceil(eval_samples / (3 * cfg.metrics.eval_cost * cfg.optim.global_batch_size)))


def eval_interval(cfg: Config, global_step: int) -> int:
    """Steps between evaluations around ``global_step``: metrics.eval_every_steps, else the floor
    doubled as often as the interval stays within AUTO_RESOLUTION of the step count."""
    if cfg.metrics.eval_every_steps:
        return cfg.metrics.eval_every_steps
    floor = eval_floor(cfg)
    return floor * 2 ** max(0, math.floor(math.log2(max(global_step * AUTO_RESOLUTION / floor, 1.0))))


def is_evaluation_step(cfg: Config, global_step: int, steps_per_epoch: int = 0) -> bool:
    """Does the run evaluate after step ``global_step`` (1-based)? Stateless, so a resumed run keeps the schedule.
    Given ``steps_per_epoch``, a run with a target evaluates after every epoch's last step too: a checkpoint
    is then a state checked below the targets not reached, where core/crossing.py can start after a restart."""
    epoch_end = steps_per_epoch and cfg.metrics.accuracy_targets and global_step % steps_per_epoch == 0
    return bool(epoch_end) or global_step % eval_interval(cfg, global_step) == 0


class TrainingClock:
    """Credits the wall time between two marks to training: ``credit(seconds)`` adds it where it belongs
    (a run's own counters, or a stack's members still training, core/train_loop.py's SharedClock)."""

    def __init__(self, device: torch.device, credit):
        self.device = device
        self.credit = credit
        self.mark = 0.0

    def restart(self) -> float:
        """Training (re)starts now; returns the time."""
        self.mark = synchronized_now(self.device)
        return self.mark

    def stop(self) -> float:
        """Training stops now: credit the time since the mark; returns the time."""
        now = synchronized_now(self.device)
        self.credit(now - self.mark)
        return now


class Race:
    """The steps-to-target race of one batch size's trials (train.race_stop = k): a trial still short of the
    target at k times the steps of the fastest trial that reached it cannot be its batch size's tuned one
    unless the seeds disagree by more than k (harness/analysis/critical.py checks that), so it stops there.

    ``best``: the fewest steps to the target known, from the trials of other processes
    (train.race_best_steps) and the members of this stack as they reach it."""

    def __init__(self, factor: Optional[float], best: Optional[int] = None):
        self.factor, self.best = factor, best or math.inf

    def reached(self, steps: int) -> None:
        self.best = min(self.best, steps)

    def lost(self, global_step: int) -> bool:
        """Is a trial still short of the target at ``global_step`` out of the race?"""
        return self.factor is not None and global_step >= self.factor * self.best


class StepEvaluations:
    """The periodic evaluations of one run, on every rank (they all-reduce, and all ranks agree). The loop
    calls ``start_epoch``, ``after_step`` after each step (true: stop); where an evaluation found targets
    reached (``crossed``) it finds their exact steps (core/crossing.py) and hands them to ``settle``
    (true: stop); it stops ``clock`` after the last step, then takes the histories and ``at_target`` to log."""

    def __init__(self, cfg: Config, ctx: DistContext, model: torch.nn.Module, validation: Split,
                 train_set: Split, probe: Optional[NoiseProbe], counters: RunCounters, last_step: int,
                 steps_per_epoch: int, sharpness=None, *, clock: TrainingClock, race: Optional[Race] = None):
        self.cfg, self.ctx, self.model, self.probe, self.counters = cfg, ctx, model, probe, counters
        self.clock = clock  # a stack's members share one
        self.race = race or Race(None)  # and one race
        # The budget's last step is evaluated too: a trial whose last steps fall between
        # two evaluations would otherwise be "not reached" when its final parameters did.
        self.last_step, self.steps_per_epoch = last_step, steps_per_epoch
        self.targets = cfg.metrics.accuracy_targets
        self.subset = validation.head(cfg.metrics.eval_samples)
        self.train_set = train_set
        self.history: list[tuple[int, float]] = []  # (global step, subset accuracy) not logged yet
        self.train_loss_history: list[tuple[int, float]] = []  # (global step, full training loss) not logged yet
        self.sharpness = sharpness  # core/sharpness.py's SharpnessReadings, read between two steps, or None
        self.at_target: dict[str, float] = {}  # what was measured at the targets, not logged yet
        self.samples = counters.samples_seen
        self.evaluated = -1  # the step of the last evaluation
        self.crossed: list[float] = []  # targets the last evaluation found reached, their steps not settled
        # (global step, training seconds) of the last evaluation with no target crossed: a crossing's time
        # is interpolated between it and the evaluation that found it.
        self.last_check = (counters.global_step, counters.train_seconds)

    def start_epoch(self) -> None:
        self.samples = self.counters.samples_seen
        self.clock.restart()

    @property
    def pending(self) -> list[float]:
        """The targets not reached yet, ascending."""
        reached = dict(self.counters.targets_reached)
        return [t for t in self.targets if t not in reached]

    def after_step(self, global_step: int, global_batch_size: int) -> bool:
        """Count the step's samples; at an evaluation point, evaluate. True: stop training here."""
        self.samples += global_batch_size
        if self.sharpness is not None and self.sharpness.is_due_after_step(global_step):
            self.clock.stop()  # reading sharpness is not training
            self.sharpness.read(global_step)
            self.clock.restart()
        if not (is_evaluation_step(self.cfg, global_step, self.steps_per_epoch) or global_step == self.last_step):
            return False
        return self._evaluate(global_step)

    def _evaluate(self, global_step: int) -> bool:
        counters = self.counters
        self.evaluated = global_step
        started = self.clock.stop()
        _, accuracy = evaluate(self.model, self.subset, self.ctx, self.cfg.train.eval_batch_size)
        if self.probe:
            self.probe.close_window()
        self.history.append((global_step, accuracy))
        pending = self.pending
        self.crossed = [t for t in pending if accuracy >= t]
        loss_reached = self._check_train_loss(global_step)
        counters.eval_seconds += self.clock.restart() - started
        if self.crossed:
            return loss_reached  # ``settle`` decides the rest
        self.last_check = (global_step, counters.train_seconds)
        return self._race_lost(global_step) if pending else loss_reached

    def _race_lost(self, global_step: int) -> bool:
        """Out of the race at ``global_step``: its steps to the last target are more than this (a lower bound,
        not "not reached"), and it stops."""
        if not self.race.lost(global_step):
            return False
        self.counters.race_stopped_step = global_step
        self.at_target["steps_to_target_lower_bound"] = float(global_step)
        return True

    def settle(self, global_step: int, crossings: list) -> bool:
        """Record the ``crossed`` targets at their exact steps (core/crossing.py ``Crossing``s), with the probe's
        windows ending at ``global_step``. True: stop training (the last target reached, or out of the race)."""
        counters = self.counters
        probe = self.probe.window_metrics() if self.probe else {}
        (checked, checked_seconds), seconds = self.last_check, counters.train_seconds
        for crossing in crossings:
            share = (crossing.step - checked) / max(global_step - checked, 1)
            metrics = {"steps_to_target": float(crossing.step), "samples_to_target": float(crossing.samples),
                       "seconds_to_target": checked_seconds + share * (seconds - checked_seconds),
                       "epochs_to_target": crossing.samples / len(self.train_set),
                       "steps_to_target_resolution": float(crossing.resolution), **probe, **crossing.noise}
            counters.targets_reached += ((crossing.target, crossing.step),)
            if self._keep_at_target(metrics, crossing.target, self.targets):
                self.race.reached(crossing.step)
                counters.target_reached_step, counters.target_reached_epoch = crossing.step, counters.epoch + 1
        self.crossed = []
        self.last_check = (global_step, seconds)
        if not self.pending:
            return self.cfg.train.stop_at_target
        return self._race_lost(global_step)

    def _check_train_loss(self, global_step: int) -> bool:
        """With train.target_train_loss: score the whole training split (sharded over the ranks, which
        then agree); each target the loss is at or below is reached at this check, its numbers kept to log
        (suffixed ``_<target>`` where there are several; unsuffixed: the smallest's). True at the smallest."""
        targets, counters = self.cfg.train.loss_targets, self.counters
        if not targets or counters.train_loss_target_step:
            return False
        loss, _ = evaluate(self.model, self.train_set, self.ctx, self.cfg.train.eval_batch_size)
        self.train_loss_history.append((global_step, loss))
        reached = dict(counters.loss_targets_reached)
        for target in (t for t in targets if t not in reached and loss <= t):  # a NaN loss reaches none
            counters.loss_targets_reached += ((target, global_step),)
            metrics = {"steps_to_train_loss_target": float(global_step),
                       "samples_to_train_loss_target": float(self.samples),
                       "seconds_to_train_loss_target": counters.train_seconds,
                       "epochs_to_train_loss_target": self.samples / len(self.train_set),
                       "train_loss_at_target_check": loss}
            if self._keep_at_target(metrics, target, targets):
                counters.train_loss_target_step = global_step
        return bool(counters.train_loss_target_step)

    def _keep_at_target(self, metrics: dict[str, float], target: float, targets: tuple[float, ...]) -> bool:
        """Keep ``metrics`` measured at ``target`` to log: suffixed ``_<target>`` where there are several
        targets, unsuffixed for the last of ``targets`` (the one that ends the run). True for the last."""
        if len(targets) > 1:
            self.at_target.update({f"{key}_{target:g}": value for key, value in metrics.items()})
        if target != targets[-1]:
            return False
        self.at_target.update(metrics)
        return True

    def take_history(self) -> list[tuple[int, float]]:
        history, self.history = self.history, []
        return history

    def take_train_loss_history(self) -> list[tuple[int, float]]:
        history, self.train_loss_history = self.train_loss_history, []
        return history

    def take_at_target(self) -> dict[str, float]:
        at_target, self.at_target = self.at_target, {}
        return at_target

"""The only training loop: ``train(trials, ctx, trackers)``, called by every launcher.

It trains K >= 1 trials, its members, through one engine (a run alone, core/trainer.py
``SingleRun``; a stack, core/stacked_run.py): each epoch's batches go through
``engine.train_step``, which returns each member's loss; a member that stops (its target, a
blown-up loss) leaves the engine (``engine.keep``) and the others go on. Each member is the run it
stands for: its own tracker (built by the launcher), evaluations, target and clock
(core/evaluation.py), sharpness readings, epoch-end measurements and checkpoints. ``hooks`` set the
launcher's resume rules and act after each epoch. Collectives run on every rank, before a tracker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from harness import faults, signals
from harness.console import say
from harness.core.checkpoint import Checkpoints
from harness.core.crossing import Replay
from harness.core.config import Config
from harness.core.data import Dataset, load_dataset
from harness.core.distributed import DistContext, all_reduce_sum
from harness.core.epoch_bar import LossPostfix, epoch_bar
from harness.core.batch_schedule import epoch_steps_bound
from harness.core.evaluation import (Race, RunCounters, StepEvaluations, TrainingClock, evaluate_members,
                                     synchronized_now, time_metrics, timed)
from harness.core.sharpness import SharpnessReadings, sharpness_cost_metrics
from harness.core.stacked_run import build_stack
from harness.core.model import build_model
from harness.core.step import unwrap
from harness.core.trainer import (InitWeights, SingleRun, Trainer, build_trainer, checkpoint_state,
                                  load_init_weights, load_state)

# A loss above this (cross-entropy of 10 classes starts near 2.3) means the run blew up.
DIVERGED_LOSS = 1e3
# The training loss at step resolution (step = optimizer step): the mean over this rank's samples since the
# point before, a point at each evaluation and at each epoch's end.
TRAIN_LOSS_POINTS = "train_loss_window"


@dataclass
class RunResult:
    run_id: Optional[str]
    epochs_completed: int
    global_step: int
    metrics: dict[str, float] = field(default_factory=dict)
    diverged: bool = False
    checkpoint: Optional[Path] = None


class RunHooks:
    """What a launcher adds to the loop: its resume rules (those of core/checkpoint.py ``Checkpoints``;
    a launcher that keeps checkpoints of its own overrides ``restored_checkpoint``) and what happens after
    each epoch."""

    def __init__(self, resume: bool = False, launch_id: Optional[str] = None, same_launch_only: bool = False):
        self.resume, self.launch_id, self.same_launch_only = resume, launch_id, same_launch_only

    def checkpoints(self, cfg: Config, ctx: DistContext) -> Checkpoints:
        """Run ``cfg``'s checkpoints under this launcher's resume rules."""
        return Checkpoints(cfg, ctx, resume=self.resume, launch_id=self.launch_id,
                           same_launch_only=self.same_launch_only, restored=lambda: self.restored_checkpoint(cfg))

    def restored_checkpoint(self, cfg: Config) -> Optional[Path]:
        """A checkpoint file the launcher itself kept for run ``cfg``, resumed before the run's folder; None here."""
        return None

    def run_tags(self) -> dict[str, str]:
        """Tags the launcher sets on every run each time it starts or resumes (e.g. where its workers are)."""
        return {}

    def after_epoch(self, epoch: int, metrics: dict[str, float], checkpoint: Optional[Path], ctx: DistContext) -> None:
        """Called on every rank for every member after each of its epochs (epoch 0: its initial checkpoint)."""

    def epoch_done(self, epoch: int, ctx: DistContext) -> None:
        """Called on every rank once per epoch of the loop, after every member's ``after_epoch`` (Ray Train
        reports here)."""


@dataclass
class Member:
    """One trial of the loop: its run's pieces, and where it is within the current epoch."""

    position: int
    trainer: Trainer
    tracker: object
    checkpoints: Checkpoints
    state: Optional[dict]
    run_id: Optional[str] = None
    counters: Optional[RunCounters] = None
    sharp: Optional[SharpnessReadings] = None
    evals: Optional[StepEvaluations] = None
    latest: Optional[Path] = None
    result: Optional[RunResult] = None
    finished: bool = False  # its run has ended (FINISHED)
    training: bool = False  # still stepping in the current epoch
    steps: int = 0  # this epoch's steps, until it stopped
    samples: int = 0  # this rank's samples of this epoch, until it stopped
    seconds_before: float = 0.0
    loss: float = 0.0  # this rank's summed loss of this epoch, banked from the engine's rows
    # The training loss at step resolution: (summed loss, samples) of this epoch up to the last point, and
    # the points (step, mean loss of this rank's samples since the one before), logged at the epoch's end.
    loss_mark: tuple[float, int] = (0.0, 0)
    loss_points: list = field(default_factory=list)

    @property
    def cfg(self) -> Config:
        return self.trainer.cfg


def shared_clock(device: torch.device, members: list[Member]) -> TrainingClock:
    """The members' training clock: a stretch of training is split evenly among the members still training
    (their steps ran together; one member's evaluation is not another's training time)."""
    def split(seconds: float) -> None:
        training = [m for m in members if m.training]
        for m in training:
            m.counters.train_seconds += seconds / len(training)

    return TrainingClock(device, split)


def build_engine(trials: list[Config], ctx: DistContext, dataset: Dataset, stacked: bool):
    """The engine that trains ``trials`` and each one's trainer: a run alone, or a stack (of one too, for a
    stack's members resumed from different epochs: their arithmetic stays the stack's)."""
    if not stacked:
        trainer = build_trainer(trials[0], ctx, dataset)
        return SingleRun(trainer), [trainer]
    return build_stack(trials, ctx, dataset)


def train(trials: list[Config], ctx: DistContext, trackers: list, hooks: Optional[RunHooks] = None,
          dataset: Optional[Dataset] = None,
          init_weights: Optional[Callable[[Config], Optional[InitWeights]]] = None) -> list[RunResult]:
    """Train ``trials`` (one, or several that ``stacked.check_stackable`` accepts) on this rank; one result each.

    ``trackers[k]`` records trial k. ``init_weights(cfg)`` (the launcher's) resolves the
    ``checkpoint.init_from`` of a trial that starts afresh. Trials resumed from checkpoints of
    different epochs cannot share steps: they are trained as separate groups.
    """
    hooks = hooks or RunHooks()
    dataset = (dataset or load_dataset(trials[0])).place(ctx.device, trials[0].data.resident)
    checkpoints = [hooks.checkpoints(cfg, ctx) for cfg in trials]
    states = [c.resume_state() for c in checkpoints]
    epochs = [state["epoch"] if state else 0 for state in states]
    results: dict[int, RunResult] = {}
    for epoch in sorted(set(epochs)):
        group = [k for k, e in enumerate(epochs) if e == epoch]
        engine, trainers = build_engine([trials[k] for k in group], ctx, dataset, stacked=len(trials) > 1)
        members = [Member(k, trainer, trackers[k], checkpoints[k], states[k]) for k, trainer in zip(group, trainers)]
        results.update(zip(group, _train_members(engine, members, dataset, hooks, init_weights, len(trials))))
    return [results[k] for k in range(len(trials))]


def _train_members(engine, members: list[Member], dataset: Dataset, hooks: RunHooks,
                   init_weights: Optional[Callable[[Config], Optional[InitWeights]]],
                   stack_size: int) -> list[RunResult]:
    """Start (or resume) every member's run, train their epochs, end their runs; one result each."""
    for m in members:
        if m.state is None:
            m.checkpoints.clear()
    # Before any run starts: a source that vanished since preflight is refused with no run made.
    init_tags = [load_init_weights(m.trainer, init_weights(m.cfg)) if m.state is None and init_weights else {}
                 for m in members]
    # start and finish sit inside the try: a signal that lands while either talks to
    # MLflow must still end every run as KILLED, not leave it RUNNING.
    try:
        for m, tags in zip(members, init_tags):
            m.run_id = m.tracker.start(resume_run_id=m.state["run_id"] if m.state else None, launch_id=hooks.launch_id)
            tags = {**tags, **hooks.run_tags()}
            if stack_size > 1:
                tags.update(stack_size=stack_size, stack_position=m.position)
            if tags:
                m.tracker.set_tags(tags)
        _train_epochs(engine, members, dataset, hooks)
        for m in members:
            _finish(m)
    except BaseException as err:
        # Inline, not in a helper: a signal raises at the next function entry, and
        # must land inside this try. It is raised only once per process
        # (harness/signals.py), so the second round of finishes runs to its end.
        try:
            status = signals.end_status(err)
            for m in members:
                if m.run_id and not m.finished:
                    m.finished = True
                    m.tracker.finish(status)
        except signals.Terminated:
            for m in members:
                if m.run_id:
                    m.tracker.finish("KILLED")
            raise
        raise
    return [m.result for m in members]


def _train_epochs(engine, members: list[Member], dataset: Dataset, hooks: RunHooks) -> None:
    """Every member's epochs: each epoch's batches through the engine, each member's evaluations after each
    step, and at the epoch's end each member's measurements, log, checkpoint and (if its run ends) finish."""
    ctx = members[0].trainer.ctx
    clock = shared_clock(ctx.device, members)
    race = Race(members[0].cfg.train.race_stop,
                min((m.cfg.train.race_best_steps for m in members if m.cfg.train.race_best_steps), default=None))
    for m in members:
        _begin(m, dataset, hooks, clock, race)
        if m.counters.target_reached_step:  # reached before a restart: it still leads the race
            race.reached(m.counters.target_reached_step)
        if first_epoch(m.cfg, m.counters) > m.cfg.total_epochs:
            m.finished = True  # stopped at its target before the restart: nothing left to train
            m.tracker.finish("FINISHED")
    if any(m.state is None for m in members):  # their epoch-0 checkpoints were just written
        hooks.epoch_done(0, ctx)
    # A member that stopped at its target before a restart has just ended: it trains no more.
    in_engine = _keep(engine, members, [m for m in members if not m.finished])
    if not in_engine:
        return
    # The epochs and steps of a member still training: one that stopped at its target in the
    # resumed epoch holds fewer steps and no epoch left.
    first = in_engine[0]
    global_step = first.counters.global_step
    # The run's last step, the same for every member.
    budget = first.cfg.step_budget(epoch_steps_bound(first.cfg, first.trainer.plan))
    replay = Replay(engine, first.cfg.metrics.noise_window_steps)
    for epoch in range(first_epoch(first.cfg, first.counters), first.cfg.total_epochs + 1):
        if not in_engine:
            break
        live = list(in_engine)
        for m in live:
            m.training, m.steps, m.samples, m.loss, m.seconds_before = True, 0, 0, 0.0, m.counters.train_seconds
            m.loss_mark, m.loss_points = (0.0, 0), []
            m.evals.start_epoch()
        if any(m.evals.pending for m in live):  # the last epoch's end was an evaluation point (or this is step 0)
            replay.checked_below(global_step)
        in_engine = _train_one_epoch(engine, in_engine, epoch, global_step, budget, replay)
        clock.stop()
        for m in live:
            m.training = False
        global_step += max(m.steps for m in live)
        _end_members_epoch(live, dataset, hooks, epoch)
        in_engine = _keep(engine, in_engine, [m for m in in_engine if not m.finished], replay)


def _train_one_epoch(engine, in_engine: list[Member], epoch: int, global_step: int, budget: int,
                     replay: Replay) -> list[Member]:
    """The engine's steps of ``epoch`` until the budget, or until every member has stopped; the members still
    training at its end. Each member's loss and samples are banked on it; a target an evaluation finds
    reached is settled at its exact step (``replay``)."""
    ctx = in_engine[0].trainer.ctx
    with epoch_bar(in_engine[0].cfg, ctx, engine.steps_per_epoch, epoch) as bar:
        postfix = LossPostfix(bar, ctx.device)
        # window_samples: this rank's samples since loss_sum was last reset (the bar's running loss)
        loss_sum, window_samples = torch.zeros(len(in_engine), dtype=torch.float64, device=ctx.device), 0
        for step, (indices, global_batch_size) in enumerate(engine.local_batches(epoch)):
            if step == budget - global_step:
                break
            if step == engine.steps_per_epoch // 2:
                faults.maybe_kill("step", epoch, ctx.rank)
            loss_sum.add_(engine.train_step(indices, global_batch_size, global_step + step))  # in float64
            replay.record(indices, global_batch_size)
            local_samples = indices.shape[-1]
            window_samples += local_samples
            postfix.maybe_show(loss_sum, window_samples)  # before update(): its redraw then shows the new value
            bar.update(1)
            done = global_step + step + 1
            for m in in_engine:
                m.steps += 1
                m.samples += local_samples
                if m.trainer.batch_schedule is not None:
                    _follow_batch_schedule(m, done)
                if m.evals.after_step(done, global_batch_size):
                    m.training = False  # its run stops here (its training-loss target, or out of the race)
            if in_engine[0].evals.evaluated == done:  # an evaluation's host sync: the loss point rides on it
                _mark_loss(loss_sum, in_engine, done)
            _settle_crossings(replay, in_engine, done)
            if not all(m.training for m in in_engine):
                _bank(loss_sum, in_engine)
                in_engine = _keep(engine, in_engine, [m for m in in_engine if m.training], replay)
                if not in_engine:
                    break
                loss_sum, window_samples = torch.zeros(len(in_engine), dtype=torch.float64, device=ctx.device), 0
            if in_engine[0].evals.evaluated == done and any(m.evals.pending for m in in_engine):
                replay.checked_below(done)
    if in_engine:
        _mark_loss(loss_sum, in_engine, global_step + in_engine[0].steps)  # the epoch's last stretch
    _bank(loss_sum, in_engine)
    return in_engine


def _mark_loss(loss_sum: torch.Tensor, in_engine: list[Member], step: int) -> None:
    """Each member's training-loss point at ``step``: the mean loss of this rank's samples since its last point."""
    for m, row in zip(in_engine, loss_sum.reshape(-1).tolist()):
        total, (marked, marked_samples) = m.loss + row, m.loss_mark
        if m.samples > marked_samples:
            mean = (total - marked) / (m.samples - marked_samples)
            if math.isfinite(mean):
                m.loss_points.append((step, mean))
        m.loss_mark = (total, m.samples)


def _follow_batch_schedule(m: Member, steps_done: int) -> None:
    """The member's batch from step ``steps_done`` on (optim.batch_schedule): where it changes, one line and
    ``by_step/batch_size`` at that step."""
    schedule = m.trainer.batch_schedule
    before = schedule.current
    after = schedule.after_step(steps_done)
    if after is None:
        return
    noise = f", B_simple {schedule.last_noise_scale:.0f}" if schedule.last_noise_scale is not None else ""
    say(f"[{m.cfg.name}] step {steps_done}: global batch {before} -> {after}{noise}", ctx=m.trainer.ctx)
    with timed(m.counters, "tracking_seconds", m.trainer.ctx.device):
        m.tracker.log_metrics({"by_step/batch_size": float(after)}, step=steps_done)


def _settle_crossings(replay: Replay, in_engine: list[Member], global_step: int) -> None:
    """The members whose evaluation at ``global_step`` found targets reached: their exact steps (training
    again from the last check, which is not training time), recorded; those whose runs end there stop."""
    rows = [row for row, m in enumerate(in_engine) if m.evals.crossed]
    if not rows:
        return
    crossing = [in_engine[row] for row in rows]
    clock = crossing[0].evals.clock
    clock.stop()
    found = replay.crossings(crossing, rows, global_step, [m.evals.samples for m in crossing])
    clock.restart()
    for m, crossings in zip(crossing, found):
        if m.evals.settle(global_step, crossings):
            m.training = False


def _end_members_epoch(live: list[Member], dataset: Dataset, hooks: RunHooks, epoch: int) -> None:
    """Each member that trained this epoch: measure, log, save, and end the runs that end here."""
    ctx = live[0].trainer.ctx
    # Every rank's loss and samples, summed.
    totals = all_reduce_sum(torch.tensor([[m.loss for m in live], [float(m.samples) for m in live]],
                                         dtype=torch.float64, device=ctx.device), ctx).tolist()
    running = [loss / max(samples, 1.0) for loss, samples in zip(*totals)]
    for m, samples in zip(live, totals[1]):
        _count_epoch(m, epoch, int(samples))
    scores = _score_members([m for m, loss in zip(live, running) if not _blown_up(loss)], dataset)
    ending = []
    for m, loss, samples in zip(live, running, totals[1]):
        stopped = _end_epoch(m, epoch, int(samples), loss, scores.get(id(m), {}))
        if not m.result.diverged:
            _save(m, hooks, epoch)
        if m.result.diverged or stopped or epoch == m.cfg.total_epochs:
            ending.append(m)
    # The launcher has every member's checkpoint of this epoch before any of their runs ends.
    hooks.epoch_done(epoch, ctx)
    for m in ending:
        _finish(m)


def _bank(loss_sum: torch.Tensor, in_engine: list[Member]) -> None:
    """Move the engine's running loss sums (one per row) to the members' own (a host read, so only
    when members leave the engine and at the epoch's end)."""
    for m, value in zip(in_engine, loss_sum.reshape(-1).tolist()):
        m.loss += value


def _keep(engine, in_engine: list[Member], staying: list[Member], replay: Optional[Replay] = None) -> list[Member]:
    """Shrink the engine (and ``replay``'s snapshots) to ``staying`` (the others' runs have ended or stop here).
    A member that leaves keeps what it had: its parameters, optimizer state and probe stay where its run
    stopped."""
    if len(staying) < len(in_engine) and staying:
        rows = {id(m): row for row, m in enumerate(in_engine)}
        kept = [rows[id(m)] for m in staying]
        engine.keep(kept, [m.trainer for m in staying])
        if replay is not None:
            replay.keep(kept)
    return staying


def _finish(m: Member) -> None:
    """End a member's run: the time line, where its final weights are, FINISHED."""
    if m.finished:
        return
    m.finished = True
    # The run's last console line: where its time went (a sweep's trials: summed in the sweep's last lines).
    if m.result.metrics and m.cfg.trial is None:
        times = time_metrics(m.counters)
        say(f"[{m.cfg.name}] time: training {times['time_train_s']:.2f} s, evaluations every few steps "
            f"{times['time_eval_s']:.2f} s ({times['eval_fraction']:.1%} of training), epoch-end evaluations "
            f"{times['time_epoch_eval_s']:.2f} s, probes {times['time_probe_s']:.2f} s, "
            f"sharpness {times['time_sharpness_s']:.2f} s ({m.counters.sharpness_readings} readings), "
            f"exact crossings {times['time_replay_s']:.2f} s, tracking {times['time_tracking_s']:.2f} s",
            ctx=m.trainer.ctx)
    m.result.checkpoint = m.latest
    if m.latest is not None:  # where the run's final weights are (interpolate, init_from by run id)
        m.tracker.set_tags({"checkpoint_path": str(Path(m.latest).resolve())})
    if m.cfg.tracking.log_model and not m.result.diverged:
        with timed(m.counters, "tracking_seconds", m.trainer.ctx.device):
            m.tracker.log_model(lambda: final_model(m))  # built by the tracker that records it: rank 0's
    m.tracker.finish("FINISHED")


def final_model(m: Member) -> torch.nn.Module:
    """The member's final weights in a model of its own on the CPU (a stack member's are a view of its row)."""
    model = build_model(m.cfg)
    model.load_state_dict({k: v.detach().cpu().clone() for k, v in unwrap(m.trainer.model).state_dict().items()})
    return model.eval()


def first_epoch(cfg: Config, counters: RunCounters) -> int:
    """The next epoch to train; past the last for a run that stopped early (resuming it trains nothing)."""
    return cfg.total_epochs + 1 if stopped_early(counters) else counters.epoch + 1


def stopped_early(counters: RunCounters) -> bool:
    """Has the run ended before its budget: at its target, its training-loss target, or out of the race?"""
    return counters.stopped_at_target or counters.train_loss_target_step > 0 or counters.race_stopped_step > 0


def _begin(m: Member, dataset: Dataset, hooks: RunHooks, clock: TrainingClock, race: Race) -> None:
    """A resumed run's state loaded, or a new run's start: step-0 sharpness and the epoch-0 checkpoint."""
    trainer, ctx = m.trainer, m.trainer.ctx
    m.counters = RunCounters() if m.state is None else load_state(trainer, m.state)
    m.sharp = SharpnessReadings(m.cfg, ctx, trainer.model, trainer.train_set, m.counters,
                                trainer.train_step.on_training_stream)
    m.result = RunResult(m.run_id, m.counters.epoch, m.counters.global_step)
    steps_per_epoch = epoch_steps_bound(m.cfg, trainer.plan)
    m.evals = StepEvaluations(m.cfg, ctx, trainer.model, dataset.validation, trainer.train_set, trainer.noise_probe,
                              m.counters, m.cfg.step_budget(steps_per_epoch), steps_per_epoch, m.sharp,
                              clock=clock, race=race)
    if m.state is not None:
        return
    if trainer.batch_schedule is not None:
        m.tracker.log_metrics({"by_step/batch_size": float(trainer.batch_schedule.current)}, step=0)
    if m.sharp.periodic:  # step 0, before the first update, logged before epoch 0 is saved
        m.sharp.read(0)
        with timed(m.counters, "tracking_seconds", ctx.device):
            _log_trajectory(m.tracker, m.sharp)
    # Epoch 0 is saved too: a run killed in its first epoch resumes into the same MLflow run.
    _save(m, hooks, 0)


def _save(m: Member, hooks: RunHooks, epoch: int) -> None:
    """The member's checkpoint of ``epoch`` (where it is kept), then the launcher's ``after_epoch``."""
    m.latest = m.checkpoints.save(checkpoint_state(m.trainer, m.counters, m.run_id, hooks.launch_id),
                                  epoch) or m.latest
    hooks.after_epoch(epoch, m.result.metrics, m.latest, m.trainer.ctx)


def _count_epoch(m: Member, epoch: int, samples: int) -> None:
    """Count an epoch's steps (all of them, or those before the run stopped inside it) and samples."""
    counters = m.counters
    counters.epoch, counters.global_step = epoch, counters.global_step + m.steps
    counters.samples_seen += samples
    counters.stopped_at_target = m.cfg.train.stop_at_target and counters.target_reached_step > 0


def _is_last(m: Member) -> bool:
    """Does the member's run end with this epoch? (train.target_train_loss: the run ends at the check that
    reached it, having broken out of the epoch there, so what is measured is measured at those parameters.)"""
    return m.counters.epoch == m.cfg.total_epochs or stopped_early(m.counters)


def _blown_up(train_loss_running: float) -> bool:
    return not math.isfinite(train_loss_running) or train_loss_running > DIVERGED_LOSS


def _score_members(members: list[Member], dataset: Dataset) -> dict[int, dict[str, float]]:
    """The epoch-end loss and accuracy of every split for ``members``, by ``id``: the members whose runs go on
    as one batched evaluation (a stack served as one), those ending here as another (their training split
    whole, the others' its metrics.train_eval_samples estimate). The time is shared evenly among them."""
    if not members:
        return {}
    ctx = members[0].trainer.ctx
    scores: dict[int, dict[str, float]] = {}
    for last in (False, True):
        group = [m for m in members if _is_last(m) == last]
        if not group:
            continue
        started = synchronized_now(ctx.device)
        train = dataset.train if last else dataset.train.spread(group[0].cfg.metrics.train_eval_samples)
        metrics = [{"train_eval_samples": float(len(train))} for _ in group]
        for prefix, split in (("train", train), ("val", dataset.validation), ("test", dataset.test)):
            if len(split):
                values = evaluate_members([m.trainer.model for m in group], split, ctx,
                                          group[0].cfg.train.eval_batch_size)
                for out, (loss, accuracy) in zip(metrics, values):
                    out[f"{prefix}_loss"], out[f"{prefix}_accuracy"] = loss, accuracy
        share = (synchronized_now(ctx.device) - started) / len(group)
        for m, out in zip(group, metrics):
            out["generalization_gap_accuracy"] = out["train_accuracy"] - out["test_accuracy"]
            out["generalization_gap_loss"] = out["test_loss"] - out["train_loss"]
            m.counters.epoch_eval_seconds += share
            scores[id(m)] = out
    return scores


def _end_epoch(m: Member, epoch: int, samples: int, train_loss_running: float, scores: dict[str, float]) -> bool:
    """After an epoch's steps were counted: measure, log; the run's result so far in ``m.result``. Returns
    whether it stopped (a target reached, or out of the race)."""
    cfg, counters = m.cfg, m.counters
    stopped = stopped_early(counters)
    is_last = _is_last(m)
    metrics, tags = _measure_epoch(m, train_loss_running, samples, scores)
    diverged = "diverged" in tags
    metrics.update(m.evals.take_at_target())
    if not diverged:
        metrics.update(_sharpness_at_epoch_end(m, epoch, is_last))
    targets = {"steps_to_target": (counters.target_reached_step, cfg.metrics.target_val_accuracy),
               "steps_to_train_loss_target": (counters.train_loss_target_step, cfg.train.target_train_loss)}
    for key, (reached_step, target) in targets.items():
        if key in metrics:
            tags[key] = str(int(metrics[key]))
        elif is_last and not reached_step and target is not None:
            tags[key] = "not reached"
    if counters.race_stopped_step:
        tags.update(steps_to_target=f"slower than the best by more than {cfg.train.race_stop:g}x",
                    race_stopped_step=str(counters.race_stopped_step))
    if counters.stopped_at_target:
        tags["stopped_at_target"] = "true"
    metrics.update(time_metrics(counters))  # cumulative; the last epoch's are the run's
    metrics.update(sharpness_cost_metrics(counters))
    finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
    with timed(counters, "tracking_seconds", m.trainer.ctx.device):
        m.tracker.log_epoch(finite, epoch, counters.global_step)
        m.tracker.log_metric_history("val_subset_accuracy", m.evals.take_history())
        m.tracker.log_metric_history(TRAIN_LOSS_POINTS, m.loss_points)
        if cfg.train.target_train_loss is not None:
            m.tracker.log_metric_history("train_loss_full", m.evals.take_train_loss_history())
        _log_trajectory(m.tracker, m.sharp)
        if tags:
            m.tracker.set_tags(tags)
    m.result = RunResult(m.run_id, epoch, counters.global_step, metrics, diverged)
    return stopped


def _sharpness_at_epoch_end(m: Member, epoch: int, is_last: bool) -> dict[str, float]:
    """The epoch-unit reading when due; at the run's end the final reading, whose values are the final
    metrics with metrics.sharpness. One reading at a step serves both (``read`` reuses it)."""
    if m.sharp.is_due_after_epoch(epoch):
        m.sharp.read(m.counters.global_step)
    if not (is_last and (m.cfg.metrics.sharpness or m.sharp.periodic)):
        return {}
    final = m.sharp.read(m.counters.global_step)
    return final if m.cfg.metrics.sharpness and final is not None else {}


def _log_trajectory(tracker, sharp: SharpnessReadings) -> None:
    """The sharpness readings not logged yet, with step = optimizer step (one record per key)."""
    for key, points in sharp.take_history().items():
        if points:
            tracker.log_metric_history(key, points)


def _measure_epoch(m: Member, train_loss_running: float, samples: int,
                   scores: dict[str, float]) -> tuple[dict[str, float], dict[str, str]]:
    """The epoch's metrics and tags, its evaluations' ``scores`` among them; every rank runs it (the probe
    all-reduces)."""
    trainer, counters = m.trainer, m.counters
    if _blown_up(train_loss_running):
        # Evaluating a blown-up model only produces NaNs: record the loss and stop.
        return ({"train_loss_running": train_loss_running, "global_step": float(counters.global_step)},
                {"diverged": "true", "diverged_epoch": str(counters.epoch)})
    metrics = {"train_loss_running": train_loss_running, **scores}
    if trainer.noise_probe:
        with timed(counters, "probe_seconds", trainer.ctx.device):
            metrics.update(trainer.noise_probe.epoch_metrics())
    elapsed_s = counters.train_seconds - m.seconds_before  # the training steps only, without the evaluations
    metrics.update(epoch_s=elapsed_s, samples_per_s=samples / elapsed_s, global_step=float(counters.global_step),
                   lr=float(trainer.schedule.lr_at(counters.global_step)[0]), weight_norm=weight_norm(trainer.model))
    return metrics, {}


@torch.no_grad()
def weight_norm(model: torch.nn.Module) -> float:
    """‖θ‖₂ over every parameter: sharpness and the loss along a line between two solutions depend on
    the scale of the weights (Dinh et al. 2017), so a comparison of minima reports it beside them."""
    return float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in unwrap(model).parameters())))

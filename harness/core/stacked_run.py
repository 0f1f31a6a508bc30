"""A stack of trials as one run: ``train_stack(members, ctx, ...)``, the stacked counterpart of train_loop.train.

core/stacked.py trains K trials of one architecture and batch size as one
stacked model; this module makes each of them the run it stands for. Every
member gets what ``train_loop.train`` gives a run alone, through the same
functions: its own MLflow run (same params, metrics and tags, plus
``stack_size`` / ``stack_position``), its periodic evaluations and target
(core/evaluation.py ``StepEvaluations``), its noise probe (a view of the stacked
probe), its sharpness readings, its epoch-end measurements and log
(train_loop.end_epoch), and its checkpoints, in the format and folder of a run
alone, so a stacked run resumes (and a member's checkpoint loads) like one.

A member is evaluated through a view: an ordinary ``MLP`` whose parameters alias
row k of the stacked tensors, so evaluation, the exact noise scale and the
Hessian readings run on it unchanged. A member that reaches its target (or
whose loss blows up) stops updating at that step; the others go on, and its run
ends at the epoch's end with what a run alone logs there. The training clock is
shared: each stretch of stacked steps is split evenly among the members still
training, so a member's ``time_train_s`` is its share, and the trials' times
still add up to the sweep's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from harness import faults, signals
from harness.console import say
from harness.core.config import Config
from harness.core.data import BatchPlan, Dataset
from harness.core.distributed import DistContext, all_reduce_sum
from harness.core.epoch_bar import epoch_bar
from harness.core.evaluation import RunCounters, StepEvaluations, TrainingClock
from harness.core.model import build_model
from harness.core.sharpness import SharpnessReadings
from harness.core.stacked import StackedTrainer
from harness.core.stacked_graph import use_graph_step
from harness.core.optim import Schedule
from harness.core.train_loop import (RunHooks, RunResult, Trainer, begin_epochs, checkpoint_state, end_epoch,
                                     first_epoch, run_step_budget, start_from_source, time_line)
from harness.records.tracking import make_tracker


class MemberStep:
    """What the loop's helpers ask of a member's step: where autograd on its parameters runs (here)."""

    @staticmethod
    def on_training_stream():
        return contextlib.nullcontext()


def member_model(stack: StackedTrainer, k: int, cfg: Config) -> torch.nn.Module:
    """An ``MLP`` of member k's architecture whose parameters alias row k of the stack's tensors."""
    model = build_model(cfg).to(stack.device)
    point_at_row(model, stack, k)
    return model


def point_at_row(model: torch.nn.Module, stack: StackedTrainer, row: int) -> None:
    """Make ``model``'s parameters views of row ``row`` of the stack's weights and biases."""
    for i, linear in enumerate(model.linears):
        linear.weight.data = stack.model.weights[i][row]
        linear.bias.data = stack.model.biases[i][row]


@dataclass
class Member:
    """One trial of the stack: its run's pieces, and where it is within the current epoch."""

    position: int
    trainer: Trainer
    tracker: object
    checkpoints: object
    state: Optional[dict]
    run_id: Optional[str] = None
    counters: Optional[RunCounters] = None
    sharp: Optional[SharpnessReadings] = None
    evals: Optional[StepEvaluations] = None
    latest: object = None
    result: Optional[RunResult] = None
    finished: bool = False  # its run has ended (FINISHED)
    training: bool = False  # still stepping in the current epoch
    steps: int = 0  # this epoch's steps, until it stopped
    samples: int = 0  # this rank's samples of this epoch, until it stopped
    seconds_before: float = 0.0
    loss: float = 0.0  # this rank's summed loss of this epoch, banked from the stack's rows

    @property
    def cfg(self) -> Config:
        return self.trainer.cfg


class SharedClock(TrainingClock):
    """One clock for the whole stack: a stretch of training is split evenly among the members still training."""

    def __init__(self, device: torch.device, members: list[Member]):
        super().__init__(device, self._split)
        self.members = members

    def _split(self, seconds: float) -> None:
        training = [m for m in self.members if m.training]
        for m in training:
            m.counters.train_seconds += seconds / len(training)


def build_members(members: list[Config], ctx: DistContext, dataset: Dataset, checkpoints: list,
                  states: list[Optional[dict]], parent_run_id: Optional[str]) -> tuple[StackedTrainer, list[Member]]:
    """The stack and each member's run pieces (nothing logged yet)."""
    stack = StackedTrainer(members, [dataset.train] * len(members), ctx=ctx)
    built = []
    for k, cfg in enumerate(members):
        model = member_model(stack, k, cfg)
        optimizer = stack.optimizer.member(k)  # row k of the stack's state, saved as a run alone saves its own
        plan = BatchPlan(num_samples=len(dataset.train), global_batch_size=cfg.optim.global_batch_size,
                         seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size, drop_last=cfg.train.drop_last)
        schedule = Schedule.of([cfg], plan.steps_per_epoch, ctx.device)
        probe = stack.probe.members[k] if stack.probe else None
        trainer = Trainer(cfg, ctx, model, optimizer, plan, dataset.train, schedule, MemberStep(), probe)
        built.append(Member(k, trainer, make_tracker(cfg, ctx, parent_run_id), checkpoints[k], states[k]))
    return stack, built


def train_stack(members: list[Config], ctx: DistContext, dataset: Dataset, hooks: Optional[RunHooks] = None,
                parent_run_id: Optional[str] = None) -> list[RunResult]:
    """Train ``members`` (trials that ``stacked.check_stackable`` accepts) as one stack; one result each.

    Members resumed from checkpoints of different epochs (a kill between two of
    their epoch-end saves) cannot share steps: they are trained as separate stacks.
    """
    hooks = hooks or RunHooks()
    dataset = dataset.to(ctx.device)
    checkpoints = [MemberCheckpoints(hooks.checkpoints(cfg, ctx)) for cfg in members]
    states = [c.resume_state() for c in checkpoints]
    epochs = [state["epoch"] if state else 0 for state in states]
    if len(set(epochs)) > 1:
        results: dict[int, RunResult] = {}
        for epoch in sorted(set(epochs)):
            part = [k for k, e in enumerate(epochs) if e == epoch]
            results.update(zip(part, train_stack([members[k] for k in part], ctx, dataset, hooks, parent_run_id)))
        return [results[k] for k in range(len(members))]
    stack, built = build_members(members, ctx, dataset, checkpoints, states, parent_run_id)
    unavailable = use_graph_step(stack, members[0].performance.cuda_graph, ctx)
    if unavailable:
        say(f"[stack of {len(members)}] performance.cuda_graph: running the eager stacked step instead, because "
            f"{unavailable}", ctx=ctx)
    for m in built:
        if m.state is None:
            m.checkpoints.clear()
    # Before any run starts, as train_loop.train: a source that vanished since preflight is refused with no run made.
    init_tags = [start_from_source(m.trainer) if m.state is None else {} for m in built]
    try:
        for m in built:
            m.run_id = m.tracker.start(resume_run_id=m.state["run_id"] if m.state else None,
                                       launch_id=hooks.launch_id)
            m.tracker.set_tags({**init_tags[m.position], "stack_size": len(built), "stack_position": m.position,
                                **hooks.run_tags()})
        _train_stack_epochs(stack, built, dataset, hooks)
        for m in built:
            _finish(m)
    except BaseException as err:
        # As train_loop.train: every member's run still open ends with the signal's status.
        try:
            status = signals.end_status(err)
            for m in built:
                if m.run_id and not m.finished:
                    m.finished = True
                    m.tracker.finish(status)
        except signals.Terminated:
            for m in built:
                if m.run_id:
                    m.tracker.finish("KILLED")
            raise
        raise
    return [m.result for m in built]


def _finish(m: Member) -> None:
    """End a member's run as a run alone ends: the time line, where its final weights are, FINISHED."""
    if m.finished:
        return
    m.finished = True
    if m.result.metrics:
        say(time_line(m.cfg.name, m.counters), ctx=m.trainer.ctx)
    m.result.checkpoint = m.latest
    if m.latest is not None:
        m.tracker.set_tags({"checkpoint_path": str(Path(m.latest).resolve())})
    m.tracker.finish("FINISHED")


def _save(m: Member, epoch: int, hooks: RunHooks) -> None:
    m.latest = m.checkpoints.save(checkpoint_state(m.trainer, m.counters, m.run_id, hooks.launch_id), epoch) \
        or m.latest


class MemberCheckpoints:
    """A member's ``Checkpoints`` (a run alone's folder and rules) whose saves copy its tensors out of the
    stack first: its parameters are views, and saving a view saves all K rows."""

    def __init__(self, checkpoints):
        self.checkpoints = checkpoints

    def __getattr__(self, name):
        return getattr(self.checkpoints, name)

    def save(self, state: dict, epoch: int):
        state = {**state, "model": {key: value.clone() for key, value in state["model"].items()}}
        return self.checkpoints.save(state, epoch)


def _train_stack_epochs(stack: StackedTrainer, built: list[Member], dataset: Dataset, hooks: RunHooks) -> None:
    ctx = stack.ctx
    clock = SharedClock(ctx.device, built)
    for m in built:
        m.counters, m.sharp, m.latest = begin_epochs(m.trainer, m.tracker, hooks, m.checkpoints, m.state, m.run_id)
        m.result = RunResult(m.run_id, m.counters.epoch, m.counters.global_step)
        m.evals = StepEvaluations(m.cfg, ctx, m.trainer.model, dataset.validation, m.trainer.train_set,
                                  m.trainer.noise_probe, m.counters, run_step_budget(m.trainer),
                                  MemberStep.on_training_stream, m.sharp, clock=clock)
        if first_epoch(m.cfg, m.counters) > m.cfg.total_epochs:
            m.finished = True  # stopped at its target before the restart: nothing left to train
            m.tracker.finish("FINISHED")
    if any(m.state is None for m in built):  # their epoch-0 checkpoints were just written
        hooks.after_stack_epoch(0, ctx)
    # A member that stopped at its target before a restart has just ended: it trains no more.
    in_stack = _keep(stack, built, [m for m in built if not m.finished])
    first = built[0].cfg
    global_step = stack.global_step = built[0].counters.global_step
    budget = run_step_budget(built[0].trainer)
    for epoch in range(first_epoch(first, built[0].counters), first.total_epochs + 1):
        if not in_stack:
            break
        live = list(in_stack)
        for m in live:
            m.training, m.steps, m.samples, m.loss = True, 0, 0, 0.0
            m.seconds_before = m.counters.train_seconds
            m.evals.start_epoch()
        loss_sum = torch.zeros(len(in_stack), dtype=torch.float64, device=ctx.device)
        with epoch_bar(first, ctx, stack.steps_per_epoch, epoch) as bar:
            for step, (indices, global_batch_size) in enumerate(stack.local_batches(epoch)):
                if step == budget - global_step:
                    break
                if step == stack.steps_per_epoch // 2:
                    faults.maybe_kill("step", epoch, ctx.rank)
                loss_sum.add_(stack.train_step(indices, global_batch_size, global_step + step))  # in float64
                bar.update(1)
                for m in in_stack:
                    m.steps += 1
                    m.samples += indices.shape[1]
                    if m.evals.after_step(global_step + step + 1, global_batch_size):
                        m.training = False  # its run alone stops here (its target)
                if not all(m.training for m in in_stack):
                    _bank(loss_sum, in_stack)
                    in_stack = _keep(stack, in_stack, [m for m in in_stack if m.training])
                    if not in_stack:
                        break
                    loss_sum = torch.zeros(len(in_stack), dtype=torch.float64, device=ctx.device)
        clock.stop()
        _bank(loss_sum, in_stack)
        for m in live:
            m.training = False
        global_step += max(m.steps for m in live)
        # Every rank's loss and samples, summed, as Trainer.run_epoch sums a run alone's.
        totals = all_reduce_sum(torch.tensor([[m.loss for m in live], [float(m.samples) for m in live]],
                                             dtype=torch.float64, device=ctx.device), ctx).tolist()
        ending = []
        for m, loss, samples in zip(live, *totals):
            m.result, stopped = end_epoch(m.trainer, dataset, m.tracker, m.counters, m.evals, m.sharp, epoch,
                                          m.steps, int(samples), loss / max(samples, 1.0),
                                          m.counters.train_seconds - m.seconds_before, m.run_id)
            if not m.result.diverged:
                _save(m, epoch, hooks)
                hooks.after_epoch(epoch, m.result.metrics, m.latest, ctx)
            if m.result.diverged or stopped or epoch == first.total_epochs:
                ending.append(m)
        # The launcher has every member's checkpoint of this epoch before any of their runs ends.
        hooks.after_stack_epoch(epoch, ctx)
        for m in ending:
            _finish(m)
        in_stack = _keep(stack, in_stack, [m for m in in_stack if not m.finished])


def _bank(loss_sum: torch.Tensor, in_stack: list[Member]) -> None:
    """Move the stack's running loss sums (one per row) to the members' own (a host read, so only
    when members leave the stack and at the epoch's end)."""
    for m, value in zip(in_stack, loss_sum.tolist()):
        m.loss += value


def _keep(stack: StackedTrainer, in_stack: list[Member], staying: list[Member]) -> list[Member]:
    """Shrink the stack to ``staying`` (the others' runs have ended or stop here) and point every staying
    member's views at its new row; a member that leaves keeps views of its old row, which no step
    touches any more: its parameters, momentum and probe stay where its run alone stopped."""
    if len(staying) < len(in_stack) and staying:
        rows = {id(m): row for row, m in enumerate(in_stack)}
        stack.keep([rows[id(m)] for m in staying])
        for row, m in enumerate(staying):
            point_at_row(m.trainer.model, stack, row)
            m.trainer.optimizer = stack.optimizer.member(row)
    return staying

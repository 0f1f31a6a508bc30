"""A stack of trials as an engine of the training loop: ``build_stack(trials, ctx, dataset)``.

core/stacked.py trains K trials of one architecture and batch size as one
stacked model; this module makes each of them a member the loop
(core/train_loop.py) can treat as a run alone. Each member's ``Trainer`` holds an
ordinary ``MLP`` whose parameters alias row k of the stacked tensors (so
evaluation, the exact noise scale, the Hessian readings and checkpoints run on it
unchanged), its row of the stack's optimizer state (saved as a run alone saves its
own), and its row of the stacked noise probe. When members leave the
stack (``StackEngine.keep``), the staying members' views are pointed at their new
rows; a member that leaves keeps views of its old row, which no step touches any
more.
"""

from __future__ import annotations

import contextlib

import torch

from harness.console import say
from harness.core.config import Config
from harness.core.data import BatchPlan, Dataset
from harness.core.distributed import DistContext
from harness.core.model import build_model
from harness.core.stacked import StackedTrainer
from harness.core.graph_step import GraphStep, new_side_stream
from harness.core.optim import Schedule
from harness.core.trainer import Trainer


class MemberStep:
    """What the loop's helpers ask of a member's step: where autograd on its parameters runs (here)."""

    @staticmethod
    def on_training_stream():
        return contextlib.nullcontext()


class StackEngine:
    """The loop's engine for a stack: the stacked trainer's batches and step, and members leaving it."""

    def __init__(self, stack: StackedTrainer):
        self.stack = stack
        self.steps_per_epoch = stack.steps_per_epoch

    def local_batches(self, epoch: int):
        return self.stack.local_batches(epoch)

    def train_step(self, indices: torch.Tensor, global_batch_size: int, global_step: int) -> torch.Tensor:
        return self.stack.train_step(indices, global_batch_size, global_step)

    def keep(self, rows: list[int], trainers: list[Trainer]) -> None:
        """Go on with only the members ``rows`` (in this order), whose trainers are ``trainers``."""
        self.stack.keep(rows)
        for row, trainer in enumerate(trainers):
            point_at_row(trainer.model, self.stack, row)
            trainer.optimizer = self.stack.optimizer.member(row)


def point_at_row(model: torch.nn.Module, stack: StackedTrainer, row: int) -> None:
    """Make ``model``'s parameters views of row ``row`` of the stack's weights and biases."""
    for i, linear in enumerate(model.linears):
        linear.weight.data = stack.model.weights[i][row]
        linear.bias.data = stack.model.biases[i][row]


def use_graph_step(stack: StackedTrainer, size: int, ctx: DistContext) -> None:
    """Train the stack through a ``GraphStep`` where CUDA graphs can run; elsewhere say in one line why not."""
    if ctx.device.type == "cuda":
        stack.train_step = GraphStep(stack, new_side_stream(ctx.device))
    else:
        say(f"[stack of {size}] performance.cuda_graph: running the eager stacked step instead, because the device "
            f"is {ctx.device.type}, and CUDA graphs need a CUDA device", ctx=ctx)


def build_stack(trials: list[Config], ctx: DistContext, dataset: Dataset) -> tuple[StackEngine, list[Trainer]]:
    """The stack of ``trials`` (``stacked.check_stackable`` refuses what cannot share it) and each member's trainer."""
    stack = StackedTrainer(trials, [dataset.train] * len(trials), ctx=ctx)
    if trials[0].performance.cuda_graph:
        use_graph_step(stack, len(trials), ctx)
    trainers = []
    for k, cfg in enumerate(trials):
        model = build_model(cfg).to(stack.device)
        point_at_row(model, stack, k)
        optimizer = stack.optimizer.member(k)  # row k of the stack's state, saved as a run alone saves its own
        plan = BatchPlan(num_samples=len(dataset.train), global_batch_size=cfg.optim.global_batch_size,
                         seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size, drop_last=cfg.train.drop_last)
        schedule = Schedule.of([cfg], plan.steps_per_epoch, ctx.device)
        probe = stack.probe.members[k] if stack.probe else None
        trainers.append(Trainer(cfg, ctx, model, optimizer, plan, dataset.train, schedule, MemberStep(), probe))
    return StackEngine(stack), trainers

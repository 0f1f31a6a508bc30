"""A stack of trials as an engine of the training loop: ``build_stack(trials, ctx, dataset)``.

The engine is core/stacked.py's ``StackedTrainer``; here each of its members becomes one the loop
(core/train_loop.py) treats as a run alone: its ``Trainer`` holds an ordinary model (the MLP, or
model.factory's) whose
parameters alias row k of the stacked tensors (evaluation, the exact noise scale, Hessian readings
and checkpoints run on it unchanged), its row of the optimizer state and of the stacked noise probe.
When members leave (``StackedTrainer.keep``), the staying members' views move to their new rows;
one that leaves keeps views of its old row, which no step touches any more.
"""

from __future__ import annotations

from harness.console import say
from harness.core.config import Config
from harness.core.data import Dataset
from harness.core.distributed import DistContext
from harness.core.model import build_model
from harness.core.stacked import StackedTrainer, point_at_row
from harness.core.graph_step import GraphStep, graph_unavailable_reason, new_side_stream
from harness.core.optim import Schedule
from harness.core.trainer import Trainer


def use_graph_step(stack: StackedTrainer, cfg: Config, size: int, ctx: DistContext) -> None:
    """Train the stack through a ``GraphStep`` where CUDA graphs can run; elsewhere say in one line why not."""
    reason = graph_unavailable_reason(cfg, ctx, stack.data.samples.features.device)
    if reason is None:
        stack.train_step = GraphStep(stack, new_side_stream(ctx.device))
    else:
        say(f"[stack of {size}] performance.cuda_graph: running the eager stacked step instead, because {reason}",
            ctx=ctx)


def build_stack(trials: list[Config], ctx: DistContext, dataset: Dataset) -> tuple[StackedTrainer, list[Trainer]]:
    """The stack of ``trials`` (``stacked.check_stackable`` refuses what cannot share it) and each member's trainer."""
    stack = StackedTrainer(trials, [dataset.train] * len(trials), ctx=ctx)
    if trials[0].performance.cuda_graph and trials[0].model.factory is None:
        use_graph_step(stack, trials[0], len(trials), ctx)
    elif trials[0].performance.cuda_graph:
        say(f"[stack of {len(trials)}] performance.cuda_graph: running the eager stacked step, because a stack of "
            "model.factory's model is not captured as CUDA graphs", ctx=ctx)
    trainers = []
    for k, cfg in enumerate(trials):
        model = build_model(cfg).to(stack.device)
        point_at_row(model, stack, k)
        # Its optimizer is row k of the stack's state, saved as a run alone saves its own; its step is the
        # stack's, whose hand-written backward leaves autograd on the member's model to the current stream.
        trainers.append(Trainer(cfg, ctx, model, stack.optimizer.member(k), stack.plans[k], dataset.train,
                                Schedule.of([cfg], stack.steps_per_epoch, ctx.device), stack,
                                stack.probe.members[k] if stack.probe else None))
    return stack, trainers

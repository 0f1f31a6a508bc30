"""The stacked step (core/stacked.py) as CUDA graphs: K trials' step, captured once, replayed per batch.

A stack's step is a few dozen small kernels for all K members together; replayed
from a graph, the whole stack costs one launch, where K trials run one after
another cost K graph replays (core/graph_step.py). This is what makes stacking
pay on a GPU, whose step at the note's sizes is launch latency, not arithmetic.

Owns: when the stacked step can be captured (``stacked_graph_unavailable_reason``),
its eager warm-up, its graphs (a plain step and a step that feeds the noise
probe), the static buffers they read (the members' batch indices [K, b] and
their LR vector [K]) and recapturing them when members leave the stack. The
step's math is not here: the graphs capture ``StackedTrainer.step_body``, the
very function the eager stacked step runs, so the two cannot drift apart.

What capture needs, and how it is met:
- static shapes and addresses: one graph per kind of full-size step; the last,
  smaller batch of an epoch runs eagerly. ``StackedTrainer.keep`` (members whose
  runs ended leave the stack) makes new, smaller tensors: the graphs are then
  dropped and captured again on them, after one eager step.
- no host reads in the step: on a GPU the update freezes a diverged member
  with a ``torch.where`` on the device-side mask (core/optim.py ``host_sync_free``),
  the one-hot targets are a scatter, the probe counts on the device, and the
  step's LR vector (core/optim.py ``Schedule.lr``) is copied into a static
  buffer before every replay.
- warm-up on a side stream before the first capture (PyTorch's CUDA notes).
"""

from __future__ import annotations

from typing import Optional

import torch

from harness.core.distributed import DistContext
from harness.core.graph_step import WARMUP_STEPS, new_side_stream, on_side_stream
from harness.core.stacked import StackedTrainer


def stacked_graph_unavailable_reason(ctx: DistContext) -> Optional[str]:
    """Why ``performance.cuda_graph`` cannot be honoured for a stack on this rank, or None when it can."""
    if ctx.device.type != "cuda":
        return f"the device is {ctx.device.type}, and CUDA graphs need a CUDA device"
    return None


class StackedGraphStep:
    """Full-size steps of a ``StackedTrainer``, replayed from CUDA graphs; the others run its eager step.

    Called as ``StackedTrainer.step`` is. ``capture=False`` runs the very body that
    would be captured, on the same static buffers, without capturing it: that is
    how it is checked against the eager stacked step on a machine without CUDA
    (tests/test_stacked_graph.py).
    """

    def __init__(self, stack: StackedTrainer, capture: bool = True):
        self.stack = stack
        self.capture = capture
        self.stream: Optional[torch.cuda.Stream] = new_side_stream(stack.device) if capture else None
        self.global_batch_size = stack.global_batch_size
        self.warmup_steps_left = WARMUP_STEPS
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # measures noise? -> graph
        self.static_losses: dict[bool, torch.Tensor] = {}
        self.static_indices: Optional[torch.Tensor] = None
        self.static_lr: Optional[torch.Tensor] = None
        self.captures = 0  # graphs captured so far (again after every change of the stack's members)
        self._layout: Optional[torch.Tensor] = None  # the gradient buffer the graphs were captured on

    def __call__(self, indices: torch.Tensor, global_batch_size: int, global_step: int) -> torch.Tensor:
        """One stacked step on the members' samples ``indices`` [K, b]; returns each member's summed loss [K]."""
        stack = self.stack
        if stack.model.flat_gradients is not self._layout:
            self._new_layout()
        full_batch = global_batch_size == self.global_batch_size
        if not full_batch or self.warmup_steps_left:
            if full_batch:
                self.warmup_steps_left -= 1
            with on_side_stream(self.stream):
                return stack.step(indices, global_batch_size, global_step)
        measure = stack.measures(global_batch_size, global_step)
        self.static_lr.copy_(stack.schedule.lr(global_step))  # one kernel: a view of the schedule's table
        if self.static_indices is None:
            self.static_indices = torch.empty_like(indices)
        self.static_indices.copy_(indices)
        stack.global_step = global_step + 1
        if not self.capture:
            return self._body(measure)
        if measure not in self.graphs:
            self._capture(measure)
        self.graphs[measure].replay()
        return self.static_losses[measure]

    def _new_layout(self) -> None:
        """The stack's tensors are new (first call, or members left): drop the graphs, size the buffers anew."""
        stack = self.stack
        if self._layout is not None:
            # One eager step before capturing on the new shapes, as before the first capture.
            self.warmup_steps_left = max(self.warmup_steps_left, 1)
        self._layout = stack.model.flat_gradients
        self.graphs.clear()
        self.static_losses.clear()
        self.static_indices = None
        # In the parameters' dtype: the copy into it casts as the eager update would (float64 to float32, the
        # same rounding), so the replayed step has no cast kernel of its own.
        self.static_lr = torch.zeros(stack.model.num_members, dtype=stack.optimizer.dtype, device=stack.device)

    def _body(self, measure: bool) -> torch.Tensor:
        return self.stack.step_body(self.static_indices, self.global_batch_size, self.static_lr, measure)

    def _capture(self, measure: bool) -> None:
        """Capture one kind of step. Capturing runs no kernels: the replay that follows trains the batch."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            self.static_losses[measure] = self._body(measure)
        self.graphs[measure] = graph
        self.captures += 1


def use_graph_step(stack: StackedTrainer, cuda_graph: bool, ctx: DistContext) -> Optional[str]:
    """With ``cuda_graph``, make the stack train through a ``StackedGraphStep`` where it can; returns why
    it cannot (None: it does, or it was not asked for)."""
    if not cuda_graph:
        return None
    reason = stacked_graph_unavailable_reason(ctx)
    if reason is None:
        stack.train_step = StackedGraphStep(stack)
    return reason

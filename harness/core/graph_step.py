"""The training step as CUDA graphs: captured once, replayed on static buffers.

At the note's sizes a step is a few dozen tiny kernels whose Python launches cost
more than their arithmetic. With ``performance.cuda_graph`` each kind of step
(plain, or feeding the noise probe) is captured once and replayed; feeding a
batch is one copy of its indices into a static buffer. The same wrapper serves a
run alone (core/step.py) and a stack (core/stacked.py), whose K members then cost
one launch. It owns when a run alone can be captured, the warm-up, the graphs,
their static buffers and recapture when a stack shrinks; the step's math stays
the wrapped step's ``step_body``, so eager and graph steps cannot drift apart.

What capture needs (PyTorch's CUDA notes, "CUDA Graphs" and "Usage with
DistributedDataParallel"): static shapes and addresses (one graph for the full
batch, the smaller last batch eager; gradients zeroed in place; new graphs, after
one eager step, when a stack's tensors are rebuilt), no host syncs (the LR is a
device tensor copied in before every replay; the probe counts on the device), and
a warm-up on a side stream (3 eager steps, 11 under DDP, whose model is built on
that stream, with NCCL's async error handling off).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from harness.core.config import Config
from harness.core.distributed import DistContext

WARMUP_STEPS = 3
# PyTorch's notes: "your warmup must run at least 11 DDP-enabled eager iterations
# before capture" (DDP rebuilds its buckets during its first iterations).
WARMUP_STEPS_DDP = 11


def graph_unavailable_reason(cfg: Config, ctx: DistContext, features_device: Optional[torch.device] = None
                             ) -> Optional[str]:
    """Why ``performance.cuda_graph`` cannot be honoured on this rank, or None when it can.
    ``features_device``: where the training samples live, when known."""
    if ctx.device.type != "cuda":
        return f"the device is {ctx.device.type}, and CUDA graphs need a CUDA device"
    if cfg.optim.batch_grows:
        return f"optim.batch_schedule {cfg.optim.batch_schedule!r} changes the batch's shape, which a graph fixes"
    if features_device is not None and features_device != ctx.device:
        # A graph replays the gather it captured; a batch gathered in host memory is not part of it.
        return (f"the samples stay in host memory (data.resident {cfg.data.resident!r}), and a graph step "
                "gathers its batch on the device")
    if cfg.train.grad_engine != "autograd":
        return (f"train.grad_engine is {cfg.train.grad_engine!r}: its hand-written backward and "
                "all-reduce run outside autograd and DDP; the graph step captures the autograd engine")
    if cfg.accumulation_steps(ctx.world_size) > 1:
        # Capturing it would mean capturing DDP's no_sync passes and the probe's per-pass reads, untested on a GPU.
        return (f"optim.micro_batch_size {cfg.optim.micro_batch_size} accumulates "
                f"{cfg.accumulation_steps(ctx.world_size)} passes per step; the graph step captures one pass")
    return None


def new_side_stream(device: torch.device) -> torch.cuda.Stream:
    """A stream on ``device`` that starts after the work already queued on its current stream."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    return stream


class CapturableStep:
    """What ``GraphStep`` asks of the step it wraps (``EagerStep``, ``StackedTrainer``), besides being called as
    ``step(indices, global batch size, global step) -> summed loss``: ``step_body(indices, global batch size,
    lr, measure)``, ``schedule``, ``optimizer``, ``global_batch_size``, ``graph_warmup_steps``,
    ``capture_layout()`` (tensors whose replacement means capturing again) and, from ``probe`` and
    ``measure_interval``, which steps feed the noise probe."""

    on_training_stream = staticmethod(contextlib.nullcontext)  # where eager autograd runs: the current stream

    def can_measure(self, global_batch_size: int) -> bool:
        """Can a step of this batch size feed the noise probe at all?"""
        return self.probe is not None and self.probe.can_measure(global_batch_size)

    def should_measure(self, global_batch_size: int, global_step: int) -> bool:
        """Does this step feed the noise probe (every noise_scale_interval-th step it can measure)?"""
        return self.can_measure(global_batch_size) and global_step % self.measure_interval == 0


class GraphStep:
    """Full-size steps of a ``CapturableStep``, replayed from CUDA graphs; the others run that step eagerly."""

    def __init__(self, step, stream: Optional[torch.cuda.Stream]):
        self.step, self.stream = step, stream
        # The graphs hold the gradient buffers' addresses: eager steps must zero them in place.
        step.keeps_gradient_buffers = True
        self.warmup_steps_left = step.graph_warmup_steps
        # measures noise? -> the graph and the loss tensor it writes
        self.graphs: dict[bool, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.static_indices: Optional[torch.Tensor] = None  # the batch's indices, copied in before every replay
        self.static_lr: Optional[torch.Tensor] = None  # and its LR
        self._layout: Optional[torch.Tensor] = None  # what the graphs were captured on

    def __call__(self, indices: torch.Tensor, global_batch_size: int, global_step: int) -> torch.Tensor:
        """One step on the samples ``indices``; returns the summed loss (no host sync). A full batch after
        the warm-up is replayed; the warm-up steps and the smaller last batch run the eager step."""
        step = self.step
        if step.capture_layout() is not self._layout:
            self._new_layout()
        full_batch = global_batch_size == step.global_batch_size
        if not full_batch or self.warmup_steps_left:
            if full_batch:
                self.warmup_steps_left -= 1
            # Eager steps run on the side stream too: DDP, built there, keeps the
            # parameters' gradient accumulators, which stay bound to that stream;
            # a backward from another stream makes autograd synchronise the two.
            with self.on_training_stream():
                return step(indices, global_batch_size, global_step)
        lr = step.schedule.lr(global_step)  # a view of the schedule's table
        if self.static_indices is None:
            self.static_indices = torch.empty_like(indices)
            # In the parameters' dtype: the copy into it casts as the eager update does, so the
            # replayed step has no cast kernel of its own.
            self.static_lr = torch.empty(lr.shape, dtype=step.optimizer.dtype, device=lr.device)
        self.static_lr.copy_(lr)  # every replay: a decaying schedule reaches the captured update
        self.static_indices.copy_(indices)
        return self.replay(step.should_measure(global_batch_size, global_step))

    @contextlib.contextmanager
    def on_training_stream(self):
        """A block of eager autograd work on the parameters, run on the stream DDP was built on, ordered
        after and before the current stream's work (no stream: as is)."""
        if self.stream is None:
            yield
            return
        current = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            yield
        current.wait_stream(self.stream)

    def replay(self, measure: bool) -> torch.Tensor:
        """Replay the graph of this kind of step, capturing the graphs first if there are none."""
        if not self.graphs:
            self._capture_all()
        graph, loss = self.graphs[measure]
        graph.replay()
        return loss

    def body(self, measure: bool) -> torch.Tensor:
        """The step as it is captured, on the static buffers."""
        return self.step.step_body(self.static_indices, self.step.global_batch_size, self.static_lr, measure)

    def _new_layout(self) -> None:
        """The step's tensors are new (first call, or members left a stack): drop the graphs and buffers."""
        if self._layout is not None:
            # One eager step before capturing on the new shapes, as before the first capture.
            self.warmup_steps_left = max(self.warmup_steps_left, 1)
        self._layout = self.step.capture_layout()
        self.graphs.clear()
        self.static_indices = self.static_lr = None

    def _capture_all(self) -> None:
        """Capture the plain step and, if the probe can measure this batch, the measuring step.

        Both right after the warm-up: under DDP its 12th and 13th iterations on every rank, clear of
        those where DDP times itself with CUDA events, which a capture could not sync on. Capturing
        runs no kernels: the replay that follows trains the batch.
        """
        for measure in (False, True) if self.step.can_measure(self.step.global_batch_size) else (False,):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                loss = self.body(measure)
            self.graphs[measure] = graph, loss


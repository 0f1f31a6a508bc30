"""The training step as CUDA graphs: captured once, replayed on static buffers.

For the note's small DNN a step is a few dozen tiny kernels, and launching them
one by one from Python costs more than running them. With
``performance.cuda_graph`` the whole step (zero-grad, gather of the batch,
forward, loss, backward with DDP's all-reduce, the noise probe, the update)
is captured once per kind of step and replayed; feeding a batch is one copy of
its indices into a static buffer.

The same wrapper serves a run alone (core/step.py) and a stack of K trials
(core/stacked.py), whose step is a few dozen small kernels for all K members
together: replayed, the whole stack costs one launch where K trials one after
another cost K replays. That is what makes stacking pay on a GPU, whose step at
the note's sizes is launch latency, not arithmetic.

Owns: when a run alone's step can be captured (``graph_unavailable_reason``), the
eager warm-up before capture, the two graphs (a plain step and a step that feeds
the noise probe), the static buffers they read (the batch's indices, [b] or
[K, b], and the LR, [1] or [K]), and capturing again when a stack's members
leave it. It does not own the step's math: ``GraphStep`` calls the wrapped step
for the steps it does not replay and captures its ``step_body``, so eager and
graph steps cannot drift apart.

What capture needs, and how it is met here (PyTorch's CUDA notes, "CUDA Graphs"
and "Usage with DistributedDataParallel"):
- static shapes and addresses: one graph per batch shape (the full batch); the
  last, smaller batch of an epoch runs eagerly. Gradients are zeroed in place,
  never set to None, so they keep their addresses between eager and graph steps.
  A stack whose members leave makes new, smaller tensors: the graphs are then
  dropped and captured again on them, after one eager step.
- no host syncs in the step: the update (core/optim.py) takes its LR as a device
  tensor, copied from the schedule's table before every replay, and on a GPU
  freezes a diverged stack member with a ``torch.where`` on the device-side mask;
  the one-hot targets of a stack are a scatter; the probe keeps its counts on the
  device.
- warm-up on a side stream before capture: 3 eager steps, 11 under DDP, whose
  model must be constructed on that same side stream (``side_stream``), with
  NCCL's async error handling off (``distributed.allow_collective_capture``).
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


def graph_unavailable_reason(cfg: Config, ctx: DistContext) -> Optional[str]:
    """Why ``performance.cuda_graph`` cannot be honoured on this rank, or None when it can."""
    if ctx.device.type != "cuda":
        return f"the device is {ctx.device.type}, and CUDA graphs need a CUDA device"
    if cfg.train.grad_engine != "autograd":
        return (f"train.grad_engine is {cfg.train.grad_engine!r}: its hand-written backward and "
                "all-reduce run outside autograd and DDP; the graph step captures the autograd engine")
    if cfg.accumulation_steps(ctx.world_size) > 1:
        # Capturing it would mean capturing DDP's no_sync passes and the probe's per-pass reads, untested on a GPU.
        return (f"optim.micro_batch_size {cfg.optim.micro_batch_size} accumulates "
                f"{cfg.accumulation_steps(ctx.world_size)} passes per step; the graph step captures one pass")
    return None


def side_stream(cfg: Config, ctx: DistContext) -> Optional[torch.cuda.Stream]:
    """The stream for DDP's construction, the warm-up and the capture (None: no graph here)."""
    if not cfg.performance.cuda_graph or graph_unavailable_reason(cfg, ctx):
        return None
    return new_side_stream(ctx.device)


def new_side_stream(device: torch.device) -> torch.cuda.Stream:
    """A stream on ``device`` that starts after the work already queued on its current stream."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    return stream


class GraphStep:
    """Full-size steps of a step, replayed from CUDA graphs; the others run that step eagerly.

    Wraps any step that offers what capture needs, and is called as that step is
    (``step(indices, global batch size, global step) -> summed loss``): a run alone's
    ``EagerStep`` (core/step.py) or a stack's ``StackedTrainer`` (core/stacked.py),
    which both offer ``step_body(indices, global batch size, lr, measure)`` (the very
    function the eager step runs, so the two cannot drift apart), ``should_measure``,
    ``can_measure``, their ``schedule`` and ``optimizer``, ``graph_warmup_steps`` and
    ``capture_layout()`` (tensors whose replacement, as when members leave a stack,
    means the graphs must be captured again, after one more eager step).
    """

    def __init__(self, step, stream: Optional[torch.cuda.Stream]):
        self.step = step
        # The graphs hold the gradient buffers' addresses: eager steps must zero them in place.
        step.keeps_gradient_buffers = True
        self.stream = stream
        self.global_batch_size = step.global_batch_size
        self.warmup_steps_left = step.graph_warmup_steps
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # measures noise? -> graph
        self.static_losses: dict[bool, torch.Tensor] = {}
        self.static_indices: Optional[torch.Tensor] = None
        self.static_lr: Optional[torch.Tensor] = None
        self._layout: Optional[torch.Tensor] = None  # what the graphs were captured on

    def __call__(self, indices: torch.Tensor, global_batch_size: int, global_step: int) -> torch.Tensor:
        """One step on the samples ``indices``; returns the summed loss (no host sync).

        A full batch after the warm-up is replayed; the warm-up steps and the
        smaller last batch of an epoch (another shape) run the eager step.
        """
        step = self.step
        if step.capture_layout() is not self._layout:
            self._new_layout()
        full_batch = global_batch_size == self.global_batch_size
        if not full_batch or self.warmup_steps_left:
            if full_batch:
                self.warmup_steps_left -= 1
            # Eager steps run on the side stream too: DDP, built there, keeps the
            # parameters' gradient accumulators, which stay bound to that stream;
            # a backward from another stream makes autograd synchronise the two.
            with self.on_training_stream():
                return step(indices, global_batch_size, global_step)
        measure = step.should_measure(global_batch_size, global_step)
        lr = step.schedule.lr(global_step)  # a view of the schedule's table
        if self.static_indices is None:
            self.static_indices = torch.empty_like(indices)
            # In the parameters' dtype: the copy into it casts as the eager update does, so the
            # replayed step has no cast kernel of its own.
            self.static_lr = torch.empty(lr.shape, dtype=step.optimizer.dtype, device=lr.device)
        self.static_lr.copy_(lr)  # every replay: a decaying schedule reaches the captured update
        self.static_indices.copy_(indices)
        return self.replay(measure)

    def on_training_stream(self):
        """A block of eager autograd work on the parameters, run on the stream DDP was built on."""
        return on_side_stream(self.stream)

    def replay(self, measure: bool) -> torch.Tensor:
        """Replay the graph of this kind of step, capturing the graphs first if there are none."""
        if not self.graphs:
            self._capture_all()
        self.graphs[measure].replay()
        return self.static_losses[measure]

    def body(self, measure: bool) -> torch.Tensor:
        """The step as it is captured, on the static buffers."""
        return self.step.step_body(self.static_indices, self.global_batch_size, self.static_lr, measure)

    def _new_layout(self) -> None:
        """The step's tensors are new (first call, or members left a stack): drop the graphs and buffers."""
        if self._layout is not None:
            # One eager step before capturing on the new shapes, as before the first capture.
            self.warmup_steps_left = max(self.warmup_steps_left, 1)
        self._layout = self.step.capture_layout()
        self.graphs.clear()
        self.static_losses.clear()
        self.static_indices = self.static_lr = None

    def _capture_all(self) -> None:
        """Capture the plain step and, if the probe can measure this batch, the measuring step.

        Both right after the warm-up, one after the other: under DDP they are then
        its 12th and 13th iterations on every rank, clear of the iterations where
        DDP times itself with CUDA events (its first ten, then every hundredth of
        the eager ones), which a capture could not sync on. Capturing runs no
        kernels, so the step's batch is trained by the replay that follows.
        """
        kinds = [False, True] if self.step.can_measure(self.global_batch_size) else [False]
        for measure in kinds:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self.static_losses[measure] = self.body(measure)
            self.graphs[measure] = graph


@contextlib.contextmanager
def on_side_stream(stream: Optional[torch.cuda.Stream]):
    """Run the block on ``stream``, ordered after and before the current stream's work (None: as is)."""
    if stream is None:
        yield
        return
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        yield
    current.wait_stream(stream)

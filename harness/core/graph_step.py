"""The training step as CUDA graphs: captured once, replayed on static buffers.

For the note's small DNN a step is a few dozen tiny kernels, and launching them
one by one from Python costs more than running them. With
``performance.cuda_graph`` the whole step (zero-grad, gather of the batch,
forward, loss, backward with DDP's all-reduce, the noise probe, the update)
is captured once per kind of step and replayed; feeding a batch is one copy of
its indices into a static buffer.

Owns: when the step can be captured (``graph_unavailable_reason``), the eager
warm-up before capture, the two graphs (a plain step and a step that feeds the
noise probe), and the static LR buffer the captured update reads. It does not
own the step's math: ``GraphStep`` wraps the eager step (core/step.py), calls it
for the steps it does not replay, and captures its ``gradients`` and ``update``,
so eager and graph steps cannot drift apart. It has the eager
step's signature, so the training loop calls either the same way.

What capture needs, and how it is met here (PyTorch's CUDA notes, "CUDA Graphs"
and "Usage with DistributedDataParallel"):
- static shapes and addresses: one graph per batch shape (the full batch); the
  last, smaller batch of an epoch runs eagerly. Gradients are zeroed in place,
  never set to None, so they keep their addresses between eager and graph steps.
- no host syncs in the step: the update (core/optim.py) takes its LR as a device
  tensor, copied from the schedule's table before every replay; the probe keeps
  its counts on the device.
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
from harness.core.step import EagerStep

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
    """Full-size steps of an ``EagerStep``, replayed from CUDA graphs; the others run that eager step.

    ``capture=False`` runs the very body that would be captured, on the same
    static buffers, without capturing it: that is how the body is checked
    against the eager step on a machine without CUDA (tests/test_graph_step.py).
    """

    def __init__(self, eager: EagerStep, stream: Optional[torch.cuda.Stream], capture: bool = True):
        cfg, ctx = eager.cfg, eager.ctx
        self.eager = eager
        # The graphs hold the gradient buffers' addresses: eager steps must zero them in place.
        eager.keeps_gradient_buffers = True
        self.stream = stream
        self.capture = capture
        self.global_batch_size = cfg.optim.global_batch_size
        self.static_indices = torch.zeros(self.global_batch_size // ctx.world_size, dtype=torch.long,
                                          device=ctx.device)
        # In the parameters' dtype: the copy into it casts as the eager update does.
        self.lr = torch.zeros(1, dtype=eager.optimizer.dtype, device=ctx.device)
        under_ddp = isinstance(eager.model, torch.nn.parallel.DistributedDataParallel)
        self.warmup_steps_left = WARMUP_STEPS_DDP if under_ddp else WARMUP_STEPS
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # measures noise? -> graph
        self.static_losses: dict[bool, torch.Tensor] = {}

    def __call__(self, indices: torch.Tensor, global_batch_size: int, global_step: int) -> torch.Tensor:
        """One step on the samples ``indices``; returns the summed loss (no host sync).

        A full batch after the warm-up is replayed; the warm-up steps and the
        smaller last batch of an epoch (another shape) run the eager step.
        """
        eager = self.eager
        full_batch = global_batch_size == self.global_batch_size
        if not full_batch or self.warmup_steps_left:
            if full_batch:
                self.warmup_steps_left -= 1
            # Eager steps run on the side stream too: DDP, built there, keeps the
            # parameters' gradient accumulators, which stay bound to that stream;
            # a backward from another stream makes autograd synchronise the two.
            with self.on_training_stream():
                return eager(indices, global_batch_size, global_step)
        measure = eager.should_measure(global_batch_size, global_step)
        self.lr.copy_(eager.schedule.lr(global_step))  # one kernel: a view of the schedule's table
        self.static_indices.copy_(indices)
        if not self.capture:
            return self._body(measure)
        if not self.graphs:
            self._capture_all()
        self.graphs[measure].replay()
        return self.static_losses[measure]

    def on_training_stream(self):
        """A block of eager autograd work on the parameters, run on the stream DDP was built on."""
        return on_side_stream(self.stream)

    def _body(self, measure: bool) -> torch.Tensor:
        """The step as it is captured: gather, gradients (zeroed in place), probe, update."""
        eager = self.eager
        x = eager.train_set.features.index_select(0, self.static_indices)
        y = eager.train_set.targets.index_select(0, self.static_indices)
        normalizer = eager.normalizer(self.global_batch_size)
        loss = eager.gradients(x, y, normalizer, measure)
        eager.update(self.lr)
        return loss * normalizer

    def _capture_all(self) -> None:
        """Capture the plain step and, if the probe can measure this batch, the measuring step.

        Both right after the warm-up, one after the other: under DDP they are then
        its 12th and 13th iterations on every rank, clear of the iterations where
        DDP times itself with CUDA events (its first ten, then every hundredth of
        the eager ones), which a capture could not sync on. Capturing runs no
        kernels, so the step's batch is trained by the replay that follows.
        """
        kinds = [False, True] if self.eager.can_measure(self.global_batch_size) else [False]
        for measure in kinds:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self.static_losses[measure] = self._body(measure)
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

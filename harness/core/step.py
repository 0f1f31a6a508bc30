"""The eager training step: ``EagerStep(indices, global_batch_size, global_step) -> summed loss``.

Owns what one training step does on this rank: the two gradient engines
(autograd, through DDP when there are several ranks; the hand-written
``backprop.manual_backward``, which averages over ranks itself), gradient
accumulation (``optim.micro_batch_size``: passes summed into one gradient, DDP's
all-reduce only in the last), the zero-grad policy (gradients are zeroed in place
once a graph step holds their addresses) and the update after the gradients, on
the parameters viewed as one member's [1, n] blocks. The update and the LR
schedule themselves are core/optim.py's, shared with the stacked step.

It leaves to others: how the noise scale is measured (the probe in
core/noise_probe.py gets this step's backward and all-reduce, and hands back
the measured step's gradients), the CUDA-graph step (core/graph_step.py, which
wraps this one and reuses ``gradients``), and which samples a step trains on
(the batch plan, data.py, through the training loop).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from harness import faults
from harness.core.backprop import autograd_backward, manual_backward
from harness.core.config import Config, steps_per_epoch
from harness.core.data import Split
from harness.core.graph_step import WARMUP_STEPS, WARMUP_STEPS_DDP
from harness.core.distributed import DistContext, average_gradients
from harness.core.optim import Optimizer, Schedule
from harness.core.precision import forward_context
from harness.core.noise_probe import NoiseProbe


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, under its DDP wrapper if it has one (a checkpoint then loads without DDP)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class EagerStep:
    """One eager step on the training samples ``indices``; returns this rank's summed cross-entropy.

    No host sync: the loss stays a device tensor.
    """

    def __init__(self, cfg: Config, ctx: DistContext, model: torch.nn.Module, optimizer: Optimizer,
                 train_set: Split, schedule: Schedule, noise_probe: Optional[NoiseProbe] = None):
        self.cfg, self.ctx = cfg, ctx
        self.model = model
        self.optimizer = optimizer
        self.train_set = train_set
        self.schedule = schedule
        self.noise_probe = noise_probe
        # A graph step that wraps this one sets it: its captured graphs hold the
        # gradient buffers' addresses, so they must be zeroed in place, never freed.
        self.keeps_gradient_buffers = False
        unwrapped = unwrap(model)
        # The unwrapped model's parameters, listed once (not on every step).
        self.params: list[torch.nn.Parameter] = list(unwrapped.parameters())
        # Each parameter as the optimizer's [K, n] block of a run alone: K = 1 (views, updated in place).
        self.parameter_blocks = [p.view(1, -1) for p in self.params]
        # performance.precision: the forward's autocast (a null context in fp32), core/precision.py.
        self.forward_context = forward_context(cfg.performance.precision, ctx.device.type)
        if cfg.train.grad_engine == "manual":
            self._backward = functools.partial(manual_backward, unwrapped)
            # The hand-written engine computes gradients outside autograd, where
            # DDP's hooks never fire: it averages them over ranks itself.
            self.all_reduce: Optional[Callable[[], None]] = functools.partial(average_gradients, unwrapped, ctx)
        else:
            self._backward = self._autograd_backward
            self.all_reduce = None  # DDP all-reduces inside the backward
        # Gradient accumulation (optim.micro_batch_size): None when a rank's share is one pass anyway.
        self.micro_batch_size: Optional[int] = (cfg.optim.micro_batch_size
                                                if cfg.accumulation_steps(ctx.world_size) > 1 else None)
        # The epoch of the step now running, at the middle step of an epoch only: where the
        # "micro_batch" fault point (harness/faults.py) may kill this rank mid-accumulation.
        self.fault_epoch: Optional[int] = None
        self._under_ddp = isinstance(model, DistributedDataParallel)
        # What a graph step (core/graph_step.py) wrapping this one needs: the full batch it replays, and how
        # many eager steps warm up first (PyTorch's notes ask for 11 DDP iterations before capture).
        self.global_batch_size = cfg.optim.global_batch_size
        self.graph_warmup_steps = WARMUP_STEPS_DDP if self._under_ddp else WARMUP_STEPS
        self._steps_per_epoch = steps_per_epoch(len(train_set), cfg.optim.global_batch_size, cfg.train.drop_last)

    def __call__(self, indices: torch.Tensor, global_batch_size: int, global_step: int) -> torch.Tensor:
        x, y = self.train_set.batch(indices)
        normalizer = self.normalizer(global_batch_size)
        if self.micro_batch_size is not None:
            epoch, step = divmod(global_step, self._steps_per_epoch)
            self.fault_epoch = epoch + 1 if step == self._steps_per_epoch // 2 else None
        loss = self.gradients(x, y, normalizer, self.should_measure(global_batch_size, global_step))
        self.update(self.schedule.lr(global_step))
        return loss * normalizer

    def step_body(self, indices: torch.Tensor, global_batch_size: int, lr: torch.Tensor,
                  measure: bool) -> torch.Tensor:
        """The step as a graph captures it, with the LR given: gather (whole rows), gradients (zeroed in
        place), probe, update."""
        x = self.train_set.features.index_select(0, indices)
        y = self.train_set.targets.index_select(0, indices)
        normalizer = self.normalizer(global_batch_size)
        loss = self.gradients(x, y, normalizer, measure)
        self.update(lr)
        return loss * normalizer

    def capture_layout(self) -> torch.Tensor:
        """What a captured graph holds the address of: the parameters, which never change here."""
        return self.params[0]

    def update(self, lr: torch.Tensor) -> None:
        """The optimizer's step from p.grad with ``lr`` [1]; p.grad is its scratch (it holds the decayed
        gradient afterwards). Shared with the graph step, which captures it."""
        self.optimizer.step(self.parameter_blocks, [p.grad.reshape(1, -1) for p in self.params], lr)

    def normalizer(self, global_batch_size: int) -> float:
        """What this rank divides its summed loss by: B/W.

        With equal shards this is the local mean, and DDP's average over W ranks
        is then the mean over the global batch of B. It stays exact for a
        smaller, unevenly split last batch.
        """
        return global_batch_size / self.ctx.world_size

    def can_measure(self, global_batch_size: int) -> bool:
        """Can a step of this batch size feed the noise probe at all?"""
        return bool(self.noise_probe and self.noise_probe.can_measure(global_batch_size))

    def should_measure(self, global_batch_size: int, global_step: int) -> bool:
        """Does this step feed the noise probe (every noise_scale_interval-th full batch)?"""
        return self.can_measure(global_batch_size) and global_step % self.cfg.metrics.noise_scale_interval == 0

    def gradients(self, x: torch.Tensor, y: torch.Tensor, normalizer: float, measure: bool) -> torch.Tensor:
        """Every rank's p.grad := the global batch's mean gradient; returns this rank's sum(CE)/normalizer.

        With ``measure`` the noise probe runs the backward its own way and
        records the step. Shared with the graph step, which captures it.
        """
        if self.micro_batch_size is not None:
            return self._accumulated_gradients(x, y, normalizer, measure)
        if measure:
            return self.noise_probe.measured_gradients(self._backward, x, y, normalizer, self.params,
                                                       self.all_reduce)
        loss = self._backward(x, y, normalizer)
        if self.all_reduce:
            self.all_reduce()
        return loss

    def _accumulated_gradients(self, x: torch.Tensor, y: torch.Tensor, normalizer: float,
                               measure: bool) -> torch.Tensor:
        """``gradients`` as passes of at most micro_batch_size samples, summed into p.grad.

        Every pass divides its summed loss by the same ``normalizer`` (B/W), so the
        passes add up to the one-pass gradient, the smaller last batch of an epoch
        included (its last pass is smaller). Under DDP only the last pass
        all-reduces: the others run under ``no_sync`` and DDP then reduces the sum.
        The hand-written engine averages once, after the last pass. A measured
        step hands each pass's gradient to the probe (its small batch).
        """
        probe = self.noise_probe if measure else None
        # An empty share (a last batch smaller than the world size) is still one pass: DDP's all-reduce.
        passes = list(zip(x.split(self.micro_batch_size), y.split(self.micro_batch_size))) or [(x, y)]
        loss = torch.zeros((), dtype=x.dtype, device=x.device)
        for i, (xs, ys) in enumerate(passes):
            is_last = i == len(passes) - 1
            if i == 1 and self.fault_epoch is not None:
                faults.maybe_kill("micro_batch", self.fault_epoch, self.ctx.rank)
            if probe:
                probe.before_micro_batch(self.params, i, reduces_in_backward=is_last and self._under_ddp)
            with contextlib.nullcontext() if is_last else self._no_sync():
                loss = loss + self._backward(xs, ys, normalizer, accumulate=i > 0)
            if probe:
                probe.after_micro_batch(self.params, len(ys), normalizer)
        if self.all_reduce:
            self.all_reduce()
        if probe:
            probe.record_micro_batches(self.params)
        return loss

    def _no_sync(self):
        """DDP's no_sync (gradients stay local, summed into p.grad); nothing to skip without DDP."""
        return self.model.no_sync() if self._under_ddp else contextlib.nullcontext()

    def on_training_stream(self):
        """Where eager autograd on the parameters runs: here, the current stream."""
        return contextlib.nullcontext()

    def _autograd_backward(self, x: torch.Tensor, y: torch.Tensor, normalizer: float,
                           accumulate: bool = False) -> torch.Tensor:
        return autograd_backward(self.model, x, y, normalizer, set_to_none=not self.keeps_gradient_buffers,
                                 accumulate=accumulate, forward_context=self.forward_context)

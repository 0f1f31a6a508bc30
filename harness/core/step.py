"""The eager training step: ``EagerStep(indices, global_batch_size, global_step) -> summed loss``.

Owns what one SGD step does on this rank: the learning rate at a step (linear
warm-up, ``LRSchedule``), the two gradient engines (autograd, through DDP when
there are several ranks; the hand-written ``backprop.manual_backward``, which
averages over ranks itself), the zero-grad policy (gradients are zeroed in place
once a graph step holds their addresses) and the optimizer's update.

It leaves to others: how the noise scale is measured (the probe in
measure/grad_noise.py gets this step's backward and all-reduce, and hands back
the measured step's gradients), the CUDA-graph step (core/graph_step.py, which
wraps this one and reuses ``gradients``), and which samples a step trains on
(the batch plan, data.py, through the training loop).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from harness.core.backprop import autograd_backward, manual_backward
from harness.core.config import Config
from harness.core.data import Split
from harness.core.distributed import DistContext, average_gradients
from harness.core.precision import forward_context
from harness.measure.grad_noise import NoiseProbe


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, under its DDP wrapper if it has one (a checkpoint then loads without DDP)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup to ``lr`` over ``warmup_steps`` (Goyal et al. 2017), then constant."""

    lr: float
    warmup_steps: int

    def lr_at(self, global_step: int) -> float:
        if global_step >= self.warmup_steps:
            return self.lr
        return self.lr * (global_step + 1) / self.warmup_steps


class EagerStep:
    """One eager SGD step on the training samples ``indices``; returns this rank's summed cross-entropy.

    No host sync: the loss stays a device tensor.
    """

    def __init__(self, cfg: Config, ctx: DistContext, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 train_set: Split, schedule: LRSchedule, noise_probe: Optional[NoiseProbe] = None):
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

    def __call__(self, indices: torch.Tensor, global_batch_size: int, global_step: int) -> torch.Tensor:
        x, y = self.train_set.features[indices], self.train_set.targets[indices]
        normalizer = self.normalizer(global_batch_size)
        loss = self.gradients(x, y, normalizer, self.should_measure(global_batch_size, global_step))
        # Set on every step, not only during warmup: graph steps in between read
        # the LR from their own tensor and leave the group's value behind.
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.lr_at(global_step)
        self.optimizer.step()
        return loss * normalizer

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
        if measure:
            return self.noise_probe.measured_gradients(self._backward, x, y, normalizer, self.params,
                                                       self.all_reduce)
        loss = self._backward(x, y, normalizer)
        if self.all_reduce:
            self.all_reduce()
        return loss

    def on_training_stream(self):
        """Where eager autograd on the parameters runs: here, the current stream."""
        return contextlib.nullcontext()

    def _autograd_backward(self, x: torch.Tensor, y: torch.Tensor, normalizer: float) -> torch.Tensor:
        return autograd_backward(self.model, x, y, normalizer, set_to_none=not self.keeps_gradient_buffers,
                                 forward_context=self.forward_context)

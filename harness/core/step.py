"""The eager training step: ``EagerStep(indices, global_batch_size, global_step) -> summed loss``.

Owns one training step on this rank: the two gradient engines (autograd, through DDP on several
ranks; the hand-written ``backprop.manual_backward``, which averages over ranks itself), gradient
accumulation (``optim.micro_batch_size``: DDP's all-reduce only in the last pass), zeroing the
gradients in place once a graph step holds their addresses, and core/optim.py's update on the
parameters viewed as [1, n] blocks. The probe (core/noise_probe.py) runs a measured step's
backward; core/graph_step.py wraps this step and captures its ``step_body``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from harness import faults
from harness.core.backprop import autograd_backward, manual_backward
from harness.core.batch_schedule import lr_factor
from harness.core.config import Config, steps_per_epoch
from harness.core.data import Split
from harness.core.graph_step import WARMUP_STEPS, WARMUP_STEPS_DDP, CapturableStep
from harness.core.distributed import DistContext, average_gradients
from harness.core.optim import Optimizer, Schedule
from harness.core.precision import forward_context
from harness.core.noise_probe import NoiseProbe


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, under its DDP wrapper if it has one (a checkpoint then loads without DDP)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class EagerStep(CapturableStep):
    """One eager step on the training samples ``indices``; returns this rank's summed cross-entropy
    (a device tensor: no host sync)."""

    def __init__(self, cfg: Config, ctx: DistContext, model: torch.nn.Module, optimizer: Optimizer,
                 train_set: Split, schedule: Schedule, noise_probe: Optional[NoiseProbe] = None):
        self.ctx, self.model, self.optimizer, self.train_set, self.schedule = ctx, model, optimizer, train_set, schedule
        self.probe, self.measure_interval = noise_probe, cfg.metrics.noise_scale_interval
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
        self.batch_lr_rule = cfg.optim.batch_lr_rule if cfg.optim.batch_grows else None
        self.graph_warmup_steps = WARMUP_STEPS_DDP if self._under_ddp else WARMUP_STEPS
        self._steps_per_epoch = steps_per_epoch(len(train_set), cfg.optim.global_batch_size, cfg.train.drop_last)

    def __call__(self, indices: torch.Tensor, global_batch_size: int, global_step: int) -> torch.Tensor:
        if self.micro_batch_size is not None:
            epoch, step = divmod(global_step, self._steps_per_epoch)
            self.fault_epoch = epoch + 1 if step == self._steps_per_epoch // 2 else None
        lr = self.schedule.lr(global_step)
        if self.batch_lr_rule is not None:  # a batch that changes: the LR follows this step's batch
            lr = lr * lr_factor(self.batch_lr_rule, global_batch_size, self.global_batch_size)
        return self.step_body(indices, global_batch_size, lr, self.should_measure(global_batch_size, global_step))

    def step_body(self, indices: torch.Tensor, global_batch_size: int, lr: torch.Tensor,
                  measure: bool) -> torch.Tensor:
        """The step with the LR given, as a graph captures it: gather, gradients, probe, update (p.grad is
        the update's scratch)."""
        x, y = self.train_set.batch(indices)
        # B/W: with equal shards the local mean, which DDP's average makes the global batch's mean;
        # exact for a smaller, unevenly split last batch too.
        normalizer = global_batch_size / self.ctx.world_size
        loss = self.gradients(x, y, normalizer, measure)
        self.optimizer.step(self.parameter_blocks, [p.grad.reshape(1, -1) for p in self.params], lr)
        return loss * normalizer

    def capture_layout(self) -> torch.Tensor:
        """What a captured graph holds the address of: the parameters, which never change here."""
        return self.params[0]

    def gradients(self, x: torch.Tensor, y: torch.Tensor, normalizer: float, measure: bool) -> torch.Tensor:
        """Every rank's p.grad := the global batch's mean gradient; returns this rank's sum(CE)/normalizer.
        With ``measure`` the noise probe runs the backward its own way and records the step."""
        if self.micro_batch_size is not None:
            return self._accumulated_gradients(x, y, normalizer, measure)
        if measure:
            return self.probe.measured_gradients(self._backward, x, y, normalizer, self.params, self.all_reduce)
        loss = self._backward(x, y, normalizer)
        if self.all_reduce:
            self.all_reduce()
        return loss

    def _accumulated_gradients(self, x: torch.Tensor, y: torch.Tensor, normalizer: float,
                               measure: bool) -> torch.Tensor:
        """``gradients`` as passes of at most micro_batch_size samples, summed into p.grad: each divides its
        loss by the same ``normalizer``, so they add up to the one-pass gradient. Under DDP only the last
        pass all-reduces (the others under ``no_sync``); a measured step hands each pass to the probe."""
        probe = self.probe if measure else None
        # An empty share (a last batch smaller than the world size) is still one pass: DDP's all-reduce.
        passes = list(zip(x.split(self.micro_batch_size), y.split(self.micro_batch_size))) or [(x, y)]
        loss = torch.zeros((), dtype=x.dtype, device=x.device)
        for i, (xs, ys) in enumerate(passes):
            is_last = i == len(passes) - 1
            if i == 1 and self.fault_epoch is not None:
                faults.maybe_kill("micro_batch", self.fault_epoch, self.ctx.rank)
            if probe:
                probe.before_micro_batch(self.params, i, reduces_in_backward=is_last and self._under_ddp)
            # DDP's no_sync keeps the other passes' gradients local, summed into p.grad.
            with self.model.no_sync() if self._under_ddp and not is_last else contextlib.nullcontext():
                loss = loss + self._backward(xs, ys, normalizer, accumulate=i > 0)
            if probe:
                probe.after_micro_batch(self.params, len(ys), normalizer)
        if self.all_reduce:
            self.all_reduce()
        if probe:
            probe.record_micro_batches(self.params)
        return loss

    def _autograd_backward(self, x: torch.Tensor, y: torch.Tensor, normalizer: float,
                           accumulate: bool = False) -> torch.Tensor:
        return autograd_backward(self.model, x, y, normalizer, set_to_none=not self.keeps_gradient_buffers,
                                 accumulate=accumulate, forward_context=self.forward_context)

"""K trials of one architecture trained as one stacked model: the stacked step.

Owns the stacked MLP (every member's parameters on a leading K axis), its forward as batched
matrix products and hand-written backward (any other model: core/stacked_module.py), the per-member loss, the step (core/optim.py's update
and schedule for all members at once, SGD's momentum folded into the weight-gradient product),
each member's data order and rank share, the one all-reduce of the gradients, the stacked noise
probe, freezing diverged members, and dropping members whose runs ended (``StackedTrainer.keep``).

Each member is the trial it stands for, run alone: the same initial weights, its own batch plan,
the eager step's loss and core/optim.py's update, so its parameters after n steps equal the solo
run's up to float rounding (tests/unit/test_stacked.py). Each member's run is
core/stacked_run.py's; grouping trials into stacks is sweeps/sweep.py's.
"""

from __future__ import annotations

import copy
import functools
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from harness.core.config import Config, check_stackable_trial
from harness.core.data import BatchPlan, Split
from harness.core.distributed import DistContext, all_reduce_sum
from harness.core.backprop import activation_backward
from harness.core.graph_step import WARMUP_STEPS, CapturableStep
from harness.core.model import ACTIVATION_MODULES, build_model, is_mlp
from harness.core.stacked_module import StackedModule, StackedParameters, unstackable_reason
from harness.core.optim import Optimizer, Schedule
from harness.errors import InputError
from harness.core.noise_probe import MemberProbes, halves_squared_norm

# Keys every member of a stack must agree on: they fix the tensors' shapes (architecture,
# batch size, the training split's size) or what one step computes for all members at once.
SHARED_KEYS = ("model.hidden_sizes", "model.activation", "model.factory", "model.kwargs", "data.dataset",
               "data.factory", "data.kwargs", "data.validation_size",
               "data.train_subset", "data.synthetic", "optim.name", "optim.global_batch_size",
               "optim.micro_batch_size", "train.drop_last", "performance.precision", "train.epochs", "train.max_steps",
               "metrics.noise_scale", "metrics.noise_scale_ema_decay", "metrics.noise_scale_interval",
               "train.race_stop", "train.target_train_loss", "metrics.target_val_accuracy", "metrics.eval_samples",
               "metrics.eval_every_steps", "metrics.eval_cost", "metrics.exact_noise_samples",
               # The evaluations and what is read at a target: core/crossing.py trains the members again from
               # shared evaluation points.
               "metrics.noise_window_steps", "metrics.hessian_noise_samples", "metrics.hessian_noise_deviations")
# On a CPU one pass of the stacked step computes at most about this many samples (members x batch):
# beyond it the stack's activations outgrow the caches and the step runs slower than the same
# members one after another (docs/steps.md measures it).
CPU_PASS_SAMPLES = 4096
# Devices whose stacks lay their parameters out parameter by parameter (core/stacked_module.py MemberLayout);
# elsewhere member by member.
PARAMETER_MAJOR_DEVICES = ("cpu",)


def finite(x: torch.Tensor) -> torch.Tensor:
    """``torch.isfinite(x)`` in two kernels where it takes four: x - x is exactly 0 for finite x, NaN otherwise
    (a stack on a GPU pays per kernel: docs/performance.md)."""
    return (x - x) == 0


def dotted(cfg: Config, key: str):
    """The value at dotted ``key`` ("optim.lr") of ``cfg``."""
    return functools.reduce(getattr, key.split("."), cfg)


def check_stackable(members: list[Config]) -> None:
    """Refuse a stack its members cannot share (one line naming the key), before anything is built."""
    if len(members) < 1:
        raise InputError("stack: 0 members; expected at least 1 trial to stack")
    for key in SHARED_KEYS:
        values = {repr(dotted(m, key)) for m in members}
        if len(values) > 1:
            raise InputError(f"{key}: the stacked trials differ ({', '.join(sorted(values))}); expected one value "
                             "for every trial of a stack")
    check_stackable_trial(members[0], "with a stack")
    reason = stack_refusal(members[0])
    if len(members) > 1 and reason:
        raise InputError(f"model.factory: {members[0].model.factory} cannot be stacked: {reason}; expected trials "
                         "one at a time")


def stack_refusal(cfg: Config) -> Optional[str]:
    """Why the model of ``cfg`` cannot be a stack's member; None where it can (the note's MLP always can)."""
    return None if is_mlp(cfg) else unstackable_reason(build_model(cfg))


class StackedMLP(StackedParameters):
    """K MLPs of one architecture: ``weights[l]`` is [K, d_l, d_{l-1}], ``biases[l]`` is [K, d_l].

    Forward of x [K, b, d_0] is one ``torch.baddbmm`` per layer: members never mix (a NaN in one
    stays there). The backward is core/backprop.py's delta recursion with a member axis in front,
    by hand: autograd's weight gradient comes out transposed and its copy into place costs more
    than the bmm (docs/steps.md). Every gradient goes into buffers allocated once.
    """

    def __init__(self, members: list[Config], device: torch.device | str = "cpu"):
        self.activation_name = members[0].model.activation
        self.activation = ACTIVATION_MODULES[self.activation_name]()
        # Each member's own seed: the solo run's initial weights.
        super().__init__([build_model(cfg) for cfg in members], torch.device(device).type not in PARAMETER_MAJOR_DEVICES,
                         device)
        # The -1 scattered into the softmax for each sample's target (loss_and_gradients): one number made
        # once, expanded to the batch, so no step fills a tensor with it.
        self._minus_one = torch.full((1, 1, 1), -1.0, dtype=self.flat_parameters.dtype, device=device)

    def _make_views(self) -> None:
        super()._make_views()
        self.weights, self.biases = self.stacked_parameters[0::2], self.stacked_parameters[1::2]
        self.weight_grads, self.bias_grads = self.stacked_gradients[0::2], self.stacked_gradients[1::2]

    def members_per_pass(self, batch: int) -> int:
        """How many members one pass of the step computes at once: all of them, except on a CPU where
        the stack's activations would outgrow its caches (``CPU_PASS_SAMPLES``)."""
        if self.weights[0].device.type != "cpu":
            return self.num_members
        return max(1, min(self.num_members, CPU_PASS_SAMPLES // max(batch, 1)))

    def _forward(self, x: torch.Tensor, rows: slice = slice(None)) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Activations a[0..L-1] and pre-activations z[1..L] (the last are the logits) of members ``rows``."""
        activations, pre_activations = [x], []
        for depth, (w, b) in enumerate(zip(self.weights, self.biases)):
            z = torch.baddbmm(b[rows].unsqueeze(1), activations[-1], w[rows].transpose(1, 2))
            pre_activations.append(z)
            if depth < len(self.weights) - 1:
                activations.append(self.activation(z))
        return activations, pre_activations

    @torch.no_grad()
    def loss_and_gradients(self, x: torch.Tensor, y: torch.Tensor, normalizer: float,
                           rows: slice = slice(None),
                           fold: Optional[tuple[list[torch.Tensor], float]] = None) -> tuple[torch.Tensor, bool]:
        """Per member (of ``rows``, whose samples x and y are): C_k = sum_i CE(z[L]_ki, y_ki) / normalizer,
        returned as [K]; its gradients written into its rows of ``flat_gradients``. delta[L] = (softmax(z[L])
        - onehot(y)) / normalizer, dC/dW[l] = delta[l]^T @ a[l-1], dC/db[l] = sum over the batch of delta[l].

        ``fold`` = (the weights' momentum buffers, momentum): if every loss is finite, each weight gradient
        goes straight into buf = momentum * buf + delta^T @ a (one ``baddbmm_``; the update then skips that
        step). Returns the loss and whether the weight gradients were so folded."""
        activations, pre_activations = self._forward(x, rows)
        logits = pre_activations[-1]
        members, batch, classes = logits.shape
        loss = F.cross_entropy(logits.reshape(members * batch, classes), y.reshape(-1),
                               reduction="none").view(members, batch).sum(1) / normalizer
        folded = fold is not None and bool(finite(loss).all())
        # softmax - onehot(y) as one scatter of -1 into the softmax: s + (-1) is s - 1 to the bit, and the other
        # classes keep s, which is s - 0. Two kernels fewer than building the one-hot and subtracting it, and
        # no F.one_hot, whose checks of y read it back on some devices: a captured step
        # (core/graph_step.py) must not read anything back.
        delta = torch.softmax(logits, dim=2).scatter_add_(
            2, y.unsqueeze(2), self._minus_one.expand(members, batch, 1)).div_(normalizer)
        for depth in range(len(self.weights) - 1, -1, -1):
            if folded:
                fold[0][depth][rows].baddbmm_(delta.transpose(1, 2), activations[depth], beta=fold[1])
            else:
                torch.bmm(delta.transpose(1, 2), activations[depth], out=self.weight_grads[depth][rows])
            torch.sum(delta, dim=1, out=self.bias_grads[depth][rows])
            if depth > 0:
                # sigma'(z) * (delta @ W) in one kernel, as autograd computes it for a run alone.
                delta = activation_backward(self.activation_name, torch.bmm(delta, self.weights[depth][rows]),
                                            pre_activations[depth - 1], activations[depth])
        return loss, folded


class StackedData:
    """The members' training samples, gathered per member into [K, b, features] batches. Equal training
    splits share one copy; otherwise (splits depend on the seed) they are concatenated and member k's
    indices offset by k * N, so a batch is still one gather."""

    def __init__(self, splits: list[Split], device):
        sizes = {len(s) for s in splits}
        if len(sizes) > 1:
            raise InputError(f"data: the stacked trials' training splits hold {sorted(sizes)} samples; expected one "
                             "size for every trial of a stack")
        self.num_samples = sizes.pop()
        first = splits[0]
        shared = all(torch.equal(s.features, first.features) and torch.equal(s.targets, first.targets)
                     for s in splits[1:])
        members = [first] if shared else splits
        self.samples = Split(first.features, first.targets.to(device)) if shared else Split(
            torch.cat([s.features for s in members]),  # where the splits keep them
            torch.cat([s.targets for s in members]).to(device))
        offsets = [0] * len(splits) if shared else [k * self.num_samples for k in range(len(splits))]
        self.offsets = torch.tensor(offsets, device=device).unsqueeze(1)  # [K, 1]
        self.shared = shared  # then every offset is 0, and a batch needs no addition

    def batch(self, indices: torch.Tensor, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """x [K, b, features], y [K, b] for member-local ``indices`` [K, b] of members ``rows``."""
        return self.samples.batch(indices if self.shared else indices + self.offsets[rows])


class StackedTrainer(CapturableStep):
    """K trials trained together, one stacked step per batch; each keeps its own data order and may stop alone.
    On several ranks each takes its share of every member's batch, as a run alone's, and one all-reduce
    averages all members' gradients, as the hand-written engine of a run alone does."""

    def __init__(self, members: list[Config], splits: list[Split], device: torch.device | str = "cpu",
                 ctx: Optional[DistContext] = None):
        check_stackable(members)
        self.ctx = ctx or DistContext(device=torch.device(device))
        self.device = self.ctx.device
        self.data = StackedData(splits, self.device)
        first = members[0]
        self.global_batch_size = first.optim.global_batch_size
        self.plans = [BatchPlan(num_samples=self.data.num_samples, global_batch_size=self.global_batch_size,
                                seed=m.seed, rank=self.ctx.rank, world_size=self.ctx.world_size,
                                drop_last=m.train.drop_last) for m in members]
        self.steps_per_epoch = self.plans[0].steps_per_epoch
        member_major = self.device.type not in PARAMETER_MAJOR_DEVICES
        self.model = (StackedMLP(members, self.device) if is_mlp(first)
                      else StackedModule(members, member_major, self.device))
        self.schedule = Schedule.of(members, self.steps_per_epoch, self.device)
        self.optimizer = Optimizer([m.optim for m in members], self.model.parameter_blocks)
        # Folding (``can_fold``) saves the memory-bound CPU update a write and a read of the weight gradients
        # (docs/performance.md). It needs one momentum for every member of a plain-SGD stack (a product's beta
        # is one number) and the parameter-major layout (each weight's buffer one contiguous block).
        self.fold_momentum = (self.optimizer.shared_momentum() if isinstance(self.model, StackedMLP)
                              and not self.model.layout.member_major and self.device.type == "cpu" else None)
        self.probe = (MemberProbes(self.ctx, self.global_batch_size, first.metrics.noise_scale_ema_decay,
                                   len(members)) if first.metrics.noise_scale else None)
        self.measure_interval = first.metrics.noise_scale_interval
        # Members still updating: one whose loss turns non-finite is frozen where it blew up (on the
        # device, no host sync), and the others go on; members whose runs end are dropped (``keep``).
        self.active = torch.ones(len(members), dtype=torch.bool, device=self.device)
        self.epoch_permutations: Optional[torch.Tensor] = None  # [K, N] of the epoch being trained
        # What trains one batch: ``step``, or core/graph_step.py's GraphStep wrapping it.
        self.train_step = self.step
        self.graph_warmup_steps = WARMUP_STEPS

    def local_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, int]]:
        """``(indices [K, b], global batch size)`` for every step of ``epoch``: this rank's share of every
        member's batch, the pieces ``BatchPlan.local_batches`` gives each member's run alone."""
        # An attribute, not a local: ``keep`` may drop members' rows between two steps.
        self.epoch_permutations = torch.stack([plan.permutation(epoch) for plan in self.plans]).to(self.device)
        for step in range(self.steps_per_epoch):
            global_batch = self.epoch_permutations[:, step * self.global_batch_size:(step + 1) * self.global_batch_size]
            yield torch.tensor_split(global_batch, self.ctx.world_size, dim=1)[self.ctx.rank], global_batch.shape[1]

    def keep(self, members: list[int], trainers: list = ()) -> None:
        """Go on with only ``members`` (rows, in this order), even mid-epoch, so the step costs only what they
        cost; their ``trainers`` (the loop's, core/stacked_run.py) are pointed at their new rows. The
        dropped members' rows stay as they were in the old tensors, for whoever still holds views of them."""
        rows = torch.tensor(members, device=self.device)
        self.plans = [self.plans[k] for k in members]
        self.model.keep(rows)
        self.optimizer.keep(rows)
        self.schedule = self.schedule.select(rows)
        if self.probe:
            self.probe.keep(rows)
        self.active = self.active[rows]
        self.data.offsets = self.data.offsets[rows]
        if self.epoch_permutations is not None:
            self.epoch_permutations = self.epoch_permutations[rows]
        for row, trainer in enumerate(trainers):
            point_at_row(trainer.model, self, row)
            trainer.optimizer = self.optimizer.member(row)

    def replica(self, rows: list[int], members: list[Config]) -> tuple[StackedTrainer, list[torch.nn.Module]]:
        """A stack of the members ``rows`` alone (``members``: their configs), holding copies of their state,
        stepped eagerly, and a model viewing each of its rows: where core/crossing.py trains again what these
        members trained, at their cost alone. Its probe starts empty: a probe's state never moves parameters."""
        replica = copy.copy(self)
        replica.model, replica.optimizer, replica.data = (copy.copy(part) for part in (self.model, self.optimizer,
                                                                                        self.data))
        replica.probe = (MemberProbes(self.ctx, self.global_batch_size, self.probe.decay, len(self.plans))
                         if self.probe else None)
        replica.train_step = replica.step
        replica.keep(rows)
        models = [build_model(cfg).to(self.device) for cfg in members]
        for row, model in enumerate(models):
            point_at_row(model, replica, row)
        return replica, models

    def select_state(self, state: list[torch.Tensor], rows: list[int]) -> list[torch.Tensor]:
        """Members ``rows`` of a copy of ``training_state()`` (taken before members left), laid out as the
        state of a stack of those members is."""
        index = torch.tensor(rows, device=self.device)
        layout = self.model.layout
        return [layout.select(layout.views(state[0]), index)] + [t.index_select(0, index) for t in state[1:]]

    def training_state(self) -> list[torch.Tensor]:
        """Every tensor a step changes and a later step reads (the first one new whenever members leave)."""
        return [self.model.flat_parameters, *self.optimizer.state_tensors(),
                *(self.probe.state_tensors() if self.probe else ()), self.active]

    def step(self, indices: torch.Tensor, global_batch_size: int, global_step: int) -> torch.Tensor:
        """One step of every active member on its batch ``indices`` [K, b]; returns this rank's summed CE
        per member [K], each normalized as the eager step's (by B / W)."""
        return self.step_body(indices, global_batch_size, self.schedule.lr(global_step),
                              self.should_measure(global_batch_size, global_step))

    __call__ = step

    def capture_layout(self) -> torch.Tensor:
        """What a captured graph holds the address of: the gradient buffer, new whenever members leave."""
        return self.model.flat_gradients

    def step_body(self, indices: torch.Tensor, global_batch_size: int, lr: torch.Tensor,
                  measure: bool) -> torch.Tensor:
        """``step``'s work with the LR vector given: on a GPU it queues kernels and reads nothing back,
        so core/graph_step.py captures it as it stands."""
        normalizer = global_batch_size / self.ctx.world_size
        folded = False
        if measure and self.ctx.world_size == 1:
            loss = self._gradients_in_halves(indices, normalizer)
        else:
            fold = (self.weight_momentum(), self.fold_momentum) if self.can_fold(indices.shape[1]) else None
            loss, folded = self._loss_and_gradients(indices, normalizer, fold)
            small_sq = self.model.member_squared_norms(self.model.flat_gradients) if measure else None
            if self.ctx.world_size > 1:  # every member's gradients averaged over the ranks in one all-reduce
                all_reduce_sum(self.model.flat_gradients, self.ctx).div_(self.ctx.world_size)
            if measure:
                self.probe.record(small_sq, self.model.member_squared_norms(self.model.flat_gradients), self.active)
        # A non-finite loss freezes its member from this step on (its update is skipped, not applied as NaN);
        # on several ranks every rank must agree, so the loss is checked after it is summed over them.
        self.active &= finite(all_reduce_sum(loss.clone(), self.ctx) if self.ctx.world_size > 1 else loss)
        # Parameter-major blocks (the only layout that folds) alternate weight, bias, weight, ...
        weight_blocks = range(0, len(self.model.parameter_blocks), 2) if folded else ()
        self.optimizer.step(self.model.parameter_blocks, self.model.gradient_blocks, lr, self.active, weight_blocks)
        return loss * normalizer

    def weight_momentum(self) -> list[torch.Tensor]:
        """The weights' momentum buffers as [K, d_l, d_{l-1}] (what a folded product adds into)."""
        return [buf.view_as(w) for buf, w in zip(self.optimizer.state["momentum_buffer"][0::2], self.model.weights)]

    def can_fold(self, local_batch: int) -> bool:
        """May this step's weight gradients go straight into the momentum buffers (folding)? Only
        where the gradient itself is read by nothing else: one rank (no all-reduce of it), no probe on this
        step (the caller's), every member still updating (a frozen member's buffer must keep its value),
        all members in one pass. Reads ``active`` back: only on a CPU, where ``fold_momentum`` is set."""
        return (self.fold_momentum is not None and self.ctx.world_size == 1
                and self.model.members_per_pass(local_batch) >= self.model.num_members and bool(self.active.all()))

    def _loss_and_gradients(self, indices: torch.Tensor, normalizer: float,
                            fold: Optional[tuple[list[torch.Tensor], float]] = None) -> tuple[torch.Tensor, bool]:
        """``StackedMLP.loss_and_gradients`` on the members' samples ``indices`` [K, b], gathered and
        computed ``members_per_pass`` members at a time; the loss, and whether it folded (``fold``: only
        where ``can_fold``, so in one pass)."""
        members, batch = indices.shape
        per_pass = self.model.members_per_pass(batch)
        losses = []
        for first in range(0, members, per_pass):
            rows = slice(first, first + per_pass)
            x, y = self.data.batch(indices[rows], rows)
            loss, folded = self.model.loss_and_gradients(x, y, normalizer, rows, fold)
            losses.append(loss)
        return (losses[0] if len(losses) == 1 else torch.cat(losses)), folded

    def _gradients_in_halves(self, indices: torch.Tensor, normalizer: float) -> torch.Tensor:
        """The batch's gradient as two half-batch passes, recording each member's small/big squared norms
        (core/noise_probe.py ``NoiseProbe._backward_in_halves``, for all members at once)."""
        half = indices.shape[1] // 2
        first_loss, _ = self._loss_and_gradients(indices[:, :half], normalizer)
        first = self.model.flat_gradients.clone()
        second_loss, _ = self._loss_and_gradients(indices[:, half:], normalizer)
        small_sq = halves_squared_norm(self.model.member_squared_norms(first),
                                       self.model.member_squared_norms(self.model.flat_gradients),
                                       normalizer, half, indices.shape[1])
        self.model.flat_gradients.add_(first)
        self.probe.record(small_sq, self.model.member_squared_norms(self.model.flat_gradients), self.active)
        return first_loss + second_loss


def point_at_row(model: torch.nn.Module, stack: StackedTrainer, row: int) -> None:
    """Make ``model``'s parameters views of row ``row`` of the stack's (the stacked model lists them in
    ``model.parameters()`` order)."""
    for parameter, stacked in zip(model.parameters(), stack.model.parameters()):
        parameter.data = stacked[row]

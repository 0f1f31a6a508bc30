"""Measuring the gradient noise scale inside training, without a second backward pass.

McCandlish et al. 2018 (Appendix A) need |G|^2 at two batch sizes. The "big" gradient is the
all-reduced one (B); the "small" one is each rank's local gradient (B/W), read from DDP's buckets
in a communication hook before they are all-reduced, or, on one rank, the two halves of the batch
(B/2) backpropagated one after the other. With gradient accumulation the small batch is the
micro-batch: each pass's gradient is read between the passes (the last under DDP in the hook).

Squared norms stay on the device, in an exponential moving average over the run (averaged over
ranks into the epoch metric ``grad_noise_scale``) and in windows between evaluation points
(core/evaluation.py closes them), from which ``grad_noise_scale_at_target`` is read. The two
components are averaged before they are divided (each is unbiased, their ratio is not). A measured
step changes only device tensors, so a CUDA graph can capture it (core/graph_step.py).

Owns the protocol of a measured step (half batches, DDP's hook, the hand-written engine's read
before its all-reduce, micro-batches) and the hook's registration; the training step (core/step.py)
passes in the backward and the all-reduce.
"""

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from harness.core.distributed import DistContext, all_reduce_sum
from harness.measure.metrics import debiased_average, noise_scale_components, simple_noise_scale

# B_simple at the target averages the newest closed windows ending there: at least MIN_WINDOWS_AT_TARGET,
# and older ones (up to WINDOWS_KEPT) until they hold MIN_MEASURED_STEPS_AT_TARGET measured steps: one
# window can hold very few, and a one-step estimate of |G|^2 is often negative.
WINDOWS_KEPT = 8
STATE = ("ema", "updates", "window", "closed_windows")  # a probe's running state, per run or per member
MIN_WINDOWS_AT_TARGET = 2
MIN_MEASURED_STEPS_AT_TARGET = 16


def squared_norm(tensors) -> torch.Tensor:
    """Sum of squares of all elements, as a float64 scalar on the device: one fused norm kernel per tensor
    (an elementwise ``pow(2).sum()`` on the 784x500 weight costs more than the step it measures)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])).double() ** 2


def halves_squared_norm(first_sq, second_sq, normalizer: float, half: int, size: int):
    """The mean squared norm of two half batches' gradients (of sum(CE)/normalizer, squared norms ``first_sq``
    and ``second_sq``), each half's taken as a mean over its own samples (``half`` and ``size - half``)."""
    return (first_sq * (normalizer / half) ** 2 + second_sq * (normalizer / (size - half)) ** 2) / 2


# backward(x, y, normalizer): assigns this rank's gradients of sum(CE)/normalizer
# (under DDP also all-reduced, through the comm hook) and returns that loss.
Backward = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def accumulate(ema: torch.Tensor, updates: torch.Tensor, window: torch.Tensor, decay: float,
               small_sq: torch.Tensor, big_sq: torch.Tensor, active: Optional[torch.Tensor] = None) -> None:
    """One measured step into a probe's running state, or K probes' at once (a member axis in front):
    the EMA of the (small, big) squared norms ``ema`` [.., 2], its count ``updates`` [..] and the open
    window's sums ``window`` [.., 3] (small, big, steps). Only ``active`` members record (None: all): a
    stack member that stopped keeps the probe its run ended with. In place: a captured step holds
    these addresses."""
    pair = torch.stack([small_sq, big_sq], dim=-1)
    measured = torch.cat([pair, torch.ones_like(pair[..., :1])], dim=-1)
    if active is None:
        ema.mul_(decay).add_(pair, alpha=1 - decay)
        updates.add_(1)
        window.add_(measured)
        return
    rows = active.unsqueeze(-1)
    ema.copy_(torch.where(rows, ema * decay + pair * (1 - decay), ema))
    updates.add_(active.to(updates.dtype))
    window.add_(torch.where(rows, measured, 0.0))


class NoiseProbe:
    def __init__(self, ctx: DistContext, global_batch_size: int, decay: float,
                 micro_batch_size: Optional[int] = None):
        """``micro_batch_size``: the step accumulates passes of this size (several per rank); None: it does not."""
        self.ctx, self.decay = ctx, decay
        self.big_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.splits_batch = ctx.world_size == 1  # one rank: measure by backpropagating two halves of the batch
        # The small batch: the micro-batch, else a rank's share, else (one rank) half the batch.
        self.small_batch_size = (micro_batch_size if micro_batch_size is not None
                                 else global_batch_size / max(ctx.world_size, 2))
        # A measured accumulating step: the sum of its passes' squared norms (as means), their count
        # (a host int: every full step has the same number of passes), and p.grad before the pass.
        self.micro_sq_sum, self.micro_count = torch.zeros((), dtype=torch.float64, device=ctx.device), 0
        self.previous_grads: Optional[list[torch.Tensor]] = None
        self.previous_by_address: Optional[dict[int, torch.Tensor]] = None
        self.ema = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # (small, big) squared norms
        self.updates = torch.zeros((), dtype=torch.float64, device=ctx.device)
        self.local_sq_norm = torch.zeros((), dtype=torch.float64, device=ctx.device)
        # Since the last evaluation point: (small, big) squared-norm sums and their count.
        self.window = torch.zeros(3, dtype=torch.float64, device=ctx.device)
        # The last WINDOWS_KEPT closed windows, oldest first, averaged over ranks.
        self.closed_windows = torch.zeros(WINDOWS_KEPT, 3, dtype=torch.float64, device=ctx.device)
        self.armed = False

    def can_measure(self, global_batch_size: int) -> bool:
        # Only full batches: the last, smaller batch of an epoch has other sizes.
        return global_batch_size == self.big_batch_size and (
            self.micro_batch_size is not None or not self.splits_batch or global_batch_size >= 2)

    def attach(self, model: torch.nn.Module) -> None:
        """Read the local gradients in DDP's all-reduce, where several ranks train ``model`` under DDP."""
        if isinstance(model, DistributedDataParallel) and not self.splits_batch:
            model.register_comm_hook(None, self._ddp_comm_hook)

    def measured_gradients(self, backward: Backward, x: torch.Tensor, y: torch.Tensor, normalizer: float,
                           params: list[torch.Tensor], all_reduce: Optional[Callable[[], None]]) -> torch.Tensor:
        """A measured step's gradients (p.grad := the global batch's mean, as an unmeasured step leaves it),
        its pair of squared norms recorded; this rank's loss. ``all_reduce`` averages the gradients where
        ``backward`` does not (the hand-written engine; None under DDP or on one rank)."""
        if self.splits_batch:
            # One rank: its gradient is the global one, nothing to all-reduce.
            loss, small_sq = self._backward_in_halves(backward, x, y, normalizer, params)
        else:
            self._arm()
            loss = backward(x, y, normalizer)
            if all_reduce:
                # No comm hook sees this engine's gradients: read the local norm before they are averaged.
                self.local_sq_norm += squared_norm([p.grad for p in params])
                all_reduce()
            small_sq = self.local_sq_norm
        self.record(small_sq, params)
        return loss

    def _backward_in_halves(self, backward: Backward, x: torch.Tensor, y: torch.Tensor, normalizer: float,
                            params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One rank's gradient as two half-batch passes; also the halves' mean squared norm (as means)."""
        half = len(y) // 2
        first_loss = backward(x[:half], y[:half], normalizer)
        first = [p.grad.clone() for p in params]
        second_loss = backward(x[half:], y[half:], normalizer)
        small_sq = halves_squared_norm(squared_norm(first), squared_norm([p.grad for p in params]), normalizer,
                                       half, len(y))
        for g, p in zip(first, params):
            p.grad.add_(g)
        return first_loss + second_loss, small_sq

    # No postponed annotations in this module: DDP checks that ``bucket`` is
    # annotated with the class dist.GradBucket itself, not a string.
    def _ddp_comm_hook(self, _state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """Add the bucket's local squared norm, then all-reduce it as DDP would (mean)."""
        if self.armed and self.previous_by_address is not None:
            # The last of several passes: the bucket holds the rank's sum over them; this pass is the growth.
            self.local_sq_norm += squared_norm([grad - self.previous_by_address[param.data_ptr()]
                                                for grad, param in zip(bucket.gradients(), bucket.parameters())])
        elif self.armed:
            self.local_sq_norm += squared_norm([bucket.buffer()])
        tensor = bucket.buffer().div_(self.ctx.world_size)
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])

    def before_micro_batch(self, params: list[torch.Tensor], index: int, reduces_in_backward: bool) -> None:
        """Before pass ``index`` of a measured accumulating step: keep p.grad, to read the pass's own gradient.
        ``reduces_in_backward``: DDP all-reduces in this pass's backward (its last), so the comm hook reads
        the pass, before the reduction replaces p.grad."""
        self.previous_grads = [p.grad.clone() for p in params] if index > 0 else None
        if reduces_in_backward:
            self.previous_by_address = (None if self.previous_grads is None else
                                        {p.data_ptr(): g for p, g in zip(params, self.previous_grads)})
            self._arm()

    def after_micro_batch(self, params: list[torch.Tensor], size: int, normalizer: float) -> None:
        """After a pass of ``size`` samples whose loss was divided by ``normalizer``: add its squared norm as a mean."""
        if self.armed:
            pass_sq = self.local_sq_norm.clone()  # read by the comm hook
            self.armed, self.previous_by_address = False, None
        elif self.previous_grads is None:
            pass_sq = squared_norm([p.grad for p in params])
        else:
            pass_sq = squared_norm([p.grad - g for p, g in zip(params, self.previous_grads)])
        self.previous_grads = None
        self.micro_sq_sum.add_(pass_sq * (normalizer / size) ** 2)
        self.micro_count += 1

    def record_micro_batches(self, params: list[torch.Tensor]) -> None:
        """After the passes and their all-reduce: record the passes' mean squared norm against the step's gradient."""
        small_sq = self.micro_sq_sum / self.micro_count
        self.micro_sq_sum.zero_()
        self.micro_count = 0
        self.record(small_sq, params)

    def _arm(self) -> None:
        self.local_sq_norm.zero_()
        self.armed = True

    def record(self, small_sq: torch.Tensor, params) -> None:
        """One step's pair of squared norms: ``small_sq`` local, ``params``' grads reduced."""
        self.armed = False
        accumulate(self.ema, self.updates, self.window, self.decay, small_sq, squared_norm([p.grad for p in params]))

    def close_window(self) -> None:
        """At an evaluation point, on every rank (it all-reduces): keep the window, start a new one (device
        work only: the closed windows are read at the target)."""
        all_reduce_sum(self.window, self.ctx).div_(self.ctx.world_size)
        self.closed_windows.copy_(torch.cat([self.closed_windows[1:], self.window.unsqueeze(0)]))
        self.window.zero_()

    def window_metrics(self) -> dict[str, float]:
        """B_simple and its components over the closed windows (a host read); empty if none measured."""
        small_sum, big_sum, count, windows = 0.0, 0.0, 0.0, 0
        for small, big, measured in reversed(self.closed_windows.tolist()):  # newest first
            if windows >= MIN_WINDOWS_AT_TARGET and count >= MIN_MEASURED_STEPS_AT_TARGET:
                break
            small_sum, big_sum, count, windows = small_sum + small, big_sum + big, count + measured, windows + 1
        if count == 0:
            return {}
        return {**self._noise_metrics(small_sum / count, big_sum / count, ("grad_sq_norm_at_target",
                                      "grad_trace_cov_at_target", "grad_noise_scale_at_target")),
                "grad_noise_scale_measured_steps_at_target": count,
                "grad_noise_scale_windows_at_target": float(windows)}

    def epoch_metrics(self) -> dict[str, float]:
        """Every rank must call this (it all-reduces). Empty until a step was measured."""
        # The averages and the open window are linear in the norms: averaging them over ranks now equals
        # averaging at the end, and every rank then holds the state rank 0's checkpoint saves. In place:
        # a captured step holds these addresses.
        all_reduce_sum(self.ema, self.ctx).div_(self.ctx.world_size)
        all_reduce_sum(self.window, self.ctx).div_(self.ctx.world_size)
        updates = int(self.updates)  # the epoch's one read of the count (a sync, once per epoch)
        if updates == 0:
            return {}
        return self._noise_metrics(*debiased_average(self.ema, self.decay, updates).tolist(),
                                   ("grad_sq_norm_estimate", "grad_trace_cov_estimate", "grad_noise_scale"))

    def _noise_metrics(self, small_sq: float, big_sq: float, names: tuple[str, str, str]) -> dict[str, float]:
        """``names`` for |G|^2, tr(Sigma) and B_simple from the mean squared norms: the (linear, unbiased)
        components, then their ratio, left out where NaN (|G|^2 not estimated positive)."""
        grad_sq_norm, trace_cov = noise_scale_components(small_sq, big_sq, self.small_batch_size, self.big_batch_size)
        noise_scale = simple_noise_scale(grad_sq_norm, trace_cov)
        return dict(zip(names, (grad_sq_norm, trace_cov) + ((noise_scale,) if noise_scale == noise_scale else ())))

    def state_tensors(self) -> list[torch.Tensor]:
        """The running state a step changes (``STATE``), as tensors."""
        return [getattr(self, name) for name in STATE]

    def state_dict(self) -> dict:
        return {"ema": self.ema.cpu(), "updates": int(self.updates), "window": self.window.cpu(),
                "closed_windows": self.closed_windows.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.ema.copy_(state["ema"])
        self.updates.fill_(int(state["updates"]))
        # Checkpoints from before the window start with empty windows.
        self.window.copy_(state.get("window", torch.zeros(3)))
        self.closed_windows.copy_(state.get("closed_windows", torch.zeros_like(self.closed_windows)))


class MemberProbes:
    """The noise probes of K members (a stack's), their state on a member axis: ``members[k]`` is an
    ordinary ``NoiseProbe`` whose state tensors are views of row k, which the stacked step records all at
    once and each member's evaluations, epoch metrics and checkpoint use as a run alone's."""

    def __init__(self, ctx: DistContext, global_batch_size: int, decay: float, num_members: int):
        self.decay = decay
        self.members = [NoiseProbe(ctx, global_batch_size, decay) for _ in range(num_members)]
        self._set_state(*(torch.stack([getattr(probe, name) for probe in self.members]) for name in STATE))

    def _set_state(self, *state: torch.Tensor) -> None:
        """The members' ``STATE`` tensors, [K, ...]: each member's probe gets views of its row."""
        self.ema, self.updates, self.window, self.closed_windows = state
        for k, probe in enumerate(self.members):
            probe.ema, probe.updates, probe.window, probe.closed_windows = (tensor[k] for tensor in state)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the members ``rows``: a dropped member's probe keeps the state it stopped with."""
        self.members = [self.members[k] for k in rows.tolist()]
        self._set_state(self.ema[rows], self.updates[rows], self.window[rows], self.closed_windows[rows])

    def can_measure(self, global_batch_size: int) -> bool:
        return self.members[0].can_measure(global_batch_size)

    state_tensors = NoiseProbe.state_tensors

    def record(self, small_sq: torch.Tensor, big_sq: torch.Tensor, active: torch.Tensor) -> None:
        """One step's squared norms, [K] each: ``small_sq`` of the small batch (as a mean), ``big_sq`` reduced.
        Only ``active`` members record: one that stopped keeps the probe its run ended with."""
        accumulate(self.ema, self.updates, self.window, self.decay, small_sq, big_sq, active)

"""Measuring the gradient noise scale inside training, without a second backward pass.

McCandlish et al. 2018 (Appendix A) need |G|^2 at two batch sizes. With W ranks
the "small" gradient is each rank's local gradient (a batch of B/W), read from
DDP's buckets before they are all-reduced (a communication hook), and the "big"
one is the all-reduced gradient (B). With one rank the local batch is split in
two halves (B/2 each) that are backpropagated one after the other.

Squared norms stay on the device in exponential moving averages; they are
averaged over ranks and turned into B_simple once per epoch (metrics.py), so no
step waits for the host. Everything a measured step changes is a device tensor
(the averages and their update count), so the step can be captured in a CUDA
graph (graph_step.py) and replayed.
"""


import torch
import torch.distributed as dist

from harness.core.distributed import DistContext, all_reduce_sum
from harness.measure.metrics import debiased_average, noise_scale_components, simple_noise_scale


def squared_norm(tensors) -> torch.Tensor:
    """Sum of squares of all elements, as a float64 scalar on the device.

    One fused norm kernel per tensor, no temporaries: an elementwise
    ``pow(2).sum()`` on the 784x500 weight costs more than the step it measures.
    """
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])).double() ** 2


class NoiseProbe:
    def __init__(self, ctx: DistContext, global_batch_size: int, decay: float):
        self.ctx = ctx
        self.decay = decay
        self.big_batch_size = global_batch_size
        self.small_batch_size = global_batch_size / ctx.world_size if ctx.world_size > 1 else global_batch_size / 2
        self.ema = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # (small, big) squared norms
        self.updates = torch.zeros((), dtype=torch.float64, device=ctx.device)
        self.local_sq_norm = torch.zeros((), dtype=torch.float64, device=ctx.device)
        self.armed = False

    @property
    def splits_batch(self) -> bool:
        """One rank: measure by backpropagating two halves of the batch."""
        return self.ctx.world_size == 1

    def can_measure(self, global_batch_size: int) -> bool:
        # Only full batches: the last, smaller batch of an epoch has other sizes.
        return global_batch_size == self.big_batch_size and (not self.splits_batch or global_batch_size >= 2)

    # No postponed annotations in this module: DDP checks that ``bucket`` is
    # annotated with the class dist.GradBucket itself, not a string.
    def ddp_comm_hook(self, _state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """Add the bucket's local squared norm, then all-reduce it as DDP would (mean)."""
        if self.armed:
            self.local_sq_norm += squared_norm([bucket.buffer()])
        tensor = bucket.buffer().div_(self.ctx.world_size)
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])

    def arm(self) -> None:
        self.local_sq_norm.zero_()
        self.armed = True

    def record(self, small_sq_norm: torch.Tensor, params) -> None:
        """One step's pair of squared norms: ``small_sq_norm`` local, ``params``' grads reduced."""
        self.armed = False
        big_sq_norm = squared_norm([p.grad for p in params])
        self.ema.mul_(self.decay).add_(torch.stack([small_sq_norm, big_sq_norm]), alpha=1 - self.decay)
        self.updates.add_(1)

    def epoch_metrics(self) -> dict[str, float]:
        """Every rank must call this (it all-reduces). Empty until a step was measured."""
        # The averages are linear in the norms, so averaging them over ranks now
        # and going on from the mean equals averaging at the very end; every rank
        # then holds the same state, which is what rank 0's checkpoint saves.
        # In place: a captured step holds this tensor's address.
        all_reduce_sum(self.ema, self.ctx).div_(self.ctx.world_size)
        updates = int(self.updates)  # the epoch's one read of the count (a sync, once per epoch)
        if updates == 0:
            return {}
        small_sq, big_sq = debiased_average(self.ema, self.decay, updates).tolist()
        grad_sq_norm, trace_cov = noise_scale_components(small_sq, big_sq, self.small_batch_size, self.big_batch_size)
        metrics = {"grad_sq_norm_estimate": grad_sq_norm, "grad_trace_cov_estimate": trace_cov}
        noise_scale = simple_noise_scale(grad_sq_norm, trace_cov)
        if noise_scale == noise_scale:  # not NaN: |G|^2 estimated positive
            metrics["grad_noise_scale"] = noise_scale
        return metrics

    def state_dict(self) -> dict:
        return {"ema": self.ema.cpu(), "updates": int(self.updates)}

    def load_state_dict(self, state: dict) -> None:
        self.ema.copy_(state["ema"])
        self.updates.fill_(int(state["updates"]))

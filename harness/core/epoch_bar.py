"""The epoch bar: a tqdm bar of one epoch's steps, with the running mean loss beside it
(``LossPostfix``, which never waits on the device). Other human-readable lines go through
harness/console.py.
"""

from __future__ import annotations

import time

import torch

from harness.core.config import Config
from harness.core.distributed import DistContext


class LossPostfix:
    """Shows this rank's running mean loss on the epoch bar (a stack's: the mean over its members), about once
    a second, never waiting on the device.

    On CUDA reading ``loss_sum`` would sync with the host every time: instead the
    sum is copied without blocking into pinned memory, and the bar shows the copy
    that an event says has landed (a second or so old).
    """

    INTERVAL_S = 1.0

    def __init__(self, bar, device: torch.device):
        self.bar, self.device = bar, device
        self.shown_at = time.monotonic()
        self.enabled = not getattr(bar, "disable", True)  # a disabled bar: nothing to do
        self.on_host = torch.zeros((), dtype=torch.float64, pin_memory=True) if self.enabled and device.type == "cuda" else None
        self.copied = None  # (event, samples) of the copy in flight

    def maybe_show(self, loss_sum: torch.Tensor, samples: int) -> None:
        if not self.enabled or time.monotonic() - self.shown_at < self.INTERVAL_S:
            return
        self.shown_at = time.monotonic()
        if self.on_host is None:
            self._show(float(loss_sum.mean()), samples)
            return
        if self.copied is not None:
            event, copied_samples = self.copied
            if not event.query():
                return  # the last copy has not landed yet: try again in a second
            self._show(float(self.on_host), copied_samples)
        self.on_host.copy_(loss_sum.mean(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.copied = (event, samples)

    def _show(self, loss_sum: float, samples: int) -> None:
        self.bar.set_postfix(loss=f"{loss_sum / max(samples, 1):.4f}", refresh=False)


def epoch_bar(cfg: Config, ctx: DistContext, total: int, epoch: int):
    """The tqdm bar of one epoch's steps, shown on rank 0 with train.progress on; never on a Ray worker, whose
    output Ray forwards line by line (each redraw of the bar would be a line of its own)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{cfg.name} epoch {epoch}", unit="step", leave=False, mininterval=1.0,
                disable=not (ctx.is_main and cfg.train.progress and ctx.launcher != "ray"))

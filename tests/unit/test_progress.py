"""The epoch bar's running loss: shown on a real tqdm bar, and on CUDA read without a host sync."""

import io

import pytest
import torch
from tqdm import tqdm

from harness.core.epoch_bar import LossPostfix

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def bar():
    return tqdm(total=10, file=io.StringIO(), disable=False)


def test_epoch_bar_shows_the_running_mean_loss(monkeypatch):
    monkeypatch.setattr(LossPostfix, "INTERVAL_S", 0.0)  # every call shows: no waiting in a test
    progress = bar()
    postfix = LossPostfix(progress, torch.device("cpu"))
    postfix.maybe_show(torch.tensor(6.0, dtype=torch.float64), samples=3)
    assert progress.postfix == "loss=2.0000"


def test_disabled_bar_is_left_alone():
    progress = tqdm(total=10, file=io.StringIO(), disable=True)
    postfix = LossPostfix(progress, torch.device("cpu"))
    postfix.maybe_show(torch.tensor(6.0), samples=3)
    assert not postfix.enabled and not getattr(progress, "postfix", None)


@cuda
def test_epoch_bar_reads_a_cuda_loss_without_syncing(monkeypatch):
    monkeypatch.setattr(LossPostfix, "INTERVAL_S", 0.0)
    progress = bar()
    postfix = LossPostfix(progress, torch.device("cuda", 0))
    loss_sum = torch.full((), 6.0, dtype=torch.float64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(200):  # the first copy lands at some call; the bar then shows it
            postfix.maybe_show(loss_sum, samples=3)
            if progress.postfix:
                break
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    postfix.maybe_show(loss_sum, samples=3)
    assert progress.postfix == "loss=2.0000"

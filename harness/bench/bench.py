"""``harness bench``: seconds per training epoch of the harness's path against a plain PyTorch peer.

All paths train the same model from the same initial weights on the same data,
in one process, one after another, and are timed the same way (one warm-up
epoch, then the median of the timed epochs, with the device synchronised):

- ``dataloader``: the peer, what a typical script (and Ray Train's Fashion-MNIST
  example) does: ``DataLoader(TensorDataset(...), shuffle=True)`` on the host,
  ``.to(device)`` per batch;
- ``harness``: the harness's eager step on data resident on the device;
- ``harness_ddp``: the same under ``DistributedDataParallel`` at world size 1;
- ``harness_graph`` and ``harness_graph_ddp``: the same two with
  ``performance.cuda_graph`` (graph_step.py); the warm-up epoch includes the
  eager warm-up steps and the capture. Where graphs are unavailable (the CPU)
  the rows carry no timing and say why.

Ratios are against the peer measured in the same process, never against a
number from elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from harness.core.config import Config
from harness.core.data import Dataset, load_dataset
from harness.core.distributed import COLLECTIVE_CAPTURE_ENV, DistContext, allow_collective_capture
from harness.core.graph_step import graph_unavailable_reason
from harness.core.model import build_model
from harness.core.trainer import SingleRun, build_trainer, train_epoch


@dataclass(frozen=True)
class BenchPath:
    """What a timed path switches on: the harness's CUDA graph step, and DDP at world size 1."""

    cuda_graph: bool = False
    ddp: bool = False


# The harness's paths in the table's row order; the DataLoader peer always runs first,
# since every other row's speed-up is against it.
HARNESS_PATHS = {
    "harness": BenchPath(),
    "harness_ddp": BenchPath(ddp=True),
    "harness_graph": BenchPath(cuda_graph=True),
    "harness_graph_ddp": BenchPath(cuda_graph=True, ddp=True),
}
PATHS = ("dataloader", *HARNESS_PATHS)


@dataclass
class Timing:
    path: str
    batch_size: int
    seconds_per_epoch: Optional[float]
    samples_per_s: Optional[float]
    speedup_vs_dataloader: Optional[float]
    note: str = ""
    epoch_seconds: list[float] = field(default_factory=list)  # every timed epoch, for the spread

    @classmethod
    def timed(cls, path: str, batch_size: int, samples: int, epoch_seconds: list[float],
              peer_s: Optional[float] = None) -> "Timing":
        """A timed row: the median epoch, and its speed-up over ``peer_s`` (None: this row is the peer)."""
        seconds = statistics.median(epoch_seconds)
        return cls(path, batch_size, seconds, samples / seconds, (peer_s or seconds) / seconds,
                   epoch_seconds=epoch_seconds)


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_epochs(run_epoch: Callable[[int], None], device: torch.device, epochs: int) -> list[float]:
    """Seconds of each of ``epochs`` timed epochs, after one warm-up epoch."""
    return time_interleaved({"only": run_epoch}, device, epochs)["only"]


def time_interleaved(sides: dict[str, Callable[[int], None]], device: torch.device,
                     epochs: int) -> dict[str, list[float]]:
    """Seconds of each side's ``epochs`` timed epochs, taken in rounds: one warm-up epoch of every side,
    then per round one timed epoch of each side in turn. A machine that slows down for a while (another
    tenant, the clock) then does so in every side's epochs of those rounds, where timing one side's
    epochs after the other's would charge the slow spell to one side only. (How much a spell slows
    each side may still differ: stack_bench.py keeps each side's fastest epoch.)"""
    for run_epoch in sides.values():
        run_epoch(0)
    _synchronise(device)
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for epoch in range(1, epochs + 1):
        for name, run_epoch in sides.items():
            started = time.perf_counter()
            run_epoch(epoch)
            _synchronise(device)
            seconds[name].append(time.perf_counter() - started)
    return seconds


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """With ``enabled``: CUDA's fp32 matrix products in TF32 (10-bit mantissa, on tensor cores) inside, and
    the setting as it was after. A bench knob: whether the stacked step's products, fp32 by default, are
    what holds it back on a GPU (docs/performance.md). A CUDA graph captured inside keeps TF32 kernels."""
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    # fp32_precision: the setting since torch 2.9 (mixing it with the older allow_tf32 is an error there).
    key, value = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    before = getattr(matmul, key)
    setattr(matmul, key, value)
    try:
        yield
    finally:
        setattr(matmul, key, before)


def dataloader_epoch_fn(cfg: Config, dataset: Dataset, device: torch.device) -> Callable[[int], None]:
    """The peer: a plain PyTorch loop over a DataLoader, host to device per batch."""
    model = build_model(cfg).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    loader = DataLoader(TensorDataset(dataset.train.features, dataset.train.targets),
                        batch_size=cfg.optim.global_batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed))

    def run_epoch(_epoch: int) -> None:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    return run_epoch


def harness_epoch_fn(cfg: Config, dataset: Dataset, ctx: DistContext) -> Callable[[int], None]:
    """The harness's own step (core/step.py, or the graph step wrapping it), data already on the device."""
    engine = SingleRun(build_trainer(cfg, ctx, dataset.to(ctx.device)))

    def run_epoch(epoch: int) -> None:
        train_epoch(engine, epoch)

    return run_epoch


def run_benchmark(cfg: Config, device: torch.device, batch_sizes: list[int], epochs: int,
                  paths: tuple[str, ...] = PATHS) -> dict:
    """Time ``paths`` (the DataLoader peer always) at every batch size; returns the JSON-ready result."""
    # The bench times the training step alone: the noise-scale probe and the
    # end-of-run sharpness are measurements a study switches on, not the step.
    cfg = cfg.replace(**{"metrics.noise_scale": False, "metrics.sharpness": False, "tracking.enabled": False})
    dataset = load_dataset(cfg)
    timings: list[Timing] = []
    for batch_size in batch_sizes:
        trial = cfg.replace(**{"optim.global_batch_size": batch_size})
        samples = len(dataset.train)
        peer = Timing.timed("dataloader", batch_size, samples,
                            time_epochs(dataloader_epoch_fn(trial, dataset, device), device, epochs))
        timings.append(peer)
        for path, kind in HARNESS_PATHS.items():
            if path not in paths:
                continue
            path_cfg = trial.replace(**{"performance.cuda_graph": kind.cuda_graph})
            ctx = DistContext(device=device, launcher="bench")
            unavailable = kind.cuda_graph and graph_unavailable_reason(path_cfg, ctx)
            if unavailable:
                timings.append(Timing(path, batch_size, None, None, None, note=f"unavailable: {unavailable}"))
                continue
            if kind.ddp:
                with _single_rank_process_group(device, capture_collectives=kind.cuda_graph):
                    seconds = time_epochs(harness_epoch_fn(path_cfg, dataset, DistContext(
                        device=device, launcher="bench", world_size=1)), device, epochs)
            else:
                seconds = time_epochs(harness_epoch_fn(path_cfg, dataset, ctx), device, epochs)
            timings.append(Timing.timed(path, batch_size, samples, seconds, peer.seconds_per_epoch))
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "train_samples": len(dataset.train),
        "epochs_timed": epochs,
        "layer_sizes": list(cfg.layer_sizes),
        "date": time.strftime("%Y-%m-%d"),
        "timings": [asdict(t) for t in timings],
    }


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


class _single_rank_process_group:
    """A world of one, in this process (no ports), so DDP can wrap the model."""

    def __init__(self, device: torch.device, capture_collectives: bool = False):
        self.device = device
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self.capture_collectives = capture_collectives

    def __enter__(self):
        self.saved_env = {name: os.environ.get(name) for name in COLLECTIVE_CAPTURE_ENV}
        if self.capture_collectives:
            allow_collective_capture()
        dist.init_process_group(self.backend, store=dist.HashStore(), rank=0, world_size=1,
                                device_id=self.device if self.device.type == "cuda" else None)

    def __exit__(self, *exc):
        dist.destroy_process_group()
        # The eager DDP path of the next batch size gets NCCL's default settings again.
        for name, value in self.saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def format_table(result: dict) -> str:
    lines = [f"device {result['device']} ({result['device_name']}), torch {result['torch']}, "
             f"{result['train_samples']} samples/epoch, median of {result['epochs_timed']} epochs, "
             f"matrix products in {result.get('matmuls', 'fp32')}",
             "| batch | path | s/epoch | samples/s | speed-up vs DataLoader |", "|---|---|---|---|---|"]
    for t in result["timings"]:
        if t["seconds_per_epoch"] is None:
            lines.append(f"| {t['batch_size']} | {t['path']} | - | - | {t['note']} |")
        else:
            lines.append(f"| {t['batch_size']} | {t['path']} | {t['seconds_per_epoch']:.4f} | "
                         f"{t['samples_per_s']:,.0f} | {t['speedup_vs_dataloader']:.2f}x |")
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as handle:
        json.dump(result, handle, indent=2)

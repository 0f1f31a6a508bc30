"""``harness bench``: seconds per training epoch of the harness's paths against a plain PyTorch peer.

Every path trains the same model from the same initial weights on the same data, in this process, one
after another, timed alike (one warm-up epoch, then the median of the timed epochs, device synchronised):
``dataloader`` is the peer, as a typical script does it (``DataLoader(TensorDataset(...), shuffle=True)``
on the host, ``.to(device)`` per batch); ``harness`` the harness's eager step on data resident on the
device; ``harness_ddp`` the same under DDP at world size 1; ``harness_graph`` and ``harness_graph_ddp``
the same two with ``performance.cuda_graph`` (the warm-up epoch includes the capture; where graphs are
unavailable, the rows say why). Ratios are against the peer measured in the same process.

Also owns the timing, device naming and JSON head that the other benches share.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from harness.console import say
from harness.core.config import Config
from harness.core.data import Dataset, load_dataset
from harness.core.distributed import COLLECTIVE_CAPTURE_ENV, DistContext, allow_collective_capture
from harness.core.graph_step import graph_unavailable_reason
from harness.core.model import build_model, describe_model, is_mlp
from harness.core.trainer import SingleRun, build_trainer, train_epoch

# The harness's paths in the table's row order, as (cuda_graph, ddp). The DataLoader peer always runs
# first, since every other row's speed-up is against it.
HARNESS_PATHS = {"harness": (False, False), "harness_ddp": (False, True),
                 "harness_graph": (True, False), "harness_graph_ddp": (True, True)}
PATHS = ("dataloader", *HARNESS_PATHS)

# A timed step leaves out the probes and end-of-run measurements that a study switches on.
STEP_ONLY = {"metrics.noise_scale": False, "metrics.sharpness": False, "tracking.enabled": False}


def timing(path: str, batch_size: int, samples: int, epoch_seconds: list[float],
           peer_s: Optional[float] = None) -> dict:
    """A timed row: the median epoch, its speed-up over ``peer_s`` (None: this row is the peer), and every
    timed epoch, for the spread."""
    seconds = statistics.median(epoch_seconds)
    return {"path": path, "batch_size": batch_size, "seconds_per_epoch": seconds, "samples_per_s": samples / seconds,
            "speedup_vs_dataloader": (peer_s or seconds) / seconds, "note": "", "epoch_seconds": epoch_seconds}


@dataclass(frozen=True)
class Repeats:
    """How many calls a median is taken over: after ``warmup``, at least ``calls`` and ``min_s`` seconds
    of them (at most ``max_calls``): one call at batch 1 can take well under a millisecond."""

    warmup: int
    calls: int
    min_s: float
    max_calls: int

    def wants_more(self, seconds: list[float]) -> bool:
        return len(seconds) < self.calls or (sum(seconds) < self.min_s and len(seconds) < self.max_calls)


class BatchProgress:
    """A bench's progress on stdout: what it will time and how to time less, then one line per batch size
    with the time so far and the estimated time left (the mean batch size's time so far, times those left)."""

    def __init__(self, batch_sizes: list[int], plan: str, shorter: str):
        self.total, self.done, self.started = len(batch_sizes), 0, time.perf_counter()
        say(f"{plan}, at batch {', '.join(map(str, batch_sizes))}; {shorter}")

    def batch_done(self, batch_size: int, summary: str) -> None:
        self.done += 1
        elapsed_s = time.perf_counter() - self.started
        left = f"about {format_seconds(elapsed_s / self.done * (self.total - self.done))} left" \
            if self.done < self.total else "done"
        say(f"  batch {batch_size}: {summary} [{self.done}/{self.total}, {format_seconds(elapsed_s)}; {left}]")


def format_seconds(seconds: float) -> str:
    """``42 s`` or ``3 min 05 s``."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(call: Callable[[int], None], device: torch.device, repeats: Repeats) -> list[float]:
    """Seconds of each timed ``call(index)`` after the warm-up calls, as many as ``repeats`` asks for."""
    for index in range(repeats.warmup):
        call(index)
    seconds: list[float] = []
    while repeats.wants_more(seconds):
        _synchronise(device)
        started = time.perf_counter()
        call(repeats.warmup + len(seconds))
        _synchronise(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def time_epochs(run_epoch: Callable[[int], None], device: torch.device, epochs: int) -> list[float]:
    """Seconds of each of ``epochs`` timed epochs, after one warm-up epoch."""
    return time_interleaved({"only": run_epoch}, device, epochs)["only"]


def time_interleaved(sides: dict[str, Callable[[int], None]], device: torch.device,
                     epochs: int) -> dict[str, list[float]]:
    """Seconds of each side's ``epochs`` timed epochs, taken in rounds: one warm-up epoch of every side,
    then per round one timed epoch of each side in turn. A machine that slows down for a while (another
    tenant, the clock) then does so in every side's epochs of those rounds, not in one side's only."""
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
    """With ``enabled``: CUDA's fp32 matrix products in TF32 inside, and the setting as it was after: does
    fp32 arithmetic hold the stacked step back on a GPU (docs/performance.md)? A CUDA graph captured
    inside keeps TF32 kernels."""
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


def run_benchmark(cfg: Config, device: torch.device, batch_sizes: list[int], epochs: int,
                  paths: tuple[str, ...] = PATHS) -> dict:
    """Time ``paths`` (the DataLoader peer always) at every batch size; returns the JSON-ready result."""
    cfg = cfg.replace(**STEP_ONLY)
    dataset = load_dataset(cfg)
    samples = len(dataset.train)
    ctx = DistContext(device=device, launcher="bench")
    timings: list[dict] = []
    graphs = cfg.replace(**{"performance.cuda_graph": True})
    timed = [path for path in PATHS if path == "dataloader" or path in paths
             and not (HARNESS_PATHS[path][0] and graph_unavailable_reason(graphs, ctx))]
    progress = BatchProgress(batch_sizes, f"bench on {device.type}: {', '.join(timed)}, each 1 warm-up and "
                             f"{epochs} timed epochs of {samples} samples",
                             "--epochs 1, fewer --batch-sizes or --paths shorten it")
    for batch_size in batch_sizes:
        trial = cfg.replace(**{"optim.global_batch_size": batch_size})
        peer = timing("dataloader", batch_size, samples,
                      time_epochs(dataloader_epoch_fn(trial, dataset, device), device, epochs))
        timings.append(peer)
        for path, (cuda_graph, ddp) in HARNESS_PATHS.items():
            if path not in paths:
                continue
            path_cfg = trial.replace(**{"performance.cuda_graph": cuda_graph})
            if unavailable := cuda_graph and graph_unavailable_reason(path_cfg, ctx):
                timings.append({"path": path, "batch_size": batch_size, "seconds_per_epoch": None,
                                "samples_per_s": None, "speedup_vs_dataloader": None,
                                "note": f"unavailable: {unavailable}", "epoch_seconds": []})
                continue
            with _single_rank_process_group(device, cuda_graph) if ddp else contextlib.nullcontext():
                # The harness's own step (or the graph step wrapping it), data already on the device.
                engine = SingleRun(build_trainer(path_cfg, ctx, dataset.to(device)))
                seconds = time_epochs(lambda epoch: train_epoch(engine, epoch), device, epochs)
            timings.append(timing(path, batch_size, samples, seconds, peer["seconds_per_epoch"]))
        progress.batch_done(batch_size, ", ".join(f"{t['path']} {t['seconds_per_epoch']:.3g} s/epoch" for t in timings
                                                  if t["batch_size"] == batch_size and t["seconds_per_epoch"]))
    return {**environment(device, cfg), "train_samples": samples, "epochs_timed": epochs, "timings": timings}


def cpu_name() -> str:
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as cpuinfo:
        return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    return platform.processor() or "cpu"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def environment(device: torch.device, cfg: Config) -> dict:
    """The head of a result's JSON: the device, the software and the model timed, and the date."""
    return {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "model": describe_model(cfg),
            "layer_sizes": list(cfg.layer_sizes) if is_mlp(cfg) else None, "date": time.strftime("%Y-%m-%d")}


@contextlib.contextmanager
def _single_rank_process_group(device: torch.device, capture_collectives: bool):
    """A world of one, in this process (no ports), so DDP can wrap the model."""
    unset = [name for name in COLLECTIVE_CAPTURE_ENV if name not in os.environ]
    if capture_collectives:
        allow_collective_capture()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1, device_id=device if device.type == "cuda" else None)
    try:
        yield
    finally:
        dist.destroy_process_group()
        # The eager DDP path of the next batch size gets NCCL's default settings again (a value the user
        # set is kept by allow_collective_capture, so only what it added goes).
        for name in unset:
            os.environ.pop(name, None)


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

"""``harness scaling --measure``: the cost model (bench/scaling.py) checked against real processes here.

Two processes on 127.0.0.1 (torch.multiprocessing, gloo over loopback TCP) measure:

1. gloo all-reduce times over a sweep of float32 sizes (``ALLREDUCE_SIZES`` plus the config's gradient),
   each the median of at least ``REPEATS`` calls and ``MIN_TIMED_S`` of them, each call timed between a
   barrier and its return on rank 0. ``fit_link`` fits the model's ring formula for W = 2,
   ``t = 2 alpha + n / beta``, to them (least squares on relative error, so small sizes count as much as
   large) and gives the loopback "link": its alpha and beta.
2. the harness's own DDP step (core/trainer.build_trainer, autograd through DDP, gloo) at global batch
   B over 2 ranks, against the same step in one process without a process group at B and at B / 2; and
   the 2-rank step under DDP's ``no_sync`` (both ranks computing at once, no all-reduce), which shows
   what sharing the machine's cores costs the compute, apart from the all-reduce.

Compute shares the cores: each rank runs with one thread (``torch.set_num_threads(1)``), so that two ranks
use two cores of the machine; the one-process steps run with one thread too, which is the fair
"one device" of the model (with two threads the one-process step would have both cores). The predicted
2-rank step is ``compute(B / 2) + all_reduce(2, gradient bytes)`` with the fitted link (no overlap: the
whole gradient is one DDP bucket), printed beside the measured one with their ratio.

Owns the processes, the timing and the fit; the formula is bench/scaling.py's.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.console import say
from harness.core.config import Config
from harness.core.data import load_dataset
from harness.core.distributed import DistContext
from harness.core.trainer import build_trainer
from harness.errors import InputError
from harness.bench.bench import cpu_name
from harness.bench.scaling import Link, all_reduce_s, parameter_count

WORLD_SIZE = 2
THREADS_PER_RANK = 1
ALLREDUCE_SIZES = tuple(4 ** k for k in range(3, 12))  # float32 elements: 64 (256 B) .. 4 Mi (16 MiB)
REPEATS = 5
MIN_TIMED_S = 0.2
MAX_REPEATS = 200
WARMUP = 2
DEFAULT_BATCHES = (32, 128, 512, 2048)
TIMEOUT_S = 120
JOINED_KEY = "harness/scaling/ranks-joined"  # rank 0 sets it in the parent's store once both ranks are in


def check_batches(batches: list[int], train_samples: int) -> None:
    for batch in batches:
        if batch < WORLD_SIZE or batch % WORLD_SIZE or batch > train_samples:
            raise InputError(f"--batch-sizes: {batch}; expected even global batch sizes from {WORLD_SIZE} up to "
                             f"the training set ({train_samples} samples) for {WORLD_SIZE} ranks")


def run_check(cfg: Config, batches: list[int]) -> dict:
    """Both measurements and the comparison (module doc); the JSON-ready result."""
    cfg = cfg.replace(**{"metrics.noise_scale": False, "metrics.sharpness": False, "tracking.enabled": False,
                         "train.progress": False})
    gradient_elements = parameter_count(cfg.layer_sizes)
    sizes = sorted({*ALLREDUCE_SIZES, gradient_elements})
    one_rank = one_process_steps(cfg, sorted({*batches, *(b // WORLD_SIZE for b in batches)}))
    two_rank = spawn_ranks(cfg, sizes, batches)
    link = fit_link([(p["bytes"], p["median_s"]) for p in two_rank["allreduce"]])
    gradient_bytes = gradient_elements * 4
    steps = []
    for batch in batches:
        predicted = one_rank[batch // WORLD_SIZE] + all_reduce_s(WORLD_SIZE, gradient_bytes, link)
        measured = two_rank["steps"][str(batch)]["step_s"]
        steps.append({"global_batch_size": batch, "one_rank_step_s": one_rank[batch],
                      "one_rank_half_batch_step_s": one_rank[batch // WORLD_SIZE], "two_rank_step_s": measured,
                      "two_rank_compute_only_s": two_rank["steps"][str(batch)]["compute_only_s"],
                      "predicted_two_rank_step_s": predicted, "measured_over_predicted": measured / predicted,
                      "measured_speedup": one_rank[batch] / measured, "predicted_speedup": one_rank[batch] / predicted})
    allreduce = [{**p, "predicted_s": all_reduce_s(WORLD_SIZE, p["bytes"], link),
                  "measured_over_predicted": p["median_s"] / all_reduce_s(WORLD_SIZE, p["bytes"], link)}
                 for p in two_rank["allreduce"]]
    return {"machine": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "backend": "gloo",
            "transport": "TCP over 127.0.0.1", "world_size": WORLD_SIZE, "threads_per_rank": THREADS_PER_RANK,
            "config": cfg.name, "layer_sizes": list(cfg.layer_sizes), "gradient_elements": gradient_elements,
            "gradient_bytes": gradient_bytes, "date": time.strftime("%Y-%m-%d"),
            "timing": f"median of at least {REPEATS} calls and {MIN_TIMED_S} s after {WARMUP} warm-up, rank 0",
            "fit": {"formula": "t = 2 (W - 1) alpha + 2 (W - 1) / W * bytes / beta, W = 2",
                    "latency_s": link.latency_s, "bandwidth_bytes_s": link.bandwidth_bytes_s},
            "allreduce": allreduce, "steps": steps}


def fit_link(points: list[tuple[float, float]]) -> Link:
    """Least squares of ``t = a + b n`` with weights 1 / t (relative error); alpha = a / 2, beta = 1 / b (W = 2).

    A negative intercept (latency hidden by noise) is refitted through the origin.
    """
    weights = [1 / t for _, t in points]
    sw = sum(w * w for w in weights)
    swn = sum(w * w * n for (n, _), w in zip(points, weights))
    swt = sum(w * w * t for (_, t), w in zip(points, weights))
    swnn = sum(w * w * n * n for (n, _), w in zip(points, weights))
    swnt = sum(w * w * n * t for (n, t), w in zip(points, weights))
    det = sw * swnn - swn * swn
    intercept = (swnn * swt - swn * swnt) / det
    slope = (sw * swnt - swn * swt) / det
    if intercept < 0:
        intercept, slope = 0.0, swnt / swnn
    # W = 2: 2 (W - 1) = 2 latency steps and 2 (W - 1) / W = 1 times the bytes.
    return Link("loopback-fit", 1 / slope, intercept / 2, "fitted to gloo all-reduce times on 127.0.0.1")


def _timed(call) -> float:
    """Median seconds of ``call``: at least REPEATS and MIN_TIMED_S of them, after WARMUP (one process)."""
    seconds: list[float] = []
    for index in range(MAX_REPEATS + WARMUP):
        started = time.perf_counter()
        call(index)
        if index >= WARMUP:
            seconds.append(time.perf_counter() - started)
        if len(seconds) >= REPEATS and sum(seconds) >= MIN_TIMED_S:
            break
    return statistics.median(seconds)


def _sample_indices(cfg: Config, batch: int, rank: int, world_size: int) -> torch.Tensor:
    # The same B samples in the one-process and the 2-rank steps, split into W equal shares.
    chosen = torch.randperm(cfg.train_set_size, generator=torch.Generator().manual_seed(cfg.seed))[:batch]
    return chosen[rank::world_size]


def one_process_steps(cfg: Config, batches: list[int]) -> dict[int, float]:
    """The eager step in this process, one thread, no process group: seconds per step at each batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS_PER_RANK)
    try:
        dataset = load_dataset(cfg)
        result = {}
        for batch in batches:
            trainer = build_trainer(cfg.replace(**{"optim.global_batch_size": batch}), DistContext(launcher="scaling"),
                                    dataset)
            indices = _sample_indices(cfg, batch, 0, 1)
            result[batch] = _timed(lambda step: trainer.train_step(indices, batch, step))
        return result
    finally:
        torch.set_num_threads(threads)


def spawn_ranks(cfg: Config, sizes: list[int], batches: list[int]) -> dict:
    """Two ranks on 127.0.0.1; rank 0's timings come back through a file in a temporary folder."""
    # This process hosts the store on a port the kernel picks: no race for a free port.
    store = dist.TCPStore("127.0.0.1", 0, WORLD_SIZE + 1, is_master=True, timeout=timedelta(seconds=TIMEOUT_S),
                          wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix="harness-scaling-") as folder:
        out = Path(folder) / "rank0.json"
        ranks = mp.start_processes(_rank_main, args=(WORLD_SIZE, store.port, cfg.to_dict(), sizes, batches, str(out)),
                                   nprocs=WORLD_SIZE, start_method="spawn", join=False)
        try:
            announced = False
            while not ranks.join(timeout=0.5):
                if not announced and store.check([JOINED_KEY]):
                    say(f"{WORLD_SIZE} ranks joined: timing all-reduces, then DDP steps")
                    announced = True
        finally:
            # A SIGTERM to this process (signals.py turns it into an exception) must not leave the ranks
            # behind: inside a gloo collective they ignore the SIGINT that torch sends when the parent dies,
            # and would wait for their peer until the timeout.
            for process in ranks.processes:
                if process.is_alive():
                    process.terminate()
                    process.join(5)
                    if process.is_alive():
                        process.kill()
        return json.loads(out.read_text())


def _rank_main(rank: int, world_size: int, port: int, cfg_dict: dict, sizes: list[int], batches: list[int],
               out: str) -> None:
    torch.set_num_threads(THREADS_PER_RANK)
    store = dist.TCPStore("127.0.0.1", port, world_size + 1, is_master=False, timeout=timedelta(seconds=TIMEOUT_S))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        dist.barrier()
        if rank == 0:
            store.set(JOINED_KEY, "1")
        cfg = Config.from_dict(cfg_dict)
        result = {"allreduce": [_allreduce_point(n) for n in sizes],
                  "steps": {str(b): _ddp_step_s(cfg, rank, world_size, b) for b in batches}}
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
    # Done and written: leave without running C++ destructors at interpreter exit. About one run in three
    # with B = 2048 aborted there ("terminate called without an active exception", SIGABRT in both ranks,
    # after destroy_process_group had returned), and the parent took the abort for a failed measurement.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _agreed(seconds: list[float]) -> bool:
    """Rank 0 decides whether to time more; both ranks must make the same number of collective calls."""
    more = torch.tensor([len(seconds) < REPEATS or (sum(seconds) < MIN_TIMED_S and len(seconds) < MAX_REPEATS)])
    dist.broadcast(more, src=0)
    return bool(more.item())


def _allreduce_point(elements: int) -> dict:
    tensor = torch.ones(elements, dtype=torch.float32)
    for _ in range(WARMUP):
        dist.all_reduce(tensor)
    seconds: list[float] = []
    while _agreed(seconds):
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(tensor)
        seconds.append(time.perf_counter() - started)
    return {"elements": elements, "bytes": 4 * elements, "median_s": statistics.median(seconds), "calls": len(seconds)}


def _ddp_step_s(cfg: Config, rank: int, world_size: int, batch: int) -> dict:
    """Median seconds of the harness's DDP step at global ``batch`` (its all-reduce synchronises the ranks),
    and of the same step under DDP's ``no_sync`` (both ranks computing at once, no all-reduce)."""
    ctx = DistContext(rank=rank, world_size=world_size, launcher="scaling")
    trainer = build_trainer(cfg.replace(**{"optim.global_batch_size": batch}), ctx, _dataset(cfg))
    indices = _sample_indices(cfg, batch, rank, world_size)
    for step in range(WARMUP):
        trainer.train_step(indices, batch, step)
    result = {}
    for name, context in (("step_s", contextlib.nullcontext), ("compute_only_s", trainer.model.no_sync)):
        seconds: list[float] = []
        while _agreed(seconds):
            dist.barrier()
            started = time.perf_counter()
            with context():
                trainer.train_step(indices, batch, WARMUP + len(seconds))
            seconds.append(time.perf_counter() - started)
        result[name] = statistics.median(seconds)
    return result


_DATASETS: dict = {}


def _dataset(cfg: Config):
    # Read once per rank: every batch size trains on the same data set.
    if cfg.name not in _DATASETS:
        _DATASETS[cfg.name] = load_dataset(cfg)
    return _DATASETS[cfg.name]


def format_report(result: dict) -> str:
    fit = result["fit"]
    lines = [f"{result['world_size']} ranks, gloo over {result['transport']}, {result['threads_per_rank']} thread "
             f"per rank, {result['machine']} ({result['cores']} cores); {result['timing']}",
             f"fitted loopback link: alpha = {fit['latency_s'] * 1e6:.3g} us per message, beta = "
             f"{fit['bandwidth_bytes_s'] / 1e9:.3g} GB/s ({fit['formula']})",
             "| bytes | measured ms | predicted ms | measured / predicted |", "|---|---|---|---|"]
    for p in result["allreduce"]:
        mark = " (the gradient)" if p["bytes"] == result["gradient_bytes"] else ""
        lines.append(f"| {p['bytes']:,}{mark} | {p['median_s'] * 1e3:.4g} | {p['predicted_s'] * 1e3:.4g} | "
                     f"{p['measured_over_predicted']:.2f} |")
    lines += ["", f"DDP step of {result['config']} {result['layer_sizes']}, gradient {result['gradient_bytes']:,} B: "
              f"predicted 2-rank step = 1-process step at B/2 + all-reduce (fitted link, no overlap)",
              "| B | 1 process at B, ms | 1 process at B/2, ms | 2 ranks measured, ms | 2 ranks predicted, ms | "
              "measured / predicted | speedup measured | speedup predicted | 2 ranks, compute only (no_sync), ms |",
              "|---" * 9 + "|"]
    for s in result["steps"]:
        lines.append(f"| {s['global_batch_size']} | {s['one_rank_step_s'] * 1e3:.4g} | "
                     f"{s['one_rank_half_batch_step_s'] * 1e3:.4g} | {s['two_rank_step_s'] * 1e3:.4g} | "
                     f"{s['predicted_two_rank_step_s'] * 1e3:.4g} | {s['measured_over_predicted']:.2f} | "
                     f"{s['measured_speedup']:.2f}x | {s['predicted_speedup']:.2f}x | "
                     f"{s['two_rank_compute_only_s'] * 1e3:.4g} |")
    return "\n".join(lines)

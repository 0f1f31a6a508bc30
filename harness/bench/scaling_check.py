"""``harness scaling --measure``: the cost model (scaling.py) checked against real processes here.

Two processes on 127.0.0.1 (gloo over loopback TCP, one thread each, so two cores) measure gloo
all-reduce times over ``ALLREDUCE_SIZES`` plus the config's gradient, which ``fit_link`` turns into the
loopback "link" (alpha, beta); and the harness's DDP step at global batch B, with and without DDP's
``no_sync`` (the compute alone, sharing the cores). Against them: the same step in one process, one
thread (the model's fair "one device"), at B and at B / 2, and the predicted 2-rank step
``compute(B / 2) + all_reduce(2, gradient bytes)`` with the fitted link (no overlap: one DDP bucket).
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

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.console import say
from harness.core.config import Config
from harness.core.data import Dataset, load_dataset
from harness.core.distributed import DistContext
from harness.core.trainer import build_trainer
from harness.errors import InputError
from harness.bench.bench import STEP_ONLY, Repeats, cpu_name, time_calls
from harness.bench.scaling import GRADIENT_ELEMENT_BYTES, Link, all_reduce_s, parameter_count

WORLD_SIZE = 2
THREADS_PER_RANK = 1
ALLREDUCE_SIZES = tuple(4 ** k for k in range(3, 12))  # float32 elements: 64 (256 B) .. 4 Mi (16 MiB)
TIMING = Repeats(warmup=2, calls=5, min_s=0.2, max_calls=200)
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
    cfg = cfg.replace(**STEP_ONLY, **{"train.progress": False})
    gradient_elements = parameter_count(cfg.layer_sizes)
    one_rank = one_process_steps(cfg, sorted({*batches, *(b // WORLD_SIZE for b in batches)}))
    two_rank = spawn_ranks(cfg, sorted({*ALLREDUCE_SIZES, gradient_elements}), batches)
    link = fit_link([(p["bytes"], p["median_s"]) for p in two_rank["allreduce"]])
    gradient_bytes = gradient_elements * GRADIENT_ELEMENT_BYTES
    steps = []
    for batch in batches:
        predicted = one_rank[batch // WORLD_SIZE] + all_reduce_s(WORLD_SIZE, gradient_bytes, link)
        measured = two_rank["steps"][str(batch)]["step_s"]
        steps.append({"global_batch_size": batch, "one_rank_step_s": one_rank[batch],
                      "one_rank_half_batch_step_s": one_rank[batch // WORLD_SIZE], "two_rank_step_s": measured,
                      "two_rank_compute_only_s": two_rank["steps"][str(batch)]["compute_only_s"],
                      "predicted_two_rank_step_s": predicted, "measured_over_predicted": measured / predicted,
                      "measured_speedup": one_rank[batch] / measured, "predicted_speedup": one_rank[batch] / predicted})
    allreduce = [{**p, "predicted_s": (model_s := all_reduce_s(WORLD_SIZE, p["bytes"], link)),
                  "measured_over_predicted": p["median_s"] / model_s} for p in two_rank["allreduce"]]
    return {"machine": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "backend": "gloo",
            "transport": "TCP over 127.0.0.1", "world_size": WORLD_SIZE, "threads_per_rank": THREADS_PER_RANK,
            "config": cfg.name, "layer_sizes": list(cfg.layer_sizes), "gradient_elements": gradient_elements,
            "gradient_bytes": gradient_bytes, "date": time.strftime("%Y-%m-%d"),
            "timing": f"median of at least {TIMING.calls} calls and {TIMING.min_s} s after {TIMING.warmup} warm-up, "
                      "rank 0",
            "fit": {"formula": "t = 2 (W - 1) alpha + 2 (W - 1) / W * bytes / beta, W = 2",
                    "latency_s": link.latency_s, "bandwidth_bytes_s": link.bandwidth_bytes_s},
            "allreduce": allreduce, "steps": steps}


def fit_link(points: list[tuple[float, float]]) -> Link:
    """Least squares of ``t = a + b n`` with weights 1 / t (relative error, so small sizes count as much as
    large); alpha = a / 2, beta = 1 / b (W = 2). A negative intercept (latency hidden by noise) is refitted
    through the origin."""
    n, t = np.array(points, dtype=np.float64).T
    slope, intercept = np.polyfit(n, t, 1, w=1 / t)
    if intercept < 0:
        intercept, slope = 0.0, np.sum(n / t) / np.sum((n / t) ** 2)
    # W = 2: 2 (W - 1) = 2 latency steps and 2 (W - 1) / W = 1 times the bytes.
    return Link("loopback-fit", float(1 / slope), float(intercept / 2), "fitted to gloo all-reduce times on 127.0.0.1")


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
            result[batch] = statistics.median(time_calls(lambda step: trainer.train_step(indices, batch, step),
                                                         torch.device("cpu"), TIMING))
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
        result = {"allreduce": [_allreduce_point(n) for n in sizes]}
        dataset = load_dataset(cfg)  # read once: every batch size trains on the same data set
        result["steps"] = {str(b): _ddp_step_s(cfg, dataset, rank, world_size, b) for b in batches}
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


def _time_together(call) -> list[float]:
    """Seconds of each ``call(index)`` after a barrier, as many as rank 0's ``TIMING`` asks for: both
    ranks must make the same number of collective calls."""
    seconds: list[float] = []
    while True:
        more = torch.tensor([TIMING.wants_more(seconds)])
        dist.broadcast(more, src=0)
        if not more.item():
            return seconds
        dist.barrier()
        started = time.perf_counter()
        call(len(seconds))
        seconds.append(time.perf_counter() - started)


def _allreduce_point(elements: int) -> dict:
    tensor = torch.ones(elements, dtype=torch.float32)
    for _ in range(TIMING.warmup):
        dist.all_reduce(tensor)
    seconds = _time_together(lambda _: dist.all_reduce(tensor))
    return {"elements": elements, "bytes": 4 * elements, "median_s": statistics.median(seconds), "calls": len(seconds)}


def _ddp_step_s(cfg: Config, dataset: Dataset, rank: int, world_size: int, batch: int) -> dict:
    """Median seconds of the harness's DDP step at global ``batch`` (its all-reduce synchronises the ranks),
    and of the same step under DDP's ``no_sync`` (both ranks computing at once, no all-reduce)."""
    ctx = DistContext(rank=rank, world_size=world_size, launcher="scaling")
    trainer = build_trainer(cfg.replace(**{"optim.global_batch_size": batch}), ctx, dataset)
    indices = _sample_indices(cfg, batch, rank, world_size)
    for step in range(TIMING.warmup):
        trainer.train_step(indices, batch, step)
    result = {}
    for name, context in (("step_s", contextlib.nullcontext), ("compute_only_s", trainer.model.no_sync)):
        def step(index: int) -> None:
            with context():
                trainer.train_step(indices, batch, TIMING.warmup + index)

        result[name] = statistics.median(_time_together(step))
    return result


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
    lines += [f"| {s['global_batch_size']} | {s['one_rank_step_s'] * 1e3:.4g} | "
              f"{s['one_rank_half_batch_step_s'] * 1e3:.4g} | {s['two_rank_step_s'] * 1e3:.4g} | "
              f"{s['predicted_two_rank_step_s'] * 1e3:.4g} | {s['measured_over_predicted']:.2f} | "
              f"{s['measured_speedup']:.2f}x | {s['predicted_speedup']:.2f}x | "
              f"{s['two_rank_compute_only_s'] * 1e3:.4g} |" for s in result["steps"]]
    return "\n".join(lines)

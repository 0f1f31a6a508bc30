"""``harness capacity``: the note's hardware claims, measured on this device.

A device runs a mini-batch in parallel, so a larger batch costs little more time per update, until the
device's size caps the batch. Measured for the config's model (the note's MLP or model.factory's) with the
harness's own eager step (one process, no DDP, data on
the device) at batch sizes 1, 2, 4, ... up to the first of ``--max-batch``, the training set, the
``--memory-limit`` or (CUDA) an out-of-memory error: the median time per step (``STEP_REPEATS``) and per
sample; one epoch of ``epoch_samples`` through the trainer's own loop; the peak memory (on CUDA
``max_memory_allocated``, on the CPU ``step_tensor_bytes``, not the RSS that caching and the data blur).

Written into the JSON and the table: **flat until** (``FLAT_DEFINITION``: up to it a step costs about
the same whatever the batch), the **largest** measured batch and what stopped the doubling
(``cap_reason``), and **beyond it**: 2x, 4x, 8x the largest as accumulated micro-batches of the largest.
The figure is harness/analysis/plots.py's ``capacity``.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from harness.console import say
from harness.core.config import Config
from harness.core.data import Dataset, load_dataset
from harness.core.distributed import DistContext
from harness.core.factories import check_model_output
from harness.core.model import build_model, is_mlp, summed_loss
from harness.core.precision import forward_context
from harness.core.step import unwrap
from harness.core.trainer import SingleRun, Trainer, build_trainer, train_epoch
from harness.errors import InputError
from harness.bench.bench import STEP_ONLY, Repeats, _synchronise, environment, time_calls

FLAT_FACTOR = 1.5
STEP_REPEATS = Repeats(warmup=2, calls=5, min_s=0.25, max_calls=500)
GROWTH_FACTORS = (2, 4, 8)
METRIC_PREFIX = "capacity/"  # MLflow keys: capacity/step_s, ..., step = batch size
ARTIFACT_FOLDER = "capacity"
GB = 1e9
CPU_MEMORY_MEANS = ("tensor bytes of the step: parameters, gradients, optimizer state and the tensors autograd "
                    "saves for the backward (saved_tensors_hooks); not the process RSS")
CUDA_MEMORY_MEANS = ("torch.cuda.max_memory_allocated over the steps and the epoch, reset before the trainer was "
                     "built (the resident data set included)")
FLAT_DEFINITION = (f"the largest batch b such that every measured batch b' <= b takes at most {FLAT_FACTOR}x "
                   "the fastest median time per step among the batches <= b'")


@dataclass
class BatchPoint:
    batch_size: int
    step_s: float  # median of the timed steps
    sample_s: float  # step_s / batch_size
    epoch_s: float
    epoch_samples: int
    memory_bytes: int
    step_s_all: list[float]


def batch_sizes(max_batch: int, train_samples: int) -> list[int]:
    """1, 2, 4, ... up to min(max_batch, train_samples)."""
    limit = min(max_batch, train_samples)
    return [2**k for k in range(int(math.log2(limit)) + 1)] if limit >= 1 else []


def flat_until(step_seconds: dict[int, float], factor: float = FLAT_FACTOR) -> Optional[int]:
    """The largest batch up to which every step takes at most ``factor`` x the fastest step of the batches
    before it and itself (``FLAT_DEFINITION``)."""
    flat, fastest = None, math.inf
    # The running minimum, not batch 1's time alone: a first batch slowed by a one-off (lazy kernel set-up,
    # another process on a shared CPU) would otherwise make every later batch look flat.
    for batch in sorted(step_seconds):
        fastest = min(fastest, step_seconds[batch])
        if step_seconds[batch] > factor * fastest:
            break
        flat = batch
    return flat


def accumulation_plans(largest: int, factors: tuple[int, ...] = GROWTH_FACTORS) -> list[dict]:
    """How a global batch ``factor`` x ``largest`` is trained: micro-batches of ``largest``, accumulated."""
    return [{"global_batch_size": factor * largest, "micro_batch_size": largest, "accumulation_steps": factor,
             "overrides": f"--set optim.global_batch_size={factor * largest} --set optim.micro_batch_size={largest}"}
            for factor in factors]


def check_arguments(max_batch: int, memory_limit_gb: Optional[float],
                    epoch_samples: Optional[int]) -> None:
    """The command's own numbers, before any work (the device: cli.py, ``distributed.pick_device``)."""
    if max_batch < 1:
        raise InputError(f"--max-batch: {max_batch}; expected a positive batch size")
    if memory_limit_gb is not None and not memory_limit_gb > 0:
        raise InputError(f"--memory-limit: {memory_limit_gb:g} GB; expected a positive number of GB")
    if epoch_samples is not None and epoch_samples < 1:
        raise InputError(f"--epoch-samples: {epoch_samples}; expected a positive number of samples")


def run_capacity(cfg: Config, device: torch.device, max_batch: int, memory_limit_gb: Optional[float] = None,
                 epoch_samples: Optional[int] = None) -> dict:
    """Measure every batch size (module doc); returns the JSON-ready result."""
    cfg = cfg.replace(**STEP_ONLY, **{"train.progress": False})
    dataset = load_dataset(cfg).to(device)
    if not is_mlp(cfg):  # the user's model, run on two samples before anything is timed or recorded
        check_model_output(build_model(cfg), dataset.train.features, dataset.train.targets, cfg.num_classes,
                           cfg.model.factory)
    samples = min(epoch_samples or len(dataset.train), len(dataset.train))
    points: list[BatchPoint] = []
    cap_reason = "--max-batch" if max_batch <= len(dataset.train) else "the training set's size"
    for batch in batch_sizes(max_batch, len(dataset.train)):
        try:
            point = measure_batch(cfg, dataset, device, batch, samples)
        except torch.cuda.OutOfMemoryError:
            cap_reason = f"CUDA out of memory at batch {batch}"
            torch.cuda.empty_cache()
            break
        if memory_limit_gb is not None and point.memory_bytes > memory_limit_gb * GB:
            if not points:  # nothing can run: refused before any MLflow run exists
                raise InputError(f"--memory-limit: {memory_limit_gb:g} GB is below one sample's memory "
                                 f"({point.memory_bytes / GB:.3g} GB at batch 1); expected at least that")
            cap_reason = f"--memory-limit {memory_limit_gb:g} GB (batch {batch} needs {point.memory_bytes / GB:.3g} GB)"
            break
        points.append(point)
        say(f"  batch {batch:>6}: {point.step_s * 1e3:9.3f} ms/step, {point.epoch_s:8.3f} s/epoch, "
            f"{point.memory_bytes / 2**20:9.1f} MiB")
    if not points:
        raise InputError(f"--device: {cap_reason}; expected a device with room for one sample's step")
    largest = points[-1].batch_size
    return {**environment(device, cfg), "device": device.type, "config": cfg.name,
            "precision": cfg.performance.precision, "max_batch": max_batch, "memory_limit_gb": memory_limit_gb,
            "epoch_samples": samples, "warmup_steps": STEP_REPEATS.warmup, "step_repeats": STEP_REPEATS.calls,
            "min_timed_seconds": STEP_REPEATS.min_s,
            "memory_means": CUDA_MEMORY_MEANS if device.type == "cuda" else CPU_MEMORY_MEANS,
            "flat_factor": FLAT_FACTOR, "flat_definition": FLAT_DEFINITION,
            "flat_until_batch": flat_until({p.batch_size: p.step_s for p in points}),
            "largest_batch": largest, "cap_reason": cap_reason,
            "beyond_largest": accumulation_plans(largest),
            "points": [asdict(p) for p in points]}


def measure_batch(cfg: Config, dataset: Dataset, device: torch.device, batch: int, epoch_samples: int) -> BatchPoint:
    """Time steps and an epoch at ``batch``; the peak memory (module doc)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer = build_trainer(cfg.replace(**{"optim.global_batch_size": batch}), DistContext(device=device,
                                                                                          launcher="capacity"), dataset)
    indices = torch.randperm(len(dataset.train), generator=torch.Generator().manual_seed(cfg.seed))[:batch].to(device)
    seconds = time_calls(lambda step: trainer.train_step(indices, batch, step), device, STEP_REPEATS)
    started = time.perf_counter()
    # Its loss all-reduce ends in a host sync. A batch larger than epoch_samples trains one whole batch.
    _, trained_samples, _ = train_epoch(SingleRun(trainer), 1, STEP_REPEATS.warmup + len(seconds),
                                        math.ceil(epoch_samples / batch))
    _synchronise(device)
    epoch_s = time.perf_counter() - started
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else step_tensor_bytes(trainer, indices)
    step_s = statistics.median(seconds)
    return BatchPoint(batch, step_s, step_s / batch, epoch_s, trained_samples, memory, seconds)


def step_tensor_bytes(trainer: Trainer, indices: torch.Tensor) -> int:
    """Parameters, gradients and optimizer state, plus what autograd saves for one step's backward (counted by
    ``saved_tensors_hooks``, a weight saved for the backward not counted twice): the CPU memory."""
    model = unwrap(trainer.model)
    state = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    state += [t for blocks in trainer.optimizer.state.values() for t in blocks]
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in held:  # a weight saved for the backward is already counted
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    x, y = trainer.train_set.batch(indices)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = summed_loss(model, x, y, forward_context(trainer.cfg.performance.precision, indices.device.type))
    del loss
    return sum(held.values()) + sum(saved.values())


def format_table(result: dict) -> str:
    flat, largest = result["flat_until_batch"], result["largest_batch"]
    lines = [f"device {result['device']} ({result['device_name']}), torch {result['torch']}, "
             f"{result['threads']} threads, model {result['model']}, {result['precision']}; step = median of at "
             f"least {result['step_repeats']} steps and {result['min_timed_seconds']} s after {result['warmup_steps']} "
             f"warm-up; epoch = {result['epoch_samples']} samples",
             "| batch | ms/step | µs/sample | s/epoch (samples) | memory MiB | |", "|---|---|---|---|---|---|"]
    for p in result["points"]:
        mark = "; ".join(label for label, batch in (("flat until here", flat), ("largest measured", largest))
                         if p["batch_size"] == batch)
        lines.append(f"| {p['batch_size']} | {p['step_s'] * 1e3:.3f} | {p['sample_s'] * 1e6:.2f} | "
                     f"{p['epoch_s']:.3f} ({p['epoch_samples']}) | {p['memory_bytes'] / 2**20:.1f} | {mark} |")
    lines += [f"flat until batch {flat}: {result['flat_definition']}",
              f"largest batch {largest} (stopped by {result['cap_reason']})",
              f"memory: {result['memory_means']}",
              "beyond it: " + "; ".join(f"global {plan['global_batch_size']} = micro {plan['micro_batch_size']} x "
                                        f"{plan['accumulation_steps']} accumulation steps"
                                        for plan in result["beyond_largest"])]
    return "\n".join(lines)


def write_outputs(result: dict, directory: Path) -> list[Path]:
    """The JSON and the plot in ``directory``; the files for MLflow."""
    from harness.analysis import plots  # matplotlib only where a figure is drawn

    return plots.json_and_figure(result, directory, "capacity", plots.capacity)


def record(uri: str, experiment: str, result: dict, files: list[Path], config_path: str) -> str:
    """An MLflow run of its own (run_kind=capacity): params, one metric per batch (step = batch size), the files."""
    from harness.records.mlflow_store import record_finished_run
    from harness.records.tracking import git_commit

    tags = {"run_kind": "capacity", "git_commit": git_commit(),
            "mlflow.note.content": (f"Time per step, per sample, per epoch and peak memory against the batch size "
                                    f"on {result['device_name']}. Metrics `{METRIC_PREFIX}*` have step = batch "
                                    f"size. Flat until batch {result['flat_until_batch']}: "
                                    f"{result['flat_definition']}. Memory: {result['memory_means']}.")}
    params = {key: result[key] for key in ("device", "device_name", "model", "precision", "max_batch",
                                           "memory_limit_gb", "epoch_samples", "torch", "threads")}
    params.update(config=config_path, config_name=result["config"], cap_reason=result["cap_reason"][:250])
    metrics = [(METRIC_PREFIX + key, float(p[key]), p["batch_size"]) for p in result["points"]
               for key in ("step_s", "sample_s", "epoch_s", "memory_bytes")]
    metrics += [(METRIC_PREFIX + key, float(result[key]), 0) for key in ("flat_until_batch", "largest_batch")]
    return record_finished_run(uri, experiment, f"capacity {result['device']} {result['config']}", tags, params,
                               metrics, files, ARTIFACT_FOLDER)

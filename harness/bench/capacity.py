"""``harness capacity``: the note's hardware claims, measured on this device.

The note says a device runs a mini-batch in parallel, so a larger batch costs little
more time per update, until the device's size caps the batch. This module measures
both halves with the harness's own eager step (core/step.py, built by
``trainer.build_trainer``: one process, no DDP, data resident on the device), at
batch sizes 1, 2, 4, ... up to the first of: ``--max-batch``, the training set, the
``--memory-limit``, or (CUDA) the first ``torch.cuda.OutOfMemoryError``:

- time per step: the median of at least ``STEP_REPEATS`` optimizer steps and at least
  ``MIN_TIMED_SECONDS`` of them (up to ``MAX_STEP_REPEATS``), after ``WARMUP_STEPS`` warm-up steps, each synchronised on CUDA (harness/bench/bench.py's
  ``_synchronise``); time per sample = time per step / batch;
- time per epoch: one pass over ``epoch_samples`` samples (the training set, or a cap,
  so that batch 1 stays short on a CPU) through the trainer's own epoch loop;
- peak memory: on CUDA ``torch.cuda.max_memory_allocated`` since a reset before the
  trainer was built (the resident data set included); on the CPU the bytes of the
  step's tensors: parameters, gradients, optimizer state, and the tensors autograd keeps
  for the backward of one step (counted by ``torch.autograd.graph.saved_tensors_hooks``,
  the parameters themselves not counted twice). The CPU number is what the step holds,
  not the process's RSS (which the allocator's caching and the data set blur).

Definitions, also written into the JSON and the table:

- **flat until** (where the device's parallelism is used up): the largest batch ``b``
  such that every measured batch ``b' <= b`` takes at most ``FLAT_FACTOR`` (1.5) times
  the fastest median step among the batches up to ``b'`` (batch 1's, unless a one-off
  slowed it). Up to it a step costs about the same whatever the batch; past it, time
  per step grows with the batch and time per sample stops falling.
- **largest that fits**: the largest measured batch; ``cap_reason`` says what stopped
  the doubling (on a CPU that is ``--max-batch``, the training set or ``--memory-limit``,
  not the hardware).
- **beyond it**: a global batch of 2x, 4x, 8x the largest is trained as micro-batches of
  the largest with accumulation = global / micro (``optim.micro_batch_size``).

Owns the measurement, the analysis (pure functions: ``flat_until``, ``accumulation_plans``),
the table, the JSON and the MLflow run (run_kind=capacity). The figure is
harness/analysis/plots.py's ``capacity``. Reuses bench.py's device naming and synchronisation.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from harness.console import say
from harness.core.config import Config
from harness.core.data import Dataset, load_dataset
from harness.core.distributed import DistContext
from harness.core.precision import forward_context
from harness.core.step import unwrap
from harness.core.trainer import SingleRun, Trainer, build_trainer, train_epoch
from harness.errors import InputError
from harness.bench.bench import _synchronise, cpu_name

FLAT_FACTOR = 1.5
WARMUP_STEPS = 2
STEP_REPEATS = 5
MIN_TIMED_SECONDS = 0.25
MAX_STEP_REPEATS = 500
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
    before it and itself (module doc)."""
    if not step_seconds:
        return None
    batches = sorted(step_seconds)
    # The running minimum, not batch 1's time alone: a first batch slowed by a one-off (lazy kernel set-up,
    # another process on a shared CPU) would otherwise make every later batch look flat.
    fastest = step_seconds[batches[0]]
    flat = batches[0]
    for batch in batches[1:]:
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
    # The step alone: the probe and the end-of-run measurements are a study's, not the step's.
    cfg = cfg.replace(**{"metrics.noise_scale": False, "metrics.sharpness": False, "tracking.enabled": False,
                         "train.progress": False})
    dataset = load_dataset(cfg).to(device)
    samples = min(epoch_samples or len(dataset.train), len(dataset.train))
    limit_bytes = memory_limit_gb * GB if memory_limit_gb is not None else None
    points: list[BatchPoint] = []
    sizes = batch_sizes(max_batch, len(dataset.train))
    cap_reason = "--max-batch" if max_batch <= len(dataset.train) else "the training set's size"
    for batch in sizes:
        try:
            point = measure_batch(cfg, dataset, device, batch, samples)
        except torch.cuda.OutOfMemoryError:
            cap_reason = f"CUDA out of memory at batch {batch}"
            torch.cuda.empty_cache()
            break
        if limit_bytes is not None and point.memory_bytes > limit_bytes:
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
    return analyse(points, cap_reason, _describe(cfg, device, samples, max_batch, memory_limit_gb))


def analyse(points: list[BatchPoint], cap_reason: str, header: dict) -> dict:
    """The measured points with the flat range, the cap and the accumulation plans beyond it."""
    largest = points[-1].batch_size
    return {**header,
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
    seconds: list[float] = []
    step = 0
    # At least STEP_REPEATS timed steps, and at least MIN_TIMED_SECONDS of them: a step at batch 1
    # takes well under a millisecond, and the median of five such steps moved by 2x between runs.
    while len(seconds) < STEP_REPEATS or (sum(seconds) < MIN_TIMED_SECONDS and len(seconds) < MAX_STEP_REPEATS):
        _synchronise(device)
        started = time.perf_counter()
        trainer.train_step(indices, batch, step)
        _synchronise(device)
        if step >= WARMUP_STEPS:
            seconds.append(time.perf_counter() - started)
        step += 1
    steps = math.ceil(epoch_samples / batch)
    started = time.perf_counter()
    # Its loss all-reduce ends in a host sync. A batch larger than epoch_samples trains one whole batch.
    _, trained_samples, _ = train_epoch(SingleRun(trainer), 1, step, steps)
    _synchronise(device)
    epoch_s = time.perf_counter() - started
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device)
    else:
        memory = step_tensor_bytes(trainer, indices)
    step_s = statistics.median(seconds)
    return BatchPoint(batch, step_s, step_s / batch, epoch_s, trained_samples, memory, seconds)


def step_tensor_bytes(trainer: Trainer, indices: torch.Tensor) -> int:
    """Parameters, gradients and optimizer state, plus what autograd saves for one step's backward (CPU memory)."""
    model = unwrap(trainer.model)
    state = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
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
        with forward_context(trainer.cfg.performance.precision, indices.device.type)():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
    del loss, logits
    return sum(held.values()) + sum(saved.values())


def _describe(cfg: Config, device: torch.device, epoch_samples: int, max_batch: int,
              memory_limit_gb: Optional[float]) -> dict:
    return {"device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "config": cfg.name,
            "layer_sizes": list(cfg.layer_sizes), "precision": cfg.performance.precision,
            "max_batch": max_batch, "memory_limit_gb": memory_limit_gb, "epoch_samples": epoch_samples,
            "warmup_steps": WARMUP_STEPS, "step_repeats": STEP_REPEATS, "min_timed_seconds": MIN_TIMED_SECONDS,
            "memory_means": CUDA_MEMORY_MEANS if device.type == "cuda" else CPU_MEMORY_MEANS,
            "date": time.strftime("%Y-%m-%d")}


def format_table(result: dict) -> str:
    flat, largest = result["flat_until_batch"], result["largest_batch"]
    lines = [f"device {result['device']} ({result['device_name']}), torch {result['torch']}, "
             f"{result['threads']} threads, layers {result['layer_sizes']}, {result['precision']}; step = median of at "
             f"least {result['step_repeats']} steps and {result['min_timed_seconds']} s after {result['warmup_steps']} "
             f"warm-up; epoch = "
             f"{result['epoch_samples']} samples",
             "| batch | ms/step | µs/sample | s/epoch (samples) | memory MiB | |", "|---|---|---|---|---|---|"]
    for p in result["points"]:
        mark = "flat until here" if p["batch_size"] == flat else ""
        if p["batch_size"] == largest:
            mark = (mark + "; " if mark else "") + "largest measured"
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

    directory.mkdir(parents=True, exist_ok=True)
    files = [directory / "capacity.json", directory / "capacity.png"]
    files[0].write_text(json.dumps(result, indent=2))
    plots.capacity(result, files[1])
    return files


def record(uri: str, experiment: str, result: dict, files: list[Path], config_path: str) -> str:
    """An MLflow run of its own (run_kind=capacity): params, one metric per batch (step = batch size), the files.

    Ended FINISHED, or FAILED/KILLED by whatever interrupts it; never left RUNNING.
    """
    from harness.records.mlflow_store import record_finished_run
    from harness.records.tracking import git_commit

    tags = {"run_kind": "capacity", "git_commit": git_commit(),
            "mlflow.note.content": (f"Time per step, per sample, per epoch and peak memory against the batch size "
                                    f"on {result['device_name']}. Metrics `{METRIC_PREFIX}*` have step = batch "
                                    f"size. Flat until batch {result['flat_until_batch']}: "
                                    f"{result['flat_definition']}. Memory: {result['memory_means']}.")}
    params = {"device": result["device"], "device_name": result["device_name"], "config": config_path,
              "config_name": result["config"], "layer_sizes": result["layer_sizes"],
              "precision": result["precision"], "max_batch": result["max_batch"],
              "memory_limit_gb": result["memory_limit_gb"], "epoch_samples": result["epoch_samples"],
              "torch": result["torch"], "threads": result["threads"], "cap_reason": result["cap_reason"][:250]}
    metrics = [(METRIC_PREFIX + key, float(p[key]), p["batch_size"]) for p in result["points"]
               for key in ("step_s", "sample_s", "epoch_s", "memory_bytes")]
    metrics += [(METRIC_PREFIX + "flat_until_batch", float(result["flat_until_batch"]), 0),
                (METRIC_PREFIX + "largest_batch", float(result["largest_batch"]), 0)]
    return record_finished_run(uri, experiment, f"capacity {result['device']} {result['config']}", tags, params,
                               metrics, files, ARTIFACT_FOLDER)

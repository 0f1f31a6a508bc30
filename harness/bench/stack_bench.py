"""``harness bench --stack K``: K trials trained as one stacked model against the same K trials one after another.

Both sides train the same K trials (the config's, with seeds seed, seed+1, ...,
seed+K-1: own initial weights, own data order) on one copy of the data (the
config's split, as a local sweep's trials share it) from the same initial
weights, in this process, one warm-up epoch each, then in rounds: per round
one timed epoch of each side in turn (bench.py ``time_interleaved``), so a
slow spell of the machine falls on every side of its rounds alike:

- ``sequential``: each trial's epoch through the harness's step (core/step.py
  via trainer.build_trainer; on CUDA its graph step, core/graph_step.py),
  trial after trial;
- ``stacked``: one epoch of core/stacked.py's StackedTrainer, all K at once (on
  CUDA replayed from core/graph_step.py's graphs).

One "epoch" is one epoch of every trial on both sides, so the ratio
sequential / stacked is the speed-up of the whole stack. Each side's time is its
fastest timed epoch: on a shared machine a slow spell (one trial's epoch taking
nearly twice as long for seconds at a time) only ever adds time, and it adds more to the sequential
side's many small operations than to the stack's few large ones, so a median or
a ratio of rounds taken in a spell would flatter the stack. The rounds give both
sides the same chances at an undisturbed epoch. Ratios are against the peer
measured in the same process, never against a number from elsewhere.

A third column bounds what any stack could gain: ``matmuls`` times only the
stacked step's matrix products for the same epoch (each layer's forward, weight
gradient and delta, batched over the K members), with nothing else: no
activations, loss, update, gathering or launch of anything but those products.
Neither side can train an epoch in less than its arithmetic takes, so
sequential / matmuls is the most a stack of these K trials can gain here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from harness.core.config import Config
from harness.core.data import load_dataset
from harness.core.distributed import DistContext
from harness.core.stacked import StackedTrainer
from harness.core.stacked_run import use_graph_step
from harness.core.trainer import SingleRun, build_trainer, train_epoch
from harness.bench.bench import cpu_name, time_interleaved


def stack_members(cfg: Config, stack: int) -> list[Config]:
    """The K trials: the config's, one per seed from cfg.seed on (a seed sweep of one batch size)."""
    return [cfg.replace(**{"seed": cfg.seed + k, "name": f"{cfg.name}-stack{k}"}) for k in range(stack)]


def run_stack_benchmark(cfg: Config, device: torch.device, batch_sizes: list[int], epochs: int, stack: int,
                        profile_dir: Optional[Path] = None) -> dict:
    """Time K trials stacked against the same K one after another at every batch size; the JSON-ready result.
    ``profile_dir``: also profile one more epoch of each side per batch size there (``profile_epochs``)."""
    # As harness bench: the step alone, without the probes a study switches on.
    # On CUDA both sides take the graph step (core/graph_step.py, one trial at a time or the
    # whole stack): each side at its fastest, the comparison the stack has to win.
    graph = device.type == "cuda"
    cfg = cfg.replace(**{"metrics.noise_scale": False, "metrics.sharpness": False, "tracking.enabled": False,
                         "performance.cuda_graph": graph})
    members = stack_members(cfg, stack)
    datasets = [load_dataset(cfg).to(device)] * stack  # one copy, as the trials of a local sweep share it
    rows = []
    for batch_size in batch_sizes:
        trials = [m.replace(**{"optim.global_batch_size": batch_size}) for m in members]
        engines = [SingleRun(build_trainer(t, DistContext(device=device, launcher="bench"), d))
                   for t, d in zip(trials, datasets)]

        def sequential_epoch(epoch: int) -> None:
            for engine in engines:
                train_epoch(engine, epoch)

        def stacked_epoch(epoch: int) -> None:
            train_epoch(stacked, epoch)

        stacked = StackedTrainer(trials, [d.train for d in datasets], device)
        if graph:
            use_graph_step(stacked, stack, stacked.ctx)
        seconds = time_interleaved({"sequential": sequential_epoch, "stacked": stacked_epoch,
                                    "matmuls": matmuls_only_epoch(stacked)}, device, epochs)
        if profile_dir is not None:
            def one_trial_alone(epoch: int) -> None:
                train_epoch(engines[0], epoch)

            profile_epochs(profile_dir / f"stack{stack}-batch{batch_size}.txt", device, epochs + 1,
                           {f"the stack of {stack}": stacked_epoch, "one trial alone": one_trial_alone},
                           stacked.steps_per_epoch)
        engines.clear()
        sequential_s, stacked_s, matmuls_s = seconds["sequential"], seconds["stacked"], seconds["matmuls"]
        sequential, together, matmuls = min(sequential_s), min(stacked_s), min(matmuls_s)
        rows.append({"batch_size": batch_size, "sequential_s_per_epoch": sequential,
                     "stacked_s_per_epoch": together, "speedup": sequential / together,
                     "matmuls_s_per_epoch": matmuls, "speedup_bound": sequential / matmuls,
                     "sequential_epoch_seconds": sequential_s, "stacked_epoch_seconds": stacked_s,
                     "matmuls_epoch_seconds": matmuls_s})
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "stack": stack,
        "cuda_graph": graph,
        "train_samples": len(datasets[0].train),
        "epochs_timed": epochs,
        "layer_sizes": list(cfg.layer_sizes),
        "date": time.strftime("%Y-%m-%d"),
        "timings": rows,
    }


def profile_epochs(path: Path, device: torch.device, epoch: int, sides: dict, steps: int) -> None:
    """One epoch of each of ``sides`` under ``torch.profiler`` (with the CUDA kernels on a GPU, those a
    graph replays included), each side's operators and kernels as a table, into ``path``: where a step's
    time goes, per operator or kernel and per call, and how many calls a step makes (calls / ``steps``)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    tables = []
    for name, run_epoch in sides.items():
        with profile(activities=activities) as prof:
            run_epoch(epoch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        tables.append(f"== {name}: one epoch of {steps} steps, {device} "
                      f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_name()})\n"
                      + prof.key_averages().table(sort_by=sort_by, row_limit=40))
    path.write_text("\n\n".join(tables) + "\n")


def matmuls_only_epoch(stacked: StackedTrainer):
    """``run_epoch(epoch)`` of only the matrix products of ``stacked``'s steps: per step, each layer's
    forward (``baddbmm``), weight gradient (``bmm``, or ``baddbmm_`` where the step folds it into the
    momentum) and, below the last layer, delta (``bmm``), for all members
    and the epoch's batch sizes (the uneven last batch included), into buffers made once. The inputs are
    zeros: a product's time does not depend on its values."""
    model = stacked.model
    sizes = [indices.shape[1] for indices, _ in stacked.local_batches(0)]  # the step's own batches
    widths = [model.weights[0].shape[2]] + [w.shape[1] for w in model.weights]
    members = model.num_members
    # As the step: on a CPU, at most members_per_pass members per pass (core/stacked.py CPU_PASS_SAMPLES).
    passes = {size: [slice(first, first + model.members_per_pass(size))
                     for first in range(0, members, model.members_per_pass(size))] for size in set(sizes)}
    activations = [torch.zeros(members, stacked.global_batch_size, width, device=model.weights[0].device)
                   for width in widths]
    deltas = [torch.zeros_like(a) for a in activations]
    # Gradients into a buffer of its own in the step's layout (the same strides): the bench times this epoch
    # between the stack's own epochs, whose state it must not touch.
    weight_grads = model.layout.views(torch.zeros_like(model.flat_gradients))[0::2]
    # Where the step folds the weight gradient into the momentum buffer (StackedTrainer.can_fold), its product is that
    # baddbmm_; the bench's stack trains every member, so folding depends only on the batch's size.
    folds = {size: stacked.can_fold(size) for size in set(sizes)}
    momentum = stacked.fold_momentum

    def run_epoch(_epoch: int) -> None:
        for size in sizes:
            for rows in passes[size]:
                for depth, (w, b) in enumerate(zip(model.weights, model.biases)):
                    torch.baddbmm(b[rows].unsqueeze(1), activations[depth][rows, :size], w[rows].transpose(1, 2),
                                  out=activations[depth + 1][rows, :size])
                for depth in range(len(model.weights) - 1, -1, -1):
                    delta = deltas[depth + 1][rows, :size]
                    if folds[size]:
                        weight_grads[depth][rows].baddbmm_(delta.transpose(1, 2), activations[depth][rows, :size],
                                                           beta=momentum)
                    else:
                        torch.bmm(delta.transpose(1, 2), activations[depth][rows, :size],
                                  out=weight_grads[depth][rows])
                    if depth > 0:
                        torch.bmm(delta, model.weights[depth][rows], out=deltas[depth][rows, :size])

    return run_epoch


def format_stack_table(result: dict) -> str:
    lines = [f"device {result['device']} ({result['device_name']}), torch {result['torch']}, "
             f"{result['threads']} threads, {result['stack']} trials of {result['train_samples']} samples/epoch, "
             f"fastest of {result['epochs_timed']} epochs each, taken in rounds, CUDA-graph step "
             f"{'on' if result.get('cuda_graph') else 'off'}, matrix products in {result.get('matmuls', 'fp32')}",
             "| batch | sequential s/epoch | stacked s/epoch | speed-up (sequential / stacked) "
             "| matmuls alone s/epoch | bound (sequential / matmuls) |", "|---|---|---|---|---|---|"]
    for row in result["timings"]:
        lines.append(f"| {row['batch_size']} | {row['sequential_s_per_epoch']:.4f} | "
                     f"{row['stacked_s_per_epoch']:.4f} | {row['speedup']:.2f}x | "
                     f"{row['matmuls_s_per_epoch']:.4f} | {row['speedup_bound']:.2f}x |")
    return "\n".join(lines)

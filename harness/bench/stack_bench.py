"""``harness bench --stack K``: K trials trained as one stacked model against the same K one after another.

Both sides train the same K trials (the config's, seeds seed .. seed+K-1) on one copy of the data, as a
local sweep's trials share it; one warm-up epoch each, then one timed epoch of each side per round
(``time_interleaved``): ``sequential`` runs each trial's epoch through the harness's step (on CUDA its
graph step), ``stacked`` one epoch of core/stacked.py's StackedTrainer (on CUDA from graphs). The ratio
is the speed-up of the whole stack. Each side's time is its fastest epoch: a slow spell of a shared
machine only adds time, more to the sequential side's many small operations, so a median would flatter
the stack.

``matmuls`` times only the stacked step's matrix products for the same epoch: no side can train an
epoch faster than its arithmetic, so sequential / matmuls bounds what a stack of these K trials can gain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from harness.core.config import Config
from harness.core.data import load_dataset
from harness.core.distributed import DistContext
from harness.core.stacked import StackedTrainer
from harness.core.stacked_run import use_graph_step
from harness.core.trainer import SingleRun, build_trainer, train_epoch
from harness.bench.bench import STEP_ONLY, BatchProgress, _synchronise, device_name, environment, time_interleaved


def stack_members(cfg: Config, stack: int) -> list[Config]:
    """The K trials: the config's, one per seed from cfg.seed on (a seed sweep of one batch size)."""
    return [cfg.replace(**{"seed": cfg.seed + k, "name": f"{cfg.name}-stack{k}"}) for k in range(stack)]


def run_stack_benchmark(cfg: Config, device: torch.device, batch_sizes: list[int], epochs: int, stack: int,
                        profile_dir: Optional[Path] = None) -> dict:
    """Time K trials stacked against the same K one after another at every batch size; the JSON-ready result.
    ``profile_dir``: also profile one more epoch of each side per batch size there (``profile_epochs``)."""
    # On CUDA both sides take the graph step (one trial at a time or the whole stack): each side at its
    # fastest, the comparison the stack has to win.
    graph = device.type == "cuda"
    cfg = cfg.replace(**STEP_ONLY, **{"performance.cuda_graph": graph})
    dataset = load_dataset(cfg).to(device)  # one copy, as the trials of a local sweep share it
    rows = []
    progress = BatchProgress(batch_sizes, f"bench --stack {stack} on {device.type}: {stack} trials one after another "
                             f"and stacked, each 1 warm-up and {epochs} timed epochs of {len(dataset.train)} samples",
                             "--epochs 1, a smaller --stack or fewer --batch-sizes shorten it")
    for batch_size in batch_sizes:
        trials = stack_members(cfg.replace(**{"optim.global_batch_size": batch_size}), stack)
        engines = [SingleRun(build_trainer(t, DistContext(device=device, launcher="bench"), dataset))
                   for t in trials]
        stacked = StackedTrainer(trials, [dataset.train] * stack, device)
        if graph:
            use_graph_step(stacked, trials[0], stack, stacked.ctx)

        def sequential_epoch(epoch: int) -> None:
            for engine in engines:
                train_epoch(engine, epoch)

        def stacked_epoch(epoch: int) -> None:
            train_epoch(stacked, epoch)

        seconds = time_interleaved({"sequential": sequential_epoch, "stacked": stacked_epoch,
                                    "matmuls": matmuls_only_epoch(stacked)}, device, epochs)
        if profile_dir is not None:
            profile_epochs(profile_dir / f"stack{stack}-batch{batch_size}.txt", device, epochs + 1,
                           {f"the stack of {stack}": stacked_epoch,
                            "one trial alone": lambda epoch: train_epoch(engines[0], epoch)},
                           stacked.steps_per_epoch)
        engines.clear()
        sequential, together, matmuls = (min(seconds[side]) for side in seconds)
        rows.append({"batch_size": batch_size, "sequential_s_per_epoch": sequential,
                     "stacked_s_per_epoch": together, "speedup": sequential / together,
                     "matmuls_s_per_epoch": matmuls, "speedup_bound": sequential / matmuls,
                     **{f"{side}_epoch_seconds": seconds[side] for side in seconds}})
        progress.batch_done(batch_size, f"one after another {sequential:.3g} s/epoch, stacked {together:.3g} s/epoch")
    return {**environment(device, cfg), "stack": stack, "cuda_graph": graph, "train_samples": len(dataset.train),
            "epochs_timed": epochs, "timings": rows}


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
            _synchronise(device)
        tables.append(f"== {name}: one epoch of {steps} steps, {device} ({device_name(device)})\n"
                      + prof.key_averages().table(sort_by=sort_by, row_limit=40))
    path.write_text("\n\n".join(tables) + "\n")


def matmuls_only_epoch(stacked: StackedTrainer):
    """``run_epoch(epoch)`` of only the matrix products of ``stacked``'s steps: per step, each layer's
    forward (``baddbmm``), weight gradient (``bmm``, or ``baddbmm_`` where the step folds it into the
    momentum) and, below the last layer, delta (``bmm``), for all members and the epoch's batch sizes (the
    uneven last batch included), into buffers made once. The inputs are zeros: a product's time does not
    depend on its values."""
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
                                                           beta=stacked.fold_momentum)
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
    lines += [f"| {row['batch_size']} | {row['sequential_s_per_epoch']:.4f} | {row['stacked_s_per_epoch']:.4f} | "
              f"{row['speedup']:.2f}x | {row['matmuls_s_per_epoch']:.4f} | {row['speedup_bound']:.2f}x |"
              for row in result["timings"]]
    return "\n".join(lines)

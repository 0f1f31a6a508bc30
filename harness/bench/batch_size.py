"""``harness batch-size``: which batch size to use for this model on this device, from one short run.

Two measurements, then an answer (harness/analysis/batch_prediction.py):

- **statistics**: the config trained at a small batch B0 (``--batch``, its LR ``--lr``) up to its accuracy
  targets or a step budget, the exact simple noise scale read along the way: every ``--every`` steps, the
  per-example gradients of the first ``metrics.exact_noise_samples`` training samples at each of
  ``--window`` consecutive steps, their |G|^2 and tr(Sigma) averaged over the window and corrected for the
  sample count (``population_noise_scale``); the held-out accuracy on ``metrics.eval_samples`` every few
  steps finds each target's step;
- **hardware**: ``harness capacity``'s time per step at batch 1, 2, 4, ... on the device (one step timed
  per batch beyond the repeats, no epoch), where it stops being flat and the largest batch that fits.

The answer per target: each candidate batch's predicted steps, samples, LR, time per step and time to
the target; the batch with the least predicted time, the one with the fewest samples, and which limit
binds, by the noise scale at the target and (beside it) integrated over training
(harness/analysis/batch_prediction.py). The noise scale used is B_simple, which McCandlish et al. use for
B_noise where the Hessian is not known (it equals B_noise where the Hessian is a multiple of the identity).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from harness.analysis.batch_prediction import NoiseReading, at_target, predict, recommend
from harness.console import say
from harness.core.config import Config
from harness.core.data import load_dataset
from harness.core.distributed import DistContext
from harness.core.evaluation import evaluate
from harness.core.step import unwrap
from harness.core.trainer import build_trainer
from harness.errors import InputError
from harness.measure.exact_noise import gradient_sums, population_noise_scale

METRIC_PREFIX = "batch_size/"  # MLflow keys: batch_size/predicted_steps, ..., step = batch size
ARTIFACT_FOLDER = "batch-size"
LR_RULES = ("noise", "sqrt", "linear", "none")
EVALUATIONS_PER_READING = 5  # the held-out accuracy is checked this many times per noise reading


@dataclass
class RunReadings:
    """What the small-batch run measured."""

    readings: list[dict]  # {step, b_noise, b_simple_over_n, resolved, trace, grad_sq}
    crossings: dict[float, int]  # target -> first step whose held-out accuracy reached it
    steps: int  # steps trained
    reached_all: bool
    seconds: float
    noise_s: float  # of which the noise readings
    eval_s: float  # and the held-out accuracy checks


def check_arguments(batch: Optional[int], lr: Optional[float], every: int, window: int, max_steps: Optional[int],
                    max_batch: int) -> None:
    """The command's own numbers, before any work."""
    for name, value in (("--batch", batch), ("--every", every), ("--window", window), ("--max-steps", max_steps),
                        ("--max-batch", max_batch)):
        if value is not None and value < 1:
            raise InputError(f"{name}: {value}; expected a positive whole number")
    if lr is not None and not lr > 0:
        raise InputError(f"--lr: {lr:g}; expected a positive learning rate")
    if window > every:
        raise InputError(f"--window: {window} steps per reading, more than --every {every}; expected <= --every")


def check_config(cfg: Config, batch: int) -> None:
    """What the statistics run needs of the config: targets to reach (or a budget), per-example gradients."""
    if cfg.metrics.exact_noise_samples is None or cfg.metrics.exact_noise_samples < 2:
        raise InputError("metrics.exact_noise_samples: null; expected a number of training samples (>= 2) whose "
                         "per-example gradients give the noise scale (e.g. 1024)")
    if cfg.model.output == "loss":
        raise InputError("model.output: loss; harness batch-size finds each target by held-out accuracy, "
                         "which a model returning its own loss does not give; expected logits")
    if batch > cfg.train_set_size:
        raise InputError(f"--batch: {batch} is larger than the training set ({cfg.train_set_size}); expected less")


def read_noise_along_training(cfg: Config, device: torch.device, batch: int, lr: float, every: int, window: int,
                              max_steps: int) -> RunReadings:
    """Train ``cfg`` at ``batch`` and ``lr`` until its last accuracy target or ``max_steps``; the noise scale
    every ``every`` steps (averaged over ``window`` steps) and each target's step (module doc)."""
    run_cfg = cfg.replace(**{"optim.global_batch_size": batch, "optim.lr": lr, "optim.micro_batch_size": None,
                             "metrics.noise_scale": False, "performance.cuda_graph": False,
                             "train.progress": False})
    dataset = load_dataset(run_cfg).place(device, run_cfg.data.resident)
    ctx = DistContext(device=device, launcher="batch-size")
    trainer = build_trainer(run_cfg, ctx, dataset)
    model = unwrap(trainer.model)
    noise_samples = dataset.train.head(cfg.metrics.exact_noise_samples)
    held_out = dataset.validation.head(cfg.metrics.eval_samples) if len(dataset.validation) else dataset.test.head(
        cfg.metrics.eval_samples)
    targets = sorted(cfg.metrics.accuracy_targets)
    eval_every = max(1, every // EVALUATIONS_PER_READING)
    readings, crossings, window_sums = [], {}, []
    started, step, epoch, noise_s, eval_s = time.perf_counter(), 0, 1, 0.0, 0.0
    while step < max_steps and len(crossings) < len(targets):
        for indices, global_batch in trainer.plan.local_batches(epoch, device):
            if step % eval_every == 0 and targets:
                began = time.perf_counter()
                _, accuracy = evaluate(model, held_out, ctx, cfg.train.eval_batch_size)
                eval_s += time.perf_counter() - began
                crossings.update({t: step for t in targets if t not in crossings and accuracy >= t})
                if len(crossings) == len(targets):
                    break
            if step % every < window:
                began = time.perf_counter()
                sums = gradient_sums(model, noise_samples.features, noise_samples.targets).noise_scale()
                noise_s += time.perf_counter() - began
                window_sums.append((sums.trace_cov, sums.grad_sq_norm))
                if len(window_sums) == window:
                    readings.append(_reading(step - window + 1, window_sums, len(noise_samples)))
                    window_sums = []
            if step >= max_steps:
                break
            trainer.train_step(indices, global_batch, step)
            step += 1
        epoch += 1
    if not readings:
        raise InputError(f"--max-steps: {max_steps} steps left no complete noise reading (--window {window}); "
                         "expected more steps")
    return RunReadings(readings, crossings, step, len(crossings) == len(targets), time.perf_counter() - started,
                       noise_s, eval_s)


def _reading(step: int, window_sums: list[tuple[float, float]], count: int) -> dict:
    """One noise reading: the window's mean tr(Sigma) over its mean |G|^2, corrected for ``count`` samples;
    where the correction leaves nothing or a value beyond ``count`` (|G|^2 within the N-sample noise: N
    samples do not resolve it), the uncorrected ratio, a lower bound, marked unresolved."""
    trace = sum(t for t, _ in window_sums) / len(window_sums)
    quadratic = sum(q for _, q in window_sums) / len(window_sums)
    over_n = trace / quadratic if quadratic > 0 else math.inf
    population = population_noise_scale(trace, quadratic, count)
    resolved = math.isfinite(population) and 0 < population <= count
    return {"step": step, "b_noise": population if resolved else over_n, "b_simple_over_n": over_n,
            "resolved": resolved, "trace": trace, "grad_sq": quadratic}


def len_noise_samples(cfg: Config) -> int:
    """How many training samples the noise readings use."""
    return min(cfg.metrics.exact_noise_samples, cfg.train_set_size)


def candidate_batches(smallest: int, largest: int) -> list[int]:
    """Powers of two from ``smallest`` (rounded down to one) to ``largest``."""
    first = 2 ** int(math.log2(smallest))
    return [2**k for k in range(int(math.log2(first)), int(math.log2(largest)) + 1)]


def run_finder(cfg: Config, device: torch.device, batch: Optional[int] = None, lr: Optional[float] = None,
               lr_rule: str = "noise", every: int = 25, window: int = 4, max_steps: Optional[int] = None,
               max_batch: int = 8192, measure_hardware: bool = True) -> dict:
    """The statistics run, the capacity sweep and the answer per target; the JSON-ready result."""
    from harness.bench.capacity import run_capacity

    batch = batch or cfg.optim.global_batch_size
    lr = lr or cfg.optim.lr
    check_config(cfg, batch)
    cfg = cfg.replace(**{"performance.cuda_graph": cfg.performance.cuda_graph and device.type == "cuda"})
    budget = max_steps or cfg.train.epochs * math.ceil(cfg.train_set_size / batch)
    say(f"batch-size: statistics: {cfg.name} at batch {batch}, LR {lr:g}, the noise scale every {every} steps, "
        f"up to held-out accuracy {', '.join(f'{t:g}' for t in sorted(cfg.metrics.accuracy_targets)) or '-'} "
        f"or {budget} steps")
    run = read_noise_along_training(cfg, device, batch, lr, every, window, budget)
    say(f"batch-size: {run.steps} steps in {run.seconds:.1f} s, {len(run.readings)} noise readings; targets "
        f"reached: {', '.join(f'{t:g} at step {s}' for t, s in sorted(run.crossings.items())) or 'none'}")
    capacity, capacity_s = None, 0.0
    largest_candidate = min(max_batch, cfg.train_set_size)
    if measure_hardware:
        started = time.perf_counter()
        say(f"batch-size: hardware: time per step on {device.type} at batch 1, 2, 4, ... up to {largest_candidate}")
        capacity = run_capacity(cfg, device, largest_candidate, epoch_samples=1)
        capacity_s = time.perf_counter() - started
    step_seconds = {p["batch_size"]: p["step_s"] for p in capacity["points"]} if capacity else None
    ends = sorted(run.crossings.items()) or [(None, run.steps)]
    answers = []
    for target, end_step in ends:
        readings = [NoiseReading(r["step"], r["b_noise"]) for r in run.readings if r["step"] < end_step]
        if not readings:
            continue
        prediction = predict(readings, end_step, batch, lr, candidate_batches(min(16, batch), largest_candidate),
                             lr_rule, step_seconds, capacity["largest_batch"] if capacity else None,
                             at_target(run.readings, end_step, len_noise_samples(cfg)))
        answer = recommend(prediction, capacity["flat_until_batch"] if capacity else None,
                           capacity["largest_batch"] if capacity else None)
        answers.append({"target": target, "measured_steps": end_step, **prediction, **answer})
    return {"config": cfg.name, "device": device.type, "batch": batch, "lr": lr, "lr_rule": lr_rule,
            "every": every, "window": window, "noise_samples": cfg.metrics.exact_noise_samples,
            "eval_samples": cfg.metrics.eval_samples, "budget_steps": budget, "run": asdict(run),
            "capacity": None if capacity is None else {k: capacity[k] for k in (
                "device_name", "flat_until_batch", "largest_batch", "cap_reason", "beyond_largest", "points")},
            "statistics_s": run.seconds, "hardware_s": capacity_s, "answers": answers}


def format_answer(result: dict) -> str:
    """The plain-words lines first, then a table per target."""
    lines = []
    for answer in result["answers"]:
        what = f"held-out accuracy {answer['target']:g}" if answer["target"] is not None else \
            f"step {answer['measured_steps']} of the run at batch {result['batch']}"
        lines += [f"To {what}: critical batch ~ {answer['b_crit']:.0f}, the noise scale at the target (S_min "
                  f"{answer['s_min']:.0f} steps, E_min {answer['e_min']:.0f} samples; integrated over training: "
                  f"{answer['b_crit_integrated']:.0f}). Fastest predicted: batch {answer['fastest_batch']}; fewest "
                  f"samples: batch {answer['fewest_samples_batch']}. {answer['binds'][0].upper()}"
                  f"{answer['binds'][1:]}.", "",
                  "| batch | predicted steps | samples | LR (" + result["lr_rule"] + " rule) | ms/step | predicted "
                  "time to target | steps (integrated) | |", "|---|---|---|---|---|---|---|---|"]
        for row in answer["rows"]:
            marks = [label for label, batch in (("measured run", result["batch"]), ("fastest", answer["fastest_batch"]),
                                                ("fewest samples", answer["fewest_samples_batch"]))
                     if row["batch_size"] == batch]
            if row["micro_batches"] > 1:
                marks.append(f"{row['micro_batches']} micro-batches")
            step_ms = "-" if row["step_s"] is None else f"{row['step_s'] * 1e3:.3g}"
            wall = "-" if row["wall_s"] is None else f"{row['wall_s']:.3g} s"
            lines.append(f"| {row['batch_size']} | {row['steps']:.0f} | {row['samples']:.3g} | {row['lr']:.4g} | "
                         f"{step_ms} | {wall} | {row['steps_integrated']:.0f} | {', '.join(marks)} |")
        lines.append("")
    unresolved = sum(not r["resolved"] for r in result["run"]["readings"])
    if unresolved:
        lines.append(f"{unresolved} of {len(result['run']['readings'])} noise readings unresolved (|G|^2 within the "
                     f"{result['noise_samples']}-sample noise): their uncorrected value, a lower bound, is used")
    run = result["run"]
    lines.append(f"time: statistics {result['statistics_s']:.1f} s (noise readings {run['noise_s']:.1f} s, accuracy "
                 f"checks {run['eval_s']:.1f} s), hardware {result['hardware_s']:.1f} s")
    return "\n".join(lines)


def write_outputs(result: dict, directory: Path) -> list[Path]:
    """The JSON and the figure in ``directory``; the files for MLflow."""
    from harness.analysis import plots  # matplotlib only where a figure is drawn

    return plots.json_and_figure(result, directory, "batch-size", plots.batch_size_answer)


def record(uri: str, experiment: str, result: dict, files: list[Path], config_path: str) -> str:
    """An MLflow run of its own (run_kind=batch-size): the table as metrics (step = batch size), the
    recommendation as metrics and tags, the files."""
    from harness.records.mlflow_store import record_finished_run
    from harness.records.tracking import git_commit

    last = result["answers"][-1]
    tags = {"run_kind": "batch-size", "git_commit": git_commit(), "recommendation": last["binds"][:5000],
            "mlflow.note.content": format_answer(result)[:20000]}
    params = {"config": config_path, "config_name": result["config"], "device": result["device"],
              "batch": result["batch"], "lr": result["lr"], "lr_rule": result["lr_rule"], "every": result["every"],
              "window": result["window"], "noise_samples": result["noise_samples"]}
    metrics = [(METRIC_PREFIX + key, float(row[key]), row["batch_size"]) for row in last["rows"]
               for key in ("steps", "samples", "lr", "step_s", "wall_s") if row[key] is not None]
    metrics += [(METRIC_PREFIX + key, float(last[key]), 0) for key in ("b_crit", "s_min", "e_min",
                                                                        "b_crit_integrated") if last[key] is not None]
    metrics += [(METRIC_PREFIX + key, float(last[key]), 0) for key in ("fastest_batch", "fewest_samples_batch")
                if last[key] is not None]
    metrics += [(METRIC_PREFIX + "noise_reading", float(r["b_noise"]), r["step"]) for r in result["run"]["readings"]]
    return record_finished_run(uri, experiment, f"batch-size {result['device']} {result['config']}", tags, params,
                               metrics, files, ARTIFACT_FOLDER)

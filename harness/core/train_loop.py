"""The only training loop: ``train(cfg, ctx)``, called by every launcher.

It does not know who started it. ``ctx`` says which rank it is; ``tracker``
(from tracking.py) takes the console lines and MLflow records; a
``Checkpoints`` object (core/checkpoint.py) saves, finds and resumes the
checkpoints; ``hooks`` let a launcher set the resume rules, hand in a checkpoint
it kept itself, and act after each epoch (Ray reports there). Collectives run on
every rank, before the tracker is called.
What one step does belongs to core/step.py (and core/graph_step.py, which wraps
it): the loop calls ``trainer.train_step`` and does not know which one it holds.
The evaluations every few steps, the target, what is measured there and the clock
belong to core/evaluation.py: the loop calls it after each step and logs what it
kept at each epoch's end (one batch of records, not one per evaluation).
Sharpness readings (when, what they cost, the trajectory) belong to
core/sharpness.py: the loop reads at step 0, at epoch ends and at the run's end,
and logs the trajectory with the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from harness import faults, signals
from harness.core.checkpoint import Checkpoints, config_fingerprint
from harness.core.config import Config
from harness.core.data import BatchPlan, Dataset, Split, load_dataset
from harness.core.distributed import DistContext, all_reduce_sum
from harness.core.epoch_bar import LossPostfix, epoch_bar
from harness.core.evaluation import RunCounters, StepEvaluations, evaluate, time_metrics, timed
from harness.measure.grad_noise import NoiseProbe
from harness.core.graph_step import GraphStep, graph_unavailable_reason, side_stream
from harness.core.optim import MemberState, Optimizer, Schedule
from harness.core.step import EagerStep, unwrap
from harness.core.model import build_model
from harness.core.sharpness import SharpnessReadings, read_sharpness, sharpness_cost_metrics
from harness.console import say
from harness.records.tracking import by_step_metrics, make_tracker

# A loss above this (cross-entropy of 10 classes starts near 2.3) means the run blew up.
DIVERGED_LOSS = 1e3


@dataclass
class RunResult:
    run_id: Optional[str]
    epochs_completed: int
    global_step: int
    metrics: dict[str, float] = field(default_factory=dict)
    diverged: bool = False
    checkpoint: Optional[Path] = None


class RunHooks:
    """What a launcher adds to the loop: its resume policy and what happens after each epoch.

    ``resume``, ``launch_id`` and ``same_launch_only`` are the rules of
    :class:`~harness.core.checkpoint.Checkpoints` (which checkpoint a run may resume);
    a launcher that keeps checkpoints of its own overrides :meth:`restored_checkpoint`.
    """

    def __init__(self, resume: bool = False, launch_id: Optional[str] = None, same_launch_only: bool = False):
        self.resume = resume
        self.launch_id = launch_id
        self.same_launch_only = same_launch_only

    def checkpoints(self, cfg: Config, ctx: DistContext) -> Checkpoints:
        """This run's checkpoints under this launcher's resume rules."""
        return Checkpoints(cfg, ctx, resume=self.resume, launch_id=self.launch_id,
                           same_launch_only=self.same_launch_only, restored=lambda: self.restored_checkpoint(cfg))

    def restored_checkpoint(self, cfg: Config) -> Optional[Path]:
        """A checkpoint file the launcher itself kept for run ``cfg`` (a stack's member, or the run), resumed
        before the run's folder; None here."""
        return None

    def run_tags(self) -> dict[str, str]:
        """Tags the launcher sets on the run each time it starts or resumes (e.g. where its workers are); none here."""
        return {}

    def after_epoch(self, epoch: int, metrics: dict[str, float], checkpoint: Optional[Path], ctx: DistContext) -> None:
        """Called on every rank after every epoch (and after the initial checkpoint, epoch 0)."""

    def after_stack_epoch(self, epoch: int, ctx: DistContext) -> None:
        """Called on every rank once a stack of runs (core/stacked_run.py) has ended epoch ``epoch``
        (0: its members' initial checkpoints), after each of its members' ``after_epoch``: a
        launcher that reports once per training run (Ray Train) reports the whole stack here."""


@dataclass
class Trainer:
    """What one run holds: the model (maybe DDP-wrapped), its optimiser, the batch plan, the step, the probe.

    ``train_step`` is the eager step or the graph step that wraps it: the loop
    calls either the same way and does not know which it holds.
    """

    cfg: Config
    ctx: DistContext
    model: torch.nn.Module
    optimizer: Optimizer | MemberState
    plan: BatchPlan
    train_set: Split
    schedule: Schedule
    train_step: EagerStep | GraphStep
    noise_probe: Optional[NoiseProbe] = None

    def lr_at(self, global_step: int) -> float:
        """The learning rate of step ``global_step`` (the epoch's metrics log it)."""
        return float(self.schedule.lr_at(global_step)[0])

    def run_epoch(self, epoch: int, first_global_step: int, max_steps: int, bar,
                  after_step: Optional[Callable[[int, int], bool]] = None) -> tuple[float, int, int]:
        """Train up to ``max_steps`` steps of one epoch, counting them on the tqdm ``bar``.

        ``after_step(global step done, its global batch size)`` runs after every
        step (host integers only: the periodic evaluation); true ends the epoch there.
        Returns (running mean loss, samples of all ranks, steps).
        """
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        local_samples = steps = 0
        postfix = LossPostfix(bar, self.ctx.device)
        for step, (indices, global_batch_size) in enumerate(self.plan.local_batches(epoch, self.ctx.device)):
            if step == max_steps:
                break
            if step == self.plan.steps_per_epoch // 2:
                faults.maybe_kill("step", epoch, self.ctx.rank)
            loss_sum += self.train_step(indices, global_batch_size, first_global_step + step)
            local_samples += len(indices)
            steps += 1
            postfix.maybe_show(loss_sum, local_samples)  # before update(): its redraw then shows the new value
            bar.update(1)
            if after_step and after_step(first_global_step + steps, global_batch_size):
                break
        totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(local_samples), dtype=torch.float64,
                                                                    device=self.ctx.device)]), self.ctx)
        return float(totals[0] / totals[1]), int(totals[1]), steps


def epoch_metrics(trainer: Trainer, dataset: Dataset, train_loss_running: float, epoch: int) -> dict[str, float]:
    batch = trainer.cfg.train.eval_batch_size
    faults.maybe_kill("evaluate", epoch, trainer.ctx.rank)
    metrics = {"train_loss_running": train_loss_running}
    for prefix, split in (("train", dataset.train), ("val", dataset.validation), ("test", dataset.test)):
        if len(split):
            metrics[f"{prefix}_loss"], metrics[f"{prefix}_accuracy"] = evaluate(trainer.model, split, trainer.ctx, batch)
    metrics["generalization_gap_accuracy"] = metrics["train_accuracy"] - metrics["test_accuracy"]
    metrics["generalization_gap_loss"] = metrics["test_loss"] - metrics["train_loss"]
    return metrics


def build_trainer(cfg: Config, ctx: DistContext, dataset: Dataset) -> Trainer:
    model = build_model(cfg).to(ctx.device)
    # With several accumulation passes per rank, the probe's small batch is the micro-batch.
    accumulating = cfg.accumulation_steps(ctx.world_size) > 1
    probe = NoiseProbe(ctx, cfg.optim.global_batch_size, cfg.metrics.noise_scale_ema_decay,
                       micro_batch_size=cfg.optim.micro_batch_size if accumulating else None) \
        if cfg.metrics.noise_scale else None
    graph_stream = side_stream(cfg, ctx)
    # The hand-written engine computes gradients outside autograd, where DDP's
    # hooks never fire; it averages them itself (core/step.py).
    if ctx.is_distributed and cfg.train.grad_engine == "autograd":
        model = _wrap_ddp(model, ctx, graph_stream)
    if probe:
        probe.attach(model)
    optimizer = Optimizer([cfg.optim], [p.view(1, -1) for p in unwrap(model).parameters()])
    plan = BatchPlan(num_samples=len(dataset.train), global_batch_size=cfg.optim.global_batch_size, seed=cfg.seed,
                     rank=ctx.rank, world_size=ctx.world_size, drop_last=cfg.train.drop_last)
    schedule = Schedule.of([cfg], plan.steps_per_epoch, ctx.device)
    train_step: EagerStep | GraphStep = EagerStep(cfg, ctx, model, optimizer, dataset.train, schedule, probe)
    if graph_stream is not None:
        train_step = GraphStep(train_step, graph_stream)
    elif cfg.performance.cuda_graph:
        say(f"[{cfg.name}] performance.cuda_graph: running the eager step instead, because "
            f"{graph_unavailable_reason(cfg, ctx)}", ctx=ctx)
    return Trainer(cfg, ctx, model, optimizer, plan, dataset.train, schedule, train_step, probe)


def _wrap_ddp(model: torch.nn.Module, ctx: DistContext, graph_stream) -> DistributedDataParallel:
    # PyTorch's CUDA-graph notes: DDP must be built on the side stream that warms
    # up and captures. Without a graph step the stream is None, a no-op here.
    with torch.cuda.stream(graph_stream):
        return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def checkpoint_state(trainer: Trainer, counters: RunCounters, run_id: Optional[str],
                     launch_id: Optional[str] = None) -> dict:
    """What a checkpoint holds: the trainer's state, the counters, and what ties it to its run."""
    # The counters' key stays "progress" (their old name): older checkpoints still load.
    return {"model": unwrap(trainer.model).state_dict(), "optimizer": trainer.optimizer.state_dict(),
            "launch_id": launch_id,  # which launch wrote it: a torchrun restart resumes only its own
            "epoch": counters.epoch, "global_step": counters.global_step, "progress": vars(counters).copy(),
            "noise_probe": trainer.noise_probe.state_dict() if trainer.noise_probe else None,
            "rng_cpu": torch.get_rng_state(), "run_id": run_id,
            "config_fingerprint": config_fingerprint(trainer.cfg),
            # The resolved config: what another run needs to start from this one's weights
            # (checkpoint.init_from) or to interpolate towards them (harness interpolate).
            "config": trainer.cfg.to_dict()}


def load_state(trainer: Trainer, state: dict) -> RunCounters:
    """Put a checkpoint's state into ``trainer``; returns where the run had got to."""
    unwrap(trainer.model).load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    if trainer.noise_probe and state.get("noise_probe"):
        trainer.noise_probe.load_state_dict(state["noise_probe"])
    return RunCounters(**state["progress"])


def start_from_source(trainer: Trainer) -> dict[str, str]:
    """Load ``checkpoint.init_from``'s model weights into the (unwrapped) model; the run's tags saying so.

    Weights only: the optimiser (momentum buffers), counters and data order stay this
    run's own. Every rank reads the same file, so DDP's replicas agree without a
    broadcast; it runs before the first step, so a CUDA-graph step (which captures at
    its first step) captures the loaded parameters (load_state_dict copies in place).
    """
    ref = trainer.cfg.checkpoint.init_from
    if ref is None:
        return {}
    # Here, not at the top: the resolver reads MLflow for a run id, which most runs never need.
    from harness.records.checkpoint_source import check_same_architecture, resolve_checkpoint
    from harness.records.mlflow_store import default_tracking_uri

    key = "checkpoint.init_from"
    source = resolve_checkpoint(ref, trainer.cfg.tracking.uri or default_tracking_uri(), key)
    check_same_architecture(source, trainer.cfg, key)
    unwrap(trainer.model).load_state_dict(source.model_state)
    say(f"[{trainer.cfg.name}] starting from the weights of {source.path}", ctx=trainer.ctx)
    tags = {"init_from": ref, "init_from_checkpoint": str(source.path)}
    if source.run_id:
        tags["init_from_run_id"] = source.run_id
    return tags


def sharpness(trainer: Trainer) -> dict[str, float]:
    """The Hessian's extremes at the trainer's parameters (core/sharpness.py ``read_sharpness``)."""
    return read_sharpness(trainer.cfg, trainer.ctx, trainer.model, trainer.train_set,
                          trainer.train_step.on_training_stream)


def train(cfg: Config, ctx: DistContext, tracker=None, hooks: Optional[RunHooks] = None,
          dataset: Optional[Dataset] = None, parent_run_id: Optional[str] = None) -> RunResult:
    """Train one run from ``cfg`` on this rank: build, maybe resume, then epochs of step/evaluate/log/checkpoint."""
    hooks = hooks or RunHooks()
    dataset = (dataset or load_dataset(cfg)).to(ctx.device)
    trainer = build_trainer(cfg, ctx, dataset)
    checkpoints = hooks.checkpoints(cfg, ctx)
    state = checkpoints.resume_state()
    tracker = tracker or make_tracker(cfg, ctx, parent_run_id)
    if state is None:
        checkpoints.clear()
    # Before the tracker starts: a source that vanished since preflight is refused with no run made.
    init_tags = {**(start_from_source(trainer) if state is None else {}), **hooks.run_tags()}
    # start and finish sit inside the try: a signal that lands while either talks to
    # MLflow must still end the run as KILLED, not leave it RUNNING.
    try:
        run_id = tracker.start(resume_run_id=state["run_id"] if state else None, launch_id=hooks.launch_id)
        if init_tags:
            tracker.set_tags(init_tags)
        result = _train_epochs(trainer, dataset, tracker, hooks, checkpoints, state, run_id)
        if result.checkpoint is not None:  # where the run's final weights are (interpolate, init_from by run id)
            tracker.set_tags({"checkpoint_path": str(Path(result.checkpoint).resolve())})
        tracker.finish("FINISHED")
    except BaseException as err:
        # Inline, not in a helper: a signal raises at the next function entry, and
        # must land inside this try. It is raised only once per process
        # (harness/signals.py), so the second finish runs to its end.
        try:
            tracker.finish(signals.end_status(err))
        except signals.Terminated:
            tracker.finish("KILLED")
            raise
        raise
    return result


def _train_epochs(trainer: Trainer, dataset: Dataset, tracker, hooks: RunHooks, checkpoints: Checkpoints,
                  state: Optional[dict], run_id: Optional[str]) -> RunResult:
    cfg, ctx = trainer.cfg, trainer.ctx
    counters, sharp, latest = begin_epochs(trainer, tracker, hooks, checkpoints, state, run_id)
    result = RunResult(run_id, counters.epoch, counters.global_step)
    step_budget = run_step_budget(trainer)
    evals = StepEvaluations(cfg, ctx, trainer.model, dataset.validation, trainer.train_set, trainer.noise_probe,
                            counters, step_budget, trainer.train_step.on_training_stream, sharp)
    for epoch in range(first_epoch(cfg, counters), cfg.total_epochs + 1):
        train_seconds_before = counters.train_seconds
        evals.start_epoch()
        with epoch_bar(cfg, ctx, trainer.plan.steps_per_epoch, epoch) as bar:
            train_loss_running, samples, steps = trainer.run_epoch(
                epoch, counters.global_step, step_budget - counters.global_step, bar, evals.after_step)
        evals.end_epoch()
        result, stopped = end_epoch(trainer, dataset, tracker, counters, evals, sharp, epoch, steps, samples,
                                    train_loss_running, counters.train_seconds - train_seconds_before, run_id)
        if result.diverged:
            break
        latest = checkpoints.save(checkpoint_state(trainer, counters, run_id, hooks.launch_id), epoch)
        hooks.after_epoch(epoch, result.metrics, latest, ctx)
        if stopped:
            break
    if result.metrics:
        say(time_line(cfg.name, counters), ctx=ctx)
    result.checkpoint = latest
    return result


def run_step_budget(trainer: Trainer) -> int:
    """The run's last step: train.max_steps, else every epoch's steps."""
    return trainer.cfg.step_budget(trainer.plan.steps_per_epoch)


def first_epoch(cfg: Config, counters: RunCounters) -> int:
    """The next epoch to train; past the last for a run that stopped at its target (resuming it trains nothing)."""
    stopped = counters.stopped_at_target or counters.train_loss_target_step > 0
    return cfg.total_epochs + 1 if stopped else counters.epoch + 1


def begin_epochs(trainer: Trainer, tracker, hooks: RunHooks, checkpoints: Checkpoints, state: Optional[dict],
                 run_id: Optional[str]) -> tuple[RunCounters, SharpnessReadings, Optional[Path]]:
    """A new run's start (step-0 sharpness, the epoch-0 checkpoint) or a resumed run's state loaded;
    returns (counters, sharpness readings, the checkpoint just written or None)."""
    cfg, ctx = trainer.cfg, trainer.ctx
    if state is not None:
        counters = load_state(trainer, state)
        return counters, SharpnessReadings(cfg, ctx, trainer.model, trainer.train_set, counters,
                                           trainer.train_step.on_training_stream), None
    counters = RunCounters()
    sharp = SharpnessReadings(cfg, ctx, trainer.model, trainer.train_set, counters,
                              trainer.train_step.on_training_stream)
    if sharp.periodic:  # step 0, before the first update, logged before epoch 0 is saved
        sharp.read(0)
        with timed(counters, "tracking_seconds", ctx.device):
            _log_trajectory(tracker, sharp)
    # Epoch 0 is saved too: a run killed in its first epoch resumes into the same MLflow run.
    latest = checkpoints.save(checkpoint_state(trainer, counters, run_id, hooks.launch_id), 0)
    hooks.after_epoch(0, {}, latest, ctx)
    return counters, sharp, latest


def end_epoch(trainer: Trainer, dataset: Dataset, tracker, counters: RunCounters, evals: StepEvaluations,
              sharp: SharpnessReadings, epoch: int, steps: int, samples: int, train_loss_running: float,
              elapsed_s: float, run_id: Optional[str]) -> tuple[RunResult, bool]:
    """After an epoch's steps (all of them, or those before the run stopped inside it): count them,
    measure, log. Returns the run's result so far and whether it stopped (target reached)."""
    cfg, ctx = trainer.cfg, trainer.ctx
    counters.epoch, counters.global_step = epoch, counters.global_step + steps
    counters.samples_seen += samples
    counters.stopped_at_target = cfg.train.stop_at_target and counters.target_reached_step > 0
    # train.target_train_loss: the run ends at the check that reached it (it broke out of the epoch
    # there), so what is measured below is measured at those parameters.
    stopped = counters.stopped_at_target or counters.train_loss_target_step > 0
    is_last = epoch == cfg.total_epochs or stopped
    metrics, tags = _measure_epoch(trainer, dataset, counters, train_loss_running, elapsed_s, samples)
    diverged = "diverged" in tags
    metrics.update(evals.take_at_target())
    if "steps_to_target" in metrics:
        tags["steps_to_target"] = str(int(metrics["steps_to_target"]))
    if "steps_to_train_loss_target" in metrics:
        tags["steps_to_train_loss_target"] = str(int(metrics["steps_to_train_loss_target"]))
    if not diverged:
        metrics.update(_sharpness_at_epoch_end(cfg, sharp, epoch, counters.global_step, is_last))
    if is_last and not counters.target_reached_step and cfg.metrics.target_val_accuracy is not None:
        tags["steps_to_target"] = "not reached"
    if is_last and not counters.train_loss_target_step and cfg.train.target_train_loss is not None:
        tags["steps_to_train_loss_target"] = "not reached"
    if counters.stopped_at_target:
        tags["stopped_at_target"] = "true"
    metrics.update(time_metrics(counters))  # cumulative; the last epoch's are the run's
    metrics.update(sharpness_cost_metrics(counters))
    finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
    with timed(counters, "tracking_seconds", ctx.device):
        tracker.log_metrics(finite, step=epoch)
        tracker.log_metrics(by_step_metrics(finite), step=counters.global_step)
        tracker.log_metric_history("val_subset_accuracy", evals.take_history())
        if cfg.train.target_train_loss is not None:
            tracker.log_metric_history("train_loss_full", evals.take_train_loss_history())
        _log_trajectory(tracker, sharp)
        if tags:
            tracker.set_tags(tags)
    return RunResult(run_id, epoch, counters.global_step, metrics, diverged), stopped


def _sharpness_at_epoch_end(cfg: Config, sharp: SharpnessReadings, epoch: int, global_step: int,
                            is_last: bool) -> dict[str, float]:
    """The epoch-unit reading when due; at the run's end the final reading, whose values are the final
    metrics with metrics.sharpness. One reading at a step serves both (``read`` reuses it)."""
    if sharp.is_due_after_epoch(epoch):
        sharp.read(global_step)
    if not (is_last and (cfg.metrics.sharpness or sharp.periodic)):
        return {}
    final = sharp.read(global_step)
    return final if cfg.metrics.sharpness and final is not None else {}


def _log_trajectory(tracker, sharp: SharpnessReadings) -> None:
    """The sharpness readings not logged yet, with step = optimizer step (one record per key)."""
    for key, points in sharp.take_history().items():
        if points:
            tracker.log_metric_history(key, points)


def time_line(name: str, counters: RunCounters) -> str:
    """The run's last console line: where its time went."""
    times = time_metrics(counters)
    return (f"[{name}] time: training {times['time_train_s']:.2f} s, evaluations every few steps "
            f"{times['time_eval_s']:.2f} s ({times['eval_fraction']:.1%} of training), epoch-end evaluations "
            f"{times['time_epoch_eval_s']:.2f} s, probes {times['time_probe_s']:.2f} s, "
            f"sharpness {times['time_sharpness_s']:.2f} s ({counters.sharpness_readings} readings), "
            f"tracking {times['time_tracking_s']:.2f} s")


def _measure_epoch(trainer: Trainer, dataset: Dataset, counters: RunCounters, train_loss_running: float,
                   elapsed_s: float, samples: int) -> tuple[dict[str, float], dict[str, str]]:
    """The epoch's metrics and tags; every rank runs it (evaluation and the probe all-reduce)."""
    if not math.isfinite(train_loss_running) or train_loss_running > DIVERGED_LOSS:
        # Evaluating a blown-up model only produces NaNs: record the loss and stop.
        return ({"train_loss_running": train_loss_running, "global_step": float(counters.global_step)},
                {"diverged": "true", "diverged_epoch": str(counters.epoch)})
    with timed(counters, "epoch_eval_seconds", trainer.ctx.device):
        metrics = epoch_metrics(trainer, dataset, train_loss_running, counters.epoch)
    if trainer.noise_probe:
        with timed(counters, "probe_seconds", trainer.ctx.device):
            metrics.update(trainer.noise_probe.epoch_metrics())
    # elapsed_s: the training steps only, without the evaluations between them.
    metrics.update(epoch_s=elapsed_s, samples_per_s=samples / elapsed_s, global_step=float(counters.global_step),
                   lr=trainer.lr_at(counters.global_step), weight_norm=weight_norm(trainer.model))
    return metrics, {}


@torch.no_grad()
def weight_norm(model: torch.nn.Module) -> float:
    """‖θ‖₂ over every parameter: sharpness and the loss along a line between two solutions depend on
    the scale of the weights (Dinh et al. 2017), so a comparison of minima reports it beside them."""
    return float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in unwrap(model).parameters())))

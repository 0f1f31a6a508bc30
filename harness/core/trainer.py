"""What one member of the training loop holds (``Trainer``), and the engine of a run alone (``SingleRun``).

The loop (core/train_loop.py) trains K >= 1 members through one engine: an object with
``steps_per_epoch``, ``local_batches(epoch)``, ``train_step(indices, global batch size, global
step) -> this rank's summed loss`` (one per member), ``keep(rows, trainers)``, ``training_state()`` and
``replica(rows, configs)``. A run alone is
``SingleRun`` (DDP, either gradient engine, accumulation, bf16, the CUDA-graph step); a stack is
core/stacked_run.py's engine. Above the engine the loop sees only ``Trainer``s. Also here: a
member's checkpoint state and starting from another run's weights (``InitWeights``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from harness.console import say
from harness.core.batch_schedule import BatchSchedule, build_batch_schedule
from harness.core.checkpoint import config_fingerprint
from harness.core.config import Config
from harness.core.data import BatchPlan, Dataset, Split
from harness.core.distributed import DistContext
from harness.core.evaluation import RunCounters
from harness.core.graph_step import GraphStep, graph_unavailable_reason, new_side_stream
from harness.core.model import build_model
from harness.core.optim import MemberState, Optimizer, Schedule
from harness.core.step import EagerStep, unwrap
from harness.core.noise_probe import NoiseProbe


@dataclass
class Trainer:
    """What one member holds: its model (maybe DDP-wrapped, or a view of a stack's row), optimiser,
    batch plan, training split, LR schedule, step (asked where autograd on the parameters runs:
    ``on_training_stream``) and noise probe."""

    cfg: Config
    ctx: DistContext
    model: torch.nn.Module
    optimizer: Optimizer | MemberState
    plan: BatchPlan
    train_set: Split
    schedule: Schedule
    train_step: object
    noise_probe: Optional[NoiseProbe] = None
    batch_schedule: Optional[BatchSchedule] = None  # a batch that changes during the run


class SingleRun:
    """The engine of a run alone: its trainer's step over its batch plan."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    @property
    def steps_per_epoch(self) -> int:
        return self.trainer.plan.steps_per_epoch

    def local_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, int]]:
        return self.trainer.plan.local_batches(epoch, self.trainer.ctx.device)

    def train_step(self, indices: torch.Tensor, global_batch_size: int, global_step: int) -> torch.Tensor:
        return self.trainer.train_step(indices, global_batch_size, global_step)

    def keep(self, rows: list[int], trainers: list[Trainer]) -> None:
        """Nothing to shrink: a run alone that stops ends the loop."""

    def replica(self, rows: list[int], members: list[Config]) -> tuple[SingleRun, list[torch.nn.Module]]:
        """What trains its one member again (core/crossing.py): the engine itself, and its model."""
        return self, [self.trainer.model]

    def training_state(self) -> list[torch.Tensor]:
        """Every tensor a step changes and a later step reads: parameters, optimizer state, the probe's state."""
        trainer = self.trainer
        return [*unwrap(trainer.model).parameters(), *trainer.optimizer.state_tensors(),
                *(trainer.noise_probe.state_tensors() if trainer.noise_probe else ())]


def build_trainer(cfg: Config, ctx: DistContext, dataset: Dataset) -> Trainer:
    """A run alone's trainer: model, DDP where autograd needs it, probe, optimiser, plan, schedule, step."""
    model = build_model(cfg).to(ctx.device)
    # With several accumulation passes per rank, the probe's small batch is the micro-batch.
    micro_batch_size = cfg.optim.micro_batch_size if cfg.accumulation_steps(ctx.world_size) > 1 else None
    probe = (NoiseProbe(ctx, cfg.optim.global_batch_size, cfg.metrics.noise_scale_ema_decay, micro_batch_size)
             if cfg.metrics.noise_scale else None)
    no_graph_reason = (graph_unavailable_reason(cfg, ctx, dataset.train.features.device)
                       if cfg.performance.cuda_graph else None)
    graph_stream = new_side_stream(ctx.device) if cfg.performance.cuda_graph and not no_graph_reason else None
    # The hand-written engine computes gradients outside autograd, where DDP's
    # hooks never fire; it averages them itself (core/step.py).
    if ctx.is_distributed and cfg.train.grad_engine == "autograd":
        # PyTorch's CUDA-graph notes: DDP must be built on the side stream that warms up and captures.
        with torch.cuda.stream(graph_stream):  # None: a no-op
            model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                            else None)
    if probe:
        probe.attach(model)
    optimizer = Optimizer([cfg.optim], [p.view(1, -1) for p in unwrap(model).parameters()])
    batch_schedule = build_batch_schedule(cfg, ctx, model, dataset.train)
    plan = BatchPlan(num_samples=len(dataset.train), global_batch_size=cfg.optim.global_batch_size, seed=cfg.seed,
                     rank=ctx.rank, world_size=ctx.world_size, drop_last=cfg.train.drop_last,
                     batch_now=(lambda: batch_schedule.current) if batch_schedule else None)
    schedule = Schedule.of([cfg], plan.steps_per_epoch, ctx.device)
    train_step: EagerStep | GraphStep = EagerStep(cfg, ctx, model, optimizer, dataset.train, schedule, probe)
    if graph_stream is not None:
        train_step = GraphStep(train_step, graph_stream)
    elif no_graph_reason:
        say(f"[{cfg.name}] performance.cuda_graph: running the eager step instead, because {no_graph_reason}",
            ctx=ctx)
    return Trainer(cfg, ctx, model, optimizer, plan, dataset.train, schedule, train_step, probe, batch_schedule)


def checkpoint_state(trainer: Trainer, counters: RunCounters, run_id: Optional[str],
                     launch_id: Optional[str] = None) -> dict:
    """What a checkpoint holds: the member's state, its counters, and what ties it to its run. The
    weights are copied: a stack member's model is a view of its row, and saving it would save the stack."""
    return {"model": {key: value.detach().clone() for key, value in unwrap(trainer.model).state_dict().items()},
            "optimizer": trainer.optimizer.state_dict(),
            "launch_id": launch_id,  # which launch wrote it: a torchrun restart resumes only its own
            "epoch": counters.epoch, "global_step": counters.global_step, "counters": vars(counters).copy(),
            "noise_probe": trainer.noise_probe.state_dict() if trainer.noise_probe else None,
            "batch_schedule": trainer.batch_schedule.state_dict() if trainer.batch_schedule else None,
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
    if trainer.batch_schedule and state.get("batch_schedule"):
        trainer.batch_schedule.load_state_dict(state["batch_schedule"])
    return RunCounters(**state["counters"])


@dataclass(frozen=True)
class InitWeights:
    """``checkpoint.init_from`` resolved by the launcher: the weights a new run starts from, and the tags
    that say where they came from."""

    path: Path
    model_state: dict
    tags: dict = field(default_factory=dict)


def load_init_weights(trainer: Trainer, init: Optional[InitWeights]) -> dict[str, str]:
    """Load ``init``'s weights (only: optimiser state, counters and data order stay this run's) into the
    unwrapped model on every rank, so DDP's replicas agree without a broadcast; the run's tags saying so.
    It runs before the first step, and copies in place, so a CUDA-graph step captures the loaded weights."""
    if init is None:
        return {}
    unwrap(trainer.model).load_state_dict(init.model_state)
    say(f"[{trainer.cfg.name}] starting from the weights of {init.path}", ctx=trainer.ctx)
    return dict(init.tags)


def train_epoch(engine, epoch: int, first_global_step: int = 0,
                max_steps: Optional[int] = None) -> tuple[torch.Tensor, int, int]:
    """Train up to ``max_steps`` steps of ``epoch`` through ``engine`` (``SingleRun``, or a stacked trainer)
    with no evaluation, record or checkpoint: what the benchmarks time. Returns this rank's summed loss
    (one per member of a stack), its samples and the steps taken."""
    loss_sum, samples, steps = torch.zeros((), dtype=torch.float64), 0, 0
    for indices, global_batch_size in itertools.islice(engine.local_batches(epoch), max_steps):
        loss = engine.train_step(indices, global_batch_size, first_global_step + steps)
        loss_sum, samples, steps = loss_sum.to(indices.device) + loss, samples + indices.shape[-1], steps + 1
    return loss_sum, samples, steps

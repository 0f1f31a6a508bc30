"""The only training loop: ``train(cfg, ctx)``, called by every launcher.

It does not know who started it. ``ctx`` says which rank it is; ``tracker``
(from tracking.py) takes every rank-0 side effect; ``hooks`` let a launcher say
where a resumed run's checkpoint comes from and what happens after each epoch
(Ray reports there). Collectives run on every rank, before the tracker is called.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from harness import checkpoint as ckpt
from harness import faults
from harness.backprop import manual_backward
from harness.config import Config
from harness.data import BatchPlan, Dataset, Split, load_dataset
from harness.distributed import DistContext, all_reduce_sum, average_gradients
from harness.model import build_model
from harness.tracking import NullTracker, checkpoint_dir, make_tracker

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
    """Launcher-specific resume and reporting. This default: checkpoint files on local disk."""

    def __init__(self, resume: bool = False):
        self.resume = resume

    def restore(self, cfg: Config) -> Optional[Path]:
        return ckpt.newest_checkpoint(checkpoint_dir(cfg)) if self.resume else None

    def after_epoch(self, epoch: int, metrics: dict[str, float], checkpoint: Optional[Path], ctx: DistContext) -> None:
        """Called on every rank after every epoch (and after the initial checkpoint, epoch 0)."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


@dataclass
class Trainer:
    """What one run holds: the model (maybe DDP-wrapped), its optimiser and the batch plan."""

    cfg: Config
    ctx: DistContext
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    plan: BatchPlan
    train_set: Split

    def step(self, x: torch.Tensor, y: torch.Tensor, global_batch_size: int) -> torch.Tensor:
        """One SGD step; returns this rank's summed cross-entropy (no host sync)."""
        # Sum over the local batch divided by B/W: with equal shards this is the
        # local mean, and DDP's average over W ranks is then the mean over the
        # global batch of B. It stays exact for a smaller, unevenly split last batch.
        normalizer = global_batch_size / self.ctx.world_size
        if self.cfg.train.grad_engine == "manual":
            loss = manual_backward(unwrap(self.model), x, y, normalizer)
            average_gradients(unwrap(self.model), self.ctx)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.model(x), y, reduction="sum") / normalizer
            loss.backward()
        self.optimizer.step()
        return loss.detach() * normalizer

    def run_epoch(self, epoch: int, progress) -> tuple[float, int]:
        """Train one epoch; returns (running mean of the training loss, samples seen by all ranks)."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        local_samples = 0
        for step, (indices, global_batch_size) in enumerate(self.plan.local_batches(epoch, self.ctx.device)):
            if step == self.plan.steps_per_epoch // 2:
                faults.maybe_kill("step", epoch, self.ctx.rank)
            loss_sum += self.step(self.train_set.features[indices], self.train_set.targets[indices], global_batch_size)
            local_samples += len(indices)
            progress.update(1)
        totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(local_samples), dtype=torch.float64,
                                                                    device=self.ctx.device)]), self.ctx)
        return float(totals[0] / totals[1]), int(totals[1])


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, ctx: DistContext, batch_size: int) -> tuple[float, float]:
    """(mean loss, accuracy) over the whole split; each rank scores a contiguous shard, then a sum-reduce."""
    model = unwrap(model)
    shard = torch.tensor_split(torch.arange(len(split)), ctx.world_size)[ctx.rank]
    start, stop = (int(shard[0]), int(shard[-1]) + 1) if len(shard) else (0, 0)
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss sum, correct, count
    for lo in range(start, stop, batch_size):
        x, y = split.features[lo:min(stop, lo + batch_size)], split.targets[lo:min(stop, lo + batch_size)]
        logits = model(x)
        totals[0] += F.cross_entropy(logits, y, reduction="sum").double()
        totals[1] += (logits.argmax(1) == y).sum()
        totals[2] += len(y)
    all_reduce_sum(totals, ctx)
    count = max(float(totals[2]), 1.0)
    return float(totals[0]) / count, float(totals[1]) / count


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
    # The hand-written engine computes gradients outside autograd, where DDP's
    # hooks never fire; it averages them itself (distributed.average_gradients).
    if ctx.is_distributed and cfg.train.grad_engine == "autograd":
        model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    plan = BatchPlan(num_samples=len(dataset.train), global_batch_size=cfg.optim.global_batch_size, seed=cfg.seed,
                     rank=ctx.rank, world_size=ctx.world_size, drop_last=cfg.train.drop_last)
    return Trainer(cfg, ctx, model, optimizer, plan, dataset.train)


def checkpoint_state(trainer: Trainer, epoch: int, global_step: int, run_id: Optional[str]) -> dict:
    return {"model": unwrap(trainer.model).state_dict(), "optimizer": trainer.optimizer.state_dict(),
            "epoch": epoch, "global_step": global_step, "rng_cpu": torch.get_rng_state(),
            "run_id": run_id, "config_fingerprint": ckpt.config_fingerprint(trainer.cfg)}


def restore(trainer: Trainer, state: dict) -> tuple[int, int]:
    unwrap(trainer.model).load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    return int(state["epoch"]), int(state["global_step"])


def _progress(cfg: Config, ctx: DistContext, total: int, epoch: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{cfg.name} epoch {epoch}", unit="step", leave=False, mininterval=1.0,
                disable=not (ctx.is_main and cfg.train.progress))


def train(cfg: Config, ctx: DistContext, tracker=None, hooks: Optional[RunHooks] = None,
          dataset: Optional[Dataset] = None, parent_run_id: Optional[str] = None) -> RunResult:
    """Train one run from ``cfg`` on this rank: build, maybe resume, then epochs of step/evaluate/log/checkpoint."""
    hooks = hooks or RunHooks()
    dataset = (dataset or load_dataset(cfg))
    dataset = Dataset(dataset.train.to(ctx.device), dataset.validation.to(ctx.device), dataset.test.to(ctx.device))
    trainer = build_trainer(cfg, ctx, dataset)
    resume_from = hooks.restore(cfg)
    state = ckpt.read_checkpoint(resume_from, cfg) if resume_from else None
    tracker = tracker or make_tracker(cfg, ctx, parent_run_id)
    if state is None:
        tracker.clear_checkpoints()
    run_id = tracker.start(resume_run_id=state["run_id"] if state else None)
    try:
        result = _train_epochs(trainer, dataset, tracker, hooks, state, run_id)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    return result


def _train_epochs(trainer: Trainer, dataset: Dataset, tracker, hooks: RunHooks, state: Optional[dict],
                  run_id: Optional[str]) -> RunResult:
    cfg, ctx = trainer.cfg, trainer.ctx
    if state is None:
        epoch, global_step = 0, 0
        # Epoch 0 is saved too: a run killed in its first epoch resumes into the same MLflow run.
        latest = tracker.save_checkpoint(checkpoint_state(trainer, 0, 0, run_id), 0)
        hooks.after_epoch(0, {}, latest, ctx)
    else:
        epoch, global_step = restore(trainer, state)
        latest = None
    result = RunResult(run_id, epoch, global_step)
    for epoch in range(epoch + 1, cfg.train.epochs + 1):
        started = time.perf_counter()
        with _progress(cfg, ctx, trainer.plan.steps_per_epoch, epoch) as progress:
            train_loss_running, samples = trainer.run_epoch(epoch, progress)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        elapsed_s = time.perf_counter() - started
        global_step += trainer.plan.steps_per_epoch
        diverged = not math.isfinite(train_loss_running) or train_loss_running > DIVERGED_LOSS
        metrics = {"train_loss_running": train_loss_running} if diverged else epoch_metrics(trainer, dataset, train_loss_running, epoch)
        metrics.update(epoch_s=elapsed_s, samples_per_s=samples / elapsed_s, global_step=float(global_step))
        tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=epoch)
        result = RunResult(run_id, epoch, global_step, metrics, diverged)
        if diverged:
            tracker.set_tags({"diverged": "true", "diverged_epoch": epoch})
            break
        latest = tracker.save_checkpoint(checkpoint_state(trainer, epoch, global_step, run_id), epoch)
        hooks.after_epoch(epoch, metrics, latest, ctx)
    result.checkpoint = latest
    return result

"""What every launcher does around the training loop: build each trial's tracker, resolve where a new run's
weights come from (``checkpoint.init_from``), then call ``train_loop.train``.

The training engine (harness/core) reads no MLflow: torchrun, the sweep drivers and the Ray Train
workers all come through here, so a run is recorded the same way whoever started it.
"""

from __future__ import annotations

from typing import Optional

from harness.core.config import Config
from harness.core.data import Dataset
from harness.core.distributed import DistContext
from harness.core.train_loop import RunHooks, RunResult, train
from harness.core.trainer import InitWeights
from harness.launching.preflight import check_init_from
from harness.records.tracking import make_tracker


def init_weights(cfg: Config) -> Optional[InitWeights]:
    """``checkpoint.init_from`` as the weights it names (a file, a folder's newest, or an MLflow run's), checked
    against ``cfg``'s architecture; None without it. The loop asks it only for a run that starts afresh."""
    if cfg.checkpoint.init_from is None:
        return None
    source = check_init_from(cfg)
    tags = {"init_from": cfg.checkpoint.init_from, "init_from_checkpoint": str(source.path)}
    if source.run_id:
        tags["init_from_run_id"] = source.run_id
    return InitWeights(source.path, source.model_state, tags)


def train_trials(trials: list[Config], ctx: DistContext, hooks: Optional[RunHooks] = None,
                 dataset: Optional[Dataset] = None, parent_run_id: Optional[str] = None) -> list[RunResult]:
    """Train ``trials`` (one run, or a stack of trials of one architecture) on this rank; one result each."""
    trackers = [make_tracker(cfg, ctx, parent_run_id) for cfg in trials]
    return train(trials, ctx, trackers, hooks=hooks, dataset=dataset, init_weights=init_weights)


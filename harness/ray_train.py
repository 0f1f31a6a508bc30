"""Ray Train glue: the worker function TorchTrainer runs, and its resume/report hooks.

Ray Train made the process group; this module only reads it
(``distributed.context_from_process_group``) and calls the same ``train`` as
torchrun. Resume comes from ``ray.train.get_checkpoint()`` (the newest checkpoint
Ray registered, which after a kill may be one epoch older than the newest file
rank 0 wrote: the tracker's (metric, step) dedup makes that harmless). Every
rank reports after every epoch; only rank 0 attaches a checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import ray.train

from harness import checkpoint as ckpt
from harness.config import Config
from harness.distributed import DistContext, context_from_process_group
from harness.train_loop import RunHooks, train


class RayHooks(RunHooks):
    def __init__(self):
        super().__init__(resume=True)
        self._restored_dir: Optional[str] = None

    def restore(self, cfg: Config) -> Optional[Path]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        # A private folder per worker: to_directory()'s default path is shared by
        # every worker of the node, and two downloads into it race.
        self._restored_dir = tempfile.mkdtemp(prefix="harness-restore-")
        checkpoint.to_directory(self._restored_dir)
        return ckpt.newest_checkpoint(Path(self._restored_dir))

    def after_epoch(self, epoch: int, metrics: dict[str, float], checkpoint: Optional[Path], ctx: DistContext) -> None:
        if self._restored_dir:  # read by now: the loop restores before its first epoch
            shutil.rmtree(self._restored_dir, ignore_errors=True)
            self._restored_dir = None
        report = {"epoch": epoch, **metrics}
        if checkpoint is None:
            ray.train.report(report)
            return
        with tempfile.TemporaryDirectory(prefix="harness-ckpt-") as staging:
            shutil.copy2(checkpoint, Path(staging) / checkpoint.name)
            # SYNC upload: the checkpoint is in Ray's storage when report returns.
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(staging))


def worker_loop(loop_config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: rebuild the config, train, report."""
    cfg = Config.from_dict(loop_config["config"])
    ctx = context_from_process_group(cfg.train.device, launcher="ray")
    result = train(cfg, ctx, hooks=RayHooks(), parent_run_id=loop_config.get("parent_run_id"))
    if ctx.is_main:
        print(f"[{cfg.name}] finished on {ctx.world_size} Ray workers: MLflow run {result.run_id or '-'}", flush=True)


def worker_env() -> dict[str, str]:
    """Variables the workers need from the submitting process (Ray does not pass its environment)."""
    names = ("MLFLOW_TRACKING_URI", "HARNESS_DATA_DIR", "HARNESS_GIT_COMMIT", "HARNESS_INJECT_FAULT")
    return {name: os.environ[name] for name in names if os.environ.get(name)}

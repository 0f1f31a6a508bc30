"""What a run records from rank 0, and when: console lines and its MLflow run (params, tags, metrics).

The loop calls the tracker on every rank; ``make_tracker`` hands the other ranks a :class:`NullTracker`,
so the loop has no ``if rank == 0``. Values arrive already reduced: no collectives in here. MLflow queries,
store checks and the spool are mlflow_store.py's; a resumed run skips every (metric, step) it already holds.
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path
from typing import Any, Optional

import torch

from harness import signals
from harness.console import say, warn
from harness.core.checkpoint import SPOOL_NAME, checkpoint_dir
from harness.core.config import Config, flatten
from harness.core.distributed import DistContext
from harness.records.mlflow_store import (Spool, apply_record, child_runs, default_tracking_uri, end_running_children,
                                          experiment_id, log_params, logged_steps, newest_sweep_run, now_ms,
                                          open_client)


def git_commit() -> str:
    """The commit of the harness checkout, or $HARNESS_GIT_COMMIT where there is no .git (Ray jobs)."""
    if commit := os.environ.get("HARNESS_GIT_COMMIT"):
        return commit
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# Config keys that apply only where another setting says so: (key or key prefix, does it apply to cfg).
APPLIES_ONLY = (
    ("data.synthetic.", lambda c: c.data.dataset == "synthetic"),
    ("optim.betas", lambda c: c.optim.name != "sgd"), ("optim.eps", lambda c: c.optim.name != "sgd"),
    *((key, lambda c: c.optim.batch_schedule != "constant") for key in (
        "optim.batch_steps", "optim.batch_noise_", "optim.batch_lr_rule", "optim.max_global_batch_size")),
    ("optim.warmup_epochs", lambda c: c.optim.warmup_epochs > 0),
    ("metrics.sharpness_", lambda c: c.metrics.sharpness or c.metrics.sharpness_every is not None),
    ("metrics.noise_scale_", lambda c: c.metrics.noise_scale),
    ("metrics.noise_window_steps", lambda c: c.metrics.exact_noise_samples is not None),
    ("metrics.hessian_noise_deviations", lambda c: c.metrics.hessian_noise_samples is not None),
)


def applicable(cfg: Config, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` without what does not apply to this run: unset keys (None) and the keys of a feature it does
    not use (no ``data.synthetic.*`` on Fashion-MNIST, no Adam's betas under SGD), so that the MLflow UI's
    param lists and dropdowns hold what the run is."""
    skipped = [prefix for prefix, applies in APPLIES_ONLY if not applies(cfg)]
    return {k: v for k, v in params.items() if v is not None and not any(k.startswith(p) for p in skipped)}


def run_params(cfg: Config, ctx: DistContext) -> dict[str, Any]:
    """The resolved config (flattened keys) plus short names every launcher shares."""
    params = applicable(cfg, {k: v for k, v in flatten(cfg).items() if not k.startswith("tracking.")})
    params.update(world_size=ctx.world_size, launcher=ctx.launcher)
    if cfg.is_sweep:  # a sweep's parent run: the trials carry the per-run names below
        return params
    return {
        **params,
        "batch_size": cfg.optim.global_batch_size,
        # The compare view's scatter axes are linear: log2 spaces batch sizes 32..8192 evenly.
        "log2_batch_size": round(math.log2(cfg.optim.global_batch_size), 3),
        "per_rank_batch_size": cfg.optim.global_batch_size // ctx.world_size,
        "lr": cfg.optim.lr,
        "lr_rule": cfg.trial.lr_rule if cfg.trial else "none",
        "seed": cfg.seed,
        "device_type": ctx.device.type,
    }


def display_name(cfg: Config) -> str:
    """The MLflow run name: a trial leads with what differs between trials (``bs32 lr0.1 s0 none``),
    so the UI's truncated name column still tells runs apart; another run takes ``tracking.run_name`` (which
    the launchers fill in from the config's name and its overrides), else its config's name."""
    if cfg.is_sweep:
        return sweep_display_name(cfg)
    if cfg.trial is None:
        return cfg.tracking.run_name or cfg.name
    return f"bs{cfg.optim.global_batch_size} lr{cfg.optim.lr:.4g} s{cfg.seed} {cfg.trial.lr_rule}"


def sweep_display_name(cfg: Config) -> str:
    """A sweep's parent run named by what it swept: ``sweep: batch 32-2048 x 3 LRs x 2 seeds``."""
    sweep = cfg.sweep
    sizes = sorted(sweep.batch_sizes)
    parts = [f"batch {sizes[0]}-{sizes[-1]}" if len(sizes) > 1 else f"batch {sizes[0]}"]
    lrs = len(sweep.lr_grid())
    parts += [f"{lrs} LRs"] if lrs > 1 else []
    parts += [f"{len(sweep.seeds)} seeds"] if len(sweep.seeds) > 1 else []
    parts += [f"rules {'/'.join(sweep.lr_rules)}"] if len(sweep.lr_rules) > 1 else []
    return f"{cfg.name}: {' x '.join(parts)}"


def run_description(cfg: Config) -> str:
    """The run's description in the MLflow UI (tag ``mlflow.note.content``, Markdown)."""
    if cfg.is_sweep:
        sweep = cfg.sweep
        return (f"Batch-size sweep `{cfg.name}`: batch sizes {list(sweep.batch_sizes)}, seeds {list(sweep.seeds)}, "
                f"LR rules {list(sweep.lr_rules)} (base LR {cfg.optim.lr:g} at batch {sweep.base_batch_size}). "
                "One child run per trial. This run's metrics have step = batch size, one key per LR rule "
                "(e.g. `by_batch/test_accuracy_none`): its charts plot them against batch size. "
                "Tables and plots: artifacts, folder `report/`.")
    steps = "Metrics have step = epoch; `by_step/<metric>` holds the same values with step = optimizer step."
    if cfg.trial is not None:
        return (f"Trial `{cfg.name}` of sweep `{cfg.trial.sweep}`: batch {cfg.optim.global_batch_size}, "
                f"LR {cfg.optim.lr:.4g} (rule {cfg.trial.lr_rule}), seed {cfg.seed}. {steps}")
    return f"Run `{cfg.name}`: batch {cfg.optim.global_batch_size}, LR {cfg.optim.lr:.4g}, seed {cfg.seed}. {steps}"


# Per-epoch metrics also logged with step = optimizer step, under ``by_step/<key>``: loss against optimizer
# steps (MLflow's charts' x axis) shows whether a large batch makes up for taking fewer steps.
BY_STEP_KEYS = ("train_loss", "train_loss_running", "train_accuracy", "val_loss", "val_accuracy", "test_loss",
                "test_accuracy", "generalization_gap_accuracy", "generalization_gap_loss")


class NullTracker:
    """What ranks other than 0 get: accepts every call, writes nothing."""

    run_id: Optional[str] = None

    def start(self, resume_run_id: Optional[str] = None, launch_id: Optional[str] = None) -> Optional[str]:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_model(self, build_model) -> None:
        pass

    def log_epoch(self, metrics: dict[str, float], epoch: int, global_step: int) -> None:
        """An epoch's metrics at step = epoch, and again at step = optimizer step (``by_step/...``)."""
        self.log_metrics(metrics, step=epoch)
        self.log_metrics({f"by_step/{k}": metrics[k] for k in BY_STEP_KEYS if k in metrics}, step=global_step)

    def log_metric_history(self, key: str, points: list[tuple[int, float]]) -> None:
        """``key`` at many steps at once, ``points`` = [(step, value), ...] (one record, not one per step)."""

    def unfinished_sweep_run(self, sweep_name: str) -> Optional[str]:
        return None

    def finished_children(self, parent_run_id: str) -> frozenset:
        return frozenset()

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def end_running_children(self, parent_run_id: Optional[str], status: str) -> list[str]:
        return []


class ConsoleTracker(NullTracker):
    """Rank 0 without MLflow: epoch lines on stdout."""

    EPOCH_KEYS = ("train_loss", "val_accuracy", "test_loss", "test_accuracy", "epoch_s")

    def __init__(self, cfg: Config, ctx: DistContext):
        self.cfg, self.ctx = cfg, ctx

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "test_accuracy" in metrics:
            say(f"[{self.cfg.name}] epoch {step}/{self.cfg.total_epochs}  "
                + "  ".join(f"{k} {metrics[k]:.4f}" for k in self.EPOCH_KEYS if k in metrics), ctx=self.ctx)


class MLflowTracker(ConsoleTracker):
    """Rank 0 with MLflow: one run per training run, nested under a sweep's parent run. Records the server
    does not take go to a spool in the run's checkpoint folder, replayed once the server answers again."""

    def __init__(self, cfg: Config, ctx: DistContext, parent_run_id: Optional[str] = None):
        super().__init__(cfg, ctx)
        uri = cfg.tracking.uri or default_tracking_uri()
        if uri.startswith(("http://", "https://")):
            # MLflow's client retries a dead server for minutes per call: fail fast and spool instead.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.client = open_client(uri)  # MLflow is imported only when tracking is on
        self.parent_run_id = parent_run_id
        self._logged: set[tuple[str, int]] = set()
        self.spool = Spool(checkpoint_dir(cfg) / SPOOL_NAME)
        self._stale_logged = False  # after a failure the store may hold more than we know

    @signals.deferring  # a signal must not cut an MLflow write in half (see signals.deferred)
    def start(self, resume_run_id: Optional[str] = None, launch_id: Optional[str] = None) -> Optional[str]:
        """Create the run (or reopen ``resume_run_id``). ``launch_id`` is tagged on a new run: the launcher
        finds and ends it by that tag if the process holding it dies."""
        if resume_run_id:
            self.run_id = resume_run_id
            self._logged = logged_steps(self.client, resume_run_id)
            self.client.update_run(resume_run_id, status="RUNNING")
            self.client.set_tag(resume_run_id, "resumed", "true")
            return self.run_id
        commit = git_commit()
        # mlflow.source.git.commit is the key MLflow's UI shows; git_commit stays for older queries.
        tags = {"git_commit": commit, "mlflow.source.git.commit": commit, "torch_version": torch.__version__,
                "launcher": self.ctx.launcher, "world_size": str(self.ctx.world_size),
                "mlflow.note.content": run_description(self.cfg)}
        # trial: the trial's config name, what a resumed sweep matches on.
        # sweep_name: the sweep's config name, what a resumed sweep finds its parent run by.
        optional = {"launch_id": launch_id, "trial": self.cfg.name if self.cfg.trial is not None else None,
                    "sweep_name": self.cfg.name if self.cfg.is_sweep else None,
                    "mlflow.parentRunId": self.parent_run_id}
        tags.update({key: value for key, value in optional.items() if value})
        run = self.client.create_run(experiment_id(self.client, self.cfg.tracking.experiment),
                                     run_name=display_name(self.cfg), tags=tags)
        self.run_id = run.info.run_id
        log_params(self.client, self.run_id, run_params(self.cfg, self.ctx))
        return self.run_id

    @signals.deferring
    def _deliver(self, record: dict[str, Any]) -> None:
        """Send ``record``, after whatever the spool holds; spool it if the server does not answer."""
        if self.spool and not self._flush():
            self.spool.append(record)
            return
        try:
            apply_record(self.client, record, self._logged)
        except Exception as err:  # the server is down or unreachable: keep training
            warn(f"[{self.cfg.name}] MLflow unreachable ({type(err).__name__}); spooling to {self.spool.path}",
                 ctx=self.ctx)
            self._stale_logged = True
            self.spool.append(record)

    def _flush(self) -> bool:
        try:
            if self._stale_logged:  # a batch may have arrived although its answer was lost
                self._logged = logged_steps(self.client, self.run_id)
                self._stale_logged = False
            for record in self.spool.records():
                apply_record(self.client, record, self._logged)
        except Exception:
            self._stale_logged = True
            return False
        self.spool.remove()
        warn(f"[{self.cfg.name}] MLflow reachable again: spooled records delivered", ctx=self.ctx)
        return True

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        super().log_metrics(metrics, step)
        fresh = {k: float(v) for k, v in metrics.items() if (k, step) not in self._logged}
        if fresh:
            self._deliver({"op": "metrics", "run_id": self.run_id, "step": step, "timestamp_ms": now_ms(),
                           "metrics": fresh})

    def log_metric_history(self, key: str, points: list[tuple[int, float]]) -> None:
        fresh = [[int(step), float(value)] for step, value in points if (key, step) not in self._logged]
        if fresh:
            self._deliver({"op": "history", "run_id": self.run_id, "key": key, "timestamp_ms": now_ms(),
                           "points": fresh})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._deliver({"op": "tags", "run_id": self.run_id, "tags": {k: str(v) for k, v in tags.items()}})

    def log_model(self, build_model) -> None:
        """The model ``build_model()`` returns (on the CPU) as the run's MLflow model, artifact ``model``: loadable with
        ``mlflow.pytorch.load_model(f"runs:/{run_id}/model")`` where the harness (or a factory's module) imports.
        Pickled (MLflow's pt2 format would trace a forward pass), with torch's pin as its only requirement
        (MLflow would otherwise infer the environment, which takes seconds). A store that does not take it
        costs the model, not the run."""
        import logging
        import tempfile

        import mlflow.pytorch

        pytorch_log = logging.getLogger("mlflow.pytorch")  # its warning about pickle on every save
        level, pytorch_log.level = pytorch_log.level, logging.ERROR
        try:
            with tempfile.TemporaryDirectory(prefix="harness-model-") as folder:
                mlflow.pytorch.save_model(build_model(), f"{folder}/model", serialization_format="pickle",
                                          pip_requirements=[f"torch=={torch.__version__}"])
                self.client.log_artifacts(self.run_id, f"{folder}/model", "model")
        except Exception as err:  # noqa: BLE001 - an unreachable store, a model that does not pickle
            warn(f"[{self.cfg.name}] the final model was not logged to MLflow ({type(err).__name__}: {err}); "
                 "its checkpoint holds the weights", ctx=self.ctx)
        finally:
            pytorch_log.level = level

    def finish(self, status: str = "FINISHED") -> None:
        if not self.run_id:
            return
        self._deliver({"op": "terminate", "run_id": self.run_id, "status": status})
        if self.spool:
            warn(f"[{self.cfg.name}] MLflow still unreachable: the run's last records are kept in "
                 f"{self.spool.path}; deliver them with: harness replay {self.spool.path} "
                 f"--tracking-uri {self.cfg.tracking.uri}", ctx=self.ctx)

    def unfinished_sweep_run(self, sweep_name: str) -> Optional[str]:
        """The newest parent run of this sweep that did not finish (killed: RUNNING; broken: FAILED)."""
        run = newest_sweep_run(self.client, self.cfg.tracking.experiment, sweep_name)
        return run.info.run_id if run is not None and run.info.status != "FINISHED" else None

    def end_running_children(self, parent_run_id: Optional[str], status: str) -> list[str]:
        """End the parent's child runs still RUNNING with ``status`` (their process could not: SIGKILL, a
        cancelled Ray task); returns their ids. Best effort: the parent's own record says how the sweep ended."""
        if not parent_run_id:
            return []
        return end_running_children(self.client, parent_run_id, status, f"[{self.cfg.name}] the sweep's child run")

    def finished_children(self, parent_run_id: str) -> frozenset:
        """Config names (tag ``trial``) of the parent's child runs that FINISHED: trials a resumed sweep skips."""
        return frozenset(c.data.tags["trial"] for c in child_runs(self.client, parent_run_id)
                         if c.info.status == "FINISHED" and "trial" in c.data.tags)


def make_tracker(cfg: Config, ctx: DistContext, parent_run_id: Optional[str] = None):
    if not ctx.is_main:
        return NullTracker()
    if cfg.tracking.enabled:
        return MLflowTracker(cfg, ctx, parent_run_id)
    return ConsoleTracker(cfg, ctx)



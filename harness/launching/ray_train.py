"""Ray Train glue: the worker function TorchTrainer runs, and its resume/report hooks.

Ray Train made the process group; the worker only reads it (``distributed.context_from_process_group``)
and trains through the same loop as torchrun (one run, or a stack of a sweep's trials). Every rank
reports after every epoch; only rank 0 attaches a checkpoint (``RayHooks``). Resume comes from
``ray.train.get_checkpoint()``, which after a kill may be an epoch older than rank 0's newest file:
the tracker's (metric, step) dedup makes that harmless. The run is tagged with the ranks' Ray node
ids (``ray_worker_nodes``): where the workers ran, checked rather than assumed, after every restart.

The driver's side is ``prepare_ray_run`` and ``fit`` (one run); a Tune sweep's trials call
``build_trainer`` (``tune_sweep``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import ray.train
import torch.distributed
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train import LoggingConfig as TrainLoggingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from harness import faults, signals
from harness.core.checkpoint import checkpoint_dir, newest_in
from harness.core.config import Config
from harness.core.data import load_dataset
from harness.core.distributed import (COLLECTIVE_CAPTURE_ENV, DistContext, allow_collective_capture,
                                     context_from_process_group)
from harness.core.train_loop import RunHooks, RunResult
from harness.records.mlflow_store import end_runs_of_launch
from harness.launching.ray_cluster import resolve_storage_path
from harness.launching.runs import train_trials


class RayHooks(RunHooks):
    """Resume from Ray's newest registered checkpoint; with ``resume_local`` (a resumed sweep), from each
    run's own checkpoint folder when Ray has none.

    Ray keeps one checkpoint per report, so the loop reports once per epoch (``epoch_done``) with
    every member's newest checkpoint file in a folder named as its run's checkpoint folder, and, for
    a run alone, the epoch's metrics (for Tune's schedulers). A member whose run has ended stays in
    every later report, so a restart finds it ended and does not train it again.
    """

    def __init__(self, resume_local: bool = False, launch_id: Optional[str] = None,
                 worker_nodes: Optional[list[str]] = None):
        super().__init__(resume=resume_local, launch_id=launch_id)
        self._restored_dir: Optional[str] = None
        self.worker_nodes = worker_nodes or []
        self.latest: dict[str, Path] = {}  # member's folder name -> its newest checkpoint file (main rank only)
        self.epoch_metrics: list[dict[str, float]] = []  # this epoch's, one per member that ended it

    def run_tags(self) -> dict[str, str]:
        """Each rank's Ray node id, in rank order, and how many nodes that is (again after a restart)."""
        if not self.worker_nodes:
            return {}
        return {"ray_worker_nodes": ",".join(self.worker_nodes),
                "ray_worker_node_count": str(len(set(self.worker_nodes)))}

    def restored_checkpoint(self, cfg: Config) -> Optional[Path]:
        """Run ``cfg``'s file in Ray's newest registered checkpoint (downloaded once); None if there is none."""
        if self._restored_dir is None:
            checkpoint = ray.train.get_checkpoint()
            if checkpoint is None:
                return None
            # A private folder per worker: to_directory()'s default path is shared by
            # every worker of the node, and two downloads into it race.
            self._restored_dir = tempfile.mkdtemp(prefix="harness-restore-")
            checkpoint.to_directory(self._restored_dir)
        name = checkpoint_dir(cfg).name
        path = newest_in(Path(self._restored_dir) / name)
        if path is not None:
            self.latest.setdefault(name, path)  # until the member saves again (or for good, if it has ended)
        return path

    def after_epoch(self, epoch: int, metrics: dict[str, float], checkpoint: Optional[Path], ctx: DistContext) -> None:
        if checkpoint is not None:
            self.latest[checkpoint.parent.name] = checkpoint
        self.epoch_metrics.append(metrics)

    def epoch_done(self, epoch: int, ctx: DistContext) -> None:
        report = {"epoch": epoch}
        if len(self.epoch_metrics) == 1:  # a run alone: its metrics, for Tune's schedulers
            report.update(self.epoch_metrics[0])
        self.epoch_metrics = []
        if not self.latest:  # a rank other than the main one (or checkpoints off)
            ray.train.report(report)
            return
        with tempfile.TemporaryDirectory(prefix="harness-ckpt-") as staging:
            for name, path in self.latest.items():
                (Path(staging) / name).mkdir()
                shutil.copy2(path, Path(staging) / name / path.name)
            # SYNC upload: the checkpoint is in Ray's storage when report returns.
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(staging))

    def close(self) -> None:
        """Remove Ray's downloaded checkpoint: the reports copy from it until the run ends."""
        if self._restored_dir:
            shutil.rmtree(self._restored_dir, ignore_errors=True)
            self._restored_dir = None


def result_dict(result: RunResult) -> dict[str, Any]:
    """What of a RunResult a worker hands back to the driver (``run_results`` reads it; a Tune
    trainable hands it on to its driver the same way)."""
    return {"run_id": result.run_id, "epochs_completed": result.epochs_completed,
            "global_step": result.global_step, "metrics": dict(result.metrics), "diverged": result.diverged}


def worker_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """What each Ray Train worker runs: rebuild the trials' configs (one run, or a stack), train, report.

    Returns each member's RunResult as a dict: Ray hands rank 0's to the driver as
    ``Result.return_value``, the only way the MLflow run ids (known to rank 0 alone) and a
    divergence (whose epoch is never reported) reach it. The members share the first one's data.
    """
    members = [Config.from_dict(member) for member in loop_config["configs"]]
    if not loop_config.get("ray_verbose"):
        quiet_train_reports()
    ctx = context_from_process_group(members[0].train.device, launcher="ray")
    hooks = RayHooks(loop_config.get("resume_local", False), loop_config.get("launch_id"), worker_node_ids(ctx))
    try:
        results = train_trials(members, ctx, hooks=hooks, dataset=load_dataset(members[0]),
                               parent_run_id=loop_config.get("parent_run_id"))
    finally:
        hooks.close()
    return {"members": [result_dict(result) for result in results]}


def quiet_train_reports() -> None:
    """Ray Train logs every ``ray.train.report`` of every rank ("Reporting training result N: TrainingReport(...)",
    with the checkpoint's full path) at INFO through a logger named after its module's file, which its
    log-level setting (``RunConfig.logging_config``, for loggers named ``ray.train``) does not reach."""
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def worker_node_ids(ctx: DistContext) -> list[str]:
    """Every rank's Ray node id, in rank order (a collective: every rank calls it); [] outside a Ray worker."""
    if not ray.is_initialized():  # Ray Train's local mode (num_workers=0) runs the loop in the driver
        return []
    node_id = ray.get_runtime_context().get_node_id()
    if ctx.world_size == 1 or not torch.distributed.is_initialized():
        return [node_id]
    gathered: list[Optional[str]] = [None] * ctx.world_size
    torch.distributed.all_gather_object(gathered, node_id)
    return [str(n) for n in gathered]


def worker_env() -> dict[str, str]:
    """Variables the workers need from the submitting process (Ray does not pass its environment)."""
    names = ("MLFLOW_TRACKING_URI", "HARNESS_DATA_DIR", "HARNESS_GIT_COMMIT", *faults.ACTIONS, *COLLECTIVE_CAPTURE_ENV)
    return {name: os.environ[name] for name in names if os.environ.get(name)}


# Ray Train's print patch in its workers sends every printed line (the epoch lines) to the driver
# twice; unpatched, a print reaches the driver once, through the worker's streamed stdout.
WORKER_RUNTIME_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


@dataclass(frozen=True)
class RayOptions:
    num_workers: int = 2
    use_gpu: bool = False
    max_failures: int = 1
    storage_path: str = "checkpoints/ray"
    placement_strategy: str = "PACK"  # see entrypoints.add_ray_arguments
    verbose: bool = False  # Ray's own INFO lines on the console too (entrypoints.ray_verbose)
    # Captured where the run is launched: Ray tasks and workers have another environment.
    env_vars: dict = field(default_factory=dict)


def prepare_ray_run(cfg: Config, num_workers: int, use_gpu: bool, max_failures: int,
                    storage_path: str, placement_strategy: str = "PACK",
                    verbose: bool = False) -> tuple[Config, RayOptions]:
    """The config with its folders made absolute, for workers that run elsewhere; the runs' options."""
    paths = {"checkpoint.dir": str(Path(cfg.checkpoint.dir).resolve())}
    if cfg.data.data_dir:
        paths["data.data_dir"] = str(Path(cfg.data.data_dir).resolve())
    if cfg.checkpoint.init_from and Path(cfg.checkpoint.init_from).exists():  # a path, not a run id
        paths["checkpoint.init_from"] = str(Path(cfg.checkpoint.init_from).resolve())
    if cfg.performance.cuda_graph and use_gpu:
        allow_collective_capture()  # here; worker_env() carries it to the workers
    env_vars = worker_env()
    if cfg.model.factory or cfg.data.factory:  # the workers import the user's modules from where this process does
        from harness.core.factories import import_roots
        roots = import_roots([cfg.model.factory, cfg.data.factory])
        env_vars["PYTHONPATH"] = os.pathsep.join(filter(None, (*roots, os.environ.get("PYTHONPATH"))))
    options = RayOptions(num_workers=num_workers, use_gpu=use_gpu, max_failures=max_failures,
                         storage_path=resolve_storage_path(storage_path), placement_strategy=placement_strategy,
                         verbose=verbose, env_vars=env_vars)
    return cfg.replace(**paths), options


def new_launch_id(cfg: Config) -> str:
    """A fresh name for one Ray Train run of ``cfg``: reusing one silently resumes the old
    run's snapshot. It is also the run's launch id, tagged on its MLflow run."""
    return f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def build_trainer(trials: list[Config], options: RayOptions, launch_id: str, parent_run_id: Optional[str] = None,
                  resume: bool = False, callbacks: tuple = ()) -> TorchTrainer:
    """The TorchTrainer of one run of the loop over ``trials`` (one run, or a stack); ``callbacks`` go to Ray
    Train's RunConfig (a Tune sweep passes the one that forwards each epoch's report to Tune)."""
    run_config = RunConfig(
        name=launch_id,
        storage_path=resolve_storage_path(options.storage_path),
        failure_config=FailureConfig(max_failures=options.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        worker_runtime_env={"env_vars": {**WORKER_RUNTIME_ENV, **options.env_vars}},
        callbacks=list(callbacks) or None,
        # Ray Train's own INFO lines (each report, each checkpoint, the worker group's start) off the console.
        logging_config=None if options.verbose else TrainLoggingConfig(log_level="WARNING"),
    )
    loop_config = {"parent_run_id": parent_run_id, "resume_local": resume, "launch_id": launch_id,
                   "configs": [trial.to_dict() for trial in trials], "ray_verbose": options.verbose}
    return TorchTrainer(
        worker_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if options.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=options.num_workers, use_gpu=options.use_gpu,
                                     placement_strategy=options.placement_strategy),
        run_config=run_config,
    )


def run_results(result, trials: list[Config]) -> list[RunResult]:
    """``worker_loop``'s results as RunResults, each with its member's folder of Ray's last checkpoint."""
    folder = Path(result.checkpoint.path) if result.checkpoint else None
    return [RunResult(returned["run_id"], returned["epochs_completed"], returned["global_step"],
                      returned["metrics"], diverged=returned["diverged"],
                      checkpoint=folder / checkpoint_dir(trial).name if folder else None)
            for trial, returned in zip(trials, result.return_value["members"])]


def fit(cfg: Config, options: RayOptions) -> RunResult:
    """One Ray Train run of ``cfg`` (a TorchTrainer) from this driver; rank 0's last report as a RunResult."""
    launch_id = new_launch_id(cfg)
    trainer = build_trainer([cfg], options, launch_id)
    # On an early stop the workers die with this driver (or already did) and cannot
    # end their MLflow run themselves: a signal here would leave it RUNNING.
    def on_stop(error: BaseException) -> None:
        # A signal interrupts only the wait (signals.call_interruptibly): fit itself goes on in its thread.
        fit_still_running = isinstance(error, (signals.Terminated, KeyboardInterrupt))
        end_orphaned_run(cfg, launch_id, signals.end_status(error), disconnect=not fit_still_running)

    result = signals.call_interruptibly(trainer.fit, "ray-train-fit", on_stop=on_stop)
    return run_results(result, [cfg])[0]


def end_orphaned_run(cfg: Config, launch_id: str, status: str, disconnect: bool) -> None:
    """End the MLflow run of launch ``launch_id`` with ``status`` if it is still RUNNING (best effort).

    Called by the driver when ``fit`` stops early. With ``disconnect`` (fit has returned) the driver
    leaves Ray first, which lets the workers go. Without it (a signal: fit still runs in its thread,
    inside Ray's C++ client) Ray stays up: ``ray.shutdown()`` under that thread would crash the driver
    with SIGSEGV instead of its exit 143; launch/ray_job.py then ends with ``os._exit``, and Ray ends
    the workers with it.
    """
    if not cfg.tracking.enabled:
        return
    if disconnect and ray.is_initialized():
        ray.shutdown()
    end_runs_of_launch(cfg, launch_id, status)

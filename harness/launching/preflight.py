"""Every check of a run's input that can fail before anything starts, in order.

Every launcher calls ``preflight`` after loading the config (``entrypoints.load_run_config``) and
before any process group, worker, trial or MLflow run exists, so a bad input is one ``InputError``
line and exit code 2 with nothing left behind. Each check lives with what it checks (config, data,
memory, tracking, checkpoints); this module owns their order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from harness import faults
from harness.core.checkpoint import Checkpoints, check_writable_dir, checkpoint_dir
from harness.core.config import Config, check_world_size
from harness.core.data import Dataset, load_dataset
from harness.core.distributed import pick_device
from harness.core.factories import check_model_output
from harness.core.model import build_model, is_mlp
from harness.core.precision import check_precision
from harness.launching.memory import check_memory
from harness.launching.ray_cluster import alive_nodes, check_cluster, check_storage_path
from harness.records.checkpoint_source import CheckpointSource, check_same_architecture, resolve_checkpoint
from harness.records.mlflow_store import (check_experiment, check_resume_run_in_store, check_tracking_server,
                                         check_tracking_uri, default_tracking_uri)


def preflight(cfg: Config, world_size: int, use_gpu: bool, *, resume: bool = False,
              launch_id: Optional[str] = None) -> Dataset:
    """Check the environment, tracking store, folders, memory, world size, device, data
    and (``resume``) the checkpoint to resume; the data set, read once, for the caller to train on.

    ``use_gpu``: every rank needs a CUDA device. ``launch_id`` (a torchrun restart):
    only this launch's checkpoints may be resumed; without it (``--resume``) the
    checkpoint's MLflow run must also be in the store, since the run continues there.
    """
    faults.check_env()
    if cfg.tracking.enabled:
        uri = cfg.tracking.uri or default_tracking_uri()
        check_tracking_uri(uri)
        check_tracking_server(uri)
        check_experiment(uri, cfg.tracking.experiment)
    if cfg.checkpoint.enabled or cfg.tracking.enabled:  # the MLflow spool lives in the run's folder too
        check_writable_dir(checkpoint_dir(cfg), "checkpoint.dir")
    check_memory(cfg, _device_type(cfg.train.device))
    check_precision(cfg.performance.precision, "cuda" if use_gpu else _device_type(cfg.train.device))
    check_world_size(cfg, world_size)
    if use_gpu:
        pick_device("cuda")
    dataset = load_dataset(cfg)  # a missing or damaged data file fails here, not in every rank or trial
    if not is_mlp(cfg):  # the user's model: built and run on two samples here, not first in every rank
        check_model_output(build_model(cfg), dataset.train.features, dataset.train.targets, cfg.num_classes,
                           cfg.model.factory)
    # A sweep config has no checkpoint of its own; its trials do.
    resumable = check_resumable(cfg, launch_id) if resume and not cfg.is_sweep else None
    # A run that resumes its own checkpoint ignores init_from (it has the weights), so its source may be gone.
    # Every trial of a sweep shares the model, so one check covers them all.
    if cfg.checkpoint.init_from is not None and resumable is None:
        check_init_from(cfg)
    return dataset


def check_resumable(cfg: Config, launch_id: Optional[str]) -> Optional[Path]:
    """The checkpoint a resumed run of ``cfg`` starts from (``Checkpoints.check_resumable``); a corrupt or
    foreign checkpoint, or (``--resume``) one whose MLflow run is not in the store, is refused here, not after init."""
    resumable = Checkpoints(cfg, launch_id=launch_id, same_launch_only=launch_id is not None).check_resumable()
    if launch_id is None and cfg.tracking.enabled:
        check_resume_run_in_store(cfg)
    return resumable


def check_init_from(cfg: Config) -> CheckpointSource:
    """The run's ``checkpoint.init_from``, resolved and checked to hold a network of the run's architecture."""
    source = resolve_checkpoint(cfg.checkpoint.init_from, cfg.tracking.uri or default_tracking_uri(),
                                "checkpoint.init_from")
    check_same_architecture(source, cfg, "checkpoint.init_from")
    return source


def _device_type(device: str) -> str:
    return "cuda" if device in ("cuda", "auto") and torch.cuda.is_available() else "cpu"


preflight_ray_storage = check_storage_path  # before joining Ray: the --storage-path where Ray keeps run state


def preflight_ray_cluster(cfg: Config, storage_path: str, shared_storage: bool, num_workers: int,
                          placement_strategy: str) -> None:
    """After joining Ray, before any worker or MLflow run: what a cluster of several nodes needs."""
    check_cluster(cfg, storage_path, shared_storage, num_workers, placement_strategy, alive_nodes())

"""What every command-line entry point shares: config arguments and the exit-2 rule.

A bad config, data file or checkpoint raises ``InputError``; ``exits_on_input_error``
turns it into one line on stderr and exit code 2. Launchers call ``load_run_config``
before they start any process group, worker or MLflow run.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Callable

from harness.config import Config, load_config
from harness.errors import USAGE_EXIT_CODE, InputError
from harness.tracking import (check_experiment, check_tracking_server, check_tracking_uri,
                              default_tracking_uri)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML file in configs/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set optim.lr=0.05 (repeatable)")


def load_run_config(args: argparse.Namespace) -> Config:
    """The validated config, with the tracking URI made absolute so workers elsewhere agree.

    Everything about the input that can be checked without reading the data is
    checked here, before any process group, worker or MLflow run starts.
    ``args.resolved_config`` (a sweep's torchrun trial) is a config already
    resolved by the parent process, as JSON: taken as it is, not re-parsed as YAML.
    """
    resolved = getattr(args, "resolved_config", None)
    if resolved and args.overrides:
        raise InputError("--set: not with --resolved-config; expected the overrides already applied in the JSON")
    if resolved:
        try:
            cfg = Config.from_dict(json.loads(resolved))
        except json.JSONDecodeError as err:
            raise InputError(f"--resolved-config: not JSON ({err.msg}); expected the JSON of a resolved config") from None
    else:
        cfg = load_config(args.config, args.overrides)
    check_run_input(cfg)
    return cfg if resolved or not cfg.tracking.enabled or cfg.tracking.uri else \
        cfg.replace(**{"tracking.uri": default_tracking_uri()})


def check_run_input(cfg: Config) -> None:
    """Checks outside the config file itself: environment, tracking store, folders, memory."""
    from harness import faults
    from harness.checkpoint import check_writable_dir, checkpoint_dir
    from harness.memory import check_memory

    faults.check_env()
    if cfg.tracking.enabled:
        uri = cfg.tracking.uri or default_tracking_uri()
        check_tracking_uri(uri)
        check_tracking_server(uri)
        check_experiment(uri, cfg.tracking.experiment)
    if cfg.checkpoint.enabled or cfg.tracking.enabled:  # the MLflow spool lives in the run's folder too
        check_writable_dir(checkpoint_dir(cfg), "checkpoint.dir")
    check_memory(cfg, _device_type(cfg.train.device))


def _device_type(device: str) -> str:
    import torch

    wants_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "cuda" if wants_cuda and torch.cuda.is_available() else "cpu"


def exits_on_input_error(main: Callable[..., int]) -> Callable[..., int]:
    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except InputError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return USAGE_EXIT_CODE

    return wrapper


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (ranks) per run")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    parser.add_argument("--max-failures", type=int, default=1, help="worker-group restarts per run")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    parser.add_argument("--storage-path", default="checkpoints/ray", help="where Ray keeps run state")


def prepare_ray_run(cfg: Config, args: argparse.Namespace):
    """Check everything before Ray starts; make paths absolute for workers elsewhere."""
    from pathlib import Path

    from harness.config import check_world_size
    from harness.data import load_dataset
    from harness.distributed import pick_device

    if args.num_workers < 1:
        raise InputError(f"--num-workers: expected a positive integer, got {args.num_workers}")
    check_world_size(cfg, args.num_workers)
    if args.use_gpu:
        pick_device("cuda")
    load_dataset(cfg)  # a missing or damaged data file fails here, not in every worker
    paths = {"checkpoint.dir": str(Path(cfg.checkpoint.dir).resolve())}
    if cfg.data.data_dir:
        paths["data.data_dir"] = str(Path(cfg.data.data_dir).resolve())
    from harness.distributed import allow_collective_capture
    from harness.ray_train import RayOptions, worker_env

    if cfg.performance.cuda_graph and args.use_gpu:
        allow_collective_capture()  # here; worker_env() carries it to the workers
    options = RayOptions(num_workers=args.num_workers, use_gpu=args.use_gpu, max_failures=args.max_failures,
                         storage_path=str(Path(args.storage_path).resolve()), env_vars=worker_env())
    return cfg.replace(**paths), options


def connect_ray(num_cpus=None) -> None:
    """Join $RAY_ADDRESS's cluster (always set inside a Ray job), else start a local Ray on loopback."""
    import os

    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1")

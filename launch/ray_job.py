"""Train one run, or a sweep, with Ray Train workers all-reducing through DDP.

    python launch/ray_job.py --config configs/fashion_mnist.yaml --num-workers 2 [--use-gpu]

Joins the Ray cluster at $RAY_ADDRESS (set inside a Ray job) or starts a local one.
Each run is a ``TorchTrainer`` with ``FailureConfig(max_failures)``: a worker that
dies is restarted and the run resumes from its newest checkpoint, into the same
MLflow run. A sweep runs its trials one after another under one parent run.
"""

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.config import check_world_size  # noqa: E402
from harness.data import load_dataset  # noqa: E402
from harness.distributed import DistContext, pick_device  # noqa: E402
from harness.entrypoints import add_config_arguments, exits_on_input_error, load_run_config  # noqa: E402
from harness.sweep import TrialOutcome, expand_trials, summary_table  # noqa: E402
from harness.tracking import make_tracker  # noqa: E402


def fit(cfg, args, parent_run_id=None):
    """One Ray Train run of ``cfg``; returns Ray's Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from harness.ray_train import worker_env, worker_loop

    run_config = RunConfig(
        # A fresh name per run: reusing one silently resumes the old run's snapshot.
        name=f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
        storage_path=str(Path(args.storage_path).resolve()),
        failure_config=FailureConfig(max_failures=args.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        worker_runtime_env={"env_vars": worker_env()},
    )
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"config": cfg.to_dict(), "parent_run_id": parent_run_id},
        torch_config=TorchConfig(backend="nccl" if args.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu),
        run_config=run_config,
    )
    return trainer.fit()


def connect_ray(args) -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:  # no cluster: a local one, on loopback, sized to this machine
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")


def run_sweep_on_ray(cfg, args) -> list:
    ctx = DistContext(world_size=args.num_workers, launcher="ray")
    parent = make_tracker(cfg, ctx)
    parent_run_id = parent.start()
    outcomes = []
    try:
        for trial in expand_trials(cfg):
            try:
                outcomes.append(TrialOutcome(trial, _trial_result(fit(trial, args, parent_run_id))))
            except Exception as err:  # one failed trial must not stop the sweep
                print(f"[{trial.name}] failed: {type(err).__name__}: {err}", file=sys.stderr)
                outcomes.append(TrialOutcome(trial, None, f"{type(err).__name__}: {err}"))
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.set_tags({"trials": len(outcomes), "trials_failed": sum(o.error is not None for o in outcomes)})
    parent.finish("FINISHED")
    return outcomes


def _trial_result(result):
    """Ray's Result holds rank 0's last report (the one with the newest checkpoint)."""
    from harness.train_loop import RunResult

    metrics = dict(result.metrics or {})
    epoch = int(metrics.pop("epoch", 0))
    return RunResult(None, epoch, int(metrics.get("global_step", 0)), metrics,
                     checkpoint=Path(result.checkpoint.path) if result.checkpoint else None)


@exits_on_input_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (ranks)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    parser.add_argument("--max-failures", type=int, default=1, help="worker-group restarts per run")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    parser.add_argument("--storage-path", default="checkpoints/ray", help="where Ray keeps run state")
    args = parser.parse_args(argv)
    cfg = load_run_config(args)
    if args.num_workers < 1:
        parser.error("--num-workers: expected a positive integer")
    # Everything that can be wrong with the input is found before Ray starts.
    check_world_size(cfg, args.num_workers)
    if args.use_gpu:
        pick_device("cuda")
    load_dataset(cfg)
    cfg = cfg.replace(**{"checkpoint.dir": str(Path(cfg.checkpoint.dir).resolve()),
                         **({"data.data_dir": str(Path(cfg.data.data_dir).resolve())} if cfg.data.data_dir else {})})
    connect_ray(args)
    if cfg.is_sweep:
        print(summary_table(run_sweep_on_ray(cfg, args)), flush=True)
    else:
        result = fit(cfg, args)
        print(f"finished {cfg.name} on Ray: checkpoint {result.checkpoint.path if result.checkpoint else '-'}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

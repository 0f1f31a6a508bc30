"""Train one run, or a whole sweep, on every rank of a torchrun job (or in this process).

    torchrun --standalone --nproc_per_node 2 launch/train.py --config configs/fashion_mnist.yaml
    python launch/train.py --config configs/seed.yaml --set optim.lr=0.05

A restart by ``torchrun --max-restarts`` continues from the newest checkpoint of
the same launch (torchrun's run id), into the same MLflow run; ``--resume``
continues from the run's newest checkpoint, whichever launch wrote it. SIGTERM or
SIGINT ends the run as KILLED (exit code 143 or 130); ``--resume`` continues it.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import signals  # noqa: E402
from harness.core import distributed  # noqa: E402
from harness.core.checkpoint import Checkpoints  # noqa: E402
from harness.running.mlflow_store import check_resume_run_in_store  # noqa: E402
from harness.core.config import check_world_size  # noqa: E402
from harness.core.data import load_dataset  # noqa: E402
from harness.running.entrypoints import ArgumentParser, add_config_arguments, exits_on_input_error, load_run_config  # noqa: E402
from harness.running.sweep import run_sweep, select_trial, summary_table  # noqa: E402
from harness.core.train_loop import RunHooks, train  # noqa: E402
from harness.console import say  # noqa: E402


@signals.exits_on_termination
@exits_on_input_error
def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("--trial", type=int, default=None,
                        help="with a sweep config: run only this trial (0-based; launch/sweep.py uses it)")
    parser.add_argument("--parent-run-id", default=None, help="MLflow run to nest this run under")
    parser.add_argument("--resolved-config", default=None, metavar="JSON",
                        help="the whole resolved config as JSON, used instead of --config and --set "
                             "(launch/sweep.py passes it so trials do not re-parse values as YAML)")
    args = parser.parse_args(argv)
    cfg = load_run_config(args)
    if args.trial is not None:
        cfg = select_trial(cfg, args.trial)
    under_torchrun = "RANK" in os.environ
    _, local_rank, world_size = distributed.torchrun_world()
    # Everything that can be wrong with the input is found before the process group starts.
    check_world_size(cfg, world_size)
    distributed.pick_device(cfg.train.device, local_rank)
    dataset = load_dataset(cfg)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    resume = args.resume or restart
    # torchrun's run id is new for every launch (a uuid with --standalone or one node).
    # A restart may resume only what this launch wrote: an earlier run's checkpoints
    # in the same folder are not its own (unless the user asked for --resume).
    hooks = RunHooks(resume=resume, launch_id=os.environ.get("TORCHELASTIC_RUN_ID"),
                     same_launch_only=restart and not args.resume)
    if resume and not cfg.is_sweep:
        # a corrupt or foreign checkpoint is refused here, not after init
        Checkpoints(cfg, launch_id=hooks.launch_id, same_launch_only=hooks.same_launch_only).check_resumable()
        if args.resume and cfg.tracking.enabled:
            check_resume_run_in_store(cfg)
    if cfg.performance.cuda_graph:
        distributed.allow_collective_capture()
    ctx = distributed.init_from_env(cfg.train.device) if under_torchrun else distributed.local_context(cfg.train.device)
    try:
        if cfg.is_sweep:
            say("", summary_table(run_sweep(cfg, ctx, dataset=dataset, resume=resume).outcomes), ctx=ctx)
        else:
            result = train(cfg, ctx, hooks=hooks, dataset=dataset, parent_run_id=args.parent_run_id)
            say(f"finished {cfg.name}: epochs {result.epochs_completed}, steps {result.global_step}, "
                f"test accuracy {result.metrics.get('test_accuracy', float('nan')):.4f}, "
                f"MLflow run {result.run_id or '-'}, checkpoint {result.checkpoint or '-'}", ctx=ctx)
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run a batch-size sweep: every (LR rule, batch size, seed) trial, then the report.

    python launch/sweep.py --config configs/sweep.yaml [--launcher local|torchrun|ray] [--nproc N]

- ``local``: every trial in this process, one after another.
- ``torchrun``: every trial as its own ``torchrun --nproc_per_node N`` job.
- ``ray``: every trial as its own Ray Train run of N workers, concurrently where
  the cluster has room (joins $RAY_ADDRESS, else starts a local Ray).

One MLflow parent run holds one child run per trial. A trial that fails or
diverges is recorded and the sweep goes on. With tracking on, the sweep ends with
``harness report``'s table and the path of its plots.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.config import check_world_size  # noqa: E402
from harness.data import load_dataset  # noqa: E402
from harness.distributed import DistContext, local_context  # noqa: E402
from harness.entrypoints import (add_config_arguments, add_ray_arguments, connect_ray,  # noqa: E402
                                 exits_on_input_error, load_run_config, prepare_ray_run)
from harness.errors import InputError  # noqa: E402
from harness.sweep import TrialOutcome, expand_trials, run_sweep, summary_table, sweep_parent_run  # noqa: E402

LAUNCHERS = ("local", "torchrun", "ray")


def torchrun_sweep(cfg, args):
    """Each trial as a torchrun job of ``--nproc`` ranks, nested under this process's parent run."""
    torchrun = Path(sys.executable).with_name("torchrun")
    with sweep_parent_run(cfg, DistContext(world_size=args.nproc, launcher="torchrun"), args.resume) as parent:
        for index, trial in enumerate(expand_trials(cfg)):
            if parent.skip(trial):
                continue
            command = [str(torchrun), "--standalone", f"--nproc_per_node={args.nproc}",
                       f"--max-restarts={args.max_restarts}", str(REPO / "launch/train.py"),
                       # The resolved config as JSON, not --set values: the trial would re-parse
                       # those as YAML, and a URI with " #" in it would lose its tail.
                       "--config", args.config, "--resolved-config", json.dumps(cfg.to_dict()),
                       "--trial", str(index)]
            if parent.run_id:
                command += ["--parent-run-id", parent.run_id]
            if args.resume:
                command.append("--resume")
            status = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}).returncode
            error = None if status == 0 else f"torchrun exited with {status}"
            if error:
                print(f"[{trial.name}] failed: {error}", file=sys.stderr, flush=True)
            parent.outcomes.append(TrialOutcome(trial, None, error))
    return parent


@exits_on_input_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--launcher", default="local", help="local, torchrun or ray")
    parser.add_argument("--nproc", type=int, default=None, help="ranks per trial (torchrun, ray); default 2")
    parser.add_argument("--max-restarts", type=int, default=1, help="torchrun restarts per trial")
    parser.add_argument("--report-dir", default="reports", help="where the report's files go")
    parser.add_argument("--resume", action="store_true",
                        help="reopen the newest unfinished sweep of this name: skip finished trials, resume the rest")
    add_ray_arguments(parser)
    args = parser.parse_args(argv)
    if args.launcher not in LAUNCHERS:
        raise InputError(f"--launcher: expected one of {', '.join(LAUNCHERS)}, got {args.launcher!r}")
    cfg = load_run_config(args)
    if not cfg.is_sweep:
        raise InputError(f"{args.config}: no sweep section; expected a sweep config (see configs/sweep.yaml)")
    args.nproc = args.nproc or (1 if args.launcher == "local" else 2)
    if args.launcher == "local" and args.nproc != 1:
        raise InputError("--nproc: the local launcher runs one process; use --launcher torchrun or ray")
    check_world_size(cfg, args.nproc)
    if args.launcher == "ray":
        args.num_workers = args.nproc
        cfg, options = prepare_ray_run(cfg, args)
        connect_ray(args.num_cpus)
        from harness.ray_train import run_sweep_on_ray

        sweep = run_sweep_on_ray(cfg, options, resume=args.resume)
    elif args.launcher == "torchrun":
        load_dataset(cfg)  # a missing or damaged data file fails before any trial starts
        sweep = torchrun_sweep(cfg, args)
    else:
        sweep = run_sweep(cfg, local_context(cfg.train.device), resume=args.resume)
    outcomes = sweep.outcomes
    if cfg.tracking.enabled:
        from harness.report import build_report

        report = build_report(cfg.tracking.uri, cfg.tracking.experiment, sweep_run_id=sweep.run_id,
                              out_dir=args.report_dir)
        print("\n" + report.markdown_table)
        print(f"\nreport: {report.directory} (plots: {', '.join(p.name for p in report.plots)})")
    else:
        print(summary_table(outcomes))
    failed = sum(o.error is not None for o in outcomes)
    print(f"{len(outcomes)} trials, {failed} failed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

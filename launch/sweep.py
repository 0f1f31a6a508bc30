"""Run a batch-size sweep: every (LR rule, batch size, seed) trial, then the report.

    python launch/sweep.py --config configs/sweep.yaml [--launcher local|torchrun|ray] [--nproc N]

- ``local``: every trial in this process, one after another.
- ``torchrun``: every trial as its own ``torchrun --nproc_per_node N`` job.
- ``ray``: every trial as its own Ray Train run of N workers, concurrently where
  the cluster has room (joins $RAY_ADDRESS, else starts a local Ray).

One MLflow parent run holds one child run per trial. A trial that fails or
diverges is recorded and the sweep goes on. With tracking on, the sweep ends with
``harness report``'s table and the path of its plots.

SIGTERM or SIGINT stops the running trials with the sweep (a trial's torchrun and
its ranks, the Ray tasks) and ends the parent and child runs as KILLED (exit code
143 or 130); ``--resume`` continues the sweep.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness import signals  # noqa: E402
from harness.console import say, warn  # noqa: E402
from harness.core.config import check_world_size  # noqa: E402
from harness.core.data import load_dataset  # noqa: E402
from harness.core.distributed import DistContext, local_context  # noqa: E402
from harness.running.entrypoints import (ArgumentParser, add_config_arguments, add_ray_arguments,  # noqa: E402
                                 connect_ray, exits_on_input_error, load_run_config, prepare_ray_run)
from harness.errors import InputError  # noqa: E402
from harness.running.sweep import SweepProgress, TrialOutcome, expand_trials, format_duration, run_sweep, summary_table, sweep_parent_run  # noqa: E402

LAUNCHERS = ("local", "torchrun", "ray")


# torchrun gives its ranks 30 s (--shutdown-timeout) to exit after the signal it
# passes on, then SIGKILLs them: wait longer than that before killing anything.
TRIAL_STOP_GRACE_S = 60


def run_trial_process(command: list[str], env: dict) -> int:
    """Run one trial's torchrun to its end; its exit code.

    torchrun runs in its own session, so a Ctrl-C in the terminal reaches it once,
    through us, not twice. On a termination signal it gets the same signal (it
    passes it on to its ranks, which end their MLflow run as KILLED) and time to
    exit; whatever of its process tree is still alive after that is killed, so no
    rank trains on as an orphan. (subprocess.run would SIGKILL torchrun alone and
    orphan its ranks, which run in sessions of their own.)
    """
    process = None
    try:
        process = subprocess.Popen(command, env=env, start_new_session=True)
        return process.wait()
    except BaseException as err:
        if process is not None:
            stop_process_tree(process, err.signum if isinstance(err, signals.Terminated) else signal.SIGTERM)
        raise


def stop_process_tree(process: subprocess.Popen, signum: int) -> None:
    """Send ``signum`` to ``process``, wait up to TRIAL_STOP_GRACE_S, then SIGKILL it and its descendants."""
    import psutil

    try:
        family = psutil.Process(process.pid).children(recursive=True)  # listed now: orphans lose their parent
    except psutil.NoSuchProcess:
        family = []
    if process.poll() is None:
        process.send_signal(signum)
    try:
        process.wait(TRIAL_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    _, alive = psutil.wait_procs(family, timeout=0)
    for leftover in alive:
        warn(f"killing pid {leftover.pid}, left behind by the trial's torchrun")
        try:
            leftover.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def torchrun_sweep(cfg, args):
    """Each trial as a torchrun job of ``--nproc`` ranks, nested under this process's parent run."""
    torchrun = Path(sys.executable).with_name("torchrun")
    progress = SweepProgress(len(expand_trials(cfg)))
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
            progress.starting(index, trial, f"torchrun --nproc_per_node={args.nproc} launch/train.py --trial {index}")
            status = run_trial_process(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
            error = None if status == 0 else f"torchrun exited with {status}"
            if error:
                warn(f"[{trial.name}] failed: {error}")
            parent.outcomes.append(TrialOutcome(trial, None, error))
    return parent


@signals.exits_on_termination
@exits_on_input_error
def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--launcher", default="local", choices=LAUNCHERS,
                        help="local: every trial in this process; torchrun: a torchrun job per trial; "
                             "ray: a Ray Train run per trial")
    parser.add_argument("--nproc", type=int, default=None,
                        help="ranks per trial (default: 1 with local, 2 with torchrun and ray)")
    parser.add_argument("--max-restarts", type=int, default=1, help="torchrun restarts per trial")
    parser.add_argument("--report-dir", default="reports", help="where the report's files go")
    parser.add_argument("--resume", action="store_true",
                        help="reopen the newest unfinished sweep of this name: skip finished trials, resume the rest")
    # Here the ranks per trial are --nproc for every launcher; --num-workers (shared
    # with launch/ray_job.py) is accepted with ray as the same thing, never a second value.
    add_ray_arguments(parser, num_workers_help="with --launcher ray: the same as --nproc "
                                               "(give one, or both equal; default: unset)")
    args = parser.parse_args(argv)
    args.nproc = merged_nproc(args)
    cfg = load_run_config(args)
    if not cfg.is_sweep:
        raise InputError(f"{args.config}: no sweep section; expected a sweep config (see configs/sweep.yaml)")
    args.nproc = args.nproc or (1 if args.launcher == "local" else 2)
    started_s = time.monotonic()
    if args.launcher == "local" and args.nproc != 1:
        raise InputError("--nproc: the local launcher runs one process; use --launcher torchrun or ray")
    check_world_size(cfg, args.nproc)
    if args.launcher == "ray":
        args.num_workers = args.nproc
        cfg, options = prepare_ray_run(cfg, args)
        connect_ray(args.num_cpus)
        signals.install()  # ray.init set its own SIGTERM handler (sys.exit)
        from harness.running.ray_train import run_sweep_on_ray

        sweep = run_sweep_on_ray(cfg, options, resume=args.resume)
    elif args.launcher == "torchrun":
        say(f"loading data ({cfg.data.dataset}) to check it before the first trial")
        load_dataset(cfg)  # a missing or damaged data file fails before any trial starts
        sweep = torchrun_sweep(cfg, args)
    else:
        say(f"loading data ({cfg.data.dataset})")
        sweep = run_sweep(cfg, local_context(cfg.train.device), resume=args.resume)
    outcomes = sweep.outcomes
    if cfg.tracking.enabled:
        say(f"building the report from MLflow ({cfg.tracking.uri})")
        from harness.results.report import build_report
        from harness.running.mlflow_store import ui_links

        report = build_report(cfg.tracking.uri, cfg.tracking.experiment, sweep_run_id=sweep.run_id,
                              out_dir=args.report_dir)
        say("\n" + report.markdown_table)
        say(f"\nreport: {report.directory} (plots: {', '.join(p.name for p in report.plots)})")
    else:
        say(summary_table(outcomes))
    failed = sum(o.error is not None for o in outcomes)
    say(f"{len(outcomes)} trials, {failed} failed, {format_duration(time.monotonic() - started_s)}")
    if cfg.tracking.enabled:
        say("\n".join(ui_links(cfg.tracking.uri, report.experiment_id, sweep.run_id)))
    return 0


def merged_nproc(args) -> int | None:
    """--nproc, or --num-workers where only that was given (ray only); a conflicting pair is refused."""
    if args.num_workers is None:
        return args.nproc
    if args.launcher != "ray":
        raise InputError(f"--num-workers: only with --launcher ray; the {args.launcher} launcher takes --nproc")
    if args.nproc is not None and args.nproc != args.num_workers:
        raise InputError(f"--num-workers {args.num_workers} and --nproc {args.nproc}: the same setting "
                         "(ranks per trial) given twice with different values; give one")
    return args.num_workers


if __name__ == "__main__":
    sys.exit(main())

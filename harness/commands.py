"""What each script in launch/ runs once its arguments are parsed: one function per script.

Each loads the config, calls ``preflight`` before any process group, worker, trial or MLflow run
starts, runs, and says what it did. The scripts keep the parser and the process's exit (signals,
exit codes). Ray Train (``ray_train``) is imported only by the Ray paths: it is slow to load.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Optional

from harness import signals
from harness.console import say
from harness.core import distributed
from harness.core.config import Config
from harness.core.train_loop import RunHooks
from harness.errors import InputError
from harness.launching.entrypoints import connect_ray, load_run_config, ray_verbose
from harness.launching import torchrun_nodes
from harness.launching.preflight import check_resumable, preflight, preflight_ray_cluster, preflight_ray_storage
from harness.launching.run_lock import run_folders_held
from harness.launching.runs import train_trials
from harness.sweeps.sweep import report_sweep, run_sweep, select_trial, select_trials, summary_table
from harness.sweeps.sweep_drivers import run_sweep_on_ray, torchrun_sweep


def train_command(args: argparse.Namespace, argv: Optional[list[str]] = None) -> int:
    """launch/train.py: one run, several as one stack (``--trials``), or a sweep config's trials, on every
    rank of a torchrun job or in this process. With ``--nnodes`` (not under torchrun): check, then become
    this node's torchrun running ``argv``."""
    cfg = load_run_config(args)
    refuse_early_stopping(cfg, "launch/train.py")
    if args.trials is not None and args.trial is not None:
        raise InputError(f"--trials {args.trials}: given together with --trial {args.trial}; expected one of them")
    # The trials this process trains as one run of the loop (one, or a stack); without either option a
    # sweep config runs as a sweep.
    members = select_trials(cfg, args.trials) if args.trials is not None \
        else [select_trial(cfg, args.trial)] if args.trial is not None else [cfg]
    cfg = members[0]
    if torchrun_nodes.starts_torchrun(args):
        world_size = torchrun_nodes.check_node_options(args)
        preflight(cfg, world_size, use_gpu=cfg.train.device == "cuda", resume=args.resume)
        torchrun_nodes.exec_torchrun(torchrun_nodes.torchrun_command(args, argv or []))
    torchrun_nodes.check_against_torchrun(args)
    under_torchrun = "RANK" in os.environ
    _, _, world_size = distributed.torchrun_world()
    # The attempt the ranks agree on through torchrun's store, not TORCHELASTIC_RESTART_COUNT:
    # on several nodes that count differs between nodes after a restart (distributed.agree_on_attempt).
    attempt = distributed.agree_on_attempt() if under_torchrun else 0
    restart = attempt > 0
    resume = args.resume or restart
    # torchrun's run id is new for every launch: a restart resumes only what this launch wrote, not an
    # earlier run's checkpoints in the same folder (unless the user asked for --resume).
    hooks = RunHooks(resume=resume, launch_id=os.environ.get("TORCHELASTIC_RUN_ID"),
                     same_launch_only=restart and not args.resume)
    launch_id = hooks.launch_id if hooks.same_launch_only else None
    dataset = preflight(cfg, world_size, use_gpu=cfg.train.device == "cuda", resume=resume, launch_id=launch_id)
    if resume:
        for member in members[1:]:  # preflight checked the first member's checkpoint
            check_resumable(member, launch_id)
    if cfg.performance.cuda_graph:
        distributed.allow_collective_capture()
    with contextlib.ExitStack() as held:
        # Rank 0 writes the folders (a sweep config's trials run in this process group, under its name);
        # the other ranks learn whether it may, so that a refusal ends every rank at once.
        refusal = None
        if int(os.environ.get("RANK", "0")) == 0:
            try:
                held.enter_context(run_folders_held(members, "sweep" if cfg.is_sweep else "run"))
            except InputError as err:
                refusal = str(err)
        if under_torchrun:
            refusal = distributed.rank_zero_refusal("folders-held", attempt, refusal)
        if refusal:
            raise InputError(refusal)
        ctx = distributed.init_from_env(cfg.train.device, attempt=attempt) if under_torchrun \
            else distributed.local_context(cfg.train.device)
        started_s, parent = time.monotonic(), None
        try:
            if cfg.is_sweep:
                parent = run_sweep(cfg, ctx, dataset=dataset, resume=resume)
            else:
                # Every member's data is the first's: select_trials refused members whose data differ.
                results = train_trials(members, ctx, hooks=hooks, dataset=dataset,
                                       parent_run_id=args.parent_run_id)
                for member, result in zip(members, results):
                    say(finished_line(member, result), ctx=ctx)
        except BaseException:
            distributed.shutdown()
            raise
        distributed.shutdown(finished=True)
        if parent is not None and ctx.is_main:  # the report reads MLflow alone: no collective after the group
            report_sweep(cfg, parent, args.report_dir, time.monotonic() - started_s)
    if under_torchrun and world_size > 1:
        distributed.end_rank_process(0)
    return 0


def finished_line(cfg: Config, result, on_ray: bool = False) -> str:
    """The line a launcher ends a run with."""
    records = [f"MLflow run {result.run_id or '-'}", f"checkpoint {result.checkpoint or '-'}"]
    return (f"finished {cfg.name}{' on Ray' if on_ray else ''}: epochs {result.epochs_completed}, "
            f"steps {result.global_step}, test accuracy {result.metrics.get('test_accuracy', float('nan')):.4f}, "
            f"{'diverged, ' if result.diverged else ''}" + ", ".join(records[::-1] if on_ray else records))


def ray_job_command(args: argparse.Namespace) -> int:
    """launch/ray_job.py: one run, or a sweep, as Ray Train runs of ``--num-workers`` ranks."""
    cfg = load_run_config(args)
    refuse_stacks_under_asha(cfg)
    cfg, options = start_ray(cfg, args, args.num_workers)
    if cfg.is_sweep:
        with run_folders_held([cfg], "sweep"):
            say(summary_table(run_sweep_on_ray(cfg, options).outcomes))
        return 0
    from harness.launching.ray_train import fit  # loaded by start_ray already

    with run_folders_held([cfg]):  # the driver: Ray's workers restart and may run on other nodes
        result = fit(cfg, options)
    say(finished_line(cfg, result, on_ray=True))
    return 0


def sweep_command(args: argparse.Namespace) -> int:
    """launch/sweep.py: every trial with ``--launcher`` (local, torchrun or ray), then the report."""
    nproc = ranks_per_trial(args)
    cfg = load_run_config(args)
    if not cfg.is_sweep:
        raise InputError(f"{args.config}: no sweep section; expected a sweep config (see configs/sweep.yaml)")
    if args.launcher != "ray":
        refuse_early_stopping(cfg, f"--launcher {args.launcher}")
    started_s = time.monotonic()
    if args.launcher == "local" and nproc != 1:
        raise InputError("--nproc: the local launcher runs one process; use --launcher torchrun or ray")
    if args.launcher == "ray":
        refuse_stacks_under_asha(cfg)
        cfg, options = start_ray(cfg, args, nproc)
        run = lambda: run_sweep_on_ray(cfg, options, resume=args.resume)  # noqa: E731
    elif args.launcher == "torchrun":
        say(f"loading data ({cfg.data.dataset}) to check it before the first trial")
        preflight(cfg, nproc, use_gpu=cfg.train.device == "cuda")
        run = lambda: torchrun_sweep(cfg, nproc, args.config, args.max_restarts, args.resume)  # noqa: E731
    else:
        say(f"loading data ({cfg.data.dataset})")
        dataset = preflight(cfg, nproc, use_gpu=cfg.train.device == "cuda")
        run = lambda: run_sweep(cfg, distributed.local_context(cfg.train.device), dataset=dataset,  # noqa: E731
                                resume=args.resume)
    # The sweep's folder is held by this driver from its last check to its report; each trial's by
    # whatever writes it (this process, or rank 0 of the trial's torchrun job).
    with run_folders_held([cfg], "sweep"):
        report_sweep(cfg, run(), args.report_dir, time.monotonic() - started_s)
    return 0


def refuse_early_stopping(cfg: Config, launcher: str) -> None:
    """Early stopping is a Ray Tune scheduler's: refuse it, before anything starts, with a launcher without Tune."""
    if cfg.is_sweep and cfg.sweep.early_stopping != "none":
        raise InputError(f"sweep.early_stopping: {cfg.sweep.early_stopping} stops trials through Ray Tune, not with "
                         f"{launcher}; expected --launcher ray (launch/sweep.py) or sweep.early_stopping=none")


def refuse_stacks_under_asha(cfg: Config) -> None:
    """ASHA stops one Ray Tune trial, and a stack of trials is one Tune trial: it would stop every member
    for the rank of one. Refused before Ray starts."""
    if cfg.is_sweep and cfg.sweep.stacks and cfg.sweep.early_stopping == "asha":
        raise InputError(f"sweep.stack_trials: {cfg.sweep.stack_trials} with sweep.early_stopping: asha; expected 1 "
                         "(ASHA stops each Ray Tune trial on its own, and a stack of trials is one Tune trial)")


def ranks_per_trial(args: argparse.Namespace) -> int:
    """--nproc, or --num-workers where only that was given (ray only), else 1 with the local
    launcher and 2 with the others; a conflicting pair is refused."""
    nproc = args.nproc
    if args.num_workers is not None:
        if args.launcher != "ray":
            raise InputError(f"--num-workers: only with --launcher ray; the {args.launcher} launcher takes --nproc")
        if nproc is not None and nproc != args.num_workers:
            raise InputError(f"--num-workers {args.num_workers} and --nproc {nproc}: the same setting "
                             "(ranks per trial) given twice with different values; give one")
        nproc = args.num_workers
    return nproc or (1 if args.launcher == "local" else 2)


def start_ray(cfg: Config, args: argparse.Namespace, num_workers: int):
    """Preflight for runs of ``num_workers`` Ray Train workers, then join (or start) Ray;
    the config and ``RayOptions`` the runs take (see ``ray_train.prepare_ray_run``)."""
    if num_workers < 1:
        raise InputError(f"--num-workers: expected a positive integer, got {num_workers}")
    if args.max_failures < -1:
        raise InputError(f"--max-failures: {args.max_failures}; expected -1 (restart without limit) or a number "
                         "of restarts, 0 or more")
    if args.num_cpus is not None and args.num_cpus < num_workers:
        raise InputError(f"--num-cpus: {args.num_cpus}; expected at least {num_workers}, the workers of a run (each "
                         "takes one CPU of the local Ray; with fewer the run would wait for them for ever)")
    preflight(cfg, num_workers, args.use_gpu)
    preflight_ray_storage(args.storage_path)
    from harness.launching.ray_train import prepare_ray_run  # only the Ray paths pay for loading Ray Train

    cfg, options = prepare_ray_run(cfg, num_workers, args.use_gpu, args.max_failures, args.storage_path,
                                   args.placement_strategy, verbose=ray_verbose(args))
    connect_ray(args.num_cpus, options.verbose)
    # Only now is the cluster known; still before any worker or MLflow run.
    preflight_ray_cluster(cfg, args.storage_path, args.shared_storage, num_workers, args.placement_strategy)
    signals.install()  # ray.init set its own SIGTERM handler (sys.exit)
    return cfg, options

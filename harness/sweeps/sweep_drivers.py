"""The sweep drivers that start other processes per trial: torchrun jobs and Ray Tune trials.

Each runs every trial of a sweep config under ``sweep.sweep_parent_run`` (which
skips the trials a resumed sweep already finished) and fills its outcomes; the
in-process driver, the trials, the parent run and the report are in ``sweep``,
and which driver runs is chosen by ``commands.sweep_command``. A trial that fails
is recorded and the sweep goes on; a termination signal stops the running trials
(a trial's torchrun and its ranks, the Tune trials) before the parent run ends KILLED.
The Ray driver's work is ``tune_sweep``'s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from harness import signals
from harness.console import warn
from harness.core.config import Config
from harness.core.distributed import DistContext
from harness.sweeps.sweep import (SweepParent, SweepProgress, TrialOutcome, expand_trials, in_sweep_order,
                                   pending_stacks, sweep_parent_run)

REPO = Path(__file__).resolve().parents[2]

# torchrun gives its ranks 30 s (--shutdown-timeout) to exit after the signal it
# passes on, then SIGKILLs them: wait longer than that before killing anything.
TRIAL_STOP_GRACE_S = 60


def torchrun_sweep(cfg: Config, nproc: int, config_path: str, max_restarts: int, resume: bool) -> SweepParent:
    """Each trial as a torchrun job of ``nproc`` ranks (launch/train.py --trial), nested under this
    process's parent run; with ``sweep.stack_trials``, each stack of trials as one job (--trials)."""
    trials = expand_trials(cfg)
    progress = SweepProgress(len(trials))
    with sweep_parent_run(cfg, DistContext(world_size=nproc, launcher="torchrun"), resume) as parent:
        # Each job's ranks load its first trial's data: trials whose data differ by seed go in different stacks.
        for indices in pending_stacks(cfg, trials, parent, split_by_seed=True):
            members = [trials[i] for i in indices]
            which = ["--trial", str(indices[0])] if len(indices) == 1 else ["--trials", ",".join(map(str, indices))]
            command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={nproc}",
                       f"--max-restarts={max_restarts}", str(REPO / "launch/train.py"),
                       # The resolved config as JSON, not --set values: the trial would re-parse
                       # those as YAML, and a URI with " #" in it would lose its tail.
                       "--config", config_path, "--resolved-config", json.dumps(cfg.to_dict()), *which]
            if parent.run_id:
                command += ["--parent-run-id", parent.run_id]
            if resume:
                command.append("--resume")
            progress.starting_stack(indices, members,
                                    f"torchrun --nproc_per_node={nproc} launch/train.py {' '.join(which)}")
            status = run_trial_process(command, env={**os.environ,
                                                     "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
            error = None if status == 0 else f"torchrun exited with {status}"
            for trial in members:  # a stack's members fail together: they ran in one job
                if error:
                    warn(f"[{trial.name}] failed: {error}")
                parent.outcomes.append(TrialOutcome(trial, None, error))
        in_sweep_order(parent, trials)
    return parent


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
    # Imported here only: psutil is not among launch/gpu-wheels.txt, so the GPU check's device
    # (which runs local sweeps, never this) may lack it.
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


def run_sweep_on_ray(cfg: Config, options, resume: bool = False) -> SweepParent:
    """Every trial as its own TorchTrainer, run as a Ray Tune experiment (``tune_sweep``): as
    many at once as the cluster's resources allow, stopped early by ASHA if
    ``sweep.early_stopping`` says so, under one MLflow parent run. ``options``: a
    ``ray_train.RayOptions``; Ray must be connected (``entrypoints.connect_ray``)."""
    # Imported here: ray, Ray Train and Tune take seconds to load, which the torchrun and local sweeps need not pay.
    from harness.sweeps.tune_sweep import run_tune_sweep

    return run_tune_sweep(cfg, options, resume)

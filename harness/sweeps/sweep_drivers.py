"""The sweep drivers that start other processes per trial: torchrun jobs and Ray Tune trials.

The trials, the parent run and the in-process driver are ``sweep``'s; the Ray driver's work is
``tune_sweep``'s. A termination signal stops the running trials (a torchrun and its ranks, the Tune
trials) before the parent run ends KILLED.
"""

from __future__ import annotations

import contextlib
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
from harness.sweeps.sweep import SweepParent, TrialOutcome, run_stacks

REPO = Path(__file__).resolve().parents[2]

# torchrun gives its ranks 30 s (--shutdown-timeout) to exit after the signal it
# passes on, then SIGKILLs them: wait longer than that before killing anything.
TRIAL_STOP_GRACE_S = 60


def torchrun_sweep(cfg: Config, nproc: int, config_path: str, max_restarts: int, resume: bool) -> SweepParent:
    """Each trial as a torchrun job of ``nproc`` ranks (launch/train.py --trial), nested under this
    process's parent run; with ``sweep.stack_trials``, each stack of trials as one job (--trials)."""
    def which(indices: list[int]) -> list[str]:
        return ["--trial", str(indices[0])] if len(indices) == 1 else ["--trials", ",".join(map(str, indices))]

    def run_job(members: list[Config], indices: list[int], parent: SweepParent) -> list[TrialOutcome]:
        command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={nproc}",
                   f"--max-restarts={max_restarts}", str(REPO / "launch/train.py"),
                   # The resolved config as JSON, not --set values: the trial would re-parse
                   # those as YAML, and a URI with " #" in it would lose its tail.
                   "--config", config_path, "--resolved-config", json.dumps(cfg.to_dict()), *which(indices)]
        if parent.run_id:
            command += ["--parent-run-id", parent.run_id]
        if resume:
            command.append("--resume")
        status = run_trial_process(command, {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        error = None if status == 0 else f"torchrun exited with {status}"
        if error:  # a stack's members fail together: they ran in one job
            for trial in members:
                warn(f"[{trial.name}] failed: {error}")
        return [TrialOutcome(trial, None, error) for trial in members]

    # Each job's ranks load its first trial's data: trials whose data differ by seed go in different stacks.
    return run_stacks(cfg, DistContext(world_size=nproc, launcher="torchrun"), resume, run_job, split_by_seed=True,
                      how=lambda indices: f"torchrun --nproc_per_node={nproc} launch/train.py "
                                          + " ".join(which(indices)))


def run_trial_process(command: list[str], env: dict) -> int:
    """Run one trial's torchrun (in its own session: a Ctrl-C reaches it once, through us) to its end; its
    exit code. On a termination signal it gets the same signal and time to exit, then what is left of its
    process tree is killed, so no rank trains on as an orphan (subprocess.run would kill torchrun alone)."""
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
    # Imported here: psutil is not in launch/gpu-wheels.txt (the GPU check runs local sweeps only).
    import psutil

    family = []  # listed now: orphans lose their parent
    with contextlib.suppress(psutil.NoSuchProcess):
        family = psutil.Process(process.pid).children(recursive=True)
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
        with contextlib.suppress(psutil.NoSuchProcess):
            leftover.kill()
    psutil.wait_procs(alive, timeout=10)


def run_sweep_on_ray(cfg: Config, options, resume: bool = False) -> SweepParent:
    """Every trial as its own TorchTrainer in a Ray Tune experiment (``tune_sweep``). ``options``: a
    ``ray_train.RayOptions``; Ray must be connected (``entrypoints.connect_ray``)."""
    # Imported here: ray, Ray Train and Tune take seconds to load, which the torchrun and local sweeps need not pay.
    from harness.sweeps.tune_sweep import run_tune_sweep

    return run_tune_sweep(cfg, options, resume)

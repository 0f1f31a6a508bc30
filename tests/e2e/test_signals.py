"""SIGTERM and SIGINT end runs as KILLED, never RUNNING; nothing trains on after them;
and a torchrun restart never takes over an earlier launch's run.

Slow: real processes (launch/train.py, torchrun and its ranks, launch/sweep.py),
real signals, a real SQLite MLflow store. Each waits for a line in the process's
output, not for a fixed time, before it sends the signal.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, REPO, seeded_store, smoke_config, train_run
from harness import signals
from harness.core.distributed import DistContext
from harness.records.tracking import make_tracker
from harness.core.train_loop import RunHooks, train

pytestmark = pytest.mark.slow

TRAIN = str(REPO / "launch/train.py")
SWEEP = str(REPO / "launch/sweep.py")
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
# Far more epochs than a test waits for (an epoch of the smoke config is ~0.05 s):
# the signal always lands mid-run.
MANY_EPOCHS = 2000
# A bound for waits on a process, so a broken handler fails the test instead of hanging it.
WAIT_S = 240


def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}


def _settings(tmp, *extra):
    return ["--set", f"tracking.uri={seeded_store(tmp)}", "--set", f"checkpoint.dir={tmp}/ckpt",
            "--set", f"train.epochs={MANY_EPOCHS}", *extra]


def start(tmp, command):
    """Start ``command`` in its own session, output to a log file (a pipe nobody reads could fill up)."""
    log = open(tmp / "output.log", "w")
    process = subprocess.Popen(command, cwd=tmp, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    process.log_path = tmp / "output.log"
    return process


def wait_for_line(process, pattern):
    """Block until the process's output has a line matching ``pattern`` (it is training by then)."""
    deadline = time.monotonic() + WAIT_S
    while not re.search(pattern, process.log_path.read_text(), re.MULTILINE):
        assert process.poll() is None, f"exited with {process.returncode}:\n" + process.log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "no line matching " + pattern
        time.sleep(0.1)


def descendants(process):
    return psutil.Process(process.pid).children(recursive=True)


def stop(process, signum):
    """Send ``signum``, wait for the exit; (exit code, output)."""
    os.kill(process.pid, signum)
    try:
        code = process.wait(WAIT_S)
    finally:
        if process.poll() is None:  # a failed test must not leave a training process behind
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return code, process.log_path.read_text()


def runs(tmp, experiment="smoke"):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    found = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([found.experiment_id]) if found else [])


def assert_all_gone(processes):
    _, alive = psutil.wait_procs(processes, timeout=0)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left running: {[(p.pid, p.cmdline()) for p in alive]}"


def newest_epoch(tmp, run_name):
    files = sorted((tmp / "ckpt" / run_name).glob("epoch-*.pt"))
    return torch.load(files[-1], weights_only=True)["epoch"]


def test_sigterm_ends_train_run_killed_and_resume_finishes_the_same_run(tmp_path):
    command = [sys.executable, TRAIN, "--config", str(CONFIGS / "smoke.yaml"), *_settings(tmp_path)]
    process = start(tmp_path, command)
    wait_for_line(process, r"^\[smoke\] epoch 2/")
    code, output = stop(process, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    client, (run,) = runs(tmp_path)
    assert run.info.status == "KILLED"

    # Fewer epochs than planned: the resumed run goes one epoch past its checkpoint and ends.
    epochs = newest_epoch(tmp_path, "smoke") + 1
    resumed = subprocess.run(command + ["--resume", "--set", f"train.epochs={epochs}"], cwd=tmp_path, env=_env(),
                             capture_output=True, text=True, timeout=WAIT_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client, (run,) = runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.tags.get("resumed") == "true"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")] == list(range(1, epochs + 1))


def test_sigint_ends_train_run_killed(tmp_path):
    process = start(tmp_path, [sys.executable, TRAIN, "--config", str(CONFIGS / "smoke.yaml"), *_settings(tmp_path)])
    wait_for_line(process, r"^\[smoke\] epoch 2/")
    code, output = stop(process, signal.SIGINT)
    assert code == 128 + signal.SIGINT, output[-3000:]
    _, (run,) = runs(tmp_path)
    assert run.info.status == "KILLED"


class SignalThenBrokenCollective(RunHooks):
    """What rank 0 of a torchrun job meets when its peer exits first on the same
    SIGTERM: the signal arrives, then a collective fails (here raised by hand)."""

    def after_epoch(self, epoch, metrics, checkpoint, ctx):
        if epoch == 1:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(WAIT_S)  # the handler raises before this ends
            except signals.Terminated:
                raise RuntimeError("Connection closed by peer") from None


def test_error_surfacing_after_a_termination_signal_still_ends_the_run_killed(tmp_path):
    cfg = smoke_config(tmp_path)
    tracker = make_tracker(cfg, DistContext())
    code = signals.exits_on_termination(lambda: train([cfg], DistContext(), [tracker],
                                                  hooks=SignalThenBrokenCollective()))()
    assert code == 128 + signal.SIGTERM
    assert MlflowClient(tracking_uri=cfg.tracking.uri).get_run(tracker.run_id).info.status == "KILLED"


def test_sigterm_to_torchrun_agent_ends_two_rank_run_killed(tmp_path):
    process = start(tmp_path, [TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=1", TRAIN,
                               "--config", str(CONFIGS / "smoke.yaml"), *_settings(tmp_path)])
    wait_for_line(process, r"^\[smoke\] epoch 2/")
    ranks = descendants(process)
    assert len(ranks) >= 2
    code, output = stop(process, signal.SIGTERM)
    assert code != 0, output[-3000:]
    _, (run,) = runs(tmp_path)
    assert run.info.status == "KILLED", output[-3000:]
    assert_all_gone(ranks)


SIGNAL_SWEEP = f"""
name: sig
seed: 0
data: {{dataset: fashion-mnist, validation_size: 256, train_subset: 512, test_subset: 512}}
model: {{hidden_sizes: [32], activation: sigmoid}}
optim: {{lr: 0.1, momentum: 0.9, global_batch_size: 64}}
train: {{epochs: {MANY_EPOCHS}, progress: false}}
tracking: {{experiment: sig}}
sweep: {{batch_sizes: [64], seeds: [0], base_batch_size: 64}}
"""


# No plain "torchrun": its sweep driver, process tree and rank are torchrun-stacked's, and a run alone
# under torchrun ending KILLED is test_sigterm_to_torchrun_agent_ends_two_rank_run_killed's.
@pytest.mark.parametrize("launcher", ["local", "local-stacked", "torchrun-stacked"])
def test_sigterm_to_sweep_kills_parent_and_child_runs_and_leaves_no_process(tmp_path, launcher):
    config = tmp_path / "sig.yaml"
    # -stacked: two trials (two LRs) trained as one stack, whose two member runs must both end KILLED.
    stacked = launcher.endswith("-stacked")
    launcher = launcher.removesuffix("-stacked")
    config.write_text(SIGNAL_SWEEP.replace("base_batch_size: 64}", "base_batch_size: 64, lrs: [0.05, 0.1], "
                                                                   "stack_trials: auto}") if stacked else SIGNAL_SWEEP)
    process = start(tmp_path, [sys.executable, SWEEP, "--config", str(config), "--launcher", launcher,
                               # One rank: the agent test covers two; here the claim is the process tree.
                               *(["--nproc", "1"] if launcher == "torchrun" else []),
                               "--set", f"tracking.uri={seeded_store(tmp_path)}",
                               "--set", f"checkpoint.dir={tmp_path}/ckpt", "--report-dir", str(tmp_path / "reports")])
    wait_for_line(process, r"^\[.*\] epoch 2/")
    trial_processes = descendants(process)  # torchrun and its rank; none for the local launcher
    assert len(trial_processes) >= (2 if launcher == "torchrun" else 0)
    code, output = stop(process, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    client, found = runs(tmp_path, "sig")
    parents = [r for r in found if r.data.tags.get("run_kind") == "sweep"]
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == (2 if stacked else 1), [(r.info.run_name, r.data.tags) for r in found]
    assert parents[0].info.status == "KILLED" and {c.info.status for c in children} == {"KILLED"}
    if stacked:
        assert {c.data.tags["stack_size"] for c in children} == {"2"}
    assert_all_gone(trial_processes)


def test_torchrun_restart_during_startup_starts_afresh_instead_of_resuming_an_earlier_launch(tmp_path):
    """An earlier run's checkpoints are in the folder; a rank of a new launch dies before
    the first checkpoint, torchrun restarts the ranks: they must train a run of their own."""
    smoke = ["--config", str(CONFIGS / "smoke.yaml"), *_settings(tmp_path, "--set", "train.epochs=2")]
    # The earlier run in this process (no interpreter to start): same store, same checkpoint folder.
    train_run(smoke_config(tmp_path, f"checkpoint.dir={tmp_path}/ckpt", "train.epochs=2"), DistContext())
    _, (earlier_run,) = runs(tmp_path)
    assert list((tmp_path / "ckpt" / "smoke").glob("epoch-*.pt")), "the earlier run left no checkpoint to take over"

    process = start(tmp_path, [TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=1", TRAIN, *smoke])
    deadline = time.monotonic() + WAIT_S
    while len(ranks := descendants(process)) < 2:  # the ranks are starting: far from their first checkpoint
        assert process.poll() is None and time.monotonic() < deadline, process.log_path.read_text()[-3000:]
        time.sleep(0.02)
    ranks[-1].kill()
    assert process.wait(WAIT_S) == 0, process.log_path.read_text()[-3000:]
    output = process.log_path.read_text()

    client, found = runs(tmp_path)
    by_id = {r.info.run_id: r for r in found}
    assert len(found) == 2, output[-3000:]
    assert "resumed" not in by_id[earlier_run.info.run_id].data.tags
    (new_run,) = [r for r in found if r.info.run_id != earlier_run.info.run_id]
    assert new_run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(new_run.info.run_id, "test_accuracy")] == [1, 2]


def test_a_signal_during_an_mlflow_write_is_raised_when_the_write_is_done():
    """A Terminated raised inside a SQLite transaction left the store locked, and the
    run RUNNING: inside signals.deferred() the signal waits for the block's end."""
    happened = []

    @signals.exits_on_termination
    def main():
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs in here, and holds the exception back
            happened.append("write finished")
        happened.append("went on after the signal")
        return 0

    assert main() == 128 + signal.SIGTERM
    assert happened == ["write finished"]

"""One run of a name at a time: while a run (or a sweep) of a name trains, a second start of that
name is refused in one line, locally and under torchrun, before it makes an MLflow run or touches
the folder; the first keeps its own weights; killed with SIGKILL, it leaves no lock behind."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, REPO, run_command, seeded_store

pytestmark = pytest.mark.slow

TORCHRUN = str(REPO / ".venv/bin/torchrun") if (REPO / ".venv/bin/torchrun").exists() else "torchrun"
# A sweep of one trial on the smoke data; its trial's folder is named after the trial.
SWEEP = (CONFIGS / "smoke.yaml").read_text() + "sweep: {batch_sizes: [64], seeds: [0], lr_rules: [none]}\n"
KINDS = {
    # kind: (script, its config, the folder the first one's checkpoints go to, the name the refusal gives)
    "run": ("launch/train.py", None, "smoke", "another run named smoke"),
    "sweep": ("launch/sweep.py", "sweep.yaml", "smoke-none-bs64-seed0", "another sweep named smoke"),
}


def command(tmp_path, kind, lr, epochs, *extra):
    script, config, _, _ = KINDS[kind]
    if config:
        (tmp_path / config).write_text(SWEEP)
    return [str(REPO / script), "--config", str(tmp_path / config if config else CONFIGS / "smoke.yaml"),
            "--set", f"tracking.uri={seeded_store(tmp_path)}", "--set", f"checkpoint.dir={tmp_path}/ckpt",
            "--set", f"optim.lr={lr}", "--set", f"train.epochs={epochs}", *extra,
            *(["--launcher", "local", "--report-dir", str(tmp_path / "reports")] if kind == "sweep" else [])]


def store_runs(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    return client.search_runs([client.get_experiment_by_name("smoke").experiment_id])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_second_start_of_a_name_is_refused_while_the_first_trains_and_the_first_keeps_its_weights(tmp_path, kind):
    _, _, folder_name, holder = KINDS[kind]
    folder = tmp_path / "ckpt" / folder_name
    held_at = tmp_path / "held"
    # The first is held (asleep, not training) in epoch 2, once epoch 1's checkpoint is written.
    first = subprocess.Popen([sys.executable, *command(tmp_path, kind, 0.1, 3)], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                             env={**os.environ, "HARNESS_INJECT_HOLD": f"step:2:0:{held_at}"})
    try:
        deadline = time.monotonic() + 120
        while not held_at.exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first never reached epoch 2"
            time.sleep(0.2)
        assert (folder / "epoch-0001.pt").exists()
        runs_before = {r.info.run_id for r in store_runs(tmp_path)}
        held = tmp_path / "ckpt" / "smoke" / ".lock"  # the run's folder, or the sweep's (its name is smoke too)
        second = run_command([sys.executable, *command(tmp_path, kind, 0.05, 1)], cwd=tmp_path, timeout=120)
        assert second.returncode == 2, second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint.dir: {held.parent} is in use by "
                                                       f"{holder} (pid {first.pid} on "), lines
        if kind == "run":  # under torchrun, rank 0 refuses before its process group
            ranks = run_command([TORCHRUN, "--standalone", "--nproc-per-node=2", *command(tmp_path, kind, 0.05, 1)],
                                cwd=tmp_path, timeout=120)
            assert ranks.returncode != 0
            assert any(line.startswith("error: checkpoint.dir: ") for line in ranks.stderr.splitlines()), \
                ranks.stderr[-3000:]
        assert {r.info.run_id for r in store_runs(tmp_path)} == runs_before  # no MLflow run of the second
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    kept = sorted(folder.glob("epoch-*.pt"))
    assert kept[-1].name == "epoch-0001.pt"  # the first's checkpoints, written before it was held, are its own
    assert {torch.load(path, weights_only=False)["config"]["optim"]["lr"] for path in kept} == {0.1}
    if kind == "run":  # the kernel dropped the killed run's lock: a new start of the name runs, and replaces it
        third = run_command([sys.executable, *command(tmp_path, kind, 0.05, 1)], cwd=tmp_path, timeout=300)
        assert third.returncode == 0, third.stderr[-3000:]
        assert torch.load(folder / "epoch-0001.pt", weights_only=False)["config"]["optim"]["lr"] == 0.05

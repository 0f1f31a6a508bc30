"""Stacks under torchrun: launch/train.py --trials I,J,... trains a sweep config's trials as one
stack on every rank, each member ends where its trial run alone ends, a restart after SIGKILL
resumes every member exactly, and the torchrun sweep driver runs each stack as one job."""

import importlib.util
import sys

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO, run_command, seeded_store, train_run, trial_runs
from harness.core.config import Config
from harness.core.data import load_dataset
from harness.core.distributed import DistContext
from harness.launching.runs import train_trials
from harness.core.train_loop import RunHooks
from harness.sweeps.sweep import expand_trials

TRAIN = str(REPO / "launch/train.py")
EPOCHS = 3
# digits after a validation split of 100: 1337 training samples, so batch 64 ends each epoch with a
# batch of 57, which 2 ranks split 29/28. Base batch 32 makes the three rules' LRs differ (0.2, 0.4,
# 0.28) and their warmups too (none: 0; linear, sqrt: 1.5 epochs, so a restart after epoch 1 lands
# mid-warmup). One seed: a stack's members share the first trial's data.
SWEEP = f"""
name: stk
data: {{dataset: digits, validation_size: 100}}
model: {{hidden_sizes: [32], activation: sigmoid}}
optim: {{lr: 0.2, momentum: 0.9, global_batch_size: 64}}
train: {{epochs: {EPOCHS}, progress: false}}
tracking: {{experiment: stk}}
sweep: {{batch_sizes: [64], seeds: [0], lr_rules: [none, linear, sqrt], base_batch_size: 32, warmup_epochs: 1.5}}
"""


def _sweep_file(folder):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "stk.yaml"
    path.write_text(SWEEP)
    return path


def _settings(folder):
    return ["--set", f"tracking.uri={seeded_store(folder)}", "--set", f"checkpoint.dir={folder}/ckpt"]


def _torchrun(folder, nproc, *extra, env=None, max_restarts=0):
    """``torchrun launch/train.py --trials 0,1,2`` under a parent run made here; the parent's id."""
    config = _sweep_file(folder)
    client = MlflowClient(tracking_uri=seeded_store(folder))
    parent = client.create_run(client.create_experiment("stk")).info.run_id
    torchrun = str(REPO / ".venv/bin/torchrun") if (REPO / ".venv/bin/torchrun").exists() else "torchrun"
    result = run_command([torchrun, "--standalone", f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}",
                          TRAIN, "--config", str(config), *_settings(folder), "--trials", "0,1,2",
                          "--parent-run-id", parent, *extra], cwd=folder, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return parent


def _trials():
    """The trial configs, as every rank builds them (their names say where the checkpoints are)."""
    return expand_trials(Config.from_dict(yaml.safe_load(SWEEP)))


def _final_params(folder, trial):
    return torch.load(folder / "ckpt" / trial.name / f"epoch-{EPOCHS:04d}.pt", weights_only=True)["model"]


def _members(folder, parent: str) -> tuple[MlflowClient, dict]:
    """The store's client, and the parent's child runs by trial name; every one FINISHED."""
    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    runs = trial_runs(client, [client.get_experiment_by_name("stk").experiment_id], parent)
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    return client, {r.data.tags["trial"]: r for r in runs}


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    """Each trial alone, in this process (train_loop.train, no tracking): its final parameters."""
    folder = tmp_path_factory.mktemp("solo")
    finals = {}
    for trial in _trials():
        cfg = trial.replace(**{"tracking.enabled": False, "checkpoint.dir": str(folder / "ckpt")})
        finals[trial.name] = torch.load(train_run(cfg, DistContext()).checkpoint, weights_only=True)["model"]
    return finals


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The stack on two torchrun ranks, started by the torchrun sweep driver (sweep.stack_trials auto):
    ``torchrun --nproc_per_node=2 launch/train.py --trials 0,1,2`` under the sweep's parent run. One run
    for three tests: the driver's, two ranks against each trial alone, and the kills' uninterrupted twin."""
    folder = tmp_path_factory.mktemp("two_ranks")
    config = _sweep_file(folder)
    result = run_command([sys.executable, str(REPO / "launch/sweep.py"), "--config", str(config), "--launcher",
                          "torchrun", "--nproc", "2", *_settings(folder), "--set", "sweep.stack_trials=auto",
                          "--report-dir", str(folder / "reports")], cwd=folder, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    (parent,) = client.search_runs([client.get_experiment_by_name("stk").experiment_id], "tags.run_kind = 'sweep'")
    return folder, parent.info.run_id, result.stdout


def _assert_members_match_solo(folder, solo):
    for trial in _trials():
        stacked, alone = _final_params(folder, trial), solo[trial.name]
        worst = max(float((stacked[k] - alone[k]).abs().max()) for k in alone)
        assert worst <= 1e-5, (trial.name, worst)


# --- bad input: refused in one line before any process group or run -------------------------


def _load_launcher():
    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REFUSALS = {
    "not a sweep": ([], "--trials 0,1: 'stk' is not a sweep config; expected a config with a sweep section",
                    "0,1"),
    "out of range": ([], "--trials 0,3: trial 3 does not exist; expected indices 0..2", "0,3"),
    "repeated": ([], "--trials 1,1: trial 1 given more than once; expected each trial once", "1,1"),
    "not indices": ([], "--trials 0,x: expected comma-separated trial indices", "0,x"),
    "batch sizes differ": (["sweep.batch_sizes=[32,64]", "sweep.lr_rules=[none]"],
                           "optim.global_batch_size: the stacked trials differ (32, 64)", "0,1"),
    "seeds differ": (["sweep.seeds=[0,1]", "sweep.lr_rules=[none]"],
                     "--trials 0,1: trials of seeds 0, 1 hold different data (the split of digits depends on the "
                     "seed); expected trials of one seed", "0,1"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_trials_that_cannot_share_a_stack_are_refused_in_one_line_before_anything_starts(
        tmp_path, capsys, monkeypatch, case):
    overrides, expected, trials = REFUSALS[case]
    monkeypatch.chdir(tmp_path)
    config = _sweep_file(tmp_path / "config")
    if case == "not a sweep":  # the same config without its sweep section
        config.write_text(SWEEP.split("sweep:")[0])
    argv = ["--config", str(config), "--set", f"checkpoint.dir={tmp_path}/ckpt",
            "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "--trials", trials]
    for override in overrides:
        argv += ["--set", override]
    status = _load_launcher().main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith(f"error: {expected}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config"], "something was left behind"


def test_trials_together_with_trial_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status = _load_launcher().main(["--config", str(_sweep_file(tmp_path / "config")), "--trials", "0,1",
                                    "--trial", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err == ["error: --trials 0,1: given together with --trial 2; expected one of them"]


def test_resume_refuses_a_corrupt_checkpoint_of_any_member_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    last = _trials()[2]  # preflight reads the first member's data and checkpoint; the others' are checked too
    folder = tmp_path / "ckpt" / last.name
    folder.mkdir(parents=True)
    (folder / "epoch-0001.pt").write_bytes(b"not a checkpoint")
    status = _load_launcher().main(["--config", str(_sweep_file(tmp_path / "config")), "--trials", "0,1,2",
                                    "--resume", "--set", f"checkpoint.dir={tmp_path}/ckpt",
                                    "--set", "tracking.enabled=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {folder}/epoch-0001.pt: corrupt checkpoint"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "config"]
    assert [p.name for p in folder.iterdir()] == ["epoch-0001.pt"]


def test_members_resumed_from_different_epochs_end_as_the_uninterrupted_stack(tmp_path):
    """A kill between two members' epoch-end saves leaves the first a checkpoint ahead of the others:
    each resumes from its own (the stack splits by epoch) and ends where the uninterrupted stack ends."""
    def trials(folder, epochs):
        return [t.replace(**{"tracking.enabled": False, "checkpoint.dir": str(folder / "ckpt"),
                             "train.epochs": epochs}) for t in _trials()]

    dataset = load_dataset(trials(tmp_path, EPOCHS)[0])
    train_trials(trials(tmp_path / "straight", EPOCHS), DistContext(), dataset=dataset)
    # What such a kill leaves on disk: every member's epoch 1, the first member's epoch 2 too.
    train_trials(trials(tmp_path, 1), DistContext(), dataset=dataset)
    train_trials(trials(tmp_path, 2)[:1], DistContext(), dataset=dataset, hooks=RunHooks(resume=True))
    results = train_trials(trials(tmp_path, EPOCHS), DistContext(), dataset=dataset, hooks=RunHooks(resume=True))
    assert [r.epochs_completed for r in results] == [EPOCHS] * 3
    for trial in trials(tmp_path, EPOCHS):
        resumed, straight = _final_params(tmp_path, trial), _final_params(tmp_path / "straight", trial)
        # <= 1e-6, not equal: the first member's epoch 2 ran in a stack of one, whose batched matrix
        # products may round differently from a stack of three.
        assert max(float((resumed[k] - straight[k]).abs().max()) for k in straight) <= 1e-6, trial.name


# --- end to end ------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_sweep_runs_a_stack_as_one_job_and_its_members_match_their_runs_alone(two_ranks, solo):
    """The torchrun driver with sweep.stack_trials auto: the three trials are one job,
    ``torchrun --nproc_per_node=2 launch/train.py --trials 0,1,2``; each member one FINISHED child run."""
    folder, parent_id, stdout = two_ranks
    assert "trials 1, 2, 3/3 as one stack" in stdout
    assert "torchrun --nproc_per_node=2 launch/train.py --trials 0,1,2" in stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["trials_failed"] == "0"
    _, members = _members(folder, parent_id)
    assert sorted(members) == sorted(t.name for t in _trials())
    assert {r.data.tags["stack_size"] for r in members.values()} == {"3"}
    _assert_members_match_solo(folder, solo)


@pytest.mark.slow
def test_stack_on_two_torchrun_ranks_matches_each_trial_run_alone(two_ranks, solo):
    folder, parent, _ = two_ranks
    _, members = _members(folder, parent)
    assert sorted(members) == sorted(t.name for t in _trials())
    assert all(r.data.params["world_size"] == "2" for r in members.values())
    _assert_members_match_solo(folder, solo)


@pytest.mark.slow
def test_stack_killed_mid_checkpoint_resumes_every_member_exactly_after_torchrun_restarts(two_ranks, tmp_path):
    """Rank 0 dies while writing the first member's epoch-3 checkpoint, after that member logged epoch 3
    and before the others did: torchrun restarts both ranks, every member resumes from its own epoch-2
    checkpoint into its own MLflow run, and the first must not log epoch 3 twice. (A stack killed in the
    middle of an epoch: tests/e2e/test_stacked_ray.py.)"""
    marker = tmp_path / "killed-checkpoint"
    parent = _torchrun(tmp_path, 2, env={"HARNESS_INJECT_FAULT": f"checkpoint:3:0:{marker}"}, max_restarts=1)
    assert marker.exists(), "the fault was never injected"
    straight_folder, straight_parent, _ = two_ranks
    client, members = _members(tmp_path, parent)
    straight_client, straight = _members(straight_folder, straight_parent)
    assert sorted(members) == sorted(straight) and len(members) == 3
    for trial in _trials():
        run, twin = members[trial.name], straight[trial.name]
        assert run.data.tags.get("resumed") == "true", trial.name
        resumed, uninterrupted = _final_params(tmp_path, trial), _final_params(straight_folder, trial)
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted), trial.name
        assert run.data.metrics.keys() == twin.data.metrics.keys(), trial.name
        for key in twin.data.metrics:  # every (metric, step) once, at the steps of the uninterrupted run
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == sorted(m.step for m in straight_client.get_metric_history(twin.info.run_id, key)), \
                (trial.name, key, steps)
            assert len(steps) == len(set(steps)), (trial.name, key, steps)
        assert not list((tmp_path / "ckpt" / trial.name).glob(".epoch-*")), "a half-written checkpoint was left"

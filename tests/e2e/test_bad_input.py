"""Bad input, through the real entry points: one line naming the key or file and what
was expected, exit code 2, and nothing left behind (no MLflow store or run, no
checkpoint file, no process)."""

import functools
import gzip
import importlib.util
import os
import shutil
import sys

import pytest
import torch

from conftest import CONFIGS, REPO, free_port, run_command, seeded_store

SMOKE = str(CONFIGS / "smoke.yaml")


def _load_launcher(name):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_launcher = _load_launcher("train")
sweep_launcher = _load_launcher("sweep")
ray_launcher = _load_launcher("ray_job")


@pytest.fixture
def place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)
    return tmp_path


def write(place, text):
    path = place / "bad.yaml"
    path.write_text(text)
    return str(path)


def assert_refused(place, capsys, status, expected, before=()):
    """Exit 2, exactly one line on stderr containing ``expected``, nothing new on disk."""
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    left = {p.name for p in place.iterdir()} - {"bad.yaml", "data", *before}
    assert not left, f"left behind: {left}"


LOSS_TARGETS = "train.target_train_loss: expected a positive number, or a non-empty list of distinct positive numbers"
CONFIG_CASES = {
    "yaml syntax": ("optim: {lr: 0.1\n", "bad.yaml: YAML syntax error at line"),
    "unknown key": ("optim: {learning_rate: 0.1}\n", "optim.learning_rate: unknown key"),
    "wrong type": ("optim: {global_batch_size: many}\n", "optim.global_batch_size: expected an integer"),
    "zero batch": ("optim: {global_batch_size: 0}\n", "optim.global_batch_size: expected a positive number, got 0"),
    "negative lr": ("optim: {lr: -0.5}\n", "optim.lr: expected a positive number, got -0.5"),
    "nan lr": ("optim: {lr: .nan}\n", "optim.lr: expected a finite number"),
    "zero epochs": ("train: {epochs: 0}\n", "train.epochs: expected a positive number, got 0"),
    "batch larger than data": ("optim: {global_batch_size: 60000}\n",
                               "optim.global_batch_size: 60000 is larger than the training set (55000 samples)"),
    "unknown dataset": ("data: {dataset: imagenet}\n", "data.dataset: expected one of 'fashion-mnist'"),
    "unknown activation": ("model: {activation: softplus}\n", "model.activation: expected one of 'sigmoid'"),
    "unknown lr rule": ("sweep: {batch_sizes: [32], lr_rules: [cubic]}\n", "sweep.lr_rules: expected a non-empty list"),
    "nan sweep size": ("sweep: {batch_sizes: [.nan]}\n", "sweep.batch_sizes[0]: expected an integer"),
    "graph switch not a boolean": ("performance: {cuda_graph: maybe}\n",
                                   "performance.cuda_graph: expected true or false, got str 'maybe'"),
    "zero training-loss target": ("train: {target_train_loss: 0}\n", f"{LOSS_TARGETS}, got 0"),
    "negative training-loss target": ("train: {target_train_loss: -0.5}\n", f"{LOSS_TARGETS}, got -0.5"),
    "repeated training-loss targets": ("train: {target_train_loss: [0.3, 0.3]}\n", f"{LOSS_TARGETS}, got [0.3, 0.3]"),
    "two stopping rules": ("train: {target_train_loss: 0.5, stop_at_target: true}\n",
                           "train.target_train_loss: 0.5 given together with train.stop_at_target true; "
                           "expected at most one stopping rule (train.stop_at_target false)"),
    "zero sharpness interval": ("metrics: {sharpness_every: 0}\n",
                                "metrics.sharpness_every: expected a positive number, got 0"),
    "negative sharpness interval": ("metrics: {sharpness_every: -3}\n",
                                    "metrics.sharpness_every: expected a positive number, got -3"),
    "unknown sharpness unit": ("metrics: {sharpness_every_unit: days}\n",
                               "metrics.sharpness_every_unit: expected one of 'steps', 'doubling_steps', 'epochs'"),
    "bf16 with the hand-written engine": ("performance: {precision: bf16}\ntrain: {grad_engine: manual}\n",
                                          "performance.precision: bf16 with train.grad_engine manual; the "
                                          "hand-written backward is fp32/fp64 only"),
    "unknown precision": ("performance: {precision: fp16}\n", "performance.precision: expected one of 'fp32', 'bf16'"),
    "blank init_from": ("checkpoint: {init_from: '  '}\n", "checkpoint.init_from: expected a non-empty string"),
    "zero micro-batch": ("optim: {micro_batch_size: 0}\n", "optim.micro_batch_size: expected a positive number, got 0"),
    "micro-batch not dividing the batch": ("optim: {global_batch_size: 64, micro_batch_size: 24}\n",
                                           "optim.micro_batch_size: 24 does not divide the per-rank batch of 64 "
                                           "(optim.global_batch_size 64); expected a divisor of 64"),
    "micro-batch larger than the batch": ("optim: {global_batch_size: 64, micro_batch_size: 128}\n",
                                          "optim.micro_batch_size: 128 does not divide the per-rank batch of 64"),
    "micro-batch not dividing a trial's batch": ("optim: {micro_batch_size: 32}\nsweep: {batch_sizes: [64, 48]}\n",
                                                 "optim.micro_batch_size: 32 does not divide the per-rank batch "
                                                 "of 48 (sweep.batch_sizes 48)"),
    "stack of zero trials": ("sweep: {stack_trials: 0}\n",
                             "sweep.stack_trials: expected a positive number of trials per stack, or auto, got 0"),
    "stack of micro-batches": ("optim: {micro_batch_size: 32}\nsweep: {stack_trials: 4}\n",
                               "optim.micro_batch_size: 32 with sweep.stack_trials 4; expected null"),
    "stack in bf16": ("performance: {precision: bf16}\nsweep: {stack_trials: auto}\n",
                      "performance.precision: bf16 with sweep.stack_trials auto; expected fp32"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_is_refused_before_anything_starts(place, capsys, case):
    text, expected = CONFIG_CASES[case]
    assert_refused(place, capsys, train_launcher.main(["--config", write(place, text)]), expected)


def test_batch_not_divisible_by_the_world_size(place, capsys):
    status = ray_launcher.main(["--config", SMOKE, "--num-workers", "3"])
    assert_refused(place, capsys, status, "optim.global_batch_size: 64 is not divisible by the world size 3")


@pytest.mark.parametrize("option, expected", [
    (["--max-failures", "-2"], "--max-failures: -2; expected -1 (restart without limit) or a number of restarts"),
    (["--num-cpus", "0"], "--num-cpus: 0; expected at least 2, the workers of a run"),
    (["--num-cpus", "1"], "--num-cpus: 1; expected at least 2, the workers of a run"),
])
def test_ray_options_that_would_hang_the_run_are_refused_before_ray_starts(place, capsys, option, expected):
    status = ray_launcher.main(["--config", SMOKE, "--num-workers", "2", *option])
    assert_refused(place, capsys, status, expected)


def test_micro_batch_larger_than_the_per_rank_batch(place, capsys):
    status = ray_launcher.main(["--config", SMOKE, "--num-workers", "2", "--set", "optim.micro_batch_size=64"])
    assert_refused(place, capsys, status, "optim.micro_batch_size: 64 does not divide the per-rank batch of 32 "
                                          "(optim.global_batch_size 64 over 2 ranks); expected a divisor of 32")


def test_stacks_under_asha_are_refused_before_ray_starts(place, capsys):
    status = sweep_launcher.main(["--config", str(CONFIGS / "sweep.yaml"), "--launcher", "ray",
                                  "--set", "sweep.stack_trials=4", "--set", "sweep.early_stopping=asha"])
    assert_refused(place, capsys, status, "sweep.stack_trials: 4 with sweep.early_stopping: asha; expected 1 "
                                          "(ASHA stops each Ray Tune trial on its own, and a stack of trials is one "
                                          "Tune trial)")


def test_unknown_launcher(place, capsys):
    status = sweep_launcher.main(["--config", str(CONFIGS / "sweep.yaml"), "--launcher", "slurm"])
    assert_refused(place, capsys, status, "--launcher: expected one of local, torchrun, ray, got 'slurm'")


def test_missing_data_files(place, capsys):
    status = train_launcher.main(["--config", SMOKE, "--set", "data.dataset=mnist",
                                  "--set", f"data.data_dir={place}/nowhere"])
    assert_refused(place, capsys, status, "nowhere does not hold the mnist IDX files")


@pytest.fixture
def damaged_copy(place, fashion_dir):
    folder = place / "data"
    folder.mkdir()
    for src in fashion_dir.glob("*.gz"):
        (folder / src.name[:-3]).write_bytes(gzip.decompress(src.read_bytes()))
    return folder


def _poke(path, offset, value):
    raw = bytearray(path.read_bytes())
    raw[offset] = value
    path.write_bytes(bytes(raw))


IDX_DAMAGE = {
    "truncated": (lambda d: (d / "train-labels-idx1-ubyte").write_bytes((d / "train-labels-idx1-ubyte").read_bytes()[:-7]),
                  "train-labels-idx1-ubyte: truncated: 60001 bytes, expected 60008"),
    "wrong magic": (lambda d: _poke(d / "t10k-images-idx3-ubyte", 1, 0x42), "t10k-images-idx3-ubyte: wrong magic number"),
    "wrong dimensions": (lambda d: shutil.copy(d / "t10k-labels-idx1-ubyte", d / "t10k-images-idx3-ubyte"),
                         "t10k-images-idx3-ubyte: wrong number of dimensions 1; expected 3"),
    "label out of range": (lambda d: _poke(d / "train-labels-idx1-ubyte", 8 + 5, 200),
                           "train-labels-idx1-ubyte: label 200 out of range; expected 0..9"),
}


@pytest.mark.parametrize("case", sorted(IDX_DAMAGE))
def test_damaged_idx_file_is_named(place, capsys, damaged_copy, case):
    damage, expected = IDX_DAMAGE[case]
    damage(damaged_copy)
    status = train_launcher.main(["--config", SMOKE, "--set", f"data.data_dir={damaged_copy}"])
    assert_refused(place, capsys, status, expected)


def _checkpoint_folder(place):
    folder = place / "checkpoints" / "smoke"
    folder.mkdir(parents=True)
    return folder


def test_corrupt_checkpoint_is_refused_on_resume(place, capsys):
    (_checkpoint_folder(place) / "epoch-0001.pt").write_bytes(b"\x80\x02 this is no checkpoint")
    status = train_launcher.main(["--config", SMOKE, "--resume", "--set", "tracking.enabled=true"])
    assert_refused(place, capsys, status, "checkpoints/smoke/epoch-0001.pt: corrupt checkpoint", before={"checkpoints"})
    assert [p.name for p in (place / "checkpoints" / "smoke").iterdir()] == ["epoch-0001.pt"]


def test_checkpoint_of_another_config_is_refused_on_resume(place, capsys):
    from harness.core.checkpoint import write_checkpoint
    from harness.core.config import load_config
    from harness.core.distributed import DistContext
    from harness.core.train_loop import RunCounters, build_trainer, checkpoint_state
    from harness.core.data import load_dataset

    other = load_config(SMOKE, ["model.hidden_sizes=[16]"])
    trainer = build_trainer(other, DistContext(), load_dataset(other))
    write_checkpoint(checkpoint_state(trainer, RunCounters(), None), _checkpoint_folder(place), 0)
    status = train_launcher.main(["--config", SMOKE, "--resume"])
    assert_refused(place, capsys, status, "epoch-0000.pt: checkpoint was made by another config",
                   before={"checkpoints"})


def test_real_command_line_exits_2_and_leaves_no_process(tmp_path):
    """The same through a real process tree: torchrun's ranks refuse before the process group."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {global_batch_size: 63}\ndata: {train_subset: 512, validation_size: 256}\n")
    result = run_command([sys.executable, str(REPO / "launch/sweep.py"), "--config", str(bad), "--launcher", "torchrun"],
                         cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {bad}: no sweep section; expected a sweep config (see configs/sweep.yaml)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


# --- names are not paths -------------------------------------------------------

HOSTILE_NAMES = {"parent": "../sibling", "absolute": "{place}/sibling", "dot": ".", "dot dot": "..", "empty": "",
                 "300 characters": "n" * 300, "quote": "it's", "separator": "a/b"}


@pytest.mark.parametrize("case", sorted(HOSTILE_NAMES))
def test_hostile_name_is_refused_and_a_sibling_folder_is_untouched(place, capsys, case):
    sibling = place / "sibling"
    sibling.mkdir()
    (sibling / "keep.txt").write_text("not the harness's")
    name = HOSTILE_NAMES[case].format(place=place)
    status = train_launcher.main(["--config", SMOKE, "--set", f"checkpoint.dir={place}/checkpoints",
                                  "--set", f"name={name!r}" if name else "name=''"])
    assert_refused(place, capsys, status, "name: expected 1..100 characters of A-Z a-z 0-9 . _ -", before={"sibling"})
    assert [p.name for p in sibling.iterdir()] == ["keep.txt"]


def test_name_in_a_config_file_is_checked_too(place, capsys):
    status = train_launcher.main(["--config", write(place, 'name: "."\n')])
    assert_refused(place, capsys, status, "name: expected 1..100 characters")


def test_sweep_name_too_long_for_its_trial_names(place, capsys):
    status = sweep_launcher.main(["--config", str(CONFIGS / "sweep.yaml"), "--set", "name=" + "s" * 95])
    assert_refused(place, capsys, status, "name: trial name sssss")


def test_quote_in_a_sweep_name(place, capsys):
    status = sweep_launcher.main(["--config", str(CONFIGS / "sweep.yaml"), "--set", "name=\"sweep' or 1=1\""])
    assert_refused(place, capsys, status, "name: expected 1..100 characters")


def test_fresh_run_keeps_foreign_files_in_its_folder(place):
    """checkpoint.dir=. with name=harness: the run's folder is a user's folder; a fresh
    run removes only what the harness wrote there (an old checkpoint), nothing else."""
    folder = place / "harness"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "epoch-0007.pt").write_bytes(b"an old run's checkpoint")
    status = train_launcher.main(["--config", SMOKE, "--set", "checkpoint.dir=.", "--set", "name=harness",
                                  "--set", "tracking.enabled=false", "--set", "train.epochs=1"])
    assert status == 0
    # .lock: the run's lock on its folder (harness/launching/run_lock.py), kept for the next run of the name.
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "epoch-0000.pt", "epoch-0001.pt", "notes.txt"]


# --- config files that are not configs ----------------------------------------

CONFIG_FILE_CASES = {
    "binary": (bytes(range(256)) * 4, "bad.yaml: not a text file"),
    "empty": (b"", "bad.yaml: config file is empty; expected a mapping"),
    "only comments": (b"# nothing here\n", "bad.yaml: config file is empty"),
    "duplicate key": (b"optim: {lr: 0.1}\noptim: {lr: 0.5}\n", "bad.yaml: key 'optim' at line 2: given twice"),
    "duplicate nested key": (b"optim:\n  lr: 0.1\n  lr: 0.5\n", "bad.yaml: key 'lr' at line 3: given twice"),
    "non-string key": (b"optim: {1: 0.1}\n", "bad.yaml: key 1 at line 1: expected a string key"),
    "deep nesting": (b"x: " + b"[" * 20000 + b"]" * 20000 + b"\n", "bad.yaml: nested too deeply"),
    "seed below 0": (b"seed: -1\n", "seed: expected an integer in [0, 2**63), got -1"),
    "seed of 2**63": (b"seed: 9223372036854775808\n", "seed: expected an integer in [0, 2**63)"),
    "sweep seed outside": (b"sweep: {batch_sizes: [32], seeds: [0, 9223372036854775808]}\n",
                           "sweep.seeds: expected a non-empty list of integers in [0, 2**63)"),
    "duplicate sweep seeds": (b"sweep: {batch_sizes: [32], seeds: [1, 2, 1]}\n",
                              "sweep.seeds: expected distinct values (repeated: 1)"),
    "duplicate batch sizes": (b"sweep: {batch_sizes: [32, 64, 32]}\n",
                              "sweep.batch_sizes: expected distinct values (repeated: 32)"),
    "empty experiment": (b"tracking: {experiment: ''}\n", "tracking.experiment: expected a non-empty string"),
    "unknown tracking scheme": (b"tracking: {uri: 'ftp://example.org/store'}\n",
                                "tracking.uri: unknown scheme in 'ftp://example.org/store'"),
    "model too large for memory": (b"model: {hidden_sizes: [200000, 200000]}\n",
                                   "model.hidden_sizes: training needs about"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_FILE_CASES))
def test_bad_config_file_is_refused(place, capsys, case):
    content, expected = CONFIG_FILE_CASES[case]
    (place / "bad.yaml").write_bytes(content)
    assert_refused(place, capsys, train_launcher.main(["--config", str(place / "bad.yaml")]), expected)


def test_bad_sweep_seed_is_refused_by_the_sweep_launcher(place, capsys):
    status = sweep_launcher.main(["--config", str(CONFIGS / "sweep.yaml"), "--set", "sweep.seeds=[-3]"])
    assert_refused(place, capsys, status, "sweep.seeds: expected a non-empty list of integers in [0, 2**63)")


def test_malformed_fault_spec_is_refused_at_start_up(place, capsys, monkeypatch):
    monkeypatch.setenv("HARNESS_INJECT_FAULT", "step:two:0:/tmp/marker")
    status = train_launcher.main(["--config", SMOKE])
    assert_refused(place, capsys, status, "$HARNESS_INJECT_FAULT: malformed spec 'step:two:0:/tmp/marker'")


# --- data locations and files --------------------------------------------------


def test_explicit_data_dir_without_the_files_is_refused_not_replaced(place, capsys):
    """fashion-mnist has a system copy; a data_dir the user named must not be passed over for it."""
    (place / "data").mkdir()
    status = train_launcher.main(["--config", SMOKE, "--set", f"data.data_dir={place}/data"])
    assert_refused(place, capsys, status, f"data.data_dir: {place}/data does not hold the fashion-mnist IDX files")


def test_harness_data_dir_without_the_files_is_refused_not_replaced(place, capsys, monkeypatch):
    (place / "data").mkdir()
    monkeypatch.setenv("HARNESS_DATA_DIR", str(place / "data"))
    status = train_launcher.main(["--config", SMOKE])
    assert_refused(place, capsys, status, f"$HARNESS_DATA_DIR: {place}/data does not hold the fashion-mnist")


def _idx(path, type_code, dims, payload):
    header = bytes([0, 0, type_code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    path.write_bytes(header + payload)


def _small_idx_set(folder, num_train, label_type=0x08):
    import numpy as np

    folder.mkdir(exist_ok=True)
    for prefix, count in (("train", num_train), ("t10k", 100)):
        _idx(folder / f"{prefix}-images-idx3-ubyte", 0x08, (count, 28, 28), bytes(count * 784))
        labels = np.arange(count) % 10
        payload = labels.astype(">f4").tobytes() if label_type == 0x0D else labels.astype(np.uint8).tobytes()
        _idx(folder / f"{prefix}-labels-idx1-ubyte", label_type, (count,), payload)


SMALL_IDX_CASES = {
    "fewer samples than the validation split": (100, 0x08, "data.validation_size: 256 leaves no training data: "
                                                "the training files hold 100 samples"),
    "fewer samples than one batch": (300, 0x08, "optim.global_batch_size: 64 is larger than the training set the "
                                     "files hold (44 samples"),
    "zero samples": (0, 0x08, "train-labels-idx1-ubyte: holds zero samples"),
    "float labels": (400, 0x0D, "train-labels-idx1-ubyte: labels of type float32; expected integer labels"),
}


@pytest.mark.parametrize("case", sorted(SMALL_IDX_CASES))
def test_idx_files_that_parse_but_cannot_train_are_refused(place, capsys, case):
    num_train, label_type, expected = SMALL_IDX_CASES[case]
    _small_idx_set(place / "data", num_train, label_type)
    status = train_launcher.main(["--config", SMOKE, "--set", f"data.data_dir={place}/data"])
    assert_refused(place, capsys, status, expected)


# --- folders and tracking stores ----------------------------------------------


@pytest.mark.parametrize("where,expected", [
    ("{place}/afile", "checkpoint.dir: {place}/afile is not a folder"),
    ("{place}/afile/under", "checkpoint.dir: {place}/afile is not a folder"),
    # Root may write anywhere a mode bit forbids; /proc refuses new files even to root.
    ("/proc/harness-checkpoints", "checkpoint.dir: cannot write to /proc"),
])
def test_checkpoint_folder_that_cannot_be_used_is_refused_before_the_run(place, capsys, where, expected):
    (place / "afile").write_text("a file, not a folder")
    status = train_launcher.main(["--config", SMOKE, "--set", f"checkpoint.dir={where.format(place=place)}"])
    assert_refused(place, capsys, status, expected.format(place=place), before={"afile"})
    assert (place / "afile").read_text() == "a file, not a folder"


def test_sqlite_file_that_is_not_a_database(place, capsys):
    (place / "notes.db").write_text("these are my notes, not a database\n" * 100)
    status = train_launcher.main(["--config", SMOKE, "--set", f"tracking.uri=sqlite:///{place}/notes.db"])
    assert_refused(place, capsys, status, f"tracking.uri: {place}/notes.db is not a SQLite database",
                   before={"notes.db"})
    assert (place / "notes.db").read_text().startswith("these are my notes")


def _runs(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return [r for e in client.search_experiments(view_type=3) for r in client.search_runs([e.experiment_id],
                                                                                         run_view_type=3)]


def test_deleted_experiment_is_refused_with_how_to_restore(place, capsys):
    from mlflow.tracking import MlflowClient

    uri = seeded_store(place / "store")
    client = MlflowClient(tracking_uri=uri)
    client.delete_experiment(client.create_experiment("smoke"))
    capsys.readouterr()  # MLflow's lines from making the store are not the launcher's
    status = train_launcher.main(["--config", SMOKE, "--set", f"tracking.uri={uri}"])
    assert_refused(place, capsys, status, "tracking.experiment: 'smoke' is deleted in", before={"store"})
    assert _runs(uri) == []


def test_resume_into_a_store_without_the_checkpoints_run(place, capsys):
    from harness.core.checkpoint import write_checkpoint
    from harness.core.config import load_config
    from harness.core.data import load_dataset
    from harness.core.distributed import DistContext
    from harness.core.train_loop import RunCounters, build_trainer, checkpoint_state

    cfg = load_config(SMOKE)
    trainer = build_trainer(cfg, DistContext(), load_dataset(cfg))
    write_checkpoint(checkpoint_state(trainer, RunCounters(), "0123456789abcdef0123456789abcdef"),
                     _checkpoint_folder(place), 1)
    uri = seeded_store(place / "store")
    capsys.readouterr()
    status = train_launcher.main(["--config", SMOKE, "--resume", "--set", f"tracking.uri={uri}"])
    assert_refused(place, capsys, status, "epoch-0001.pt: its MLflow run 0123456789abcdef0123456789abcdef is not in",
                   before={"checkpoints", "store"})
    assert _runs(uri) == []


# --- the harness command -------------------------------------------------------


def test_replay_delivers_every_valid_record_and_names_the_bad_line(place, capsys):
    import json

    from mlflow.tracking import MlflowClient

    from harness.cli import main as harness_main

    uri = seeded_store(place / "store")
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("replay")).info.run_id
    lines = [json.dumps({"op": "metrics", "run_id": run_id, "step": 1, "timestamp_ms": 1, "metrics": {"loss": 1.0}}),
             '{"op": "metrics", "run_id": "' + run_id + '", "step": 2, "timest',  # cut off mid-write
             json.dumps({"op": "metrics", "run_id": run_id, "step": 3, "timestamp_ms": 3, "metrics": {"loss": 0.5}}),
             json.dumps({"op": "terminate", "run_id": run_id, "status": "KILLED"})]
    spool = place / "mlflow-spool.jsonl"
    spool.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    status = harness_main(["replay", str(spool), "--tracking-uri", uri])
    assert_refused(place, capsys, status, f"{spool}: line(s) 2 are not spool records", before={"store", spool.name})
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 1.0), (3, 0.5)]
    assert client.get_run(run_id).info.status == "KILLED"


def test_replay_of_a_spool_whose_run_the_store_lacks_is_refused_in_one_line_delivering_nothing(place, capsys):
    import json

    from harness.cli import main as harness_main

    uri = seeded_store(place / "store")
    spool = place / "mlflow-spool.jsonl"
    spool.write_text(json.dumps({"op": "metrics", "run_id": UNKNOWN_RUN_ID, "step": 1, "timestamp_ms": 1,
                                 "metrics": {"loss": 1.0}}) + "\n")
    capsys.readouterr()
    status = harness_main(["replay", str(spool), "--tracking-uri", uri])
    assert_refused(place, capsys, status, f"{spool}: its records are for MLflow run {UNKNOWN_RUN_ID}, which this "
                   "tracking store does not hold", before={"store", spool.name})
    assert spool.exists() and _runs(uri) == []


@pytest.mark.parametrize("command", ["escape", "report"])
def test_a_run_id_that_is_not_a_sweep_is_refused_in_one_line(place, capsys, command):
    from mlflow.tracking import MlflowClient

    from harness.cli import main as harness_main

    uri = seeded_store(place / "store")
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("single"), run_name="alone", tags={"run_kind": "capacity"})
    capsys.readouterr()
    status = harness_main([command, "--sweep-run-id", run.info.run_id, "--tracking-uri", uri])
    assert_refused(place, capsys, status, f"--sweep-run-id {run.info.run_id}: run 'alone' is a capacity run; "
                   "expected the parent run of a sweep (tag run_kind = sweep)", before={"store"})


@pytest.mark.parametrize("argv,expected", [
    (["bench", "--epochs", "0"], "--epochs: expected a positive number of timed epochs, got 0"),
    (["bench", "--config", SMOKE, "--device", "cpu", "--paths", "harness", "dataloaders"],
     "--paths: dataloaders is not a path of the bench; expected some of dataloader, harness"),
    (["report", "--out", "{place}/afile"], "--out: {place}/afile is not a folder"),
    (["mlflow-server", "--port", "99999"], "--port: 99999 is not a TCP port; expected 1..65535"),
    (["mlflow-server", "--backend", "postgresql", "--store-dir", "{place}/afile/store"],
     "--store-dir: {place}/afile is not a folder"),
    (["capacity", "--max-batch", "0"], "--max-batch: 0; expected a positive batch size"),
    (["capacity", "--config", SMOKE, "--device", "cpu", "--memory-limit", "1e-9"],
     "--memory-limit: 1e-09 GB is below one sample's memory"),
    pytest.param(["capacity", "--device", "cuda"], "--device: cuda was requested but no CUDA device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (["scaling", "--world-sizes", "1", "0"], "--world-sizes: 0; expected world sizes of at least 1"),
    (["scaling", "--link-gbps", "0"], "--link-gbps: 0; expected a positive bandwidth in Gb/s"),
    (["scaling", "--link", "infiniband"], "--link: 'infiniband'; expected one of nvlink, ethernet-100g"),
    (["scaling", "--from-json", "{place}/afile"], "--from-json: {place}/afile: not JSON"),
    (["scaling", "--from-json", str(REPO / "docs" / "bench" / "cpu.json")], "cpu.json: not a capacity result"),
    (["scaling", "--measure", "--config", SMOKE, "--batch-sizes", "33"],
     "--batch-sizes: 33; expected even global batch sizes"),
])
def test_harness_command_refuses_bad_arguments(place, capsys, argv, expected):
    from harness.cli import main as harness_main

    (place / "afile").write_text("a file")
    status = harness_main([a.format(place=place) for a in argv])
    assert_refused(place, capsys, status, expected.format(place=place), before={"afile"})


def _capacity_json(points, layer_sizes=(784, 32, 10)):
    import json

    return json.dumps({"points": points, "layer_sizes": list(layer_sizes)})


BAD_CAPACITY_JSON = {
    "batch 0": (_capacity_json([{"batch_size": 0, "step_s": 0.01}]), "batch 0 with step time 0.01; expected positive"),
    "a negative step time": (_capacity_json([{"batch_size": 8, "step_s": -1}]), "batch 8 with step time -1.0"),
    "a NaN step time": ('{"points": [{"batch_size": 8, "step_s": NaN}], "layer_sizes": [784, 10]}',
                        "batch 8 with step time nan"),
    "a fractional batch": (_capacity_json([{"batch_size": 8.5, "step_s": 0.01}]), "not a capacity result"),
    "negative layer sizes": (_capacity_json([{"batch_size": 8, "step_s": 0.01}], (784, -32, 10)),
                             "layer sizes [784, -32, 10]; expected positive layer sizes"),
    "a deeply nested document": ("[" * 100000 + "]" * 100000, "not JSON (RecursionError)"),
    "an enormous document": (" " * 10_000_001 + "{}", "10000003 bytes, more than a capacity result's 10000000"),
}


@pytest.mark.parametrize("case", sorted(BAD_CAPACITY_JSON))
def test_scaling_from_a_capacity_json_that_says_nothing_sound_is_refused_in_one_line(place, capsys, case):
    from harness.cli import main as harness_main

    text, expected = BAD_CAPACITY_JSON[case]
    (place / "capacity.json").write_text(text)
    status = harness_main(["scaling", "--from-json", str(place / "capacity.json")])
    assert_refused(place, capsys, status, f"--from-json: {place}/capacity.json: {expected}",
                   before={"capacity.json"})


# Every tool that writes a --json file after its work checks the path before the work.
JSON_TOOLS = {
    "capacity": ["capacity", "--config", SMOKE, "--device", "cpu", "--max-batch", "4", "--out", "{place}/out"],
    "scaling": ["scaling", "--config", SMOKE, "--device", "cpu", "--max-batch", "4"],
    "bench": ["bench", "--config", SMOKE, "--device", "cpu", "--epochs", "1", "--batch-sizes", "64"],
}
BAD_OUTPUTS = {
    "a missing folder": ("{place}/nowhere/x.json", "--json: {place}/nowhere is not a folder; expected a file in an "
                                                   "existing folder"),
    "a folder": ("{place}", "--json: {place} is a folder; expected the path of a file to write"),
    "a device": ("/dev/full", "--json: /dev/full is not a regular file; expected the path of a file to write"),
    "a name past the limit": ("{place}/" + "x" * 300 + ".json", "File name too long; expected a file path to write"),
}


@pytest.mark.parametrize("output", sorted(BAD_OUTPUTS))
@pytest.mark.parametrize("tool", sorted(JSON_TOOLS))
def test_a_json_output_that_cannot_be_written_is_refused_before_the_work(place, capsys, tool, output):
    from harness.cli import main as harness_main

    path, expected = BAD_OUTPUTS[output]
    uri = seeded_store(place / "store")
    capsys.readouterr()  # MLflow's lines if the store's template was made just now
    argv = [a.format(place=place) for a in JSON_TOOLS[tool]] + ["--json", path.format(place=place)]
    status = harness_main(argv + (["--tracking-uri", uri] if tool == "capacity" else []))
    assert_refused(place, capsys, status, expected.format(place=place), before={"store"})
    assert _runs(uri) == []


# --- PostgreSQL: a tracking store that does not answer, a server that cannot start ---


TINY_SWEEP = """name: tinysweep
data: {dataset: digits, validation_size: 200}
optim: {lr: 0.1, global_batch_size: 16}
sweep: {batch_sizes: [16, 32], seeds: [0], lr_rules: [none], base_batch_size: 16}
"""


@pytest.mark.parametrize("launcher", ["train", "sweep", "ray_job"])
def test_unreachable_postgresql_store_is_refused_with_its_password_masked(place, capsys, launcher):
    uri = f"postgresql://mlflow:hunter2-secret@127.0.0.1:{free_port()}/mlflow"
    config = write(place, TINY_SWEEP) if launcher == "sweep" else SMOKE
    main = {"train": train_launcher, "sweep": sweep_launcher, "ray_job": ray_launcher}[launcher].main
    status = main(["--config", config, "--set", f"tracking.uri={uri}"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: tracking.uri: database postgresql://mlflow:***@127.0.0.1:"), err
    assert "is unreachable or refused the login (" in err and "hunter2" not in err
    assert {p.name for p in place.iterdir()} <= {"bad.yaml"}


def test_mlflow_server_on_a_port_in_use_is_refused(place, capsys):
    import socket

    from harness.cli import main as harness_main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for backend in ("sqlite", "postgresql"):
            status = harness_main(["mlflow-server", "--backend", backend, "--port", str(port),
                                   "--store-dir", str(place / "store")])
            assert_refused(place, capsys, status, f"--port: cannot listen on 127.0.0.1:{port}")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands PostgreSQL to another user")
def test_postgresql_store_the_postgres_user_cannot_reach_is_refused(place, capsys):
    from harness.cli import main as harness_main

    locked = place / "locked"
    locked.mkdir(mode=0o700)
    status = harness_main(["mlflow-server", "--backend", "postgresql", "--port", str(free_port()),
                           "--store-dir", str(locked / "store")])
    assert_refused(place, capsys, status, f"--store-dir: {locked} cannot be reached by the postgres user",
                   before={"locked"})
    assert list(locked.iterdir()) == []


# --- checkpoint.init_from and harness interpolate: the source checkpoints ---------


@functools.cache
def _source_state(overrides: tuple[str, ...]) -> dict:
    """What a run's checkpoint holds (no training: build, then take its state), of smoke.yaml with
    ``overrides``; built once per session (reading the data is most of the cost)."""
    from harness.core.config import load_config
    from harness.core.data import load_dataset
    from harness.core.distributed import DistContext
    from harness.core.train_loop import RunCounters, build_trainer, checkpoint_state

    cfg = load_config(SMOKE, list(overrides))
    return checkpoint_state(build_trainer(cfg, DistContext(), load_dataset(cfg)), RunCounters(), None)


def _source_checkpoint(folder, *overrides, drop_config=False):
    from harness.core.checkpoint import write_checkpoint

    state = dict(_source_state(overrides))
    if drop_config:  # as checkpoints were written before they carried their config
        del state["config"]
    return write_checkpoint(state, folder, 1)


# Synthetic images of Fashion-MNIST's shape: the same 784-32-10 network, another data set.
SYNTHETIC = ("data.dataset=synthetic", "data.synthetic.num_train=400", "data.synthetic.num_classes=10",
             "data.validation_size=100")
UNKNOWN_RUN_ID = "0123456789abcdef0123456789abcdef"

INIT_FROM_CASES = {
    "missing file": (lambda place, uri: f"{place}/nowhere/epoch-0003.pt",
                     "checkpoint.init_from: {place}/nowhere/epoch-0003.pt does not exist; expected a checkpoint file"),
    "another architecture": (lambda place, uri: _source_checkpoint(place / "wide", "model.hidden_sizes=[16]"),
                             "checkpoint.init_from: {place}/wide/epoch-0001.pt holds a 784-16-10 sigmoid network; "
                             "expected 784-32-10 sigmoid (model.hidden_sizes, model.activation)"),
    "checkpoint without its config": (lambda place, uri: _source_checkpoint(place / "old", drop_config=True),
                                      "checkpoint.init_from: {place}/old/epoch-0001.pt holds no config"),
    "not a checkpoint": (lambda place, uri: _write_file(place / "notes.pt", "these are my notes"),
                         "checkpoint.init_from: {place}/notes.pt is not a harness checkpoint"),
    "empty folder": (lambda place, uri: _make_folder(place / "empty"),
                     "checkpoint.init_from: folder {place}/empty holds no epoch-NNNN.pt checkpoint"),
    "a name past the limit": (lambda place, uri: f"{place}/{'x' * 300}.pt",
                              "checkpoint.init_from: {place}/xxx"),
    "an unknown home": (lambda place, uri: "~no-such-user-here/epoch-0001.pt",
                        "checkpoint.init_from: ~no-such-user-here/epoch-0001.pt: Could not determine home directory"),
    "unknown run id": (lambda place, uri: UNKNOWN_RUN_ID,
                       "checkpoint.init_from: " + UNKNOWN_RUN_ID + " is not a file or folder, nor a run in"),
    "run without a checkpoint": (lambda place, uri: _run_without_checkpoint(uri),
                                 "has no checkpoint_path tag"),
}


def _write_file(path, text):
    path.write_text(text)
    return path


def _make_folder(path):
    path.mkdir()
    return path


def _run_without_checkpoint(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("elsewhere"))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.mark.parametrize("case", sorted(INIT_FROM_CASES))
def test_init_from_that_cannot_be_used_is_refused_before_any_run(place, capsys, case):
    make, expected = INIT_FROM_CASES[case]
    uri = seeded_store(place / "store")
    ref = make(place, uri)
    runs_before = len(_runs(uri))
    capsys.readouterr()
    status = train_launcher.main(["--config", SMOKE, "--set", f"tracking.uri={uri}",
                                  "--set", f"checkpoint.init_from={ref}"])
    assert_refused(place, capsys, status, expected.format(place=place),
                   before={"store", "wide", "old", "notes.pt", "empty"})
    assert len(_runs(uri)) == runs_before  # no run made (the one case that made a run itself still has just it)
    assert not (place / "checkpoints").exists()


INTERPOLATE_CASES = {
    "empty alpha range": (["--alpha-min", "2", "--alpha-max", "1"],
                          "--alpha-min: 2 is not below --alpha-max 1; expected a non-empty α range"),
    "one point": (["--points", "1"], "--points: 1; expected 2 (both ends of the α range) to 10000"),
    "points past what is worth scoring": (["--points", "100000000"], "--points: 100000000; expected 2"),
    "an α past the float range": (["--alpha-max", "1e308"], "--alpha-max: 1e+308; expected a number in [-100, 100]"),
    "a NaN α": (["--alpha-min", "nan"], "--alpha-min: nan; expected a number in [-100, 100]"),
    "missing source": (["--run-a", "{place}/nowhere"], "--run-a: {place}/nowhere does not exist"),
    "another architecture": (["--run-b", "{place}/wide"], "--run-b: {place}/wide/epoch-0001.pt holds a 784-16-10 "
                             "sigmoid network; expected 784-32-10 sigmoid"),
    "another data set": (["--run-b", "{place}/synthetic"], "--run-b: {place}/synthetic/epoch-0001.pt was trained on "
                         "synthetic (400 train, 784 features, 5 targets); expected run A's data set fashion-mnist"),
}


@pytest.mark.parametrize("case", sorted(INTERPOLATE_CASES))
def test_interpolation_that_cannot_be_drawn_is_refused_before_any_run(place, capsys, case):
    from harness.cli import main as harness_main

    extra, expected = INTERPOLATE_CASES[case]
    _source_checkpoint(place / "a")
    _source_checkpoint(place / "wide", "model.hidden_sizes=[16]")
    _source_checkpoint(place / "synthetic", *SYNTHETIC)
    uri = seeded_store(place / "store")
    capsys.readouterr()
    argv = ["interpolate", "--run-a", str(place / "a"), "--run-b", str(place / "a"), "--tracking-uri", uri,
            *[item.format(place=place) for item in extra]]
    status = harness_main(argv)  # the later of a repeated option wins, as argparse does
    assert_refused(place, capsys, status, expected.format(place=place),
                   before={"store", "a", "wide", "synthetic"})
    assert _runs(uri) == []


# --- multi-node torchrun: launch/train.py --nnodes checks before it becomes torchrun ----

ENDPOINT = ["--rdzv-endpoint", "127.0.0.1:29400", "--rdzv-id", "launch-1"]
NODE_CASES = {
    "nodes x ranks do not split the batch": (["--nnodes", "3", *ENDPOINT],
                                             "optim.global_batch_size: 64 is not divisible by the world size 3"),
    "nodes x ranks do not split a sweep's batch": (["--config", str(CONFIGS / "sweep.yaml"), "--nnodes", "2",
                                                    "--nproc", "3", *ENDPOINT],
                                                   "sweep.batch_sizes: 32 is not divisible by the world size 6"),
    "micro-batch over nodes x ranks": (["--nnodes", "2", "--nproc-per-node", "2", *ENDPOINT,
                                        "--set", "optim.micro_batch_size=32"],
                                       "optim.micro_batch_size: 32 does not divide the per-rank batch of 16 "
                                       "(optim.global_batch_size 64 over 4 ranks)"),
    "zero nodes": (["--nnodes", "0"], "--nnodes: expected a whole number of at least 1"),
    "an elastic range of nodes": (["--nnodes", "1:2", *ENDPOINT], "--nnodes: expected a whole number of at least 1 "
                                                                   "(a fixed count"),
    "zero ranks per node": (["--nnodes", "1", "--nproc", "0"], "--nproc-per-node: expected a whole number of at "
                                                                "least 1"),
    "node rank outside the job": (["--nnodes", "2", "--node-rank", "2", *ENDPOINT],
                                  "--node-rank: 2 is not a node of --nnodes 2; expected 0..1"),
    "no rendezvous endpoint": (["--nnodes", "2", "--rdzv-id", "launch-1"], "--rdzv-endpoint: missing with --nnodes 2"),
    "endpoint without a port": (["--nnodes", "2", "--rdzv-endpoint", "node0", "--rdzv-id", "launch-1"],
                                "--rdzv-endpoint: got 'node0'; expected HOST:PORT of node 0"),
    "no rendezvous id": (["--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29400"], "--rdzv-id: missing with --nnodes 2"),
    "a node option without --nnodes": (["--node-rank", "1"], "--node-rank: only with --nnodes"),
}


@pytest.fixture
def torchrun_never_starts(monkeypatch):
    """A guard, not a stand-in: if a case were not refused, the launcher would replace
    pytest's own process with torchrun. Fail the test instead."""
    from harness.launching import torchrun_nodes

    def started(command):
        raise AssertionError(f"torchrun was started: {command}")

    monkeypatch.setattr(torchrun_nodes, "exec_torchrun", started)


@pytest.mark.parametrize("case", sorted(NODE_CASES))
def test_node_count_that_does_not_fit_the_world_size_is_refused_before_torchrun_starts(
        place, capsys, torchrun_never_starts, case):
    options, expected = NODE_CASES[case]
    config = [] if "--config" in options else ["--config", SMOKE]
    status = train_launcher.main([*config, *options, "--set", f"checkpoint.dir={place}/checkpoints"])
    assert_refused(place, capsys, status, expected)


# --- tampered or foreign checkpoints, wherever a checkpoint is read ---------------------------------

def _tampered(state, case):
    model = dict(state["model"])
    if case == "a weight of the wrong shape":
        model["linears.0.weight"] = torch.zeros(32, 700)
    elif case == "a NaN weight":
        model["linears.1.bias"] = torch.full((10,), float("nan"))
    elif case == "model not a mapping":
        model = [1, 2, 3]
    elif case == "model empty":
        model = {}
    return {**state, "model": model} if case != "no model" else {k: v for k, v in state.items() if k != "model"}


TAMPERED = {
    "a weight of the wrong shape": "model weight linears.0.weight has shape [32, 700]; expected [32, 784] "
                                   "(a 784-32-10 sigmoid network)",
    "a NaN weight": "model weight linears.1.bias holds NaN or infinite values; expected finite weights",
    "model not a mapping": "its model weights are a list; expected a mapping of the network's 4 weight tensors",
    "model empty": "its model weights are empty; expected a mapping",
    "no model": "its model weights are missing; expected a mapping",
}


@pytest.mark.parametrize("reader", ["--resume", "checkpoint.init_from", "harness interpolate"])
@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_a_tampered_checkpoint_is_refused_in_one_line_naming_the_file_before_anything_trains(place, capsys, case,
                                                                                             reader):
    from mlflow.tracking import MlflowClient

    from harness.cli import main as harness_main
    from harness.core.checkpoint import write_checkpoint

    uri = seeded_store(place / "store")
    # A FINISHED run whose checkpoint folder then gets a tampered newest checkpoint: it must stay FINISHED.
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("smoke")).info.run_id
    client.set_terminated(run_id, "FINISHED")
    good = {**_source_state(()), "run_id": run_id}
    folder = place / "checkpoints" / "smoke"
    write_checkpoint(good, folder, 1)
    bad = write_checkpoint(_tampered(good, case), folder if reader == "--resume" else place / "source", 2)
    capsys.readouterr()
    if reader == "--resume":
        status = train_launcher.main(["--config", SMOKE, "--resume", "--set", f"tracking.uri={uri}",
                                      "--set", "train.epochs=3"])
        prefix = "checkpoints/smoke/epoch-0002.pt"  # checkpoint.dir as the config gives it
    elif reader == "checkpoint.init_from":
        status = train_launcher.main(["--config", SMOKE, "--set", f"tracking.uri={uri}", "--set", "name=warm",
                                      "--set", f"checkpoint.init_from={bad}"])
        prefix = f"checkpoint.init_from: {bad}"
    else:
        status = harness_main(["interpolate", "--run-a", str(folder / "epoch-0001.pt"), "--run-b", str(bad),
                               "--tracking-uri", uri])
        prefix = f"--run-b: {bad}"
    assert_refused(place, capsys, status, f"{prefix}: {TAMPERED[case]}", before={"store", "checkpoints", "source"})
    (run,) = _runs(uri)
    assert run.info.status == "FINISHED"
    assert not (place / "checkpoints" / "warm").exists()


def test_a_tampered_checkpoint_given_to_a_torchrun_resume_ends_every_rank_with_its_line(tmp_path):
    from mlflow.tracking import MlflowClient

    from harness.core.checkpoint import write_checkpoint

    uri = seeded_store(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("smoke")).info.run_id
    client.set_terminated(run_id, "FINISHED")
    bad = write_checkpoint(_tampered({**_source_state(()), "run_id": run_id}, "a NaN weight"),
                           tmp_path / "ckpt" / "smoke", 1)
    torchrun = str(REPO / ".venv/bin/torchrun") if (REPO / ".venv/bin/torchrun").exists() else "torchrun"
    result = run_command([torchrun, "--standalone", "--nproc-per-node=2", str(REPO / "launch/train.py"), "--config",
                          SMOKE, "--resume", "--set", f"tracking.uri={uri}", "--set", f"checkpoint.dir={tmp_path}/ckpt"],
                         cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [f"error: {bad}: {TAMPERED['a NaN weight']}"] * 2, result.stderr[-3000:]  # each rank's
    assert client.get_run(run_id).info.status == "FINISHED"

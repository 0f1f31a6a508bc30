"""Bad input, through the real entry points: one line naming the key or file and what
was expected, exit code 2, and nothing left behind (no MLflow store or run, no
checkpoint file, no process)."""

import gzip
import importlib.util
import shutil
import sys

import pytest

from conftest import CONFIGS, REPO, run_command

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
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_is_refused_before_anything_starts(place, capsys, case):
    text, expected = CONFIG_CASES[case]
    assert_refused(place, capsys, train_launcher.main(["--config", write(place, text)]), expected)


def test_batch_not_divisible_by_the_world_size(place, capsys):
    status = ray_launcher.main(["--config", SMOKE, "--num-workers", "3"])
    assert_refused(place, capsys, status, "optim.global_batch_size: 64 is not divisible by the world size 3")


def test_unknown_launcher(place, capsys):
    status = sweep_launcher.main(["--config", str(CONFIGS / "sweep.yaml"), "--launcher", "slurm"])
    assert_refused(place, capsys, status, "--launcher: expected one of local, torchrun, ray, got 'slurm'")


def test_missing_data_files(place, capsys):
    status = train_launcher.main(["--config", SMOKE, "--set", "data.dataset=mnist",
                                  "--set", f"data.data_dir={place}/nowhere"])
    assert_refused(place, capsys, status, "data.dataset 'mnist': IDX files not found")


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
    from harness.checkpoint import write_checkpoint
    from harness.config import load_config
    from harness.distributed import DistContext
    from harness.train_loop import Progress, build_trainer, checkpoint_state
    from harness.data import load_dataset

    other = load_config(SMOKE, ["model.hidden_sizes=[16]"])
    trainer = build_trainer(other, DistContext(), load_dataset(other))
    write_checkpoint(checkpoint_state(trainer, Progress(), None), _checkpoint_folder(place), 0)
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

"""Configs: every shipped file loads; every class of bad input is one line naming the key, exit 2."""

import json
import sys

import pytest
import yaml
from pydantic import ValidationError

from conftest import CONFIGS, REPO, run_command
from harness.core.config import Config, load_config
from harness.errors import InputError


@pytest.mark.parametrize("name", ["seed", "fashion_mnist", "sweep", "sweep_gpu", "study", "smoke"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert isinstance(cfg, Config)


def test_seed_config_is_the_notes_example():
    cfg = load_config(CONFIGS / "seed.yaml")
    assert cfg.layer_sizes == (784, 500, 10)
    assert cfg.model.activation == "sigmoid"
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.global_batch_size, cfg.train.epochs) == (0.01, 0.9, 5, 2)
    assert cfg.data.dataset == "synthetic" and cfg.data.synthetic.num_train == 5
    assert cfg.data.synthetic.num_targets == 5  # targets 0..4


def test_overrides_keep_types_and_round_trip():
    cfg = load_config(CONFIGS / "smoke.yaml", ["optim.lr=0.05", "model.hidden_sizes=[8, 4]", "train.drop_last=true"])
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    assert cfg.model.hidden_sizes == (8, 4)
    assert cfg.train.drop_last is True
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_name_ending_in_a_newline_is_refused():
    """A name becomes a folder: "run\\n" would make a folder whose name ends in a newline."""
    with pytest.raises(InputError, match="name: expected 1..100 characters"):
        Config.from_dict({"name": "run\n"})


def test_config_is_frozen():
    cfg = load_config(CONFIGS / "smoke.yaml")
    with pytest.raises(ValidationError, match="frozen"):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    assert cfg.optim.lr == 0.1


@pytest.mark.parametrize("overrides", [(), ("model.factory=user_models:tiny_cnn", "model.kwargs={channels: 3}")],
                         ids=["mlp", "factory"])
def test_round_trip_goes_through_json_and_keeps_equality_and_hash(overrides):
    """What Ray and torchrun hand a worker: JSON of to_dict(), rebuilt with from_dict (a factory's kwargs too)."""
    cfg = load_config(CONFIGS / "study.yaml", overrides)
    again = Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and hash(again) == hash(cfg)
    assert cfg.replace(**{"optim.lr": 0.5}) != cfg and cfg.replace(**{"optim.lr": 0.5}).optim.lr == 0.5


def test_replace_validates_again():
    cfg = load_config(CONFIGS / "smoke.yaml")
    with pytest.raises(InputError, match="optim.global_batch_size: expected a positive number, got 0"):
        cfg.replace(**{"optim.global_batch_size": 0})


def _error(tmp_path, raw=None, text=None, overrides=()):
    path = tmp_path / "bad.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(raw))
    with pytest.raises(InputError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


BASE = {"data": {"dataset": "digits", "validation_size": 100}}


def test_unknown_top_level_key(tmp_path):
    assert "optimizer: unknown key" in _error(tmp_path, {**BASE, "optimizer": {}})


def test_unknown_nested_key(tmp_path):
    message = _error(tmp_path, {**BASE, "optim": {"learning_rate": 0.1}})
    assert "optim.learning_rate: unknown key" in message and "lr" in message


def test_wrong_type(tmp_path):
    assert "optim.global_batch_size: expected an integer" in _error(tmp_path, {**BASE, "optim": {"global_batch_size": "64"}})


def test_float_where_int_expected(tmp_path):
    assert "train.epochs: expected an integer" in _error(tmp_path, {**BASE, "train": {"epochs": 2.5}})


@pytest.mark.parametrize("key,value", [("lr", 0), ("lr", -0.1), ("global_batch_size", 0), ("global_batch_size", -4)])
def test_non_positive_sizes_and_rates(tmp_path, key, value):
    assert f"optim.{key}: expected a positive number" in _error(tmp_path, {**BASE, "optim": {key: value}})


def test_nan_rate(tmp_path):
    assert "optim.lr: expected a finite number" in _error(tmp_path, text="data: {dataset: digits, validation_size: 100}\noptim: {lr: .nan}\n")


def test_unknown_dataset(tmp_path):
    message = _error(tmp_path, {"data": {"dataset": "cifar10"}})
    assert "data.dataset" in message and "'fashion-mnist'" in message


def test_unknown_activation(tmp_path):
    assert "model.activation: expected one of 'sigmoid', 'tanh', 'relu'" in _error(tmp_path, {**BASE, "model": {"activation": "gelu"}})


def test_unknown_grad_engine(tmp_path):
    assert "train.grad_engine" in _error(tmp_path, {**BASE, "train": {"grad_engine": "jax"}})


def test_yaml_syntax_error(tmp_path):
    message = _error(tmp_path, text="optim: {lr: 0.1\n")
    assert "bad.yaml: YAML syntax error at line" in message


def test_batch_larger_than_training_set(tmp_path):
    message = _error(tmp_path, {**BASE, "optim": {"global_batch_size": 5000}})
    assert "optim.global_batch_size: 5000 is larger than the training set (1337 samples)" in message


def test_bad_override_key_and_value(tmp_path):
    assert "unknown key 'optim.rate'" in _error(tmp_path, BASE, overrides=["optim.rate=1"])
    assert "expected key=value" in _error(tmp_path, BASE, overrides=["optim.lr"])
    assert "optim.lr: expected a number" in _error(tmp_path, BASE, overrides=["optim.lr=fast"])


def test_first_problem_in_the_file_is_named(tmp_path):
    """Several mistakes: within a section an unknown key first, then values in the file's order."""
    assert "optim.zz: unknown key" in _error(tmp_path, text="optim: {lr: -1, zz: 1}\n")
    assert "train.epochs:" in _error(tmp_path, text="train: {epochs: 0}\noptim: {lr: -1}\n")
    assert "optim.lr:" in _error(tmp_path, text="optim: {lr: -1}\ntrain: {epochs: 0}\n")


def test_empty_section_means_defaults_but_an_empty_config_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {dataset: digits, validation_size: 100}\noptim:\n")
    assert load_config(path).optim == Config().optim
    with pytest.raises(InputError, match="config: expected a mapping, got NoneType None"):
        Config.from_dict(None)


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_launcher_exits_2_with_one_line_and_logs_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {dataset: digits, validation_size: 100}\nmodel: {activation: swish}\n")
    result = run_command([sys.executable, str(REPO / "launch/train.py"), "--config", str(bad)], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: model.activation: expected one of 'sigmoid', 'tanh', 'relu', got 'swish'"]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "checkpoints").exists()

"""Config: YAML in, one frozen and fully validated dataclass out.

Owns the schema, YAML loading (``yaml.safe_load`` only), ``--set key=value``
overrides and every check that can be made before data is read or a process
group exists. Does not own launching, data loading or tracking.

Every problem raises :class:`harness.errors.InputError` with one line that names
the key (``optim.lr``) and what was expected, so launchers can exit with code 2.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from harness.errors import InputError

DATASETS = ("fashion-mnist", "mnist", "digits", "synthetic")
ACTIVATIONS = ("sigmoid", "tanh", "relu")
GRAD_ENGINES = ("autograd", "manual")
DEVICES = ("auto", "cpu", "cuda")
LR_RULES = ("none", "linear", "sqrt")

# Sizes of the real data sets, known without reading them, so that a batch larger
# than the training set is refused before any process starts. (train, test)
# data._digits splits scikit-learn's 1797 digits by these numbers.
KNOWN_SPLIT_SIZES = {"fashion-mnist": (60000, 10000), "mnist": (60000, 10000), "digits": (1437, 360)}
KNOWN_SHAPES = {"fashion-mnist": (784, 10), "mnist": (784, 10), "digits": (64, 10)}


def _positive(value) -> Optional[str]:
    return None if value > 0 else "a positive number"


def _non_negative(value) -> Optional[str]:
    return None if value >= 0 else "a number >= 0"


def _in_unit_interval(value) -> Optional[str]:
    return None if 0 <= value < 1 else "a number in [0, 1)"


def _all_positive(values) -> Optional[str]:
    if len(values) == 0:
        return "a non-empty list of positive integers"
    return None if all(v > 0 for v in values) else "a list of positive integers"


# A run's name becomes a folder (checkpoint.dir/<name>) and an MLflow run name:
# letters, digits, '.', '_', '-', starting with a letter or digit, so it can be
# neither a path ('../x', '/abs', '.') nor empty, nor quote-break an MLflow filter.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
NAME_MAX_CHARS = 100
# Seeds feed torch.Generator.manual_seed, which takes a signed 64-bit integer.
SEED_LIMIT = 2**63


def _safe_name(value) -> Optional[str]:
    if len(value) <= NAME_MAX_CHARS and NAME_PATTERN.match(value):
        return None
    return (f"1..{NAME_MAX_CHARS} characters of A-Z a-z 0-9 . _ - starting with a letter or digit "
            "(the name is a folder under checkpoint.dir)")


def _seed(value) -> Optional[str]:
    return None if 0 <= value < SEED_LIMIT else "an integer in [0, 2**63)"


def _non_empty(value) -> Optional[str]:
    return None if value.strip() else "a non-empty string"


def _distinct(check):
    """``check`` on a list, and no value twice (a repeated trial would share a name and a folder)."""
    def distinct(values) -> Optional[str]:
        complaint = check(values)
        if complaint:
            return complaint
        repeated = sorted({v for v in values if list(values).count(v) > 1})
        return f"distinct values (repeated: {', '.join(map(str, repeated))})" if repeated else None

    return distinct


def _choice(*names):
    def check(value) -> Optional[str]:
        return None if value in names else "one of " + ", ".join(repr(n) for n in names)

    return check


def _checked(default, check, **kwargs):
    """A dataclass field whose value must pass ``check`` (returns a complaint or None)."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata={"check": check}, **kwargs)
    return field(default=default, metadata={"check": check}, **kwargs)


@dataclass(frozen=True)
class SyntheticConfig:
    """The note's random images: ``x = rand(n, 784)``, targets ``arange(n) % num_targets``."""

    num_train: int = _checked(5, _positive)
    num_test: int = _checked(5, _positive)
    num_features: int = _checked(784, _positive)
    num_targets: int = _checked(5, _positive)  # the note's targets are 0..4
    num_classes: int = _checked(10, _positive)  # ... scored by a 10-way output layer


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _checked("fashion-mnist", _choice(*DATASETS))
    data_dir: Optional[str] = None
    validation_size: int = _checked(5000, _non_negative)
    # Keep only the first N training / test samples after the split (small tests).
    train_subset: Optional[int] = _checked(None, _positive)
    test_subset: Optional[int] = _checked(None, _positive)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class ModelConfig:
    hidden_sizes: tuple[int, ...] = _checked((500,), lambda v: None if all(h > 0 for h in v) else "a list of positive integers")
    activation: str = _checked("sigmoid", _choice(*ACTIVATIONS))


@dataclass(frozen=True)
class OptimConfig:
    lr: float = _checked(0.01, _positive)
    momentum: float = _checked(0.9, _in_unit_interval)
    weight_decay: float = _checked(0.0, _non_negative)
    global_batch_size: int = _checked(128, _positive)
    # Linear warmup of the LR from lr/warmup_steps to lr over this many epochs'
    # worth of steps (Goyal et al. 2017 pair it with the linear scaling rule).
    warmup_epochs: float = _checked(0.0, _non_negative)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _checked(2, _positive)
    # A step budget instead of an epoch budget: stop after this many steps
    # (the last epoch may be partial); train.epochs is then ignored.
    max_steps: Optional[int] = _checked(None, _positive)
    grad_engine: str = _checked("autograd", _choice(*GRAD_ENGINES))
    device: str = _checked("auto", _choice(*DEVICES))
    eval_batch_size: int = _checked(10000, _positive)
    # False: the last, smaller batch of an epoch is trained too, so an epoch sees
    # every training sample exactly once at any batch size.
    drop_last: bool = False
    progress: bool = True


@dataclass(frozen=True)
class MetricsConfig:
    """What harness/measure/metrics.py measures during a run."""

    # Steps-to-target (Shallue et al. 2018): first epoch whose validation accuracy reaches this.
    target_val_accuracy: float = _checked(0.85, lambda v: None if 0 < v <= 1 else "a number in (0, 1]")
    noise_scale: bool = True
    noise_scale_ema_decay: float = _checked(0.95, _in_unit_interval)
    # Measure every N-th step: the estimate is an average anyway, and measuring
    # costs about one extra backward's worth of memory traffic on small batches.
    noise_scale_interval: int = _checked(4, _positive)
    sharpness: bool = True
    sharpness_samples: int = _checked(1024, _positive)
    sharpness_iterations: int = _checked(20, _positive)


@dataclass(frozen=True)
class PerformanceConfig:
    """How the step is executed; none of it changes what is computed (up to float rounding)."""

    # Capture the whole training step (zero-grad, forward, loss, backward with
    # DDP's all-reduce, optimizer step) as CUDA graphs and replay them. Needs a
    # CUDA device and the autograd engine; elsewhere the eager step runs and a
    # log line says why (harness/core/graph_step.py).
    cuda_graph: bool = False


@dataclass(frozen=True)
class TrialConfig:
    """Set by a sweep on each trial it expands: how this run's LR was derived."""

    sweep: str = "sweep"
    lr_rule: str = _checked("none", _choice(*LR_RULES))
    base_lr: float = _checked(0.01, _positive)
    base_batch_size: int = _checked(128, _positive)


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (resolved by the launcher).
    uri: Optional[str] = None
    experiment: str = _checked("minibatch-harness", _non_empty)


@dataclass(frozen=True)
class CheckpointConfig:
    enabled: bool = True
    dir: str = "checkpoints"


@dataclass(frozen=True)
class SweepConfig:
    """A batch-size sweep: one trial per (batch size, seed)."""

    batch_sizes: tuple[int, ...] = _checked((32, 128, 512), _distinct(_all_positive))
    seeds: tuple[int, ...] = _checked((0,), _distinct(
        lambda v: None if len(v) and all(_seed(s) is None for s in v) else "a non-empty list of integers in [0, 2**63)"))
    # LR scaling relative to (base_batch_size, optim.lr): none, linear (Goyal et
    # al. 2017), sqrt (Hoffer et al. 2017). Every rule listed gets every batch size.
    lr_rules: tuple[str, ...] = _checked(("none",), _distinct(lambda v: None if v and all(r in LR_RULES for r in v)
                                         else "a non-empty list of " + ", ".join(repr(r) for r in LR_RULES)))
    base_batch_size: int = _checked(128, _positive)
    # The budget of every trial: None keeps train.epochs (a fixed-epoch comparison);
    # a number of steps gives a fixed-step comparison (train.max_steps).
    budget_steps: Optional[int] = _checked(None, _positive)
    # Linear LR warmup for the trials of a scaling rule (linear, sqrt); Goyal et al.
    # 2017 pair linear scaling with warmup. Trials of rule none keep optim.warmup_epochs.
    warmup_epochs: float = _checked(0.0, _non_negative)


@dataclass(frozen=True)
class Config:
    name: str = _checked("run", _safe_name)
    seed: int = _checked(0, _seed)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    sweep: Optional[SweepConfig] = None
    trial: Optional[TrialConfig] = None

    @classmethod
    def from_dict(cls, raw: dict) -> "Config":
        cfg = _build(cls, raw, prefix="")
        _check_cross_field(cfg)
        return cfg

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def replace(self, **dotted: Any) -> "Config":
        """A copy with dotted keys replaced, validated again: ``replace(**{"optim.lr": 0.1})``."""
        raw = self.to_dict()
        for key, value in dotted.items():
            _set_dotted(raw, key, value)
        return Config.from_dict(raw)

    # Derived values, computed in one place.
    @property
    def input_size(self) -> int:
        if self.data.dataset == "synthetic":
            return self.data.synthetic.num_features
        return KNOWN_SHAPES[self.data.dataset][0]

    @property
    def num_classes(self) -> int:
        if self.data.dataset == "synthetic":
            return self.data.synthetic.num_classes
        return KNOWN_SHAPES[self.data.dataset][1]

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return (self.input_size, *self.model.hidden_sizes, self.num_classes)

    @property
    def train_set_size(self) -> int:
        """Training samples after the validation split and subset."""
        size = _training_total(self.data) - self.data.validation_size
        if self.data.train_subset is not None:
            size = min(size, self.data.train_subset)
        return size

    @property
    def is_sweep(self) -> bool:
        return self.sweep is not None

    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.train_set_size, self.optim.global_batch_size, self.train.drop_last)

    @property
    def total_epochs(self) -> int:
        """Epochs to run: train.epochs, or as many as train.max_steps needs."""
        if self.train.max_steps is None:
            return self.train.epochs
        return -(-self.train.max_steps // self.steps_per_epoch())


def _training_total(data: DataConfig) -> int:
    """Samples in the source's training file (before the validation split), known without reading it."""
    if data.dataset == "synthetic":
        return data.synthetic.num_train
    return KNOWN_SPLIT_SIZES[data.dataset][0]


def steps_per_epoch(num_samples: int, global_batch_size: int, drop_last: bool) -> int:
    """Steps in one pass over ``num_samples``; a smaller last batch counts unless ``drop_last``.

    The one definition: Config.steps_per_epoch (before any data is read) and
    data.BatchPlan (which yields the batches) both ask it.
    """
    full, rest = divmod(num_samples, global_batch_size)
    return full + (1 if rest and not drop_last else 0)


def check_divisible_by_world_size(key: str, global_batch_size: int, world_size: int) -> None:
    """Refuse a global batch that ``world_size`` ranks cannot share equally (``key`` names it in the error)."""
    if global_batch_size % world_size:
        raise InputError(f"{key}: {global_batch_size} is not divisible by the world size {world_size}; "
                         f"expected a multiple of {world_size}")


def check_world_size(cfg: Config, world_size: int) -> None:
    """Refuse batch sizes that W ranks cannot share equally, for the run or every trial."""
    sizes = cfg.sweep.batch_sizes if cfg.sweep else (cfg.optim.global_batch_size,)
    key = "sweep.batch_sizes" if cfg.sweep else "optim.global_batch_size"
    for size in sizes:
        check_divisible_by_world_size(key, size, world_size)


def _check_cross_field(cfg: Config) -> None:
    data = cfg.data
    if data.dataset == "synthetic":
        syn = data.synthetic
        if syn.num_targets > syn.num_classes:
            raise InputError(f"data.synthetic.num_targets: {syn.num_targets} exceeds num_classes "
                             f"{syn.num_classes}; expected <= num_classes")
    total = _training_total(data)
    if data.validation_size >= total:
        raise InputError(f"data.validation_size: {data.validation_size} leaves no training data; "
                         f"expected < {total} for {data.dataset}")
    if cfg.sweep:
        _check_trial_names(cfg)
    sizes = cfg.sweep.batch_sizes if cfg.sweep else (cfg.optim.global_batch_size,)
    key = "sweep.batch_sizes" if cfg.sweep else "optim.global_batch_size"
    for size in sizes:
        if size > cfg.train_set_size:
            raise InputError(f"{key}: {size} is larger than the training set "
                             f"({cfg.train_set_size} samples); expected <= {cfg.train_set_size}")


def trial_name(sweep_name: str, rule: str, batch_size: int, seed: int) -> str:
    """The path-safe name (and checkpoint folder) of one sweep trial."""
    return f"{sweep_name}-{rule}-bs{batch_size}-seed{seed}"


def _check_trial_names(cfg: Config) -> None:
    """Every derived trial name must be a valid name too (the longest decides)."""
    sweep = cfg.sweep
    longest = max((trial_name(cfg.name, r, b, s) for r in sweep.lr_rules for b in sweep.batch_sizes
                   for s in sweep.seeds), key=len)
    if len(longest) > NAME_MAX_CHARS:
        raise InputError(f"name: trial name {longest[:40]}... would be {len(longest)} characters; expected a sweep "
                         f"name short enough for trial names of at most {NAME_MAX_CHARS} characters")


# --- loading -----------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice or a key that is not a string.

    PyYAML keeps the last of two equal keys without a word, so a config could
    silently train with a value its author did not see.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                where = f"line {key_node.start_mark.line + 1}"
                if not isinstance(key, str):
                    raise InputError(f"key {key!r} at {where}: expected a string key (a config name)")
                if key in seen:
                    raise InputError(f"key {key!r} at {where}: given twice in one mapping; expected each key once")
                seen.add(key)
        return super().construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


def _parse_yaml(text: str, where: str) -> Any:
    """YAML -> plain data; every problem (syntax, duplicate or non-string key,
    nesting past Python's recursion limit) as an InputError naming ``where``."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except InputError as err:
        raise InputError(f"{where}: {err}") from None
    except RecursionError:
        raise InputError(f"{where}: nested too deeply; expected at most a few levels of sections") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise InputError(f"{where}: YAML syntax error{at}: {problem}") from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, validate everything."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found; expected a YAML file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder; expected a YAML file") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read config ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not a text file (byte {err.start} is not UTF-8); expected a YAML file") from None
    if "\0" in text:
        raise InputError(f"{path}: not a text file (it holds NUL bytes); expected a YAML file")
    raw = _parse_yaml(text, str(path))
    if raw is None:
        # An empty file is a mistake (a wrong path, a truncated copy), not a request for defaults.
        raise InputError(f"{path}: config file is empty; expected a mapping of config sections (see configs/)")
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of config sections at the top level, "
                         f"got {type(raw).__name__}")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    try:
        return Config.from_dict(raw)
    except RecursionError:  # e.g. a self-referencing YAML alias
        raise InputError(f"{path}: nested too deeply; expected at most a few levels of sections") from None


def parse_override(item: str) -> tuple[str, Any]:
    """``optim.lr=0.05`` -> ("optim.lr", 0.05); values are parsed as YAML scalars/lists."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise InputError(f"--set {item!r}: expected key=value, e.g. optim.lr=0.05")
    if not text.strip():
        return key.strip(), ""
    try:
        value = _parse_yaml(text, f"--set {key.strip()}")
    except InputError:
        raise InputError(f"--set {key.strip()}: cannot parse value {text!r} as YAML") from None
    return key.strip(), value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    schema: Any = Config
    for depth, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
        if part not in fields:
            where = ".".join(parts[: depth + 1])
            raise InputError(f"--set {key}: unknown key {where!r}; expected one of "
                             + ", ".join(sorted(fields)) if fields else f"--set {key}: {where!r} has no sub-keys")
        schema = _dataclass_of(_hints(schema)[part])
        if depth == len(parts) - 1:
            node[part] = value
        else:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _dataclass_of(tp) -> Any:
    """The dataclass inside ``tp`` (``Optional[X]`` -> X), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _build(cls, raw: Any, prefix: str):
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected a mapping, got {_describe(raw)}")
    hints = _hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise InputError(f"{prefix}{unknown[0]}: unknown key; expected one of {', '.join(sorted(names))}")
    values = {}
    for name, value in raw.items():
        key = prefix + name
        converted = _convert(hints[name], value, key)
        check = names[name].metadata.get("check")
        if check is not None and converted is not None:
            complaint = check(converted)
            if complaint:
                raise InputError(f"{key}: expected {complaint}, got {_short_repr(value)}")
        values[name] = converted
    return cls(**values)


def _convert(tp, value: Any, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{key}: expected a list of {args[0].__name__}, got {_describe(value)}")
        return tuple(_convert(args[0], item, f"{key}[{i}]") for i, item in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise InputError(f"{key}: expected true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise InputError(f"{key}: expected an integer, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise InputError(f"{key}: expected a finite number, got {value!r}")
            return float(value)
        raise InputError(f"{key}: expected a number, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise InputError(f"{key}: expected a string, got {_describe(value)}")
    raise TypeError(f"config schema: unsupported type {tp!r} for {key}")  # a bug in this module


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(value) if hasattr(value, '__len__') else '?'} long)"


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, dict) else "a mapping"


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"optim.lr": 0.01, ...}``: the resolved config as MLflow params."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix.rstrip(".")] = node

    walk(cfg.to_dict(), "")
    return out

"""Config: the harness's schema, YAML in, one frozen and fully validated model out.

Owns the sections and their keys, the range of every value, the checks across keys,
the facts derived from a config before any data is read (layer sizes, steps per
epoch, trial names) and :func:`load_config`; the general machinery, which knows no
harness key, is harness/core/config_loader.py. Every problem raises
:class:`harness.errors.InputError` with one line that names the key (``optim.lr``)
and what was expected, so launchers can exit with code 2.
"""

from __future__ import annotations

import json
import math
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BeforeValidator, Field, model_validator

from harness.core.config_loader import (ConfigModel, Expect, check, list_of, parse_override, read_yaml_file,
                                        set_dotted)
from harness.errors import InputError

Dataset = Literal["fashion-mnist", "mnist", "digits", "synthetic"]
LrRule = Literal["none", "linear", "sqrt"]
LR_RULES = typing.get_args(LrRule)
OptimizerName = Literal["sgd", "nesterov", "adam", "adamw"]
ScheduleName = Literal["constant", "linear", "cosine"]
SCHEDULES = typing.get_args(ScheduleName)

# (train, test) sizes known without reading the data, so that a batch larger than the training
# set is refused before any process starts; data._digits splits scikit-learn's 1797 digits so.
KNOWN_SPLIT_SIZES = {"fashion-mnist": (60000, 10000), "mnist": (60000, 10000), "digits": (1437, 360)}
KNOWN_SHAPES = {"fashion-mnist": (784, 10), "mnist": (784, 10), "digits": (64, 10)}

# A run's name becomes a folder (checkpoint.dir/<name>) and an MLflow run name, so it can be
# neither a path ('../x', '/abs', '.') nor empty, nor quote-break an MLflow filter.
# \Z, not $: in Python's re, $ also matches before a final newline ("run\n").
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z"
NAME_MAX_CHARS = 100
# metrics.eval_cost's default: the periodic evaluations cost about a tenth of training at most.
DEFAULT_EVAL_COST = 0.10
# Seeds feed torch.Generator.manual_seed, which takes a signed 64-bit integer.
SEED_LIMIT = 2**63

PositiveInt = Annotated[int, Field(gt=0), Expect("a positive number")]
PositiveFloat = Annotated[float, Field(gt=0), Expect("a positive number")]
NonNegativeInt = Annotated[int, Field(ge=0), Expect("a number >= 0")]
NonNegativeFloat = Annotated[float, Field(ge=0), Expect("a number >= 0")]
Fraction = Annotated[float, Field(ge=0, lt=1), Expect("a number in [0, 1)")]
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT), Expect("an integer in [0, 2**63)")]
RunName = Annotated[str, Field(max_length=NAME_MAX_CHARS, pattern=NAME_PATTERN),
                    Expect(f"1..{NAME_MAX_CHARS} characters of A-Z a-z 0-9 . _ - starting with a letter or digit "
                           "(the name is a folder under checkpoint.dir)")]


def _distinct_list(item_type: type, item_ok, expected: str, if_empty: Optional[str] = None) -> Any:
    """A non-empty list of items that pass ``item_ok``, no value twice (a repeated trial would share
    a name and a folder). Items are checked here, not typed, so that the line names the list."""
    def complaint(values) -> Optional[str]:
        if not values:
            return if_empty or expected
        if not all(map(item_ok, values)):
            return expected
        repeated = sorted({v for v in values if values.count(v) > 1})
        return f"distinct values (repeated: {', '.join(map(str, repeated))})" if repeated else None

    return list_of(item_type, check(complaint))


HiddenSizes = list_of(int, check(lambda v: None if all(h > 0 for h in v) else "a list of positive integers"))
BatchSizes = _distinct_list(int, lambda v: v > 0, "a list of positive integers",
                            if_empty="a non-empty list of positive integers")
Seeds = _distinct_list(int, lambda s: 0 <= s < SEED_LIMIT, "a non-empty list of integers in [0, 2**63)")
LrRules = _distinct_list(str, lambda r: r in LR_RULES, "a non-empty list of " + ", ".join(map(repr, LR_RULES)))
LrGrid = _distinct_list(float, lambda x: x > 0, "a non-empty list of positive numbers")
StackTrials = Annotated[Any, check(
    lambda v: None if v == "auto" or (type(v) is int and v >= 1) else "a positive number of trials per stack, or auto")]
# A validator, not min_length: a string of spaces is blank too, and the value must stay as given.
NonBlank = Annotated[str, check(lambda v: None if v.strip() else "a non-empty string")]


def _as_floats(value):
    """A list as a tuple, and integers (not booleans) as floats: a target of 1 means 1.0."""
    def number(v):
        return float(v) if type(v) is int else v
    return tuple(map(number, value)) if isinstance(value, list) else number(value)


def _targets(in_range, expected: str):
    """One target, or several (a list, held as a tuple, its values distinct); a single number stays a
    number, as configs wrote it."""
    def complaint(value) -> Optional[str]:
        values = value if isinstance(value, tuple) else (value,)
        fine = values and all(type(v) is float and in_range(v) for v in values) and len(set(values)) == len(values)
        return None if value is None or fine else expected

    return Annotated[Any, BeforeValidator(_as_floats), check(complaint)]


AccuracyTargets = _targets(lambda v: 0 < v <= 1, "a number in (0, 1], or a non-empty list of distinct such numbers")
LossTargets = _targets(lambda v: 0 < v < math.inf, "a positive number, or a non-empty list of distinct positive numbers")


def targets_text(value) -> str:
    """A target setting as a config writes it: ``0.2``, or ``[0.3, 0.2]``."""
    return f"[{', '.join(f'{v:g}' for v in value)}]" if isinstance(value, tuple) else f"{value:g}"


# model.factory / data.factory: the user's code (core/factories.py).
FACTORY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*\Z"
FACTORY_EXPECTED = '"package.module:function" (a module importable from the working directory or PYTHONPATH)'
FactoryPath = Annotated[str, Field(pattern=FACTORY_PATTERN), Expect(FACTORY_EXPECTED)]


# (step, global batch) pairs: YAML lists of two positive integers, held as tuples.
BatchSteps = Annotated[Any, BeforeValidator(lambda value: tuple(tuple(p) if isinstance(p, list) else p for p in value)
                                            if isinstance(value, list) else value),
                       check(lambda v: None if isinstance(v, tuple) and v and all(
                           isinstance(p, tuple) and len(p) == 2 and all(type(n) is int and n > 0 for n in p)
                           for p in v) else "a non-empty list of [step, batch] pairs of positive integers")]
Betas = list_of(float, check(lambda v: None if len(v) == 2 and all(0 <= b < 1 for b in v)
                             else "two numbers in [0, 1)"))


class SyntheticConfig(ConfigModel):
    """The note's random images: ``x = rand(n, 784)``, targets ``arange(n) % num_targets``."""

    num_train: PositiveInt = 5
    num_test: PositiveInt = 5
    num_features: PositiveInt = 784
    num_targets: PositiveInt = 5  # the note's targets are 0..4
    num_classes: PositiveInt = 10  # ... scored by a 10-way output layer


class WithKwargs(ConfigModel):
    """A section holding a factory's ``kwargs`` (a mapping, which Python cannot hash): hashed by its JSON,
    so a Config stays hashable as every other section is."""

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))


class DataConfig(WithKwargs):
    dataset: Dataset = "fashion-mnist"
    # The user's data instead of data.dataset: factory(**kwargs) returns (train, test), each a map-style
    # Dataset of (features, label) or a pair (features, labels) (core/factories.py); held in memory.
    factory: Optional[FactoryPath] = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    data_dir: Optional[str] = None
    validation_size: NonNegativeInt = 5000
    # Keep only the first N training / test samples after the split (small tests).
    train_subset: Optional[PositiveInt] = None
    test_subset: Optional[PositiveInt] = None
    # Where the samples live while training: on the device ("device"), in host memory with each batch
    # copied over as it is drawn ("host"), or on the device when they take at most half its free memory
    # ("auto"). The batch plan, and so every result, is the same either way.
    resident: Literal["auto", "device", "host"] = "auto"
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)


class ModelConfig(WithKwargs):
    # The note's MLP: input -> hidden_sizes -> classes, the activation between.
    hidden_sizes: HiddenSizes = (500,)
    activation: Literal["sigmoid", "tanh", "relu"] = "sigmoid"
    # The user's model instead: factory(**kwargs) returns an nn.Module mapping inputs to logits
    # (core/factories.py); trained with autograd, seeded with the run's seed.
    factory: Optional[FactoryPath] = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    # What the factory's model returns: logits [n, classes] from forward(features), scored by cross-entropy
    # and accuracy; or "loss": the mean loss over the batch from forward(features, labels), its own
    # objective (no accuracy, so no accuracy targets).
    output: Literal["logits", "loss"] = "logits"


class OptimConfig(ConfigModel):
    # core/optim.py: sgd (torch.optim.SGD's momentum), nesterov, adam (Kingma & Ba 2015; weight_decay
    # as an L2 term) or adamw (decoupled weight decay, Loshchilov & Hutter 2019).
    name: OptimizerName = "sgd"
    lr: PositiveFloat = 0.01
    momentum: Fraction = 0.9
    weight_decay: NonNegativeFloat = 0.0
    betas: Betas = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    global_batch_size: PositiveInt = 128
    # Linear LR warmup over this many epochs' worth of steps (Goyal et al. 2017).
    warmup_epochs: NonNegativeFloat = 0.0
    # After the warmup: the LR held, or decayed to 0 at the end of the step budget, linearly or
    # along a half cosine (Loshchilov & Hutter 2017, without restarts).
    schedule: ScheduleName = "constant"
    # Gradient accumulation (core/step.py): each rank runs its share of a global batch as passes of
    # this many samples summed into one update, so a batch larger than the device holds trains as
    # one batch would. None: one pass per step.
    micro_batch_size: Optional[PositiveInt] = None
    # A global batch that changes during the run (core/batch_schedule.py): "constant" (global_batch_size
    # throughout); "steps": batch_steps' (step, batch) pairs, each batch from its step on; "noise_scale":
    # every batch_noise_every steps the exact B_simple on metrics.exact_noise_samples training samples,
    # and the batch grows to the largest power of two at most batch_noise_multiple x B_simple (never
    # shrinking; capped by max_global_batch_size and the training set). The LR follows each step's batch
    # by batch_lr_rule from lr at global_batch_size.
    batch_schedule: Literal["constant", "steps", "noise_scale"] = "constant"
    batch_steps: Optional[BatchSteps] = None
    batch_noise_every: PositiveInt = 50
    batch_noise_multiple: PositiveFloat = 1.0
    max_global_batch_size: Optional[PositiveInt] = None
    batch_lr_rule: Literal["sqrt", "linear", "none"] = "sqrt"

    @property
    def batch_grows(self) -> bool:
        return self.batch_schedule != "constant"


class TrainConfig(ConfigModel):
    epochs: PositiveInt = 2
    # A step budget instead of train.epochs (the last epoch may be partial).
    max_steps: Optional[PositiveInt] = None
    grad_engine: Literal["autograd", "manual"] = "autograd"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_batch_size: PositiveInt = 10000
    # False: the last, smaller batch of an epoch is trained too, so an epoch sees
    # every training sample exactly once at any batch size.
    drop_last: bool = False
    progress: bool = True
    # End the run (FINISHED) at the first evaluation reaching metrics.target_val_accuracy.
    stop_at_target: bool = False
    # End the run (FINISHED) at the first evaluation whose loss over the whole training split is
    # at or below this: batch sizes compared at equal training loss (Keskar et al. 2017). A list:
    # the steps to each are recorded, and the run ends at the smallest.
    target_train_loss: Optional[LossTargets] = None
    # With stop_at_target: stop a trial still short of the target at race_stop times the steps of the
    # fastest trial of its batch size (a stack's members, and race_best_steps from trials run before);
    # it is recorded with a lower bound on its steps (core/evaluation.py Race). Sweeps set both.
    race_stop: Optional[Annotated[float, Field(gt=1), Expect("a number > 1 or null")]] = None
    race_best_steps: Optional[PositiveInt] = None

    @property
    def loss_targets(self) -> tuple[float, ...]:
        """The training-loss targets, descending (the order training reaches them); () without one."""
        value = self.target_train_loss
        return () if value is None else tuple(sorted(value if isinstance(value, tuple) else (value,), reverse=True))


class MetricsConfig(ConfigModel):
    """What harness/measure/metrics.py measures during a run."""

    # Steps-to-target (Shallue et al. 2018): the first step whose accuracy on the first eval_samples
    # validation samples reaches this; a list: each target's (the run goes on to the last).
    target_val_accuracy: Optional[AccuracyTargets] = 0.85
    # None: about 40 evaluations over the run's step budget (harness/core/evaluation.py).
    eval_every_steps: Optional[PositiveInt] = None
    eval_samples: PositiveInt = 2000
    # The epoch-end training loss and accuracy on this many training samples, spread evenly over the
    # split (the same ones every epoch, on every launcher): an estimate; a run's last epoch scores
    # the whole split. None: the whole split every epoch.
    train_eval_samples: Optional[PositiveInt] = None
    # The automatic schedule's budget: evaluations cost about this fraction of training at most
    # (core/evaluation.py eval_floor); a larger fraction buys a finer stopping point.
    eval_cost: Annotated[float, Field(gt=0, le=1), Expect("a number in (0, 1]")] = DEFAULT_EVAL_COST
    # The exact B_simple from per-example gradients at the target (measure/exact_noise.py),
    # over the first N training samples; None: not computed.
    exact_noise_samples: Optional[PositiveInt] = 1024
    # The exact B_simple at a target: its two components averaged over the states after the last N
    # steps up to the crossing, then divided (one step's |G|^2 swings with the momentum's oscillation).
    noise_window_steps: PositiveInt = 16
    # B_noise = tr(H Sigma) / (G^T H G) at each target's crossing (measure/hessian_noise.py), over the first N
    # training samples, tr(H Sigma) from hessian_noise_deviations of them (one Hessian-vector product each,
    # its sampling error logged beside it); None: not computed.
    hessian_noise_samples: Optional[PositiveInt] = 256
    hessian_noise_deviations: Annotated[int, Field(ge=2), Expect("a number >= 2")] = 16
    noise_scale: bool = True
    noise_scale_ema_decay: Fraction = 0.95
    # Measure every N-th step: the estimate is an average anyway, and measuring costs.
    noise_scale_interval: PositiveInt = 4
    # The Hessian's extreme eigenvalues at the end of a run: a Lanczos pass, so only where a config asks for it.
    sharpness: bool = False
    sharpness_samples: PositiveInt = 1024
    sharpness_iterations: PositiveInt = 20
    # sharpness_iterations caps the Lanczos restarts (ARPACK's maxiter); each eigenvalue is
    # returned within this fraction of the spectral radius.
    sharpness_tolerance: Annotated[float, Field(gt=0, lt=1), Expect("a number in (0, 1)")] = 1e-3
    # Sharpness over training (Cohen et al. 2021, core/sharpness.py): read at step 0, every N steps
    # (doubling_steps: N, 2N, 4N, ...; epochs: every N-th epoch's end) and at the end, as by_step/
    # metrics. None: only the final reading.
    sharpness_every: Optional[PositiveInt] = None
    sharpness_every_unit: Literal["steps", "doubling_steps", "epochs"] = "steps"

    @property
    def accuracy_targets(self) -> tuple[float, ...]:
        """The held-out accuracy targets, ascending; () without one."""
        value = self.target_val_accuracy
        return () if value is None else tuple(sorted(value if isinstance(value, tuple) else (value,)))


class PerformanceConfig(ConfigModel):
    """How the step is executed; none of it changes what is computed (up to float rounding)."""

    # Capture the whole training step as CUDA graphs and replay them (core/graph_step.py); needs
    # CUDA and the autograd engine, elsewhere the eager step runs and a log line says why.
    cuda_graph: bool = False
    # bf16: the training forward runs under torch.autocast(bfloat16) (core/precision.py); all else
    # stays fp32. The hand-written engine is fp32/fp64 only.
    precision: Literal["fp32", "bf16"] = "fp32"


class TrialConfig(ConfigModel):
    """Set by a sweep on each trial it expands: how this run's LR was derived."""

    sweep: str = "sweep"
    lr_rule: LrRule = "none"
    base_lr: PositiveFloat = 0.01
    base_batch_size: PositiveInt = 128


class TrackingConfig(ConfigModel):
    enabled: bool = True
    # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (resolved by the launcher).
    uri: Optional[str] = None
    experiment: NonBlank = "minibatch-harness"
    # The MLflow run's name. None: a sweep's trial is named by what differs between trials; another run by
    # its config's name and what its --set overrides changed (the launchers fill it in).
    run_name: Optional[NonBlank] = None
    # The run's final weights as an MLflow model (artifact "model": mlflow.pytorch.load_model("runs:/<id>/model")).
    log_model: bool = True


class CheckpointConfig(ConfigModel):
    enabled: bool = True
    dir: str = "checkpoints"
    # Start from another run's weights (a checkpoint file, a run's checkpoint folder or an MLflow
    # run id), with a fresh optimiser and counters. A resumed run ignores it.
    init_from: Optional[NonBlank] = None


class SweepConfig(ConfigModel):
    """A batch-size sweep: one trial per (batch size, seed)."""

    batch_sizes: BatchSizes = (32, 128, 512)
    seeds: Seeds = (0,)
    # LR scaling relative to (base_batch_size, optim.lr): none, linear (Goyal et
    # al. 2017), sqrt (Hoffer et al. 2017). Every rule listed gets every batch size.
    lr_rules: LrRules = ("none",)
    base_batch_size: PositiveInt = 128
    # Every trial's budget: None keeps train.epochs; a number of steps sets train.max_steps.
    budget_steps: Optional[PositiveInt] = None
    # Linear LR warmup for the trials of a scaling rule (Goyal et al. 2017); rule none keeps optim's.
    warmup_epochs: NonNegativeFloat = 0.0
    # The LR grid of every (rule, batch size), tuned per batch size (Shallue et al. 2018): lrs as
    # given, or lr_factors times the rule's LR. Neither: one LR per trial.
    lrs: Optional[LrGrid] = None
    lr_factors: Optional[LrGrid] = None
    # Early stopping of hopeless trials, Ray launcher only: asha = asynchronous successive halving
    # (Li et al. 2020) on validation accuracy, one rung per grace_period x reduction_factor^k epochs.
    early_stopping: Literal["none", "asha"] = "none"
    asha_grace_period: PositiveInt = 1  # epochs every trial trains before ASHA may stop it
    asha_reduction_factor: Annotated[float, Field(gt=1), Expect("a number > 1")] = 3.0
    # Trials that share batch size and architecture trained as one stacked model (core/stacked.py),
    # up to this many per stack; auto: as many as can; 1: each alone.
    stack_trials: StackTrials = 1
    # The steps-to-target race (trials with train.stop_at_target): a trial still short of the target at
    # this many times the steps of the fastest trial of its batch size stops (train.race_stop). null: off.
    race_stop: Optional[Annotated[float, Field(gt=1), Expect("a number > 1 or null")]] = 2.0

    @property
    def stacks(self) -> bool:
        return self.stack_trials != 1

    @model_validator(mode="after")
    def _one_lr_grid(self) -> SweepConfig:
        if self.lrs is not None and self.lr_factors is not None:
            raise InputError("sweep.lr_factors: given together with sweep.lrs; expected at most one LR grid")
        return self

    def lr_grid(self) -> tuple[Optional[float], ...]:
        """The grid's values (LRs or factors), ``(None,)`` without a grid."""
        return self.lrs or self.lr_factors or (None,)

    def lr_label(self, value: Optional[float]) -> str:
        """How a grid value appears in a trial name: ``lr0.01`` (an LR) or ``lrx0.5`` (a factor)."""
        return "" if value is None else f"lr{'' if self.lrs else 'x'}{value:.6g}"


class Config(ConfigModel):
    name: RunName = "run"
    seed: Seed = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    performance: PerformanceConfig = Field(default_factory=PerformanceConfig)
    sweep: Optional[SweepConfig] = None
    trial: Optional[TrialConfig] = None

    @model_validator(mode="after")
    def _check_across_keys(self) -> Config:
        # Runs only once every key is valid on its own, so it may read any of them.
        _check_cross_field(self)
        return self

    # Derived values, computed in one place.
    @property
    def input_size(self) -> int:
        return _known_sizes(self.data)[1]

    @property
    def num_classes(self) -> int:
        return _known_sizes(self.data)[2]

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return (self.input_size, *self.model.hidden_sizes, self.num_classes)

    @property
    def train_set_size(self) -> int:
        """Training samples after the validation split and subset."""
        return self.train_size_of(_known_sizes(self.data)[0])

    def train_size_of(self, training_file_size: int) -> int:
        size = training_file_size - self.data.validation_size
        return size if self.data.train_subset is None else min(size, self.data.train_subset)

    def accumulation_steps(self, world_size: int = 1) -> int:
        """Micro-batches per rank in a full step: the per-rank batch over optim.micro_batch_size (1 without)."""
        if self.optim.micro_batch_size is None:
            return 1
        return self.optim.global_batch_size // world_size // self.optim.micro_batch_size

    @property
    def is_sweep(self) -> bool:
        return self.sweep is not None

    def batch_sizes(self) -> tuple[str, tuple[int, ...]]:
        """The key that names the global batch sizes (of the run, or of every trial) and the sizes."""
        if self.sweep:
            return "sweep.batch_sizes", self.sweep.batch_sizes
        return "optim.global_batch_size", (self.optim.global_batch_size,)

    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.train_set_size, self.optim.global_batch_size, self.train.drop_last)

    @property
    def total_epochs(self) -> int:
        """Epochs to run: train.epochs, or as many as train.max_steps needs."""
        max_steps = self.train.max_steps
        return self.train.epochs if max_steps is None else -(-max_steps // self.steps_per_epoch())

    def step_budget(self, steps_in_epoch: int) -> int:
        """The run's steps: train.max_steps, else every epoch's steps (``steps_in_epoch`` each)."""
        return self.train.max_steps or self.total_epochs * steps_in_epoch


def _known_sizes(data: DataConfig) -> tuple[int, int, int]:
    """(samples in the training file before the validation split, features, classes), known without reading
    the data files; a data factory is called once per process to know them (core/factories.py)."""
    if data.factory is not None:
        from harness.core.factories import factory_data
        samples = factory_data(data.factory, data.kwargs)
        return len(samples.train_labels), samples.num_features, samples.num_classes
    syn = data.synthetic
    if data.dataset == "synthetic":
        return syn.num_train, syn.num_features, syn.num_classes
    return KNOWN_SPLIT_SIZES[data.dataset][0], *KNOWN_SHAPES[data.dataset]


def steps_per_epoch(num_samples: int, global_batch_size: int, drop_last: bool) -> int:
    """Steps in one pass over ``num_samples``; a smaller last batch counts unless ``drop_last``.
    Config.steps_per_epoch (before any data is read) and data.BatchPlan both ask it."""
    return num_samples // global_batch_size if drop_last else -(-num_samples // global_batch_size)


def check_divisible_by_world_size(key: str, global_batch_size: int, world_size: int) -> None:
    """Refuse a global batch that ``world_size`` ranks cannot share equally (``key`` names it in the error)."""
    if global_batch_size % world_size:
        raise InputError(f"{key}: {global_batch_size} is not divisible by the world size {world_size}; "
                         f"expected a multiple of {world_size}")


def check_world_size(cfg: Config, world_size: int) -> None:
    """Refuse batch sizes that W ranks cannot share equally, for the run or every trial."""
    key, sizes = cfg.batch_sizes()
    for size in sizes:
        check_divisible_by_world_size(key, size, world_size)
        check_micro_batch(cfg.optim.micro_batch_size, key, size, world_size)
    for _, size in cfg.optim.batch_steps or () if cfg.optim.batch_schedule == "steps" else ():
        check_divisible_by_world_size("optim.batch_steps", size, world_size)


def check_micro_batch(micro_batch_size: Optional[int], key: str, global_batch_size: int, world_size: int) -> None:
    """Refuse a micro-batch that cannot split each rank's share of ``global_batch_size`` into equal passes."""
    per_rank = global_batch_size // world_size
    if micro_batch_size is not None and (micro_batch_size > per_rank or per_rank % micro_batch_size):
        where = f"{key} {global_batch_size}" + (f" over {world_size} ranks" if world_size > 1 else "")
        raise InputError(f"optim.micro_batch_size: {micro_batch_size} does not divide the per-rank batch of "
                         f"{per_rank} ({where}); expected a divisor of {per_rank}")


def _check_cross_field(cfg: Config) -> None:
    data, syn = cfg.data, cfg.data.synthetic
    if data.dataset == "synthetic" and syn.num_targets > syn.num_classes:
        raise InputError(f"data.synthetic.num_targets: {syn.num_targets} exceeds num_classes "
                         f"{syn.num_classes}; expected <= num_classes")
    total = _known_sizes(data)[0]
    if data.validation_size >= total:
        source = "data.factory's training part" if data.factory else data.dataset
        raise InputError(f"data.validation_size: {data.validation_size} leaves no training data; "
                         f"expected < {total} for {source}")
    if cfg.train.stop_at_target and cfg.metrics.target_val_accuracy is None:
        raise InputError("train.stop_at_target: true needs a target; expected metrics.target_val_accuracy "
                         "in (0, 1], or stop_at_target false")
    if cfg.train.race_stop is not None and not cfg.train.stop_at_target:
        raise InputError(f"train.race_stop: {cfg.train.race_stop:g} races trials to their target; expected "
                         "train.stop_at_target true, or race_stop null")
    if cfg.train.target_train_loss is not None and cfg.train.stop_at_target:
        raise InputError(f"train.target_train_loss: {targets_text(cfg.train.target_train_loss)} given together with "
                         "train.stop_at_target true; expected at most one stopping rule (train.stop_at_target false)")
    if cfg.model.output == "loss":
        _check_loss_output(cfg)
    if cfg.optim.batch_grows:
        _check_batch_schedule(cfg)
    if cfg.model.factory is not None and cfg.train.grad_engine == "manual":
        raise InputError(f"train.grad_engine: manual with model.factory {cfg.model.factory}; the hand-written "
                         "backward is the note's MLP's; expected grad_engine autograd")
    if cfg.optim.name == "nesterov" and cfg.optim.momentum == 0:
        raise InputError("optim.name: nesterov with optim.momentum 0; expected a momentum > 0 "
                         "(Nesterov's step is a momentum step), or optim.name sgd")
    if cfg.performance.precision == "bf16" and cfg.train.grad_engine == "manual":
        raise InputError("performance.precision: bf16 with train.grad_engine manual; the hand-written backward "
                         "is fp32/fp64 only; expected precision fp32 or grad_engine autograd")
    if cfg.sweep:
        _check_trial_names(cfg)
        if cfg.sweep.early_stopping == "asha" and data.validation_size == 0:
            raise InputError("sweep.early_stopping: asha ranks trials by validation accuracy; expected "
                             "data.validation_size > 0")
        if cfg.sweep.stacks:
            check_stackable_trial(cfg, f"with sweep.stack_trials {cfg.sweep.stack_trials}")
    key, sizes = cfg.batch_sizes()
    for size in sizes:
        if size > cfg.train_set_size:
            raise InputError(f"{key}: {size} is larger than the training set "
                             f"({cfg.train_set_size} samples); expected <= {cfg.train_set_size}")
        # One rank's view, at load: what W ranks need is checked again by check_world_size.
        check_micro_batch(cfg.optim.micro_batch_size, key, size, 1)
    for _, size in cfg.optim.batch_steps or () if cfg.optim.batch_schedule == "steps" else ():
        if size > cfg.train_set_size:
            raise InputError(f"optim.batch_steps: batch {size} is larger than the training set "
                             f"({cfg.train_set_size} samples); expected <= {cfg.train_set_size}")


def _check_batch_schedule(cfg: Config) -> None:
    """A batch that changes during a run: what it needs, and what it cannot run with, each one line."""
    optim, schedule = cfg.optim, cfg.optim.batch_schedule
    if schedule == "steps":
        pairs = optim.batch_steps or ()
        if not pairs:
            raise InputError("optim.batch_steps: null with optim.batch_schedule steps; expected (step, batch) pairs, "
                             "e.g. [[500, 256], [2000, 1024]]")
        steps = [step for step, _ in pairs]
        if steps != sorted(set(steps)):
            raise InputError(f"optim.batch_steps: steps {steps}; expected increasing steps")
    elif cfg.metrics.exact_noise_samples is None or cfg.metrics.exact_noise_samples < 2:
        raise InputError("metrics.exact_noise_samples: null with optim.batch_schedule noise_scale, which reads the "
                         "exact B_simple on that many training samples; expected a number >= 2 (e.g. 1024)")
    if cfg.sweep and cfg.sweep.stacks:
        raise InputError(f"sweep.stack_trials: {cfg.sweep.stack_trials} with optim.batch_schedule {schedule}: a "
                         "stack's members share one batch at every step; expected stack_trials 1")
    if optim.micro_batch_size is not None:
        raise InputError(f"optim.micro_batch_size: {optim.micro_batch_size} with optim.batch_schedule {schedule}; "
                         "expected null (accumulation plans a fixed batch)")
    if optim.schedule != "constant" or optim.warmup_epochs > 0:
        raise InputError(f"optim.schedule: {optim.schedule} (warmup_epochs {optim.warmup_epochs:g}) with "
                         f"optim.batch_schedule {schedule}, whose LR follows the batch; expected schedule constant "
                         "and warmup_epochs 0")


def _check_loss_output(cfg: Config) -> None:
    """A model that returns its own loss has no logits: nothing that reads accuracy can run on it."""
    if cfg.model.factory is None:
        raise InputError("model.output: loss needs model.factory (the note's MLP returns logits); expected "
                         "model.output logits, or a model.factory")
    if cfg.metrics.target_val_accuracy is not None:
        raise InputError(f"metrics.target_val_accuracy: {targets_text(cfg.metrics.target_val_accuracy)} with "
                         "model.output loss, whose model gives no accuracy; expected null (train.target_train_loss "
                         "stops a run at a training loss)")
    if cfg.sweep and cfg.sweep.early_stopping == "asha":
        raise InputError("sweep.early_stopping: asha ranks trials by validation accuracy, which model.output loss "
                         "does not give; expected early_stopping none")


def check_stackable_trial(cfg: Config, where: str) -> None:
    """What no stacked step does (core/stacked.py): refused in one line naming the key."""
    if cfg.optim.micro_batch_size is not None:
        raise InputError(f"optim.micro_batch_size: {cfg.optim.micro_batch_size} {where}; expected null "
                         "(a stacked step is one pass)")
    if cfg.performance.precision != "fp32":
        raise InputError(f"performance.precision: {cfg.performance.precision} {where}; expected fp32 "
                         "(the stacked step's backward is written by hand)")


def trial_name(sweep_name: str, rule: str, batch_size: int, seed: int, lr_label: str = "") -> str:
    """The path-safe name (and checkpoint folder) of one sweep trial; ``lr_label``
    (``SweepConfig.lr_label``: ``lr0.01``, ``lrx0.5``) only in a sweep with an LR grid."""
    return f"{sweep_name}-{rule}-bs{batch_size}-{lr_label + '-' if lr_label else ''}seed{seed}"


def _check_trial_names(cfg: Config) -> None:
    """Every derived trial name must be a valid name too (the longest decides), and one per grid value."""
    sweep = cfg.sweep
    labels = [sweep.lr_label(v) for v in sweep.lr_grid()]
    if len(set(labels)) < len(labels):  # 0.1 and 0.1000001 would share a name, a folder and a run
        key = "sweep.lrs" if sweep.lrs else "sweep.lr_factors"
        raise InputError(f"{key}: values that agree to 6 significant digits ({', '.join(labels)}); "
                         "expected values that differ within 6 digits")
    longest = max((trial_name(cfg.name, r, b, s, lr) for r in sweep.lr_rules for b in sweep.batch_sizes
                   for s in sweep.seeds for lr in labels), key=len)
    if len(longest) > NAME_MAX_CHARS:
        raise InputError(f"name: trial name {longest[:40]}... would be {len(longest)} characters; expected a sweep "
                         f"name short enough for trial names of at most {NAME_MAX_CHARS} characters")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, validate everything."""
    raw = read_yaml_file(path)
    for item in overrides:
        set_dotted(Config, raw, *parse_override(item))
    return Config.from_dict(raw)


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"optim.lr": 0.01, ...}``: the resolved config as MLflow params."""
    def walk(node: dict, prefix: str):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield prefix + key, value

    return dict(walk(cfg.to_dict(), ""))

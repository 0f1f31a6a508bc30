"""The update and the LR schedule (core/optim.py) are torch.optim's for each of the loop's K members: a run
alone (K = 1) and every member of a stack.

The reference for each claim is ``torch.optim.{SGD, Adam, AdamW}`` driven by
``torch.optim.lr_scheduler`` (a ``LinearLR`` warmup, then ``LinearLR`` or
``CosineAnnealingLR`` decay, or the LR held, joined by ``SequentialLR``), fed the
same batches from the same initial weights.
"""

import copy
import itertools
import math

import pytest
import torch
from torch.optim import lr_scheduler

from conftest import UncapturedGraphStep
from harness.core.backprop import autograd_backward
from harness.core.config import Config
from harness.core.data import load_dataset
from harness.core.distributed import DistContext
from harness.core.evaluation import RunCounters
from harness.core.model import build_model
from harness.core.optim import Optimizer, Schedule
from harness.core.stacked import StackedTrainer, check_stackable
from harness.core.step import unwrap
from harness.core.train_loop import build_engine
from harness.core.trainer import SingleRun, build_trainer, checkpoint_state, load_state
from harness.errors import InputError

OPTIMIZERS = ["sgd", "nesterov", "adam", "adamw"]
SCHEDULES = ["constant", "linear", "cosine"]
STEPS = 50
# digits after a validation split of 100: 1337 training samples in batches of 64, 21 steps an epoch (the
# last of 57); a budget of 50 steps, so a decay ends at step 50. warmup_epochs 0.25: round(5.25) = 5 steps.
STEPS_PER_EPOCH = 21
WARMUP_STEPS = 5
BASE = {"data": {"dataset": "digits", "validation_size": 100}, "model": {"hidden_sizes": [16]},
        "optim": {"global_batch_size": 64, "weight_decay": 1e-3}, "train": {"max_steps": STEPS, "progress": False},
        "tracking": {"enabled": False}, "checkpoint": {"enabled": False},
        "metrics": {"noise_scale": False, "sharpness": False, "target_val_accuracy": None}}
# The LR of each kind of update; a stack's members then take 1x, 0.5x and 2x of it.
LR = {"sgd": 0.1, "nesterov": 0.1, "adam": 0.01, "adamw": 0.01}
TOLERANCE = 1e-6


def _config(name: str, schedule: str, seed: int = 0, **optim) -> Config:
    settings = {"name": name, "lr": LR[name], "schedule": schedule, "warmup_epochs": 0.25, **optim}
    return Config.from_dict({**BASE, "name": f"run{seed}", "seed": seed, "optim": {**BASE["optim"], **settings}})


def _members(name: str, schedule: str, size: int = 3, warmup_epochs: float = 0.25) -> list[Config]:
    """The first ``size`` of three members that differ in seed (weights, data order, digits split), LR, warmup,
    weight decay, betas; the first warms up for ``warmup_epochs``."""
    return [_config(name, schedule, seed=0, warmup_epochs=warmup_epochs),
            _config(name, schedule, seed=1, lr=LR[name] / 2, warmup_epochs=0.0, weight_decay=0.0, betas=[0.8, 0.99]),
            _config(name, schedule, seed=2, lr=LR[name] * 2, warmup_epochs=0.5, weight_decay=1e-4)][:size]


def _engine(members: list[Config]):
    """The loop's engine for ``members`` (core/train_loop.py ``build_engine``: a run alone's for one, a stack's
    for several, on the first member's digits split) and each member's trainer."""
    return build_engine(members, DistContext(), load_dataset(members[0]), stacked=len(members) > 1)


def _as_on_a_gpu(engine, graph: bool):
    """``engine`` freezing a member as on a GPU (no host read: the graph needs it) and, with ``graph``, training
    its full batches through the graph step's body, uncaptured; returns that graph step (None without)."""
    alone = isinstance(engine, SingleRun)
    owner = engine.trainer if alone else engine  # what holds the step the engine runs
    owner.optimizer.host_sync_free = True
    if not graph:
        return None
    owner.train_step = UncapturedGraphStep(owner.train_step if alone else owner, None)
    return owner.train_step


def _first_steps(local_batches) -> list[tuple[int, torch.Tensor, int]]:
    """(step, indices, global batch size) of the run's STEPS steps, from ``local_batches(epoch)``."""
    batches = itertools.chain.from_iterable(local_batches(epoch) for epoch in (1, 2, 3))
    return [(step, indices, size) for step, (indices, size) in enumerate(itertools.islice(batches, STEPS))]


def _reference(params, cfg: Config, warmup_steps: int):
    """torch.optim's optimizer named by ``cfg`` on ``params``, and the scheduler that gives its LR schedule."""
    optim = cfg.optim
    if optim.name in ("sgd", "nesterov"):
        optimizer = torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                                    nesterov=optim.name == "nesterov")
    else:
        kind = torch.optim.Adam if optim.name == "adam" else torch.optim.AdamW
        optimizer = kind(params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)
    decay_steps = STEPS - warmup_steps
    after = {"constant": lambda: lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
             "linear": lambda: lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=decay_steps),
             "cosine": lambda: lr_scheduler.CosineAnnealingLR(optimizer, T_max=decay_steps)}[optim.schedule]
    if warmup_steps == 0:
        return optimizer, after()
    warmup = lr_scheduler.LinearLR(optimizer, 1 / warmup_steps, 1.0, total_iters=warmup_steps - 1)
    return optimizer, lr_scheduler.SequentialLR(optimizer, [warmup, after()], milestones=[warmup_steps])


def _reference_step(model, optimizer, scheduler, x, y, normalizer) -> None:
    autograd_backward(model, x, y, normalizer)
    optimizer.step()
    scheduler.step()


@torch.no_grad()
def _max_difference(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((g - w.reshape(g.shape)).abs().max()) for g, w in zip(got, want))


# A run alone with and without warm-up; a stack whose members warm up for 0.25, 0 and 0.5 epochs.
@pytest.mark.parametrize("size, warmup_epochs", [(1, 0.25), (1, 0.0), (3, 0.25)],
                         ids=["alone-warmup", "alone-no_warmup", "stack"])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_member_follows_torch_optim_and_its_lr_scheduler_step_for_step(name, schedule, size, warmup_epochs):
    members = _members(name, schedule, size, warmup_epochs)
    engine, trainers = _engine(members)
    references = []
    for cfg, trainer in zip(members, trainers):
        model = build_model(cfg)
        model.load_state_dict(unwrap(trainer.model).state_dict())  # a copy of its initial weights, not a view
        references.append((model, *_reference(list(model.parameters()), cfg,
                                               round(cfg.optim.warmup_epochs * STEPS_PER_EPOCH))))
    for step, indices, global_batch_size in _first_steps(engine.local_batches):
        loss = engine.train_step(indices, global_batch_size, step)
        assert bool(torch.isfinite(loss).all()), step  # no member froze
        for trainer, own, (model, optimizer, scheduler) in zip(trainers, indices.reshape(size, -1), references):
            _reference_step(model, optimizer, scheduler, *trainer.train_set.batch(own), global_batch_size)
    for k, (trainer, (model, _, _)) in enumerate(zip(trainers, references)):
        assert _max_difference(list(unwrap(trainer.model).parameters()), list(model.parameters())) <= TOLERANCE, k


def _run_alone_lr(cfg: Config, step: int) -> float:
    return float(Schedule.of([cfg], STEPS_PER_EPOCH, "cpu").lr_at(step)[0])


@pytest.mark.parametrize("size", [1, 3], ids=["alone", "stack"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_graph_body_reads_every_members_decaying_lr_at_every_step(schedule, size):
    members = _members("sgd", schedule, size)
    (eager, eager_trainers), (graphed, trainers) = _engine(members), _engine(members)
    _as_on_a_gpu(eager, graph=False)  # the graph's way of freezing, in both
    graph = _as_on_a_gpu(graphed, graph=True)
    graph.warmup_steps_left = 0  # every full batch goes through the static buffers
    replayed = 0
    for (step, indices, global_batch_size), (_, same, _) in zip(_first_steps(graphed.local_batches),
                                                                _first_steps(eager.local_batches)):
        graphed.train_step(indices, global_batch_size, step)
        eager.train_step(same, global_batch_size, step)
        if global_batch_size == 64:
            replayed += 1
            want = torch.tensor([_run_alone_lr(cfg, step) for cfg in members], dtype=torch.float32)
            torch.testing.assert_close(graph.static_lr, want, rtol=1e-6, atol=0, msg=f"step {step}")
    assert replayed == STEPS - 2  # the two uneven last batches ran eagerly
    # The LRs the body read reached the update: the eager step's parameters, bit for bit.
    for got, want in zip(trainers, eager_trainers, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(unwrap(got.model).parameters(), unwrap(want.model).parameters()))


@pytest.mark.parametrize("frozen_after", [0, 2], ids=["from_the_start", "after_two_steps"])
@pytest.mark.parametrize("host_sync_free", [False, True], ids=["index_fill", "where"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_frozen_member_keeps_its_parameters_and_state_while_the_others_update(name, host_sync_free,
                                                                                  frozen_after):
    torch.manual_seed(0)
    members = [cfg.optim for cfg in _members(name, "constant")]
    params = [torch.randn(3, 12), torch.randn(3, 4)]  # two [K, n] blocks of three members
    optimizer = Optimizer(members, params)
    optimizer.host_sync_free = host_sync_free
    lr = torch.tensor([m.lr for m in members], dtype=torch.float64)
    for _ in range(frozen_after):
        optimizer.step(params, [torch.randn_like(p) for p in params], lr)
    tensors = params + [block for blocks in optimizer.state.values() for block in blocks]
    before = [t.clone() for t in tensors]
    grads = [torch.randn_like(p) for p in params]
    grads[0][1, 3] = float("nan")  # what a blown-up member's gradient holds
    active = torch.tensor([True, False, True])
    for _ in range(3):
        optimizer.step(params, [g.clone() for g in grads], lr, active)
    for got, want in zip(tensors, before):
        assert torch.equal(got[1], want[1])
    assert all(not torch.equal(p[k], b[k]) for p, b in zip(params, before) for k in (0, 2))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_run_resumed_from_its_checkpoint_continues_bit_for_bit(name):
    cfg = _config(name, "cosine")
    through = build_trainer(cfg, DistContext(), load_dataset(cfg))
    steps = _first_steps(through.plan.local_batches)
    for step, indices, global_batch_size in steps:
        through.train_step(indices, global_batch_size, step)
        if step == 29:
            state = copy.deepcopy(checkpoint_state(through, RunCounters(), None))
    resumed = build_trainer(cfg, DistContext(), load_dataset(cfg))
    load_state(resumed, state)
    for step, indices, global_batch_size in steps[30:]:
        resumed.train_step(indices, global_batch_size, step)
    for got, want in zip(unwrap(resumed.model).parameters(), unwrap(through.model).parameters()):
        assert torch.equal(got, want)
    for key, blocks in through.optimizer.state.items():
        assert all(torch.equal(a, b) for a, b in zip(resumed.optimizer.state[key], blocks)), key


@pytest.mark.parametrize("member_major", [False, True], ids=["cpu_layout", "gpu_layout"])
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_a_stack_members_optimizer_state_is_a_run_alones_and_back(monkeypatch, name, member_major):
    from harness.core import stacked

    monkeypatch.setattr(stacked, "PARAMETER_MAJOR_DEVICES", () if member_major else ("cpu",))
    members = _members(name, "constant")
    stack = StackedTrainer(members, [load_dataset(cfg).train for cfg in members])
    assert stack.model.layout.member_major == member_major
    batches = stack.local_batches(1)
    for step in range(3):
        stack.step(*next(batches), step)
    alone = build_trainer(members[1], DistContext(), load_dataset(members[1]))
    saved = stack.optimizer.member(1).state_dict()
    alone.optimizer.load_state_dict(saved)
    for key, row in alone.optimizer.state_dict().items():
        assert row == saved[key] if key == "name" else torch.equal(row, saved[key]), key
    # ... and back into another member's row of the stack.
    stack.optimizer.member(2).load_state_dict(alone.optimizer.state_dict())
    for key, blocks in stack.optimizer.state.items():
        assert all(torch.equal(block[2], block[1]) for block in blocks), key


def test_a_checkpoint_of_another_optimizer_is_refused_in_one_line():
    sgd = build_trainer(_config("sgd", "constant"), DistContext(), load_dataset(_config("sgd", "constant")))
    adam = build_trainer(_config("adam", "constant"), DistContext(), load_dataset(_config("adam", "constant")))
    with pytest.raises(InputError, match=r"^optimizer: a checkpoint of 'sgd'; expected the state of 'adam' "
                                         r"\(keys step, exp_avg, exp_avg_sq\)$"):
        adam.optimizer.load_state_dict(sgd.optimizer.state_dict())


def test_nesterov_without_momentum_is_refused_in_one_line():
    with pytest.raises(InputError, match=r"^optim.name: nesterov with optim.momentum 0; expected a momentum > 0"):
        _config("nesterov", "constant", momentum=0.0)


def test_members_of_one_stack_share_one_optimizer():
    with pytest.raises(InputError, match=r"^optim.name: the stacked trials differ \('adam', 'sgd'\); expected one "
                                         r"value for every trial of a stack$"):
        check_stackable([_config("sgd", "constant"), _config("adam", "constant", seed=1)])


def test_a_decaying_lr_reaches_zero_at_the_end_of_the_budget_and_not_before():
    for schedule in ("linear", "cosine"):
        lrs = Schedule.of([_config("sgd", schedule)], 21, "cpu").lr_at(torch.arange(STEPS + 1))[:, 0]
        assert float(lrs[WARMUP_STEPS]) == LR["sgd"] and float(lrs[STEPS]) == 0.0
        assert bool((lrs[WARMUP_STEPS:STEPS].diff() < 0).all()) and float(lrs[STEPS - 1]) > 0
        assert float(lrs[STEPS - 1]) == pytest.approx(LR["sgd"] * (1 / 45 if schedule == "linear"
                                                                   else (1 - math.cos(math.pi / 45)) / 2))


def test_betas_other_than_two_fractions_are_refused_in_one_line():
    for betas in ([0.9, 1.0], [0.9]):
        with pytest.raises(InputError, match=r"^optim.betas: expected two numbers in \[0, 1\), got "):
            _config("adam", "constant", betas=betas)

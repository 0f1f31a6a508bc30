"""K trials trained as one stacked model (core/stacked.py) end where each trial run alone ends."""

import pytest
import torch

from conftest import diverged, member_state_dict, stack_epoch, train_run
from harness.core import stacked
from harness.core.config import Config
from harness.core.data import load_dataset
from harness.core.distributed import DistContext
from harness.core.stacked import StackedTrainer, check_stackable
from harness.core.optim import Schedule
from harness.errors import InputError

EPOCHS = 3
# digits after a validation split of 100: 1337 training samples, so batch 64 leaves a last batch of 57.
BASE = {"data": {"dataset": "digits", "validation_size": 100}, "model": {"hidden_sizes": [32]},
        "optim": {"global_batch_size": 64}, "train": {"epochs": EPOCHS, "progress": False},
        "tracking": {"enabled": False},
        "metrics": {"noise_scale": False, "sharpness": False, "target_val_accuracy": None}}
# Every per-member knob differs: seed (initial weights, data order, and here the digits split), LR,
# momentum (0 included: SGD then keeps no buffer), weight decay and warmup (none, within and beyond epoch 1).
MEMBERS = [dict(seed=0, lr=0.1, momentum=0.9, weight_decay=0.0, warmup_epochs=0.0),
           dict(seed=1, lr=0.3, momentum=0.5, weight_decay=1e-3, warmup_epochs=1.5),
           dict(seed=7, lr=0.05, momentum=0.0, weight_decay=1e-4, warmup_epochs=0.5)]


def _config(tmp_path, k: int, seed: int, **optim) -> Config:
    return Config.from_dict({**BASE, "name": f"member{k}", "seed": seed, "optim": {**BASE["optim"], **optim},
                             "checkpoint": {"dir": str(tmp_path / "checkpoints")}})


def _solo_parameters(cfg: Config):
    """The trial alone through the harness's training loop; its final parameters from its last checkpoint."""
    result = train_run(cfg, DistContext())
    return result, torch.load(result.checkpoint, weights_only=True)["model"]


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def _stacked(members: list[Config]) -> StackedTrainer:
    return StackedTrainer(members, [load_dataset(cfg).train for cfg in members])


# A user's model (tests/user_models.py): a convolution over the 8x8 digits, stacked through torch.func.
CNN = {"factory": "user_models:tiny_cnn", "kwargs": {"side": 8, "channels": 3}}
CNN_WITH_ITS_LOSS = {**CNN, "factory": "user_models:tiny_cnn_with_its_loss", "output": "loss"}


@pytest.mark.parametrize("samples_per_pass, member_major, model",
                         [(stacked.CPU_PASS_SAMPLES, False, None), (64, False, None), (stacked.CPU_PASS_SAMPLES, True, None),
                          (stacked.CPU_PASS_SAMPLES, False, CNN), (stacked.CPU_PASS_SAMPLES, False, CNN_WITH_ITS_LOSS)],
                         ids=["one_pass", "member_by_member", "gpu_layout", "cnn", "cnn_returning_its_loss"])
def test_stacked_members_end_with_the_parameters_of_their_solo_runs(tmp_path, monkeypatch, samples_per_pass,
                                                                   member_major, model):
    # member_by_member: the CPU's large-batch way (one member per pass, CPU_PASS_SAMPLES // 64 = 1), the same sums.
    # gpu_layout: the GPU's member-major buffers (core/stacked_module.py MemberLayout), run here.
    # cnn: a model that is not the MLP (core/stacked_module.py), each member against its run alone.
    monkeypatch.setattr(stacked, "CPU_PASS_SAMPLES", samples_per_pass)
    monkeypatch.setattr(stacked, "PARAMETER_MAJOR_DEVICES", ("cpu",) if not member_major else ())
    members = [_config(tmp_path, k, **m) for k, m in enumerate(MEMBERS)]
    if model:
        members = [cfg.replace(**{f"model.{key}": value for key, value in model.items()}) for cfg in members]
    stack = _stacked(members)
    assert stack.model.layout.member_major == member_major
    assert stack.steps_per_epoch == 21 and 1337 % 64 == 57  # the uneven last batch is trained
    for epoch in range(1, EPOCHS + 1):
        stack_epoch(stack, epoch)
    assert diverged(stack) == [False, False, False]
    for k, cfg in enumerate(members):
        _, solo = _solo_parameters(cfg)
        assert _max_difference(member_state_dict(stack, k), solo) <= 1e-5, cfg.name


def test_members_sharing_one_momentum_fold_their_weight_gradients_and_still_end_as_their_solo_runs(tmp_path):
    """With one momentum for all, every step's weight-gradient product adds into the momentum buffers
    (StackedTrainer.can_fold); seeds, LRs, weight decay and warm-up still differ, the last batch is uneven."""
    members = [_config(tmp_path, k, **{**m, "momentum": 0.9}) for k, m in enumerate(MEMBERS)]
    stack = _stacked(members)
    assert stack.fold_momentum == pytest.approx(0.9)
    folded = []
    loss_and_gradients = stack.model.loss_and_gradients

    def spy(*args, **kwargs):
        loss, was_folded = loss_and_gradients(*args, **kwargs)
        folded.append(was_folded)
        return loss, was_folded

    stack.model.loss_and_gradients = spy
    for epoch in range(1, EPOCHS + 1):
        stack_epoch(stack, epoch)
    assert folded == [True] * (EPOCHS * stack.steps_per_epoch)
    for k, cfg in enumerate(members):
        _, solo = _solo_parameters(cfg)
        assert _max_difference(member_state_dict(stack, k), solo) <= 1e-5, cfg.name


def test_member_lr_vector_equals_each_solo_schedule_at_every_step(tmp_path):
    members = [_config(tmp_path, k, **m) for k, m in enumerate(MEMBERS)]
    stack = _stacked(members)
    solos = [Schedule.of([cfg], stack.steps_per_epoch, "cpu") for cfg in members]
    for step in range(3 * stack.steps_per_epoch):
        assert stack.schedule.lr(step).tolist() == [float(s.lr(step)[0]) for s in solos]


@pytest.mark.parametrize("host_sync_free, momentum", [(False, None), (True, None), (False, 0.9)],
                         ids=["index_fill", "mask_multiply", "folded"])
def test_diverged_member_stops_updating_and_the_others_match_their_solo_runs(tmp_path, host_sync_free, momentum):
    # mask_multiply: the GPU's way of freezing a member (nan_to_num_ and a multiply, no host read), run here.
    # folded: one momentum for all, so the weight gradients fold into the momentum until the step whose loss
    # is not finite, which must not fold (the frozen member's buffer keeps its value), nor any step after it.
    settings = [MEMBERS[0], {**MEMBERS[1], "lr": 1e6}, MEMBERS[2]]  # 1e6: the loss is inf in epoch 1
    if momentum is not None:
        settings = [{**m, "momentum": momentum} for m in settings]
    members = [_config(tmp_path, k, **m) for k, m in enumerate(settings)]
    stack = _stacked(members)
    stack.optimizer.host_sync_free = host_sync_free
    assert (stack.fold_momentum is not None) == (momentum is not None)
    stack_epoch(stack, 1)
    assert diverged(stack) == [False, True, False]
    frozen = member_state_dict(stack, 1)
    for epoch in range(2, EPOCHS + 1):
        stack_epoch(stack, epoch)
    assert diverged(stack) == [False, True, False]
    assert _max_difference(member_state_dict(stack, 1), frozen) == 0.0
    assert all(torch.isfinite(v).all() for v in frozen.values())  # frozen before its NaN update, not after
    for k, cfg in enumerate(members):
        result, solo = _solo_parameters(cfg)
        assert result.diverged == (k == 1)
        if k != 1:
            assert _max_difference(member_state_dict(stack, k), solo) <= 1e-5, cfg.name


@pytest.mark.parametrize("host_sync_free, momentum", [(False, None), (True, None), (False, 0.9)],
                         ids=["index_fill", "mask_multiply", "folded"])
def test_the_step_whose_loss_is_not_finite_leaves_that_members_parameters_and_momentum_as_they_were(
        tmp_path, host_sync_free, momentum):
    settings = MEMBERS if momentum is None else [{**m, "momentum": momentum} for m in MEMBERS]
    stack = _stacked([_config(tmp_path, k, **m) for k, m in enumerate(settings)])
    stack.optimizer.host_sync_free = host_sync_free
    batches = stack.local_batches(1)
    stack.step(*next(batches), 0)  # momentum buffers that are not zero
    stack.model.weights[-1][1].mul_(1e38)  # finite weights whose logits overflow: member 1's loss is not finite
    before = [t[1].clone() for t in stack.model.parameters() + stack.optimizer.state["momentum_buffer"]]
    loss = stack.step(*next(batches), 1)
    assert torch.isfinite(loss).tolist() == [True, False, True] and diverged(stack) == [False, True, False]
    after = [t[1] for t in stack.model.parameters() + stack.optimizer.state["momentum_buffer"]]
    assert all(torch.equal(b, a) for b, a in zip(before, after))


def test_finite_is_torch_isfinite_on_every_kind_of_float():
    tiny, huge = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
    x = torch.tensor([0.0, -0.0, 1.5, -3.0, tiny, tiny / 8, -tiny / 8, huge, -huge,
                      float("inf"), float("-inf"), float("nan")])
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(stacked.finite(x.to(dtype)), torch.isfinite(x.to(dtype)))


def test_trials_of_different_architectures_or_batch_sizes_are_refused_one_line(tmp_path):
    first = _config(tmp_path, 0, **MEMBERS[0])
    wider = first.replace(**{"model.hidden_sizes": [64]})
    with pytest.raises(InputError, match=r"^model.hidden_sizes: the stacked trials differ \(\(32,\), \(64,\)\); "
                                         r"expected one value for every trial of a stack$"):
        check_stackable([first, wider])
    with pytest.raises(InputError, match=r"^optim.global_batch_size: the stacked trials differ"):
        check_stackable([first, first.replace(**{"optim.global_batch_size": 128})])
    with pytest.raises(InputError, match=r"^stack: 0 members; expected at least 1"):
        check_stackable([])


def test_stacked_members_warm_started_from_a_checkpoint_end_as_their_warm_started_runs_alone(tmp_path):
    # checkpoint.init_from: each member starts from the source's weights (loaded into its row of the
    # stack through its view) with its own momentum, data order and LR, as train_loop.train starts it.
    from harness.launching.runs import train_trials

    source = train_run(_config(tmp_path, 9, seed=5, lr=0.1).replace(**{"train.epochs": 1}), DistContext()).checkpoint
    members = [_config(tmp_path, k, **m).replace(**{"checkpoint.init_from": str(source)})
               for k, m in enumerate(MEMBERS[:2])]
    dataset = load_dataset(members[0])  # one copy for every member, as in a local sweep
    stacked_results = train_trials(members, DistContext(), dataset=dataset)
    for cfg, result in zip(members, stacked_results):
        stacked = torch.load(result.checkpoint, weights_only=True)["model"]
        alone_run = train_run(cfg.replace(**{"checkpoint.dir": str(tmp_path / "alone")}), DistContext(), dataset=dataset)
        alone = torch.load(alone_run.checkpoint, weights_only=True)["model"]
        assert _max_difference(stacked, alone) <= 1e-5, cfg.name

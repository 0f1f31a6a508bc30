"""Every optimizer and LR schedule resumes exactly: a run alone, and every member of a stack, interrupted
after an epoch and resumed from its checkpoint, ends bit for bit where the uninterrupted run ends."""

import pytest
import torch

from conftest import FailAfterEpoch, smoke_config
from harness.core.distributed import DistContext
from harness.core.train_loop import RunHooks
from harness.launching.runs import train_trials

EPOCHS = 3


def trials(place, name: str, schedule: str, size: int, model: tuple = ()):
    """``size`` trials of smoke.yaml with ``name``'s update and a decaying ``schedule`` after warm-up, LRs apart."""
    lr = {"sgd": 0.1, "nesterov": 0.1, "adam": 0.003, "adamw": 0.003}[name]
    return [smoke_config(place, *model, "tracking.enabled=false", f"name=m{k}", f"optim.name={name}",
                         f"optim.schedule={schedule}", f"optim.lr={lr * (1 + k / 2)}", "optim.weight_decay=0.01",
                         "optim.warmup_epochs=0.5", f"train.epochs={EPOCHS}", "metrics.noise_scale=false",
                         "metrics.sharpness=false")
            for k in range(size)]


@pytest.mark.parametrize("size", [1, 3], ids=["alone", "stack"])
@pytest.mark.parametrize("name,schedule,model", [
    ("sgd", "linear", ()), ("nesterov", "cosine", ()), ("adam", "cosine", ()), ("adamw", "linear", ()),
    ("adam", "linear", ("model.factory=user_models:tiny_cnn",)),  # a user's model, and a torch.func stack of it
], ids=["sgd", "nesterov", "adam", "adamw", "cnn-adam"])
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, name, schedule, model, size):
    straight = train_trials(trials(tmp_path / "straight", name, schedule, size, model), DistContext())
    interrupted = trials(tmp_path / "resumed", name, schedule, size, model)
    with pytest.raises(RuntimeError, match="injected failure"):
        train_trials(interrupted, DistContext(), hooks=FailAfterEpoch(1))
    resumed = train_trials(interrupted, DistContext(), hooks=RunHooks(resume=True))
    for want, got in zip(straight, resumed):
        assert got.epochs_completed == EPOCHS
        a, b = (torch.load(r.checkpoint, weights_only=True) for r in (want, got))
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), key
        for key, value in a["optimizer"].items():
            assert value == b["optimizer"][key] if isinstance(value, str) else torch.equal(value, b["optimizer"][key])

"""Samples on the device or in host memory: the same batches either way, on the device that computes."""

import pytest
import torch

from conftest import train_run
from harness.core.config import Config
from harness.core.data import Split, features_stay_on_host
from harness.core.distributed import DistContext

GIB = 2**30


@pytest.mark.parametrize("device, resident, feature_gib, free_gib, on_host", [
    ("cpu", "host", 1, 100, False),      # a CPU trains where the host memory is
    ("cuda", "device", 80, 10, False),   # asked for: the device (the memory check refuses what cannot fit)
    ("cuda", "host", 1, 100, True),      # asked for: host memory
    ("cuda", "auto", 4, 10, False),      # at most half the free memory: on the device
    ("cuda", "auto", 6, 10, True),       # more: host memory
])
def test_data_resident_chooses_where_the_features_live(device, resident, feature_gib, free_gib, on_host):
    assert features_stay_on_host(torch.device(device), feature_gib * GIB, resident, free_gib * GIB) is on_host


def test_a_splits_batches_and_subsets_are_its_samples_at_those_indices():
    features, targets = torch.rand(10, 3, 4), torch.arange(10) * 7
    split = Split(features, targets)
    indices = torch.tensor([[7, 2], [0, 9]])
    x, y = split.batch(indices)
    assert torch.equal(x, features[indices]) and torch.equal(y, targets[indices])
    spread = torch.linspace(0, 9, 4).long()
    for subset, rows in ((split.head(4), torch.arange(4)), (split.spread(4), spread), (Split(*split.rows(2, 6)),
                                                                                        torch.arange(2, 6))):
        assert torch.equal(subset.features, features[rows]) and torch.equal(subset.targets, targets[rows])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("factory", [None, "user_models:tiny_cnn"])
def test_samples_in_host_memory_train_as_samples_on_the_gpu(tmp_path, factory):
    """The batch plan is the same wherever the samples live: the weights after two epochs are bit for bit."""
    weights = {}
    for resident in ("device", "host"):
        cfg = Config.from_dict({
            "name": resident, "data": {"dataset": "digits", "validation_size": 297, "resident": resident},
            "model": {"factory": factory} if factory else {"hidden_sizes": [32]},
            "optim": {"lr": 0.05, "global_batch_size": 64},
            "train": {"epochs": 2, "device": "cuda", "progress": False},
            "tracking": {"enabled": False}, "checkpoint": {"dir": str(tmp_path / "checkpoints")},
            "metrics": {"target_val_accuracy": None}})
        result = train_run(cfg, DistContext(device=torch.device("cuda")))
        weights[resident] = torch.load(result.checkpoint, weights_only=True)["model"]
    assert all(torch.equal(weights["device"][k], weights["host"][k]) for k in weights["device"])

"""Will the model fit? A memory estimate checked before anything is allocated.

Owns the estimate of what one training process needs (parameters, gradients, the optimizer's
state, one batch's activations, the data set in memory) and its check against the device's free
memory: a model too large is refused with both numbers, instead of the OOM killer ending the run
half-way with its MLflow run left RUNNING. Does not own devices or models.
"""

from __future__ import annotations

from harness.core.config import KNOWN_SPLIT_SIZES, Config
from harness.core.model import build_model, is_mlp
from harness.core.optim import STATE_KEYS
from harness.errors import InputError

FLOAT_BYTES = 4
# Per sample and unit: the pre-activation z, the activation a and the gradient
# flowing back (autograd keeps z and a; the backward pass makes a delta).
ACTIVATION_COPIES = 3


def copies_per_parameter(cfg: Config) -> int:
    """Parameters, their gradients and the optimizer's state of every weight (SGD's momentum buffer, Adam's
    two moments; its step count is one number per run)."""
    return 2 + sum(key != "step" for key in STATE_KEYS[cfg.optim.name])


def parameter_count(cfg: Config) -> int:
    if not is_mlp(cfg):
        return sum(p.numel() for p in build_model(cfg).parameters())
    return sum((fan_in + 1) * fan_out for fan_in, fan_out in zip(cfg.layer_sizes, cfg.layer_sizes[1:]))


def estimate_training_bytes(cfg: Config, with_data: bool = True) -> int:
    """Bytes one process needs to train ``cfg`` with its largest batch (the whole batch in one process),
    the data set included unless ``with_data`` is False. A factory's model has no known activation sizes:
    its estimate counts its weights and the data only."""
    batch = max(cfg.sweep.batch_sizes) if cfg.sweep else cfg.optim.global_batch_size
    weights = copies_per_parameter(cfg) * parameter_count(cfg)
    activations = ACTIVATION_COPIES * max(batch, cfg.train.eval_batch_size) * sum(cfg.layer_sizes) \
        if is_mlp(cfg) else 0
    data = _sample_count(cfg) * cfg.input_size if with_data else 0
    return FLOAT_BYTES * (weights + activations + data)


def _sample_count(cfg: Config) -> int:
    """Training and test samples in memory."""
    data = cfg.data
    if data.factory is not None:
        from harness.core.factories import factory_data
        samples = factory_data(data.factory, data.kwargs)
        return len(samples.train_labels) + len(samples.test_labels)
    if data.dataset == "synthetic":
        return data.synthetic.num_train + data.synthetic.num_test
    return sum(KNOWN_SPLIT_SIZES[data.dataset])


def available_bytes(device_type: str) -> tuple[int, str]:
    """Free memory of the device that will train, and what was measured."""
    if device_type == "cuda":
        import os

        import torch

        # This rank's own GPU (torchrun sets LOCAL_RANK): asking about the default
        # device would open a CUDA context on GPU 0 in every rank of the host.
        free, _ = torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return free, "free GPU memory (torch.cuda.mem_get_info)"
    import psutil

    return psutil.virtual_memory().available, "available RAM (psutil)"


def check_memory(cfg: Config, device_type: str) -> None:
    # On a GPU, data.resident "auto" and "host" keep a data set that does not fit in host memory.
    needed = estimate_training_bytes(cfg, with_data=device_type == "cpu" or cfg.data.resident == "device")
    limit, what = available_bytes(device_type)
    if needed > limit:
        key = "model.hidden_sizes" if is_mlp(cfg) else "model.factory"
        raise InputError(f"{key}: training needs about {needed / 2**30:.1f} GiB "
                         f"({parameter_count(cfg):,} parameters x {copies_per_parameter(cfg)} copies, one batch's "
                         f"activations, the data set) but only {limit / 2**30:.1f} GiB is {what}; expected a "
                         "smaller model or batch")

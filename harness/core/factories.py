"""The user's own model and data: ``model.factory`` and ``data.factory``, each "package.module:function".

Owns importing a factory, calling it with its ``kwargs`` and checking what it returns, every failure one
``InputError`` line naming the key, so a launcher exits with code 2 before anything starts:

- a model factory returns an ``nn.Module`` mapping a batch of inputs to logits [n, classes], or (model.output
  loss) a batch of inputs and labels to the batch's mean loss;
- a data factory returns ``(train, test)``, each a map-style ``torch.utils.data.Dataset`` whose items are
  ``(features, label)``, or a pair ``(features, labels)`` of tensors or numpy arrays: features of any shape
  per sample, integer labels from 0. The samples are held in memory (core/data.py splits and batches them).

Modules import as ``python -m`` would: from the working directory, then sys.path (PYTHONPATH). A data
factory is called once per process and configuration of it: its samples are cached, since every trial's
config is checked against their count and shape.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from harness.core.config import FACTORY_EXPECTED
from harness.errors import InputError


def resolve_factory(path: str, key: str) -> Callable[..., Any]:
    """The function ``path`` names; an import that fails, a missing name or one that cannot be called is
    one line naming ``key``."""
    module_name, _, function_name = path.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the user's module may raise anything while it imports
        raise InputError(f"{key}: cannot import {module_name} ({type(err).__name__}: {_first_line(err)}); "
                         f"expected {FACTORY_EXPECTED}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        found = "no such name" if function is None else f"{_describe(function)}, not a function"
        raise InputError(f"{key}: {module_name} has {function_name} as {found}; expected {FACTORY_EXPECTED}")
    return function


def import_roots(paths: list[Optional[str]]) -> list[str]:
    """The folders the factories ``paths`` import from here (the one above each module's top package): what
    another process (a Ray worker) puts on its PYTHONPATH to import them as this one does."""
    roots = []
    for path in filter(None, paths):
        module_name = path.partition(":")[0]
        module = importlib.import_module(module_name)
        file = getattr(module, "__file__", None)
        if not file:
            continue
        depth = module_name.count(".") + (2 if os.path.basename(file) == "__init__.py" else 1)
        root = os.path.abspath(file)
        for _ in range(depth):
            root = os.path.dirname(root)
        if root not in roots:
            roots.append(root)
    return roots


def call_factory(path: str, kwargs: dict[str, Any], key: str) -> Any:
    """``function(**kwargs)`` of the factory ``path``; what it raises is one line naming ``key``."""
    function = resolve_factory(path, key)
    try:
        return function(**kwargs)
    except Exception as err:
        raise InputError(f"{key}: {path}({_kwargs_text(kwargs)}) raised {type(err).__name__}: {_first_line(err)}; "
                         "expected it to return") from None


def build_factory_model(path: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    """The model ``model.factory`` returns, checked to be an ``nn.Module`` with parameters."""
    model = call_factory(path, kwargs, "model.factory")
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model.factory: {path} returned {_describe(model)}; expected a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise InputError(f"model.factory: {path} returned a module with no trainable parameters; expected some")
    return model


def check_model_output(model: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       path: str) -> None:
    """Refuse a model that cannot score the data: its forward on two samples must give finite logits
    [2, classes] with a column for every label the data holds, or (model.output loss) one number."""
    from harness.core.model import returns_loss

    sample, sample_labels = features[:2], labels[:2]
    gives_loss = returns_loss(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(sample, sample_labels) if gives_loss else model(sample)
    except Exception as err:
        takes = "a batch of samples and their labels to its mean loss" if gives_loss else \
            "a batch of samples to logits"
        raise InputError(f"model.factory: {path} cannot take a batch of the data (samples of shape "
                         f"{list(sample.shape[1:])}): {type(err).__name__}: {_first_line(err)}; expected a model "
                         f"mapping {takes}") from None
    finally:
        model.train(was_training)
    shape = list(output.shape) if torch.is_tensor(output) else _describe(output)
    if gives_loss:
        if not torch.is_tensor(output) or output.dim() != 0 or not output.is_floating_point():
            raise InputError(f"model.factory: {path} with model.output loss returns {shape} for {len(sample)} "
                             "samples; expected one number, the batch's mean loss")
        return
    if not torch.is_tensor(output) or output.dim() != 2 or output.shape[0] != len(sample) \
            or output.shape[1] < num_classes or not output.is_floating_point():
        raise InputError(f"model.factory: {path} maps {len(sample)} samples to {shape}; expected logits "
                         f"[{len(sample)}, {num_classes}] (one column per class of the data)")


@dataclass(frozen=True)
class FactoryData:
    """A data factory's samples: features float32 [n, ...], labels int64 [n]."""

    train_features: torch.Tensor
    train_labels: torch.Tensor
    test_features: torch.Tensor
    test_labels: torch.Tensor

    @property
    def num_features(self) -> int:
        return int(np.prod(self.train_features.shape[1:]))

    @property
    def num_classes(self) -> int:
        return int(max(self.train_labels.max(), self.test_labels.max())) + 1


_DATA_CACHE: dict[tuple[str, str], FactoryData] = {}


def factory_data(path: str, kwargs: dict[str, Any]) -> FactoryData:
    """The samples ``data.factory`` returns (called once per process and kwargs), checked."""
    cache_key = (path, json.dumps(kwargs, sort_keys=True, default=str))
    if cache_key not in _DATA_CACHE:
        returned = call_factory(path, kwargs, "data.factory")
        if not isinstance(returned, (tuple, list)) or len(returned) != 2:
            raise InputError(f"data.factory: {path} returned {_describe(returned)}; expected (train, test)")
        train = _as_tensors(returned[0], path, "train")
        test = _as_tensors(returned[1], path, "test")
        if train[0].shape[1:] != test[0].shape[1:]:
            raise InputError(f"data.factory: {path}: train samples of shape {list(train[0].shape[1:])}, test samples "
                             f"of shape {list(test[0].shape[1:])}; expected one shape")
        _DATA_CACHE[cache_key] = FactoryData(*train, *test)
    return _DATA_CACHE[cache_key]


def _as_tensors(part: Any, path: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32, labels int64) of one part: a (features, labels) pair or a map-style Dataset."""
    where = f"data.factory: {path}: its {name} part"
    if isinstance(part, (tuple, list)) and len(part) == 2:
        features, labels = part
    elif isinstance(part, torch.utils.data.Dataset) and hasattr(part, "__len__"):
        try:
            items = [part[i] for i in range(len(part))]
            features = torch.stack([torch.as_tensor(x) for x, _ in items]) if items else torch.empty(0)
            labels = torch.as_tensor([int(y) for _, y in items])
        except Exception as err:
            raise InputError(f"{where}: reading its items raised {type(err).__name__}: {_first_line(err)}; "
                             "expected items (features, label)") from None
    else:
        raise InputError(f"{where} is {_describe(part)}; expected a map-style torch Dataset of (features, label) "
                         "items or a pair (features, labels)")
    try:
        features, labels = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features), \
            torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
    except Exception as err:
        raise InputError(f"{where}: not tensors or arrays ({type(err).__name__}); expected numbers") from None
    if len(features) == 0 or features.dim() < 2:
        raise InputError(f"{where}: features of shape {list(features.shape)}; expected [samples, ...] with at "
                         "least one sample")
    if not (features.is_floating_point() or features.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32,
                                                               torch.int64)):
        raise InputError(f"{where}: features of type {features.dtype}; expected numbers")
    if labels.dim() != 1 or len(labels) != len(features):
        raise InputError(f"{where}: labels of shape {list(labels.shape)} for {len(features)} samples; expected one "
                         "label per sample")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise InputError(f"{where}: labels of type {labels.dtype}; expected integer class labels")
    if int(labels.min()) < 0:
        raise InputError(f"{where}: label {int(labels.min())}; expected labels 0, 1, ...")
    features = features.to(torch.float32).contiguous()
    if not bool(torch.isfinite(features).all()):
        raise InputError(f"{where}: features hold NaN or infinite values; expected finite numbers")
    return features, labels.to(torch.int64).contiguous()


def describe_factory(path: str, kwargs: dict[str, Any]) -> str:
    """``examples.cnn:build(channels=16)``"""
    return f"{path}({_kwargs_text(kwargs)})"


def _kwargs_text(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    name = type(value).__name__
    return "None" if value is None else f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else "no message"

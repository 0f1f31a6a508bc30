"""A run's checkpoints: one object, :class:`Checkpoints`, saves, finds, loads, resumes and clears them.

Owns the file layout (``<dir>/epoch-0003.pt``), atomic writes (write, fsync, rename; the
newest two are kept), safe reads (``weights_only=True``), the config fingerprint that
refuses another config's checkpoint, the launch id that keeps a torchrun restart from
resuming an earlier launch, and which checkpoint (if any) a run resumes from. Only the
main rank writes or reads them (the others get its state by broadcast). What goes into a
checkpoint is trainer.checkpoint_state's business; the MLflow side of resuming is
harness/records/mlflow_store.py's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from harness import faults
from harness.console import say
from harness.core.config import Config
from harness.core.distributed import broadcast_from_main
from harness.core.model import describe_model, weight_shapes
from harness.errors import InputError

CHECKPOINT_PATTERN = re.compile(r"^epoch-(\d{4,})\.pt$")
KEEP_NEWEST = 2

# Keys that change bookkeeping, not the trajectory (a budget, where records go, how a step is
# executed: the same update, rounded differently), so a run may resume with another value.
_NOT_FINGERPRINTED = ("name", "tracking", "checkpoint", "sweep", "trial", "metrics", "performance", "train.epochs",
                      "train.max_steps", "train.progress", "train.eval_batch_size", "train.device",
                      "train.target_train_loss", "train.race_stop", "train.race_best_steps",
                      "optim.micro_batch_size", "data.resident")
# Keys that change nothing at these values: left out there, so a checkpoint written before they existed
# still resumes.
_FINGERPRINTED_UNLESS = {"model.output": "logits", "optim.batch_schedule": "constant"}
_ONLY_WITH = {"optim.batch_schedule": ("optim.batch_steps", "optim.batch_noise_every", "optim.batch_noise_multiple",
                                       "optim.max_global_batch_size", "optim.batch_lr_rule")}


def config_fingerprint(cfg: Config) -> str:
    raw = cfg.to_dict()
    dropped = list(_NOT_FINGERPRINTED)
    for key, inert in _FINGERPRINTED_UNLESS.items():
        section, _, leaf = key.rpartition(".")
        if raw[section].get(leaf) == inert:
            dropped += [key, *_ONLY_WITH.get(key, ())]
    for key in dropped:
        section, _, leaf = key.rpartition(".")  # a top-level key or one a section deep
        (raw[section] if section else raw).pop(leaf, None)
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


def check_model_weights(state: Any, path: Path, cfg: Config, key: str = "") -> None:
    """Refuse, in one line naming the file (after ``key``), a checkpoint whose ``model`` would not load
    into ``cfg``'s network or holds a weight that is not finite."""
    head, network = f"{key}: {path}" if key else f"{path}", describe_model(cfg)
    expected = weight_shapes(cfg)
    model = state.get("model") if isinstance(state, dict) else None
    if not isinstance(model, dict) or not model:
        found = "missing" if model is None else "empty" if isinstance(model, dict) else f"a {type(model).__name__}"
        raise InputError(f"{head}: its model weights are {found}; expected a mapping of the network's "
                         f"{len(expected)} weight tensors ({', '.join(list(expected)[:6])})")
    if set(model) != set(expected):
        odd = sorted(set(model) ^ set(expected), key=str)[:3]
        raise InputError(f"{head}: its model weights are named {', '.join(map(str, odd))}...; expected exactly "
                         f"{', '.join(list(expected)[:6])}{'...' if len(expected) > 6 else ''} (a {network} network)")
    for name, (shape, floating) in expected.items():
        tensor = model[name]
        if not isinstance(tensor, torch.Tensor) or tensor.is_floating_point() != floating:
            raise InputError(f"{head}: model weight {name} is a {type(tensor).__name__} "
                             f"{getattr(tensor, 'dtype', '')}; expected a{' floating-point' if floating else 'n integer'} "
                             "tensor")
        if tuple(tensor.shape) != shape:
            raise InputError(f"{head}: model weight {name} has shape {list(tensor.shape)}; expected {list(shape)} "
                             f"(a {network} network)")
        if floating and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{head}: model weight {name} holds NaN or infinite values; expected finite weights")


def checkpoint_dir(cfg: Config) -> Path:
    """Where a run's checkpoints live: one folder per run name."""
    return Path(cfg.checkpoint.dir) / cfg.name


def checkpoint_path(directory: Path, epoch: int) -> Path:
    return Path(directory) / f"epoch-{epoch:04d}.pt"


def write_checkpoint(state: dict[str, Any], directory: Path, epoch: int) -> Path:
    """Write ``state`` as ``epoch-NNNN.pt`` via a temp file and a rename; prune old ones. The bare
    write, on any rank: a run saves through :meth:`Checkpoints.save`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, epoch)
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        faults.maybe_kill("checkpoint", epoch, 0)  # a half-written file must never be loaded
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    for stale in directory.glob(".epoch-*.tmp-*"):  # left by a writer killed mid-write
        stale.unlink(missing_ok=True)
    for old in _by_epoch(directory)[:-KEEP_NEWEST]:
        old.unlink(missing_ok=True)
    return final


def _by_epoch(directory: Path) -> list[Path]:
    # By epoch number, not by name: epoch-10000.pt sorts before epoch-9999.pt as text.
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


# The only files a run writes into its folder: checkpoints, their temp files
# (write_checkpoint) and the MLflow spool (harness/records/mlflow_store.py).
_TEMP_PATTERN = re.compile(r"^\.epoch-\d{4,}\.pt\.tmp-\d+$")
SPOOL_NAME = "mlflow-spool.jsonl"


def newest_in(directory: Path) -> Optional[Path]:
    """The checkpoint with the highest epoch in ``directory``; None if it has none."""
    found = _by_epoch(Path(directory)) if Path(directory).is_dir() else []
    return found[-1] if found else None


@dataclass
class Checkpoints:
    """One run's checkpoints, in ``checkpoint_dir(cfg)``, and the rule for resuming from them.

    ``ctx`` (a DistContext; None: this process): only the main rank saves and clears.
    ``resume`` asks to continue from the newest checkpoint in the folder. ``launch_id``
    goes into every checkpoint; with ``same_launch_only`` (a torchrun restart the user
    did not ask to resume) another launch's checkpoint is not resumed: the run starts
    afresh. ``restored`` gives a checkpoint the launcher kept itself (Ray Train's, after a
    restart): when it returns one, that is resumed whatever ``resume`` says.
    """

    cfg: Config
    ctx: Any = None
    resume: bool = False
    launch_id: Optional[str] = None
    same_launch_only: bool = False
    restored: Optional[Callable[[], Optional[Path]]] = None

    @property
    def directory(self) -> Path:
        return checkpoint_dir(self.cfg)

    @property
    def writes(self) -> bool:
        return self.ctx is None or self.ctx.is_main

    def newest(self) -> Optional[Path]:
        """The newest checkpoint in the run's folder (whichever launch wrote it)."""
        return newest_in(self.directory)

    def load(self, path: Path) -> Optional[dict[str, Any]]:
        """Load safely and check it belongs to this config; errors name the file. With
        ``same_launch_only``, another launch's checkpoint gives None, before its config is checked."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise InputError(f"{path}: checkpoint not found") from None
        except Exception as err:  # torch raises several types for a damaged file
            raise InputError(f"{path}: corrupt checkpoint ({type(err).__name__}); "
                             "expected a file written by the harness") from None
        if not isinstance(state, dict) or "config_fingerprint" not in state:
            raise InputError(f"{path}: not a harness checkpoint; expected keys model, optimizer, epoch")
        if self.same_launch_only and self.launch_id is not None and state.get("launch_id") != self.launch_id:
            return None
        if state["config_fingerprint"] != config_fingerprint(self.cfg):
            raise InputError(f"{path}: checkpoint was made by another config (fingerprint "
                             f"{state['config_fingerprint']}, this config {config_fingerprint(self.cfg)}); "
                             "expected the same model, data, optimiser and seed")
        check_model_weights(state, path, self.cfg)
        return state

    def resume_state(self) -> Optional[dict[str, Any]]:
        """The state this run resumes from (read and checked); None to start afresh. Every rank must call it.

        Only the main rank decides and reads the file; the others get its state (or its
        error) through a broadcast, so they never disagree and need no shared folder.
        """
        if self.ctx is None or not self.ctx.is_distributed:
            return self._read_resume_state()
        outcome: Optional[tuple[str, Any]] = None
        if self.ctx.is_main:
            try:
                outcome = ("state", self._read_resume_state())
            except InputError as err:  # the others must not wait for a state that never comes
                outcome = ("error", str(err))
        kind, value = broadcast_from_main(outcome, self.ctx)
        if kind == "error":
            raise InputError(value)
        return value

    def _read_resume_state(self) -> Optional[dict[str, Any]]:
        path = self.restored() if self.restored else None
        if path is None and self.resume:
            path = self.newest()
        if path is None:
            return None
        state = self.load(path)
        if state is None:
            say(f"[{self.cfg.name}] {path} is another launch's checkpoint: starting afresh", ctx=self.ctx)
        return state

    def check_resumable(self) -> Optional[Path]:
        """The checkpoint in the folder a resumed run would start from, read and checked now
        (before any process group starts); None when there is none, or when the newest is
        another launch's (with ``same_launch_only``)."""
        path = self.newest()
        return None if path is None or self.load(path) is None else path

    def save(self, state: dict[str, Any], epoch: int) -> Optional[Path]:
        """Write ``state`` as epoch ``epoch`` (main rank, checkpoints enabled); the file, or None."""
        return write_checkpoint(state, self.directory, epoch) if self.writes and self.cfg.checkpoint.enabled else None

    def clear(self) -> None:
        """A fresh (not resumed) run starts without the checkpoints of an earlier run of its name.
        Deletes only the files the harness writes (the folder may hold the user's), then the folder if empty."""
        directory = self.directory
        if not self.writes or directory.is_symlink() or not directory.is_dir():
            return
        for path in directory.iterdir():
            ours = CHECKPOINT_PATTERN.match(path.name) or _TEMP_PATTERN.match(path.name) or path.name == SPOOL_NAME
            if ours and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: something that is not ours stays
            directory.rmdir()


def check_writable_dir(path: Path, key: str) -> None:
    """Refuse a folder that is a file, lies under a file, or cannot be written, before
    anything runs; creates nothing (a probe file in the nearest existing folder is removed)."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())  # the root, at the latest
    if not existing.is_dir():
        raise InputError(f"{key}: {existing} is not a folder (a file is in the way of {path}); "
                         "expected a folder or a path that can be created")
    try:
        handle, probe = tempfile.mkstemp(prefix=".harness-write-check-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise InputError(f"{key}: cannot write to {existing} ({err.strerror}); expected a writable folder") from None

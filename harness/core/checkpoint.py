"""The checkpoint format: what a resumable run saves, written atomically, read safely.

Owns the file layout (``<dir>/epoch-0003.pt``), atomic writes (write, fsync,
rename: a reader never sees half a file), safe reads (``weights_only=True``),
the config fingerprint that refuses a checkpoint made by another config, and
the launch id that keeps a torchrun restart from resuming an earlier launch.
Deciding *when* to write (rank 0, every epoch) is tracking.py's business.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

from harness import faults
from harness.core.config import Config
from harness.errors import InputError

CHECKPOINT_PATTERN = re.compile(r"^epoch-(\d{4,})\.pt$")
KEEP_NEWEST = 2

# Keys that change bookkeeping, not the trajectory: a run may be resumed with
# more epochs, another tracking server or another progress setting, or with the
# CUDA-graph step switched on or off (the same update, rounded differently).
_NOT_FINGERPRINTED = ("name", "tracking", "checkpoint", "sweep", "trial", "metrics", "performance", "train.epochs",
                      "train.max_steps", "train.progress", "train.eval_batch_size", "train.device")


def config_fingerprint(cfg: Config) -> str:
    raw = cfg.to_dict()
    for key in _NOT_FINGERPRINTED:
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_dir(cfg: Config) -> Path:
    """Where a run's checkpoints live: one folder per run name."""
    return Path(cfg.checkpoint.dir) / cfg.name


def check_resumable(cfg: Config, launch_id: Optional[str] = None) -> Optional[Path]:
    """The checkpoint a resumed run would start from, read and checked now (before any
    process group starts); None when there is none (or, with ``launch_id``, when the
    newest is another launch's: see :func:`read_checkpoint`)."""
    path = newest_checkpoint(checkpoint_dir(cfg))
    if path is not None and read_checkpoint(path, cfg, launch_id) is None:
        return None
    return path


def checkpoint_path(directory: Path, epoch: int) -> Path:
    return Path(directory) / f"epoch-{epoch:04d}.pt"


def newest_checkpoint(directory: Path) -> Optional[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return max(found)[1] if found else None


def write_checkpoint(state: dict[str, Any], directory: Path, epoch: int) -> Path:
    """Write ``state`` as ``epoch-NNNN.pt`` via a temp file and a rename; prune old ones."""
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
    for old in sorted(directory.glob("epoch-*.pt"))[:-KEEP_NEWEST]:
        old.unlink(missing_ok=True)
    return final


def read_checkpoint(path: Path, cfg: Config, launch_id: Optional[str] = None) -> Optional[dict[str, Any]]:
    """Load safely and check it belongs to this config; errors name the file.

    With ``launch_id`` (a restart, which may resume only its own launch's files),
    a checkpoint that another launch wrote gives None, before its config is
    checked: that earlier run is not this one's to resume or to refuse.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: checkpoint not found") from None
    except Exception as err:  # torch raises several types for a damaged file
        raise InputError(f"{path}: corrupt checkpoint ({type(err).__name__}); "
                         "expected a file written by the harness") from None
    if not isinstance(state, dict) or "config_fingerprint" not in state:
        raise InputError(f"{path}: not a harness checkpoint; expected keys model, optimizer, epoch")
    if launch_id is not None and state.get("launch_id") != launch_id:
        return None
    if state["config_fingerprint"] != config_fingerprint(cfg):
        raise InputError(f"{path}: checkpoint was made by another config (fingerprint "
                         f"{state['config_fingerprint']}, this config {config_fingerprint(cfg)}); "
                         "expected the same model, data, optimiser and seed")
    return state


# The only files a run writes into its folder: checkpoints, their temp files
# (write_checkpoint) and the MLflow spool (tracking.py).
_TEMP_PATTERN = re.compile(r"^\.epoch-\d{4,}\.pt\.tmp-\d+$")
SPOOL_NAME = "mlflow-spool.jsonl"


def is_harness_file(path: Path) -> bool:
    return bool(CHECKPOINT_PATTERN.match(path.name) or _TEMP_PATTERN.match(path.name)) or path.name == SPOOL_NAME


def clear_checkpoints(directory: Path) -> None:
    """A fresh (not resumed) run starts without the checkpoints of an earlier run of its name.

    Deletes only the files the harness writes, never a folder tree: the folder
    may be one the user keeps other things in (``checkpoint.dir: .`` with
    ``name: harness``). The folder itself goes only if that leaves it empty.
    """
    directory = Path(directory)
    if directory.is_symlink() or not directory.is_dir():
        return
    for path in directory.iterdir():
        if is_harness_file(path) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:  # not empty: something that is not ours stays
        pass


def check_writable_dir(path: Path, key: str) -> None:
    """Refuse a folder that is a file, lies under a file, or cannot be written, before
    anything runs; creates nothing (a probe file in the nearest existing folder is removed)."""
    import tempfile

    path = Path(path).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{key}: {existing} is not a folder (a file is in the way of {path}); "
                         "expected a folder or a path that can be created")
    try:
        handle, probe = tempfile.mkstemp(prefix=".harness-write-check-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise InputError(f"{key}: cannot write to {existing} ({err.strerror}); expected a writable folder") from None


def check_resume_run_in_store(cfg: Config) -> None:
    """``--resume`` continues the checkpoint's MLflow run: refuse now if the store lacks it."""
    from harness.running.tracking import check_resume_run, default_tracking_uri  # tracking imports this module

    path = newest_checkpoint(checkpoint_dir(cfg))
    if path is not None:
        state = read_checkpoint(path, cfg)
        check_resume_run(cfg.tracking.uri or default_tracking_uri(), state.get("run_id"), path)

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
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from harness import faults
from harness.config import Config
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


def clear_checkpoints(directory: Path) -> None:
    """A fresh (not resumed) run starts from an empty checkpoint folder."""
    shutil.rmtree(directory, ignore_errors=True)

"""One run of a name at a time: the process that writes a run's folder holds its lock.

Two runs of one name share the folder ``checkpoint.dir/<name>``: the second would clear
the first's checkpoints and write its own weights over them, and every reader of that
folder (``--resume``, ``checkpoint.init_from``, ``harness interpolate``, ``harness
escape``) would then read the wrong run's weights. So each launcher holds the lock
(``harness.folder_lock``) of ``<folder>/.lock`` for every folder it writes (a run's, each
member's of a stack, a sweep's), from after its input checks, before any process group,
worker or MLflow run starts, until its command ends; a second start is refused in one line.

The holder is the process that outlives the work: the process of a run without
torchrun, rank 0 of a torchrun job (a restarted rank 0 takes it again), the driver of a
sweep or of a Ray run (its workers, restarted or on other nodes, never lock).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from harness import folder_lock
from harness.core.checkpoint import checkpoint_dir
from harness.core.config import Config

LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_folders_held(cfgs: list[Config], what: str = "run") -> Iterator[None]:
    """Hold the lock of every folder that ``cfgs`` write (checkpoints, or the MLflow spool) until the
    block ends; InputError, with nothing held, if another process holds one."""
    with contextlib.ExitStack() as stack:
        for cfg in cfgs:
            if cfg.checkpoint.enabled or cfg.tracking.enabled:
                folder = checkpoint_dir(cfg)
                stack.enter_context(folder_lock.held(
                    folder / LOCK_NAME,
                    lambda holder, folder=folder, name=cfg.name:
                        f"checkpoint.dir: {folder} is in use by another {what} named {name} ({holder}); expected one "
                        f"{what} of a name at a time: wait for it to end, or give this one another name "
                        "(--set name=...)"))
        yield

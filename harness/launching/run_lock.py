"""One run of a name at a time: the process that writes a run's folder holds its lock.

Two runs of one name share ``checkpoint.dir/<name>``: the second would write its weights over the
first's, and every reader of that folder (``--resume``, ``checkpoint.init_from``, ``harness
interpolate``, ``harness escape``) would read the wrong run's. So each launcher holds
``<folder>/.lock`` (``harness.folder_lock``) of every folder it writes, from after its input
checks, before any process group, worker or MLflow run starts, until its command ends. The holder
is the process that outlives the work: the run's process, rank 0 under torchrun (taken again after
a restart), the driver of a sweep or a Ray run (whose workers never lock).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from harness import folder_lock
from harness.core.checkpoint import checkpoint_dir
from harness.core.config import Config


@contextlib.contextmanager
def run_folders_held(cfgs: list[Config], what: str = "run") -> Iterator[None]:
    """Hold the lock of every folder that ``cfgs`` write (checkpoints, or the MLflow spool) until the
    block ends; InputError, with nothing held, if another process holds one."""
    with contextlib.ExitStack() as stack:
        for cfg in cfgs:
            if cfg.checkpoint.enabled or cfg.tracking.enabled:
                folder = checkpoint_dir(cfg)
                stack.enter_context(folder_lock.held(
                    folder / ".lock",
                    lambda holder, folder=folder, name=cfg.name:
                        f"checkpoint.dir: {folder} is in use by another {what} named {name} ({holder}); expected one "
                        f"{what} of a name at a time: wait for it to end, or give this one another name "
                        "(--set name=...)"))
        yield

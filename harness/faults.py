"""Deliberate crashes for fault tests: SIGKILL this process at a named point, once.

Set ``HARNESS_INJECT_FAULT=<point>:<epoch>:<rank>:<marker file>`` (points: ``step``,
``evaluate``, ``checkpoint``), or several such specs separated by commas. The
process of that rank kills itself with SIGKILL at that point of that epoch,
unless the marker file exists; it creates the marker first, so the restarted run
goes through. Read from the environment, not the
config, because a fault is not part of the experiment: it must not change the
config's fingerprint or the run's params.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV_VAR = "HARNESS_INJECT_FAULT"
POINTS = ("step", "evaluate", "checkpoint")


def maybe_kill(point: str, epoch: int, rank: int) -> None:
    for spec in filter(None, os.environ.get(ENV_VAR, "").split(",")):
        want_point, want_epoch, want_rank, marker = spec.split(":", 3)
        if (want_point, int(want_epoch), int(want_rank)) != (point, epoch, rank):
            continue
        marker_path = Path(marker)
        if marker_path.exists():
            continue
        marker_path.write_text(f"killed {point} epoch {epoch} rank {rank} pid {os.getpid()}\n")
        os.kill(os.getpid(), signal.SIGKILL)

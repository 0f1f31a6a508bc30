"""Deliberate crashes for fault tests: SIGKILL this process at a named point, once, or hold it there.

``HARNESS_INJECT_FAULT=<point>:<epoch>:<rank>:<marker file>`` (several, comma-separated; points: ``step``,
``micro_batch`` (before the second pass of the epoch's middle step), ``checkpoint``): that
rank kills itself at that point of that epoch unless the marker exists; it writes the marker first, so
the restarted run goes through. ``HARNESS_INJECT_HOLD`` takes the same specs and sleeps there instead
(at most ``HOLD_S``), once, so a test can fail something outside the rank (a Ray node) mid-epoch.
Read from the environment, not the config: a fault must not change the config's fingerprint or params.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from harness.errors import InputError

# Each variable, and the word its marker file starts with.
ACTIONS = {"HARNESS_INJECT_FAULT": "killed", "HARNESS_INJECT_HOLD": "holding"}
HOLD_S = 120.0  # long enough for the test to act, short enough that a missed action still ends the run
POINTS = ("step", "micro_batch", "checkpoint")


def parse_specs(env_var: str) -> list[tuple[str, int, int, str]]:
    """``step:1:0:/tmp/m,checkpoint:2:1:/tmp/n`` in ``$env_var`` -> [(point, epoch, rank, marker), ...];
    InputError for a malformed spec, so launchers refuse it at start-up (check_env)."""
    specs = []
    for spec in filter(None, os.environ.get(env_var, "").split(",")):
        parts = spec.split(":", 3)
        if not (len(parts) == 4 and parts[0] in POINTS and parts[1].isdigit() and parts[2].isdigit()
                and parts[3].strip()):
            raise InputError(f"${env_var}: malformed spec {spec!r}; expected <point>:<epoch>:<rank>:<marker file> "
                             f"with point one of {', '.join(POINTS)}, epoch and rank integers >= 0")
        specs.append((parts[0], int(parts[1]), int(parts[2]), parts[3]))
    return specs


def check_env() -> None:
    for env_var in ACTIONS:
        parse_specs(env_var)


def maybe_kill(point: str, epoch: int, rank: int) -> None:
    """Kill (or hold) this rank if a spec names this point, epoch and rank and its marker does not exist."""
    for env_var, action in ACTIONS.items():
        for *where, marker in parse_specs(env_var):
            if tuple(where) != (point, epoch, rank) or Path(marker).exists():
                continue
            Path(marker).write_text(f"{action} {point} epoch {epoch} rank {rank} pid {os.getpid()}\n")
            if action == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(HOLD_S)

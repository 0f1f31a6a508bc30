"""Deliberate crashes for fault tests: SIGKILL this process at a named point, once.

Set ``HARNESS_INJECT_FAULT=<point>:<epoch>:<rank>:<marker file>`` (points: ``step``, ``micro_batch``
(mid-accumulation: before the second pass of the epoch's middle step, optim.micro_batch_size),
``evaluate``, ``checkpoint``), or several such specs separated by commas. The
process of that rank kills itself with SIGKILL at that point of that epoch,
unless the marker file exists; it creates the marker first, so the restarted run
goes through. Read from the environment, not the
config, because a fault is not part of the experiment: it must not change the
config's fingerprint or the run's params.

``HARNESS_INJECT_HOLD`` takes the same specs and holds the rank at that point instead,
once: it creates the marker and sleeps (at most ``HOLD_S``), so that a test can fail
something outside the rank (a Ray node) while the run is known to be mid-epoch.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV_VAR = "HARNESS_INJECT_FAULT"
HOLD_ENV_VAR = "HARNESS_INJECT_HOLD"
HOLD_S = 120.0  # long enough for the test to act, short enough that a missed action still ends the run
POINTS = ("step", "micro_batch", "evaluate", "checkpoint")


def parse_specs(text: str, env_var: str = ENV_VAR) -> list[tuple[str, int, int, str]]:
    """``step:1:0:/tmp/m,evaluate:2:1:/tmp/n`` -> [(point, epoch, rank, marker), ...].

    Raises InputError for a malformed spec, so launchers refuse it at start-up
    (check_env) instead of a rank crashing at the point it names.
    """
    from harness.errors import InputError

    specs = []
    for spec in filter(None, text.split(",")):
        parts = spec.split(":", 3)
        ok = (len(parts) == 4 and parts[0] in POINTS and parts[1].isdigit() and parts[2].isdigit()
              and parts[3].strip())
        if not ok:
            raise InputError(f"${env_var}: malformed spec {spec!r}; expected <point>:<epoch>:<rank>:<marker file> "
                             f"with point one of {', '.join(POINTS)}, epoch and rank integers >= 0")
        specs.append((parts[0], int(parts[1]), int(parts[2]), parts[3]))
    return specs


def check_env() -> None:
    parse_specs(os.environ.get(ENV_VAR, ""))
    parse_specs(os.environ.get(HOLD_ENV_VAR, ""), HOLD_ENV_VAR)


def maybe_kill(point: str, epoch: int, rank: int) -> None:
    for want_point, want_epoch, want_rank, marker in parse_specs(os.environ.get(ENV_VAR, "")):
        if (want_point, want_epoch, want_rank) != (point, epoch, rank):
            continue
        marker_path = Path(marker)
        if marker_path.exists():
            continue
        marker_path.write_text(f"killed {point} epoch {epoch} rank {rank} pid {os.getpid()}\n")
        os.kill(os.getpid(), signal.SIGKILL)
    _maybe_hold(point, epoch, rank)


def _maybe_hold(point: str, epoch: int, rank: int) -> None:
    for want_point, want_epoch, want_rank, marker in parse_specs(os.environ.get(HOLD_ENV_VAR, ""), HOLD_ENV_VAR):
        marker_path = Path(marker)
        if (want_point, want_epoch, want_rank) != (point, epoch, rank) or marker_path.exists():
            continue
        marker_path.write_text(f"holding {point} epoch {epoch} rank {rank} pid {os.getpid()}\n")
        time.sleep(HOLD_S)

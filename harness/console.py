"""Every human-readable line the harness writes: one exit, rank 0 only.

``say`` writes progress and results to stdout, ``warn`` writes problems to
stderr. Both speak only for the main process: with a ``DistContext`` that is its
rank 0; without one (a CLI command, a sweep driver, a signal handler) it is the
process that torchrun numbered 0 through ``$RANK``, or the only process when
nothing numbered it. So a line written by every rank of a torchrun job appears
once, and no module calls ``print`` itself.

Owns the decision who speaks and the flushing (lines must interleave with the
child processes' in the order they happened). Does not own what is said.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, TextIO


def _is_main(ctx) -> bool:
    if ctx is not None:
        return ctx.is_main
    return os.environ.get("RANK", "0") == "0"


def _write(stream: TextIO, lines: tuple[str, ...], ctx) -> None:
    if _is_main(ctx):
        for line in lines:
            print(line, file=stream, flush=True)


def say(*lines: str, ctx: Optional[object] = None) -> None:
    """Progress and results, on stdout."""
    _write(sys.stdout, lines, ctx)


def warn(*lines: str, ctx: Optional[object] = None) -> None:
    """Problems and what was done about them, on stderr."""
    _write(sys.stderr, lines, ctx)


def fail(line: str) -> None:
    """The one line a process writes as it exits on an error: from any rank, since
    only the rank that met the problem knows it (its peers then fail on the broken
    process group, or exit on the same input error and say the same)."""
    print(line, file=sys.stderr, flush=True)

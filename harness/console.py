"""Every human-readable line the harness writes, flushed at once so it interleaves with child processes'.

``say`` (stdout) and ``warn`` (stderr) speak only for the main process: rank 0 of a ``DistContext``, else
the process ``$RANK`` numbers 0, or the only one. A line every rank of a torchrun job writes appears once.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, TextIO


def _write(stream: TextIO, lines: tuple[str, ...], ctx) -> None:
    is_main = ctx.is_main if ctx is not None else os.environ.get("RANK", "0") == "0"
    if is_main:
        for line in lines:
            print(line, file=stream, flush=True)


def say(*lines: str, ctx: Optional[object] = None) -> None:
    """Progress and results, on stdout."""
    _write(sys.stdout, lines, ctx)


def warn(*lines: str, ctx: Optional[object] = None) -> None:
    """Problems and what was done about them, on stderr."""
    _write(sys.stderr, lines, ctx)


def fail(line: str) -> None:
    """The one line a process writes as it exits on an error, from any rank: only the rank that met the
    problem knows it (its peers fail on the broken process group, or say the same)."""
    print(line, file=sys.stderr, flush=True)

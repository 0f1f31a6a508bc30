"""Termination signals: SIGTERM and SIGINT end a run as KILLED, never RUNNING.

Owns the handlers of an entry point's main process. The first SIGTERM or SIGINT raises
:class:`Terminated` in the main thread, so ``finally`` and ``except BaseException`` blocks run as the
stack unwinds (runs end KILLED, launchers pass the signal on); later signals are recorded and
otherwise ignored, so they cannot cut that short. Which MLflow status a run ends with is decided
here (:func:`end_status`); who finishes which run is the caller's business.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from typing import Any, Callable, Optional

from harness.console import fail

HANDLED = (signal.SIGTERM, signal.SIGINT)
EXIT_CODES = tuple(128 + signum for signum in HANDLED)  # what exits_on_termination returns

_received: list[int] = []  # every handled signal this process received, oldest first


class Terminated(BaseException):
    """The first SIGTERM or SIGINT. A BaseException, like KeyboardInterrupt, so that
    ``except Exception`` (a sweep's catch around one trial) does not swallow it."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


# Depth of nested ``deferred()`` blocks, and whether a Terminated waits for their end.
_defer_depth = 0
_pending = False


def _handler(signum: int, _frame) -> None:
    global _pending
    _received.append(signum)
    if len(_received) == 1:
        if _defer_depth:
            _pending = True
            return
        raise Terminated(signum)


@contextlib.contextmanager
def deferred():
    """Hold the first signal's Terminated until this block ends: a Terminated inside an MLflow write to
    SQLite would leave its transaction open and the store locked, so the run could not be marked KILLED."""
    global _defer_depth, _pending
    _defer_depth += 1
    try:
        yield
    finally:
        _defer_depth -= 1
    if _pending and not _defer_depth:  # the block ended normally: raise what it held back
        _pending = False
        raise Terminated(_received[0])


# As a decorator: every call of the function runs inside a deferred() block of its own.
deferring = deferred()


def install() -> dict:
    """Handle SIGTERM and SIGINT in this process (main thread only; elsewhere Python forbids it); the handlers
    it replaced. Call again after anything that installs its own: ``ray.init`` sets SIGTERM to ``sys.exit``."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, _handler) for signum in HANDLED}


def end_status(error: BaseException) -> str:
    """The MLflow status of a run that ``error`` ended: KILLED when a termination was
    asked for (even if what surfaced first was a collective broken by a peer that
    exited on the same signal), else FAILED."""
    return "KILLED" if _received or isinstance(error, (Terminated, KeyboardInterrupt)) else "FAILED"


def exits_on_termination(main: Optional[Callable[..., int]] = None, *,
                         after: str = "an unfinished MLflow run is marked KILLED (continue it with --resume)"):
    """Run ``main`` with the handlers installed; a termination signal becomes exit code 128+signal
    and one line on stderr, ending with ``after`` (what became of the work, and what to do next: only
    a command that has ``--resume`` says to use it). The previous handlers are put back afterwards
    (tests call ``main`` in-process). Used bare, or with ``after=`` as a decorator factory."""
    if main is None:
        return functools.partial(exits_on_termination, after=after)

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        _received.clear()
        previous = install()
        try:
            return main(*args, **kwargs)
        except BaseException as err:
            # After a signal, what surfaces may be another error it caused: a
            # collective broken by a peer that exited on the same signal, or Ray's
            # ray.wait wrapping Terminated in a SystemError. The exit is the signal's.
            if not _received:
                raise
            stop = err if isinstance(err, Terminated) else Terminated(_received[0])
            seen = "" if err is stop else f" ({type(err).__name__} as it stopped: {str(err)[:200]})"
            fail(f"stopped: {stop}{seen}; {after}")
            return 128 + stop.signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            # A test that calls main() in-process goes on in the same interpreter:
            # a signal it received must not make later runs end KILLED.
            _received.clear()
            global _pending
            _pending = False

    return wrapper


def call_interruptibly(call: Callable[[], Any], name: str, on_stop: Callable[[BaseException], None],
                       stop_wait_s: float = 0.0, stop_on_error: bool = True) -> Any:
    """``call()`` in a helper thread while this thread waits in Python, where signal handlers run.

    For calls that block in C++ for a whole run (Ray Train's ``fit``, Ray Tune's), during which the
    main thread runs no Python signal handler (and off the main thread Ray leaves our SIGINT handler
    alone). When the wait is interrupted, ``on_stop(error)`` runs, the helper gets ``stop_wait_s`` to
    wind down, and the error is raised; when the call raises, ``on_stop`` runs too (with
    ``stop_on_error``) and its error is raised. The helper may then still be inside C++, where a
    normal interpreter exit can crash: launch/ray_job.py ends with os._exit.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as err:  # handed to the waiting thread below
            outcome["error"] = err

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
    except BaseException as err:
        on_stop(err)
        thread.join(stop_wait_s)
        raise
    if "error" in outcome:
        if stop_on_error:
            on_stop(outcome["error"])
        raise outcome["error"]
    return outcome["result"]

"""An exclusive lock on a file, held by one process while it works in a folder that must have one user.

``flock`` without waiting: a second process is refused at once, with the holder's PID and host.
The kernel drops the lock when its process ends, SIGKILL included. The lock file stays:
deleting it would let a third process lock a new file of that name while a second holds the old one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

from harness.errors import InputError


@contextlib.contextmanager
def held(path: Path, refusal: Callable[[str], str]) -> Iterator[None]:
    """Hold ``path``'s lock for the block (its folder is created); InputError(``refusal(holder)``),
    with nothing held, while another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle = open(path, "a+")
    except OSError as err:
        raise InputError(f"{path}: cannot open the lock file ({err.strerror}); expected a writable folder") from None
    with handle:  # closing drops the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise InputError(refusal(handle.read().strip() or "another process")) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield

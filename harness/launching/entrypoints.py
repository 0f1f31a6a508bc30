"""What every command-line entry point shares: config arguments, the exit-2 rule, joining Ray.

A bad input raises ``InputError``; ``exits_on_input_error`` turns it into one line on stderr and
exit code 2. Launchers call ``load_run_config``, then ``preflight.preflight``, before they start
anything; what each launcher runs after that is in ``harness.commands``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import select
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from harness.core.config import Config, load_config
from harness.console import fail, say
from harness.errors import USAGE_EXIT_CODE, InputError
from harness.records.mlflow_store import default_tracking_uri

# Nothing imported here loads torch, ray or mlflow (ray is imported where Ray is
# joined): `harness --help` and the launchers' --help answer without them.

RAY_VERBOSE = "HARNESS_RAY_VERBOSE"  # "1": Ray's own INFO lines on the console too, as with --verbose


def ray_verbose(args: argparse.Namespace) -> bool:
    """Whether Ray's own INFO lines go to the console: ``--verbose``, or ``HARNESS_RAY_VERBOSE=1``."""
    return bool(getattr(args, "verbose", False)) or os.environ.get(RAY_VERBOSE) == "1"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the text already says it or the option is required."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if action.required or "default" in text else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the defaults in the help, and usage errors as every other bad input's ``error:`` line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise InputError(message)

    def _check_value(self, action: argparse.Action, value) -> None:
        if action.choices is not None and value not in action.choices:
            name = "/".join(action.option_strings) or action.dest
            raise InputError(f"{name}: expected one of {', '.join(map(str, action.choices))}, got {value!r}")


def check_output_file(path: str | Path, key: str) -> None:
    """A file a tool writes after its work (``--json``), refused now rather than after the measurement
    if it is a folder or a device, or its folder is missing or not writable; creates nothing."""
    import tempfile

    given = Path(path).expanduser()
    folder = given.absolute().parent
    try:
        exists, is_file, folder_is_dir = given.exists(), given.is_file(), folder.is_dir()
    except OSError as err:  # a name past the file system's limit, a loop of links
        raise InputError(f"{key}: {path}: {err.strerror}; expected a file path to write") from None
    if exists and not is_file:
        raise InputError(f"{key}: {given} is {'a folder' if given.is_dir() else 'not a regular file'}; "
                         "expected the path of a file to write")
    if not folder_is_dir:
        raise InputError(f"{key}: {folder} is not a folder; expected a file in an existing folder")
    try:
        tempfile.TemporaryFile(dir=folder).close()  # no name on Linux, else removed at once
        if exists:
            open(given, "a").close()
    except OSError as err:
        raise InputError(f"{key}: cannot write {given} ({err.strerror}); expected a writable file") from None


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML file in configs/ (required)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set optim.lr=0.05 (repeatable)")


def load_run_config(args: argparse.Namespace) -> Config:
    """The validated config, with the tracking URI made absolute so workers elsewhere agree.
    ``args.resolved_config`` (a sweep's torchrun trial) is the parent's resolved config as JSON, taken as it is."""
    resolved = getattr(args, "resolved_config", None)
    if not resolved:
        cfg = load_config(args.config, args.overrides)
        named = {} if cfg.is_sweep or cfg.tracking.run_name else {"tracking.run_name": named_by_overrides(
            cfg.name, args.overrides or [])}
        if cfg.tracking.enabled and not cfg.tracking.uri:
            named["tracking.uri"] = default_tracking_uri()
        return cfg.replace(**named) if named else cfg
    if args.overrides:
        raise InputError("--set: not with --resolved-config; expected the overrides already applied in the JSON")
    try:
        return Config.from_dict(json.loads(resolved))
    except json.JSONDecodeError as err:
        raise InputError(f"--resolved-config: not JSON ({err.msg}); expected the JSON of a resolved config") from None


# Overrides that change where a run's records go, not what it trains: left out of its name.
UNNAMED_OVERRIDES = ("tracking.", "checkpoint.", "train.progress", "train.device")


def named_by_overrides(name: str, overrides: list[str]) -> str:
    """A run's MLflow name: its config's, then each override that changes what it trains, by its last key
    (``fashion-mnist lr=0.05 hidden_sizes=[256,128]``), as sweep trials are named by what differs."""
    changed = [item.split("=", 1) for item in overrides if "=" in item]
    parts = [f"{key.strip().rsplit('.', 1)[-1]}={value.strip()}" for key, value in changed
             if key.strip() != "name" and not key.strip().startswith(UNNAMED_OVERRIDES)]
    return " ".join([name, *parts])[:250]


def exits_on_input_error(main: Callable[..., int]) -> Callable[..., int]:
    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except InputError as err:
            fail(f"error: {err}")
            return USAGE_EXIT_CODE

    return wrapper


def add_ray_arguments(parser: argparse.ArgumentParser, num_workers_help: Optional[str] = None) -> None:
    """The Ray options; ``num_workers_help`` (launch/sweep.py, whose --nproc is the ranks per
    trial) makes --num-workers an unset alias with that help instead of a value of its own."""
    parser.add_argument("--num-workers", type=int, default=None if num_workers_help else 2,
                        help=num_workers_help or "Ray Train workers (ranks) per run")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    parser.add_argument("--max-failures", type=int, default=1, help="worker-group restarts per run")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    parser.add_argument("--storage-path", default="checkpoints/ray",
                        help="where Ray keeps run state and checkpoints: a folder, or a URI (s3://, gs://, ...)")
    # On a cluster of several nodes every worker writes there: see harness/launching/ray_cluster.py.
    parser.add_argument("--shared-storage", action="store_true",
                        help="--storage-path is a folder every node of the Ray cluster sees at the same path "
                             "(a shared file system); needed for a folder on a cluster of several nodes")
    # Ray's placement group strategies (ScalingConfig.placement_strategy).
    parser.add_argument("--placement-strategy", default="PACK", choices=("PACK", "SPREAD", "STRICT_SPREAD"),
                        help="where Ray places a run's workers: PACK fills a node first, SPREAD uses distinct "
                             "nodes where it can, STRICT_SPREAD one worker per node")
    parser.add_argument("--verbose", action="store_true",
                        help=f"Ray's own INFO lines on the console too (Ray Train's per-report and worker-group "
                             f"lines, ray.init's): the same as {RAY_VERBOSE}=1; default: warnings and errors only")


# An unreachable $RAY_ADDRESS must fail fast: ray.init alone retries for minutes
# inside Ray's C++ client, where Python runs no signal handler (Ctrl-C is ignored).
RAY_PROBE_TIMEOUT_S = 5.0  # TCP connect to the head's port (DNS included)
RAY_INIT_DEADLINE_S = 60.0  # ray.init once that port accepts connections
RAY_ADDRESS_EXPECTED = ("expected the address of a running Ray head: host:port of its GCS, as `ray start --head "
                        "--port` printed it (e.g. 127.0.0.1:6379), or ray://host:port")


def connect_ray(num_cpus=None, verbose: bool = False) -> None:
    """Join $RAY_ADDRESS's cluster (always set inside a Ray job), else start a local Ray on loopback.

    A malformed or unreachable address is an InputError within RAY_PROBE_TIMEOUT_S; a port that
    accepts but is no Ray cluster, or a signal while connecting, ends the process with one line.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address:
        # address="local": a new Ray of our own. Plain ray.init() would join any cluster
        # this host runs (or last ran: /tmp/ray/ray_current_cluster), and then refuse num_cpus.
        ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", logging_config=ray_logging(verbose))
        return
    if address != "auto":  # "auto": Ray looks up this host's running cluster itself
        host, port = ray_host_port(address)
        with _exit_unless_done_within(address, RAY_PROBE_TIMEOUT_S + 5, f"no answer from {address!r} within "
                                      f"{RAY_PROBE_TIMEOUT_S + 5:.0f} s"):
            try:
                socket.create_connection((host, port), timeout=RAY_PROBE_TIMEOUT_S).close()
            except OSError as err:  # refused, timed out, unknown host, no route
                reason = err.strerror or str(err) or type(err).__name__
                raise InputError(f"RAY_ADDRESS: nothing answers at {address!r} ({reason}); "
                                 f"{RAY_ADDRESS_EXPECTED}") from None
    say(f"connecting to the Ray cluster at {address}")  # Ray's own line on it is INFO, off (ray_logging)
    with _exit_unless_done_within(address, RAY_INIT_DEADLINE_S, f"{address!r} accepts connections but no Ray "
                                  f"cluster answered within {RAY_INIT_DEADLINE_S:.0f} s"):
        try:
            ray.init(address=address, logging_config=ray_logging(verbose))
        except ConnectionError as err:  # "auto" with no cluster here; a cluster that refused our token (~20 s)
            raise InputError(f"RAY_ADDRESS: {address!r}: {str(err).splitlines()[0]}; {RAY_ADDRESS_EXPECTED}, "
                             "and, for a cluster in token mode, its token in RAY_AUTH_TOKEN or ~/.ray/auth_token "
                             "(Ray logs InvalidAuthToken above when that is the cause)") from None


def ray_logging(verbose: bool = False):
    """Ray's own INFO lines (Ray Train's per-report and checkpoint lines, its worker-group set-up) off in
    every process of this job, warnings and errors kept; ``verbose`` keeps them all."""
    import ray

    if verbose:
        return None
    return ray.LoggingConfig(encoding="TEXT", log_level="WARNING")


def ray_host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``ray://host:port`` split; anything else (an http:// dashboard URL, no port) refused."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        rest = address
    elif scheme != "ray":
        raise InputError(f"RAY_ADDRESS: {address!r} is a {scheme}:// URL (the dashboard's, for `ray job submit`?); "
                         f"{RAY_ADDRESS_EXPECTED}")
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"RAY_ADDRESS: got {address!r}; {RAY_ADDRESS_EXPECTED}")
    return host, int(port)


@contextlib.contextmanager
def _exit_unless_done_within(address: str, deadline_s: float, problem: str):
    """Run the block; if it takes longer than ``deadline_s``, or SIGINT/SIGTERM arrives, print one
    ``error: RAY_ADDRESS: ...`` line and end the process (exit 2, or 128 + the signal).

    The block may sit in Ray's C++ code, where Python's handlers never run, but Python's C-level
    handler still writes each signal's number to the wakeup fd, which a watcher thread reads.
    Nothing has started yet, so ``os._exit`` leaves nothing half-done. Main thread only.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    caught = (signal.SIGINT, signal.SIGTERM)
    # No-op Python handlers: the signal is then handled only by the watcher below
    # (and SIGTERM, whose default kills at once, reaches the wakeup fd at all).
    previous_handlers = {signum: signal.signal(signum, lambda *_: None) for signum in caught}
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    done = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + deadline_s
        while not done.is_set():
            ready, _, _ = select.select([reader], [], [], max(0.0, deadline - time.monotonic()))
            if done.is_set():
                return
            if not ready:
                fail(f"error: RAY_ADDRESS: {problem}; {RAY_ADDRESS_EXPECTED}")
                os._exit(USAGE_EXIT_CODE)
            for signum in reader.recv(64):
                if signum in caught:
                    fail(f"error: RAY_ADDRESS: interrupted ({signal.Signals(signum).name}) while connecting to "
                         f"{address!r}")
                    os._exit(128 + signum)

    watcher = threading.Thread(target=watch, name="ray-connect-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        with contextlib.suppress(OSError):
            writer.send(b"\0")  # wake the watcher; 0 is no signal
        watcher.join()
        signal.set_wakeup_fd(previous_fd)
        for signum, handler in previous_handlers.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        reader.close()
        writer.close()

"""The MLflow tracking server behind ``harness mlflow-server``: over a SQLite file, or over a PostgreSQL of its own.

SQLite is one ``mlflow server``, exec'd to own the command's PID. PostgreSQL, for many writers, is a cluster
in ``<store>/mlflow-pg/`` on 127.0.0.1 with ``mlflow server`` as a child; this process stops both, mlflow
first. Its generated password is only in mode-0600 files (mlflow reads it through ``PGPASSFILE``), never in
an argv or environment. Artifacts go through the server: workers need no shared disk. Owns starting, stopping
and refusing what would make these servers fail; a client's tracking URI is records/mlflow_store.py's.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from harness import folder_lock, signals
from harness.console import say, warn
from harness.errors import InputError

PG_FOLDER = "mlflow-pg"  # under --store-dir: the cluster (db/), its password files, log and socket
SERVER_LOCK = "mlflow-server.lock"  # under --store-dir: held by the one server of the store (harness.folder_lock)
STARTED_BY_US = "postmaster.started"  # under PG_FOLDER: the PID of the postmaster a server started
PG_ROLE = "mlflow"       # the cluster's only role (its superuser), created by initdb
PG_DATABASE = "mlflow"
PG_SYSTEM_USER = "postgres"  # who runs the server when we are root: PostgreSQL refuses to run as root
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner processes (~2.5 GB less)
MLFLOW_STOP_WAIT_S = 30


def check_port_free(host: str, port: int, key: str) -> None:
    """Refuse a port out of range, or one something already listens on: the server would start and then die."""
    if not 1 <= port <= 65535:
        raise InputError(f"{key}: {port} is not a TCP port; expected 1..65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # SO_REUSEADDR as the servers set it: a port left in TIME_WAIT by a stopped server is free to them.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise InputError(f"{key}: cannot listen on {host}:{port} ({err.strerror}); expected a free port "
                             "(is another server running there?)") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def mlflow_command(host: str, port: int, artifacts: Path, *backend: str) -> list[str]:
    return [str(Path(sys.executable).with_name("mlflow")), "server", *backend, "--artifacts-destination",
            str(artifacts), "--host", host, "--port", str(port), "--workers", "1"]


def serve_sqlite(store: Path, host: str, port: int) -> None:
    """exec ``mlflow server`` over ``<store>/mlflow.db``: the server takes this process's PID."""
    command = mlflow_command(host, port, store / "mlartifacts", "--backend-store-uri", f"sqlite:///{store}/mlflow.db")
    say(f"MLflow UI on http://{host}:{port} (store {store / 'mlflow.db'})")
    os.execve(command[0], command, {**os.environ, **SERVER_ENV})


def serve_postgresql(store: Path, host: str, port: int, pg_port: Optional[int]) -> int:
    """Run PostgreSQL and ``mlflow server`` over it until a termination signal (exit 0) or mlflow's end,
    holding ``<store>/mlflow-server.lock`` from its first check to its last stop: one server per store."""
    if pg_port == port:
        raise InputError(f"--pg-port: {pg_port} is --port too; expected two different ports (the MLflow UI "
                         "listens on one, PostgreSQL on the other)")
    cluster = LocalPostgres(store / PG_FOLDER)
    cluster.check(pg_port)  # what needs no lock: refused with nothing created
    made_store = not store.exists()
    mlflow = None
    with folder_lock.held(store / SERVER_LOCK,
                          lambda holder: f"--store-dir: {store} is served by another harness mlflow-server "
                                         f"({holder}); expected one server per store: stop that one first"):
        try:
            cluster.take_over_if_stale()
            pg_port = pg_port or free_port()
            cluster.initialise()
            cluster.start(pg_port)
            cluster.create_database(pg_port)
            env = {**os.environ, **SERVER_ENV, "MLFLOW_BACKEND_STORE_URI": cluster.uri(pg_port),
                   "PGPASSFILE": str(cluster.pgpass)}
            say(f"MLflow UI on http://{host}:{port} (store PostgreSQL {cluster.uri(pg_port)}, data {cluster.data}; "
                f"artifacts {store / 'mlartifacts'}); stop with: kill {os.getpid()}")
            # Its own session: a Ctrl-C in the terminal reaches only this process, which stops mlflow
            # and then PostgreSQL in that order. PDEATHSIG: if this process is SIGKILLed, mlflow goes too.
            mlflow = subprocess.Popen(mlflow_command(host, port, store / "mlartifacts"), env=env,
                                      start_new_session=True, preexec_fn=terminated_with_parent)
            code = mlflow.wait()
            warn(f"mlflow server exited with code {code}; stopping PostgreSQL")
            return 1
        except signals.Terminated as stop:
            say(f"{stop}: stopping mlflow and PostgreSQL")
            return 0
        except InputError:
            if made_store and not cluster.folder.exists():  # refused on a new store: leave no trace of it
                (store / SERVER_LOCK).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    store.rmdir()  # only if empty: nothing but the lock was made in it
            raise
        finally:
            if mlflow is not None:
                _stop(mlflow)
            cluster.stop()  # only a PostgreSQL this process started


def terminated_with_parent() -> None:
    """In a child, before exec (``preexec_fn``): SIGTERM when the process that started it dies, however it dies."""
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the parent's finally block still stops it
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM mlflow (it stops its uvicorn worker itself), then end what is left of its session: a worker
    orphaned by a killed mlflow would go on serving."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(MLFLOW_STOP_WAIT_S)
    end_session(process.pid, MLFLOW_STOP_WAIT_S)  # the session's id is mlflow's PID (start_new_session)
    process.wait()


def end_session(sid: int, wait_s: float) -> None:
    """SIGTERM every process of session ``sid``, then SIGKILL what is left after ``wait_s``."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(sid, signum)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                os.killpg(sid, 0)  # raises ProcessLookupError once none is left
                time.sleep(0.2)
        except ProcessLookupError:
            return


class LocalPostgres:
    """A PostgreSQL cluster in ``folder``: ``db/`` (PGDATA), ``password``, ``pgpass``, ``postgres.log``
    and the Unix socket, all readable by its owner only."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.data = folder / "db"
        self.password_file = folder / "password"
        self.pgpass = folder / "pgpass"
        self.log = folder / "postgres.log"
        self.started_record = folder / STARTED_BY_US
        self.bindir = find_pg_bindir()
        self.as_root = os.geteuid() == 0
        self.started = False  # whether this process ran pg_ctl start: only then does stop() stop it

    def uri(self, port: int) -> str:
        return f"postgresql://{PG_ROLE}@127.0.0.1:{port}/{PG_DATABASE}"

    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess:
        """One of PostgreSQL's programs, run as PG_SYSTEM_USER when we are root."""
        command = [str(self.bindir / program), *args]
        if self.as_root:
            command = ["runuser", "-u", PG_SYSTEM_USER, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)

    def check(self, pg_port: Optional[int]) -> None:
        """Everything that would stop PostgreSQL from starting, refused before anything is created."""
        if importlib.util.find_spec("psycopg") is None:  # the driver of postgresql:// in SQLAlchemy 2.1
            raise InputError("--backend postgresql: the PostgreSQL driver psycopg is not installed; expected "
                             "pip install 'psycopg[binary]' (pinned in requirements.txt)")
        if pg_port is not None:
            check_port_free("127.0.0.1", pg_port, "--pg-port")
        if self.as_root:
            self._check_reachable_by_server_user()
        if self.folder.exists() and not (self.data / "PG_VERSION").is_file():
            raise InputError(f"--store-dir: {self.folder} exists but holds no PostgreSQL cluster (db/PG_VERSION); "
                             "expected the folder a previous start created, or no folder (move this one away)")

    def take_over_if_stale(self) -> None:
        """With the store's lock held (so no server of this store runs): stop a PostgreSQL of this cluster that
        a killed server started (its PID recorded), so this start begins as any other; refuse any other."""
        running = (self.data / "postmaster.pid").exists() and self._run("pg_ctl", "status", "-D", str(self.data))
        if running and running.returncode == 0:
            postmaster = _read_pid(self.data / "postmaster.pid")
            if postmaster is None or postmaster != _read_pid(self.started_record):
                raise InputError(f"--store-dir: the PostgreSQL of {self.data} is already running, not started by "
                                 f"a harness mlflow-server; expected it stopped (pg_ctl -D {self.data} stop)")
            warn(f"stopping the PostgreSQL (pid {postmaster}) that a killed harness mlflow-server "
                 f"left running on {self.data}")
            self.started = True
            self.stop()

    def _check_reachable_by_server_user(self) -> None:
        try:
            pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            raise InputError(f"--backend postgresql: running as root, but there is no {PG_SYSTEM_USER!r} user to "
                             "run PostgreSQL (it refuses root); expected apt-get install postgresql, or run as a "
                             "normal user") from None
        nearest = self.folder
        while not nearest.exists():
            nearest = nearest.parent
        # test -x as that user: every folder above must be traversable by it, not only the last one.
        probe = subprocess.run(["runuser", "-u", PG_SYSTEM_USER, "--", "test", "-x", str(nearest)],
                               capture_output=True)
        if probe.returncode != 0:
            raise InputError(f"--store-dir: {nearest} cannot be reached by the {PG_SYSTEM_USER} user that runs "
                             "PostgreSQL (root may not run it); expected a folder whose parents are all "
                             "traversable (chmod o+x), e.g. one outside a mode-700 home or temp folder")

    def initialise(self) -> None:
        """initdb on the first start: a new cluster with a generated password; a failed one leaves no folder."""
        if (self.data / "PG_VERSION").is_file():
            self._write_pgpass()
            return
        self.folder.mkdir(mode=0o700, parents=True)
        try:
            _write_private(self.password_file, secrets.token_urlsafe(32) + "\n")
            if self.as_root:
                shutil.chown(self.folder, PG_SYSTEM_USER, PG_SYSTEM_USER)
                shutil.chown(self.password_file, PG_SYSTEM_USER, PG_SYSTEM_USER)
            done = self._run("initdb", "-D", str(self.data), "-U", PG_ROLE, "-A", "scram-sha-256",
                             f"--pwfile={self.password_file}", "-E", "UTF8", "--locale=C", "--no-instructions")
            if done.returncode != 0:
                raise InputError(f"--store-dir: initdb in {self.data} failed: {_last_line(done.stderr)}")
            self._write_pgpass()
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)  # made by this call, so ours to remove
            raise

    def _write_pgpass(self) -> None:
        # libpq's format host:port:database:user:password; the port is chosen per start, so any.
        # token_urlsafe has no ':' or '\\', which the format would need escaped.
        password = self.password_file.read_text().strip()
        _write_private(self.pgpass, f"127.0.0.1:*:*:{PG_ROLE}:{password}\n")

    def start(self, port: int) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={shlex.quote(str(self.folder))}"
        self.started = True  # from here on, a postmaster of this data folder is this process's to stop
        done = self._run("pg_ctl", "start", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "-t", "60")
        if (postmaster := _read_pid(self.data / "postmaster.pid")) is not None:
            _write_private(self.started_record, f"{postmaster}\n")
        if done.returncode != 0:
            reason = _last_line(self.log.read_text() if self.log.exists() else done.stderr)
            self.stop()  # pg_ctl -w gave up waiting: a server that came up late must not stay behind
            raise InputError(f"--pg-port: PostgreSQL did not start on 127.0.0.1:{port} ({reason}); see {self.log}")

    def create_database(self, port: int) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user=PG_ROLE, dbname="postgres",
                             passfile=str(self.pgpass), connect_timeout=10, autocommit=True) as connection:
            if not connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)).fetchone():
                connection.execute(f'CREATE DATABASE "{PG_DATABASE}"')

    def stop(self) -> None:
        """Stop the PostgreSQL this process started or took over; any other is not this process's to stop."""
        if self.started and (self.data / "postmaster.pid").exists():
            done = self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "60")
            if done.returncode != 0:
                warn(f"PostgreSQL of {self.data} did not stop: {_last_line(done.stderr)}")
                return
        self.started = False
        self.started_record.unlink(missing_ok=True)


def find_pg_bindir() -> Path:
    """Where initdb and pg_ctl are: on PATH, else Debian's newest /usr/lib/postgresql/<version>/bin."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if versions:
        return versions[-1].parent
    raise InputError("--backend postgresql: PostgreSQL's server programs (initdb, pg_ctl) are not installed; "
                     "expected apt-get install postgresql (or them on PATH)")


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read, never readable by others even for a moment."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # O_CREAT's mode applies to new files only
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def _read_pid(path: Path) -> Optional[int]:
    """The PID on the first line of ``path`` (PGDATA/postmaster.pid, or STARTED_BY_US), None if there is none."""
    try:
        return int(path.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no message"

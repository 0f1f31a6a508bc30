"""The one place that talks to MLflow: the store and its checks, every query, the spool of undelivered records.

What a run records and when is tracking.py's; what a sweep's numbers mean is analysis/report.py's.
MLflow is imported inside the functions that need it: ``harness --help`` and untracked runs never load it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from harness.console import warn
from harness.core.config import Config
from harness.errors import InputError

# --- the store: where it is, whether it answers, a client ----------------------


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else an absolute sqlite file in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """Refuse an HTTP tracking server that does not answer /health, or a PostgreSQL store that refuses a login."""
    if uri.lower().startswith("postgresql"):
        return check_database(uri, timeout_s)
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s)
    except OSError as err:
        reason = getattr(err, "reason", err)
        raise InputError(f"tracking.uri: MLflow server {uri} is unreachable ({reason}); expected a running "
                         "server (make mlflow-server) or tracking.enabled: false") from None


def masked_uri(uri: str) -> str:
    """``uri`` with its password (if any) replaced by ``***``: what error lines may show."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(uri).render_as_string(hide_password=True)
    except ArgumentError:
        return uri


def check_database(uri: str, timeout_s: float = 5.0) -> None:
    """Refuse a ``postgresql://`` URI whose driver is missing, whose server does not answer or that
    refuses the login (libpq reads a password missing from the URI from ``$PGPASSFILE``, as MLflow will)."""
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, DBAPIError

    shown = masked_uri(uri)
    try:
        url = sqlalchemy.engine.make_url(uri)
        # NullPool: the check's connection is closed at once, not kept in a pool of this process.
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool,
                                          connect_args={"connect_timeout": max(1, int(timeout_s))})
    except ArgumentError as err:
        raise InputError(f"tracking.uri: {shown} is not a database URI ({err}); expected "
                         "postgresql://user:password@host:port/database") from None
    except ImportError as err:  # SQLAlchemy 2.1 reads postgresql:// as postgresql+psycopg (psycopg 3)
        raise InputError(f"tracking.uri: no driver for {shown} ({err}); expected the pinned driver installed "
                         "(pip install 'psycopg[binary]', see requirements.txt)") from None
    try:
        engine.connect().close()
    except DBAPIError as err:
        reason = " ".join(str(err.orig).split()) or type(err.orig).__name__
        if url.password:  # libpq does not echo passwords; make sure no message ever does
            reason = reason.replace(str(url.password), "***")
        raise InputError(f"tracking.uri: database {shown} is unreachable or refused the login ({reason}); "
                         "expected a running PostgreSQL that accepts this user and password "
                         "(make mlflow-server-pg serves one) or tracking.enabled: false") from None
    finally:
        engine.dispose()


# URI schemes MLflow 3.17's tracking store registry knows (``postgresql+psycopg``
# counts as postgresql); anything else fails deep inside MLflow after the run began.
TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")


def sqlite_path(uri: str) -> Optional[Path]:
    """The file of a ``sqlite:///`` URI (None for other stores and in-memory sqlite)."""
    if not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:":
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def check_tracking_uri(uri: str) -> None:
    """Refuse a URI MLflow cannot use: unknown scheme, a sqlite file that is no database or lacks its folder."""
    scheme = uri.partition(":")[0].split("+", 1)[0].lower() if ":" in uri else ""
    if scheme not in TRACKING_SCHEMES:
        raise InputError(f"tracking.uri: unknown scheme in {uri!r}; expected one of "
                         + ", ".join(f"{s}:" for s in TRACKING_SCHEMES) + " (e.g. sqlite:///mlflow.db)")
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):
        raise InputError(f"tracking.uri: {uri!r}; expected sqlite:///<path to a file>")
    path = sqlite_path(uri)
    if path is None:
        return
    if not path.exists():
        if not path.parent.is_dir():
            raise InputError(f"tracking.uri: folder {path.parent} does not exist; expected the folder of the "
                             "SQLite file to exist")
        return
    if not path.is_file():
        raise InputError(f"tracking.uri: {path} is not a file; expected a SQLite database file")
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            db.execute("select count(*) from sqlite_master").fetchone()
    except sqlite3.DatabaseError as err:
        raise InputError(f"tracking.uri: {path} is not a SQLite database ({err}); expected an MLflow "
                         "store or a path where one can be created") from None


def open_client(uri: str):
    """An ``MlflowClient`` whose store exists and is migrated.

    Two processes opening a new sqlite store at once would both run MLflow's schema migration and the
    second would die, so it is created under a lock. The lock is on a side file (``<db>.lock``): closing
    any other descriptor of the database file would drop the POSIX locks SQLite holds on it.
    """
    import fcntl

    from mlflow.tracking import MlflowClient

    path = sqlite_path(uri)
    if path is None:  # a server (or database server) migrates its own store
        return MlflowClient(tracking_uri=uri)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released as the file closes
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # creates and migrates a new store here
    return client


def check_experiment(uri: str, name: str) -> None:
    """Refuse an experiment deleted in an existing store (a store that does not exist is not created here)."""
    path = sqlite_path(uri)
    if path is not None and not path.exists():
        return
    found = _sqlite_experiment(path, name) if path is not None else None
    if found is None:  # a server, or a file this read could not answer for: MLflow's client reads it
        experiment = open_client(uri).get_experiment_by_name(name)
        found = (experiment.experiment_id, experiment.lifecycle_stage) if experiment is not None else ()
    if found and found[1] == "deleted":
        raise InputError(f"tracking.experiment: {name!r} is deleted in {masked_uri(uri)}; restore it with `mlflow "
                         f"experiments restore --experiment-id {found[0]}` "
                         f"(MLFLOW_TRACKING_URI={masked_uri(uri)}) or choose another name")


def _sqlite_experiment(path: Path, name: str) -> Optional[tuple]:
    """(experiment id, lifecycle stage) of experiment ``name`` in an MLflow SQLite store, () where it has none,
    None where the file cannot answer (no experiments table yet, or locked). Read with sqlite3, not MLflow's
    client: every rank of a job checks, and importing MLflow and opening its store costs each about 2 s."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            row = db.execute("select experiment_id, lifecycle_stage from experiments where name = ?",
                             (name,)).fetchone()
    except sqlite3.Error:
        return None
    return (str(row[0]), row[1]) if row else ()


def check_resume_run_in_store(cfg: Config) -> None:
    """``--resume`` continues the checkpoint's MLflow run: refuse now if the store lacks it."""
    # Here, not at the top: core/checkpoint.py loads torch, which `harness replay` and `harness report` never need.
    from harness.core.checkpoint import Checkpoints

    checkpoints = Checkpoints(cfg)
    path = checkpoints.newest()
    run_id = checkpoints.load(path).get("run_id") if path is not None else None
    if not run_id:
        return
    from mlflow.exceptions import MlflowException

    uri = cfg.tracking.uri or default_tracking_uri()
    try:
        open_client(uri).get_run(run_id)
    except MlflowException:
        raise InputError(f"{path}: its MLflow run {run_id} is not in {masked_uri(uri)}; expected the store "
                         "the run was started with (tracking.uri), or start afresh without --resume") from None


CHECKPOINT_PATH_TAG = "checkpoint_path"  # set by the training loop at a run's end: its newest checkpoint


def run_checkpoint_path(uri: str, run_id: str, key: str) -> str:
    """The ``checkpoint_path`` tag of run ``run_id`` in the store at ``uri``; refused (as option ``key``)
    when the store or the run does not exist, or the run recorded no checkpoint."""
    from mlflow.exceptions import MlflowException

    check_tracking_uri(uri)
    path = sqlite_path(uri)
    if path is not None and not path.exists():  # looking must not create a store
        raise InputError(f"{key}: {run_id} is not a file or folder, and {uri} holds no MLflow store to look it up "
                         "in; expected a checkpoint file, a run's checkpoint folder or a run id of that store")
    check_tracking_server(uri)
    try:
        run = open_client(uri).get_run(run_id)
    except MlflowException:
        raise InputError(f"{key}: {run_id} is not a file or folder, nor a run in {uri}; expected a checkpoint "
                         "file, a run's checkpoint folder or an MLflow run id (tracking.uri)") from None
    tagged = run.data.tags.get(CHECKPOINT_PATH_TAG)
    if not tagged:
        raise InputError(f"{key}: MLflow run {run_id} has no {CHECKPOINT_PATH_TAG} tag (it wrote no checkpoint, "
                         "did not finish, or predates the tag); expected a run that saved checkpoints, or give "
                         "its checkpoint file")
    return tagged


UI_PORT = 5000  # harness mlflow-server's and mlflow ui's default


def ui_links(uri: str, experiment_id: str, sweep_run_id: Optional[str] = None) -> list[str]:
    """How to open the MLflow UI on this store, and the URLs of the experiment's runs and of the sweep
    (in the model-training view: MLflow 3 opens an experiment on its GenAI overview otherwise)."""
    if uri.startswith(("http://", "https://")):
        base, lines = uri.rstrip("/"), []
    else:
        base = f"http://127.0.0.1:{UI_PORT}"
        store = sqlite_path(uri)
        if store is not None and store.name == "mlflow.db":
            command = ("make mlflow-server" if store.parent == Path.cwd().resolve()
                       else f".venv/bin/harness mlflow-server --store-dir {store.parent}")
        else:
            command = f".venv/bin/mlflow ui --backend-store-uri {uri}"
        lines = [f"open the MLflow UI: {command}"]
    lines.append(f"  runs: {base}/#/experiments/{experiment_id}?workflowType=machine_learning")
    if sweep_run_id:
        lines.append(f"  the sweep (charts vs batch size): {base}/#/experiments/{experiment_id}/runs/{sweep_run_id}"
                     "/model-metrics?workflowType=machine_learning")
    return lines


# --- the queries: every filter string the harness sends -------------------------

SWEEP_RUNS = "tags.run_kind = 'sweep'"  # the tag sweep_parent_run sets on a sweep's parent run


def children_of(parent_run_id: str) -> str:
    return f"tags.mlflow.parentRunId = '{parent_run_id}'"


def newest_sweep_run(client, experiment: str, sweep_name: Optional[str] = None):
    """The newest sweep parent run in ``experiment`` (named ``sweep_name``, if given); None if there is none."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    # The parent carries its config's name in the tag sweep_name; a parent recorded before the tag existed,
    # as its run name.
    for selection in ([SWEEP_RUNS] if sweep_name is None else
                      [f"{SWEEP_RUNS} and tags.sweep_name = '{sweep_name}'",
                       f"{SWEEP_RUNS} and attributes.run_name = '{sweep_name}'"]):
        runs = client.search_runs([found.experiment_id], selection, order_by=["attributes.start_time DESC"],
                                  max_results=1)
        if runs:
            return runs[0]
    return None


def child_runs(client, parent_run_id: str, experiment_id: Optional[str] = None) -> list:
    """Every child run of ``parent_run_id`` (whose experiment is looked up unless given)."""
    experiment_id = experiment_id or client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id], children_of(parent_run_id), max_results=10000)


def end_running_children(client, parent_run_id: str, status: str, what: str) -> list[str]:
    """End the parent's child runs still RUNNING with ``status`` (see :func:`end_running_runs`)."""
    return end_running_runs(client, lambda: client.get_run(parent_run_id).info.experiment_id,
                            children_of(parent_run_id), status, what, "their trial")


def _experiment_of(client, cfg: Config) -> Optional[str]:
    """The id of ``cfg``'s experiment, None if it does not exist."""
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    return experiment.experiment_id if experiment else None


def end_runs_of_launch(cfg: Config, launch_id: str, status: str) -> list[str]:
    """End the runs of launch ``launch_id`` its stopped workers left RUNNING with ``status``; returns their ids."""
    try:
        client = open_client(cfg.tracking.uri or default_tracking_uri())
    except Exception as err:  # the store is unreachable: report, do not mask why the run ended
        warn(f"[{cfg.name}] could not open the tracking store ({type(err).__name__}: {err})")
        return []
    return end_running_runs(client, lambda: _experiment_of(client, cfg), f"tags.launch_id = '{launch_id}'", status,
                            f"[{cfg.name}] the run of launch {launch_id}", "its workers")


def end_stopped_run(cfg: Config, launch_id: str, tags: dict[str, str]) -> list[str]:
    """Tag the run of launch ``launch_id`` with ``tags`` and end it FINISHED; returns its ids. Best effort.

    For a run a scheduler stopped on purpose (Ray Tune's ASHA). A worker torn down by the stop may have
    ended it FAILED or KILLED first: that is the stop's echo, not the run's outcome, so it is overwritten.
    The tags go first, so a reader that sees it FINISHED sees why.
    """
    try:
        client = open_client(cfg.tracking.uri or default_tracking_uri())
        experiment = _experiment_of(client, cfg)
        runs = client.search_runs([experiment], f"tags.launch_id = '{launch_id}'") if experiment else []
        for run in runs:
            for key, value in tags.items():
                client.set_tag(run.info.run_id, key, value)
            if run.info.status != "FINISHED":
                client.set_terminated(run.info.run_id, status="FINISHED")
    except Exception as err:  # the store is unreachable: say so, the sweep goes on
        warn(f"[{cfg.name}] could not end the run of launch {launch_id} ({type(err).__name__}: {err})")
        return []
    return [run.info.run_id for run in runs]


def end_running_runs(client, experiment_id, selection: str, status: str, what: str, left_by: str) -> list[str]:
    """End the runs matching ``selection`` still RUNNING with ``status``; returns their ids. ``experiment_id``
    (None: nothing to end) queries the store inside the guard: an unreachable store is reported, not raised."""
    try:
        experiment = experiment_id()
        if experiment is None:
            return []
        runs = client.search_runs([experiment], f"{selection} and attributes.status = 'RUNNING'", max_results=10000)
        for run in runs:
            client.set_terminated(run.info.run_id, status=status)
    except Exception as err:
        warn(f"{what}: could not end RUNNING runs ({type(err).__name__}: {err})")
        return []
    for run in runs:
        warn(f"{what}: MLflow run {run.info.run_id} left RUNNING by {left_by} marked {status}")
    return [run.info.run_id for run in runs]


def experiment_id(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id


# --- the spool: records a run could not deliver, and their replay ---------------
# With the server down, the tracker appends each record to a JSON-lines file and trains on; it
# replays the file at the next record and at the run's end, or ``harness replay <spool>`` does later.
# Replay skips every (metric, step) the run already holds, so nothing arrives twice.


class Spool:
    def __init__(self, path: Path):
        self.path = Path(path)

    def __bool__(self) -> bool:
        return self.path.exists() and self.path.stat().st_size > 0

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def records(self) -> Iterator[dict[str, Any]]:
        with open(self.path) as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def logged_steps(client, run_id: str) -> set[tuple[str, int]]:
    """Every (metric, step) the tracking store already holds for ``run_id``."""
    keys = client.get_run(run_id).data.metrics.keys()
    return {(key, m.step) for key in keys for m in client.get_metric_history(run_id, key)}


def now_ms() -> int:
    """A record's timestamp: milliseconds since the epoch, as MLflow keeps them."""
    return int(time.time() * 1000)


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    """Log ``params`` (values as strings) in batches of MLflow's limit."""
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in params.items()]
    for lo in range(0, len(items), MLFLOW_PARAM_BATCH):
        client.log_batch(run_id, params=items[lo:lo + MLFLOW_PARAM_BATCH])


def log_new_metrics(client, run_id: str, metrics: list, logged: set[tuple[str, int]]) -> None:
    """Log the ``Metric``s whose (key, step) is not in ``logged`` yet, in batches, and add them to it."""
    fresh = [m for m in metrics if (m.key, m.step) not in logged]
    for lo in range(0, len(fresh), MLFLOW_METRIC_BATCH):
        client.log_batch(run_id, metrics=fresh[lo:lo + MLFLOW_METRIC_BATCH])
        logged.update((m.key, m.step) for m in fresh[lo:lo + MLFLOW_METRIC_BATCH])


def apply_record(client, record: dict[str, Any], logged: set[tuple[str, int]]) -> None:
    """Deliver one record; metrics already in ``logged`` are skipped, delivered ones added."""
    from mlflow.entities import Metric

    run_id = record["run_id"]
    if record["op"] == "metrics":
        log_new_metrics(client, run_id, [Metric(k, float(v), record["timestamp_ms"], record["step"])
                                         for k, v in record["metrics"].items()], logged)
    elif record["op"] == "history":  # one metric at many steps (evaluations inside a run), in few calls
        log_new_metrics(client, run_id, [Metric(record["key"], float(v), record["timestamp_ms"], int(step))
                                         for step, v in record["points"]], logged)
    elif record["op"] == "tags":
        for key, value in record["tags"].items():
            client.set_tag(run_id, key, value)
    elif record["op"] == "terminate":
        client.set_terminated(run_id, status=record["status"])
    else:
        raise ValueError(f"unknown spool record {record['op']!r}")


RECORD_KEYS = {"metrics": ("run_id", "step", "timestamp_ms", "metrics"), "tags": ("run_id", "tags"),
               "terminate": ("run_id", "status"), "history": ("run_id", "key", "timestamp_ms", "points")}
MLFLOW_METRIC_BATCH = 1000  # MLflow's limit of metrics per log_batch call
MLFLOW_PARAM_BATCH = 100  # and of params


def parse_lines(spool: Spool) -> tuple[list[dict[str, Any]], list[int]]:
    """The well-formed records of a spool and the numbers (1-based) of the lines that are not."""
    records, bad = [], []
    with open(spool.path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                ok = isinstance(record, dict) and all(k in record for k in RECORD_KEYS.get(record.get("op"), ("?",)))
            except (UnicodeDecodeError, json.JSONDecodeError):
                ok = False
            if ok:
                records.append(record)
            else:
                bad.append(number)
    return records, bad


def replay(client, spool: Spool) -> tuple[int, list[int]]:
    """Deliver every well-formed record of a spool; returns (records delivered, numbers of malformed lines).
    Only a spool delivered whole is removed."""
    from mlflow.exceptions import MlflowException

    records, bad = parse_lines(spool)
    logged_by_run: dict[str, set] = {}
    for run_id in dict.fromkeys(record["run_id"] for record in records):  # every run first: all or nothing
        try:
            logged_by_run[run_id] = logged_steps(client, run_id)
        except MlflowException:
            raise InputError(f"{spool.path}: its records are for MLflow run {run_id}, which this tracking store "
                             "does not hold; expected --tracking-uri of the store the run wrote to (nothing was "
                             "delivered)") from None
    for record in records:
        apply_record(client, record, logged_by_run[record["run_id"]])
    if not bad:
        spool.remove()
    return len(records), bad


def record_finished_run(uri: str, experiment: str, run_name: str, tags: dict[str, str], params: dict[str, Any],
                        metrics: list[tuple[str, float, int]], files: list[Path], artifact_folder: str) -> str:
    """A run of its own for results computed before it (harness interpolate, harness capacity), created,
    filled and ended FINISHED in one go (FAILED/KILLED if interrupted, never left RUNNING); returns its id."""
    from mlflow.entities import Metric

    from harness import signals

    client = open_client(uri)
    with signals.deferred():  # a signal must not cut the creation in half
        run_id = client.create_run(experiment_id(client, experiment), run_name=run_name, tags=tags).info.run_id
    try:
        log_params(client, run_id, params)
        timestamp_ms = now_ms()
        log_new_metrics(client, run_id, [Metric(key, value, timestamp_ms, step) for key, value, step in metrics], set())
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path=artifact_folder)
        client.set_terminated(run_id, status="FINISHED")
    except BaseException as err:
        # As in train_loop.train: a second signal while ending must still end the run.
        try:
            client.set_terminated(run_id, status=signals.end_status(err))
        except signals.Terminated:
            client.set_terminated(run_id, status="KILLED")
            raise
        raise
    return run_id

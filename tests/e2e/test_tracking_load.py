"""Many processes writing to one MLflow store at once: the server over PostgreSQL keeps every
(run, metric, step) exactly once; the same writers on a shared SQLite file show what SQLite does.

The writers, all real processes started together: one torchrun job (launch/train.py; one rank: only
rank 0 writes, so further ranks add start-up, not writes) and
PLAIN_WRITERS processes logging through the harness's tracker (tests/e2e/tracking_writer.py
forks them), which wait at a gate until all of them are ready, so that they write at the same
time as the training run. (A local sweep as a further writer tripled the test's
time: its report and plots; its trials log through the same tracker.) Also here:
what ``harness mlflow-server --backend postgresql`` promises about its listeners,
its password and its stopping.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, REPO, free_port, run_command, seeded_store, stop_server

# One worker holds the module's server (a second would start another PostgreSQL).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("pg-server")]

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
PLAIN_WRITERS = 7
SQLITE_WRITERS = 3  # SQLite's file lock serialises every writer: fewer show the same
PLAIN_STEPS, PLAIN_KEYS = 30, 4
TRAIN_EPOCHS = 4
EPOCH_KEYS = ("train_loss", "test_accuracy", "epoch_s")



def wait_for(condition, what, timeout=180):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except OSError:
        return False


class PgServer:
    """``harness mlflow-server --backend postgresql`` in a folder the postgres user can reach
    (pytest's own temp folder is mode 700, and PostgreSQL refuses to run as root)."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="harness-pg-", dir="/tmp"))
        self.root.chmod(0o755)
        self.store = self.root / "store"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None
        self.log = self.root / "server.log"

    def start(self):
        with open(self.log, "a") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "harness.cli", "mlflow-server", "--backend",
                                             "postgresql", "--port", str(self.port), "--store-dir", str(self.store)],
                                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: answers(self.uri + "/health") or self.process.poll() is not None, "the server", 180)
        assert self.process.poll() is None, self.log.read_text()[-3000:]

    @property
    def cluster(self) -> Path:
        return self.store / "mlflow-pg"

    def postmaster_pid(self):
        pid_file = self.cluster / "db" / "postmaster.pid"
        return int(pid_file.read_text().split()[0]) if pid_file.exists() else None

    def pg_port(self) -> int:
        return int((self.cluster / "db" / "postmaster.pid").read_text().splitlines()[3])

    def stop(self):
        stop_server(self.process, timeout=90)


@pytest.fixture(scope="module")
def pg_server():
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()
        postmaster = server.postmaster_pid()
        if postmaster and psutil.pid_exists(postmaster):  # only if the server failed to stop it
            subprocess.run(["runuser", "-u", "postgres", "--", "kill", "-TERM", str(postmaster)] if os.geteuid() == 0
                           else ["kill", "-TERM", str(postmaster)])
        shutil.rmtree(server.root, ignore_errors=True)


def process_tree(pid: int) -> list:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def test_postgresql_server_listens_on_loopback_only_and_keeps_its_password_out_of_argv_and_env(pg_server):
    processes = process_tree(pg_server.process.pid) + process_tree(pg_server.postmaster_pid())
    names = {p.name() for p in processes}
    assert "postgres" in names and any("mlflow" in " ".join(p.cmdline()) for p in processes), names
    password = (pg_server.cluster / "password").read_text().strip()
    assert len(password) >= 32
    listening = set()
    for process in processes:
        try:  # a PostgreSQL backend may end while we look: only the living ones count
            listening |= {c.laddr.ip for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
            seen = " ".join(process.cmdline()) + " ".join(f"{k}={v}" for k, v in process.environ().items())
        except psutil.NoSuchProcess:
            continue
        assert password not in seen, process
    assert listening and listening <= set(LOOPBACK), listening
    for secret in ("password", "pgpass"):
        assert (pg_server.cluster / secret).stat().st_mode & 0o077 == 0, secret
    assert (pg_server.cluster / "db" / "pg_hba.conf").read_text().count("scram-sha-256") >= 3


def test_wrong_postgresql_password_is_refused_before_training(pg_server, tmp_path):
    uri = f"postgresql://mlflow:not-the-password-42@127.0.0.1:{pg_server.pg_port()}/mlflow"
    result = run_command([sys.executable, str(REPO / "launch/train.py"), "--config", str(CONFIGS / "smoke.yaml"),
                          "--set", f"tracking.uri={uri}", "--set", f"checkpoint.dir={tmp_path}/ckpt"], cwd=tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert line.startswith(f"error: tracking.uri: database postgresql://mlflow:***@127.0.0.1:{pg_server.pg_port()}"
                           "/mlflow is unreachable or refused the login"), line
    assert 'password authentication failed for user "mlflow"' in line and "not-the-password-42" not in line
    assert not (tmp_path / "ckpt").exists()


# --- the load ---------------------------------------------------------------------


def start_writers(uri: str, folder: Path, writers: int) -> tuple[list, Path]:
    """Every writer, started at once; the plain writers' output paths. The gate opens when they are ready."""
    folder.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    common = dict(cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    processes = [
        subprocess.Popen(["torchrun", "--standalone", "--nproc_per_node=1", str(REPO / "launch/train.py"),
                          "--config", str(CONFIGS / "smoke.yaml"), "--set", f"tracking.uri={uri}",
                          "--set", f"train.epochs={TRAIN_EPOCHS}", "--set", f"checkpoint.dir={folder}/ckpt"], **common),
    ]
    gate = folder / "gate"
    processes.append(subprocess.Popen([sys.executable, str(REPO / "tests/e2e/tracking_writer.py"), uri, str(writers),
                                       str(PLAIN_STEPS), str(PLAIN_KEYS), str(gate), str(folder)], **common))
    return processes, gate


def run_writers(uri: str, folder: Path, writers: int = PLAIN_WRITERS) -> dict:
    """Run the writers to their end; what they reported (plain writers), their stderr, the throughput."""
    started = time.monotonic()
    processes, gate = start_writers(uri, folder, writers)
    try:
        # The gate opens when every plain writer has its run and the training run exists too,
        # so that all of them write at once.
        wait_for(lambda: (len(list(folder.glob("writer*.ready"))) == writers and training_started(uri))
                 or any(p.poll() not in (None, 0) for p in processes), "the writers at the gate", 300)
        gate.touch()
        ready_s = time.monotonic() - started
        outputs = [p.communicate(timeout=600) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    reports = [json.loads((folder / f"writer{i}.json").read_text()) for i in range(writers)
               if (folder / f"writer{i}.json").exists()]
    span = (max(r["end"] for r in reports) - min(r["begin"] for r in reports)) if reports else float("nan")
    return {"codes": [p.returncode for p in processes], "stderr": [err for _, err in outputs], "reports": reports,
            "points_per_s": sum(r["points"] for r in reports) / span if reports else 0.0, "span_s": span,
            "ready_s": ready_s, "total_s": time.monotonic() - started, "writers": writers}


def training_started(uri: str) -> bool:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("smoke")
    return experiment is not None and bool(client.search_runs([experiment.experiment_id]))


def duplicates_and_histories(client: MlflowClient) -> tuple[dict, list]:
    """{(run name, key): [steps]} of every metric of every run in the store, and the (run, key, step) seen twice."""
    histories, twice = {}, []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            for key in run.data.metrics:
                steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
                histories[(run.info.run_name, key)] = sorted(steps)
                twice += [(run.info.run_name, key, s) for s in set(steps) if steps.count(s) > 1]
    return histories, twice


def assert_every_step_once(uri: str, outcome: dict) -> None:
    client = MlflowClient(tracking_uri=uri)
    histories, twice = duplicates_and_histories(client)
    assert twice == [], f"logged twice: {twice[:10]}"
    for index in range(outcome["writers"]):
        for key in range(PLAIN_KEYS):
            assert histories.get((f"writer{index}", f"load_{key}")) == list(range(1, PLAIN_STEPS + 1)), (index, key)
    trained = {name for name, key in histories if key == "test_accuracy"}
    run_name = f"smoke epochs={TRAIN_EPOCHS}"  # the config's name and what its --set changed
    assert trained == {run_name}, trained
    for key in EPOCH_KEYS:
        assert histories[(run_name, key)] == list(range(1, TRAIN_EPOCHS + 1)), key
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            assert run.info.status == "FINISHED", run.info.run_name


def show(capsys, label: str, outcome: dict) -> None:
    """The throughput and what went wrong, on the terminal (measured, not asserted)."""
    from harness.console import say

    spooled = sum(err.count("spooling to") for err in outcome["stderr"])
    locked = sum(err.count("database is locked") for err in outcome["stderr"])
    with capsys.disabled():
        say(f"\n[load] {label}: {outcome['writers']} plain writers logged {outcome['writers'] * PLAIN_STEPS * PLAIN_KEYS} "
            f"points in {outcome['span_s']:.1f} s ({outcome['points_per_s']:.0f} points/s, "
            f"{outcome['points_per_s'] / PLAIN_KEYS:.0f} log calls/s, beside a torchrun run); start-up "
            f"{outcome['ready_s']:.1f} s, all done after {outcome['total_s']:.1f} s; exit codes {outcome['codes']}; "
            f"'spooling' warnings {spooled}; 'database is locked' {locked}")


def test_postgresql_server_keeps_every_step_of_concurrent_writers_once(pg_server, tmp_path, capsys):
    outcome = run_writers(pg_server.uri, tmp_path / "writers")
    show(capsys, "server over PostgreSQL", outcome)
    assert outcome["codes"] == [0, 0], [err[-1500:] for err in outcome["stderr"]]
    assert not any("spooling to" in err for err in outcome["stderr"]), "a write was refused and spooled"
    assert_every_step_once(pg_server.uri, outcome)


def test_sqlite_file_shared_by_concurrent_writers(tmp_path, capsys):
    """A sqlite:/// file that every process opens itself (what a shared folder across nodes would be)."""
    uri = seeded_store(tmp_path / "store")
    outcome = run_writers(uri, tmp_path / "writers", SQLITE_WRITERS)
    show(capsys, "shared SQLite file", outcome)
    assert outcome["codes"] == [0, 0], [err[-1500:] for err in outcome["stderr"]]
    assert_every_step_once(uri, outcome)


def assert_all_stopped(pg_server, tree, postmaster) -> None:
    assert all(has_exited(p.pid) for p in tree)  # mlflow and its uvicorn worker
    assert not (pg_server.cluster / "db" / "postmaster.pid").exists()  # pg_ctl -w stop saw it shut down
    # The postmaster removes that file just before it exits; then init reaps it.
    wait_for(lambda: has_exited(postmaster), "the postmaster to exit", 60)


def test_stopping_by_pid_or_losing_mlflow_stops_postgresql_and_a_restart_keeps_the_records(pg_server):
    client = MlflowClient(tracking_uri=pg_server.uri)
    kept = client.create_experiment("kept across restarts")
    password = (pg_server.cluster / "password").read_text()
    postmaster, tree = pg_server.postmaster_pid(), process_tree(pg_server.process.pid)
    assert postmaster and len(tree) >= 3  # this process, mlflow, uvicorn
    os.kill(pg_server.process.pid, signal.SIGTERM)
    assert pg_server.process.wait(timeout=90) == 0
    assert_all_stopped(pg_server, tree, postmaster)

    pg_server.start()  # the same folder: the cluster is reused, not made again
    assert (pg_server.cluster / "password").read_text() == password
    assert MlflowClient(tracking_uri=pg_server.uri).get_experiment_by_name("kept across restarts").experiment_id == kept
    postmaster, tree = pg_server.postmaster_pid(), process_tree(pg_server.process.pid)
    mlflow = psutil.Process(pg_server.process.pid).children()[0]
    mlflow.kill()  # mlflow dies: the server command stops PostgreSQL and says so
    assert pg_server.process.wait(timeout=90) == 1
    assert "mlflow server exited with code -9; stopping PostgreSQL" in pg_server.log.read_text()
    assert_all_stopped(pg_server, tree, postmaster)


def has_exited(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def server_command(port: int, store: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "harness.cli", "mlflow-server", "--backend", "postgresql", "--port", str(port),
            "--store-dir", str(store), *extra]


def serving(pg_server) -> PgServer:
    """The module's server, started again if an earlier test stopped it."""
    if pg_server.process.poll() is not None:
        pg_server.start()
    return pg_server


def test_a_second_server_over_a_served_store_is_refused_in_one_line_and_stops_nothing(pg_server):
    server = serving(pg_server)
    postmaster = server.postmaster_pid()
    second = run_command(server_command(free_port(), server.store), cwd=REPO, timeout=120)
    assert second.returncode == 2, second.stderr[-3000:]
    assert second.stderr.strip().splitlines() == [
        f"error: --store-dir: {server.store} is served by another harness mlflow-server "
        f"({(server.store / 'mlflow-server.lock').read_text().strip()}); expected one server per store: stop that "
        "one first"]
    assert server.postmaster_pid() == postmaster and psutil.pid_exists(postmaster)
    assert MlflowClient(tracking_uri=server.uri).create_experiment("still answering")


def test_a_server_killed_by_sigkill_leaves_a_postgresql_that_the_next_start_stops_and_replaces(pg_server):
    server = serving(pg_server)
    kept = MlflowClient(tracking_uri=server.uri).create_experiment("kept across a sigkill")
    postmaster = server.postmaster_pid()
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    # Its mlflow gets SIGTERM from the kernel (PDEATHSIG) and stops; its PostgreSQL is nobody's child.
    wait_for(lambda: not answers(server.uri + "/health"), "the killed server's mlflow to stop", 60)
    assert psutil.pid_exists(postmaster)
    server.start()
    assert "that a killed harness mlflow-server left running" in server.log.read_text()
    assert server.postmaster_pid() != postmaster and has_exited(postmaster)
    assert MlflowClient(tracking_uri=server.uri).get_experiment_by_name("kept across a sigkill").experiment_id == kept


def test_sigterm_while_the_server_starts_stops_what_it_started_and_exits_as_when_up(tmp_path):
    other = PgServer()
    try:
        process = subprocess.Popen(server_command(other.port, other.store), cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: (other.cluster / "db" / "postmaster.pid").exists() or process.poll() is not None,
                 "PostgreSQL to start", 120)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 0
        data = str(other.cluster / "db")
        left = [p for p in psutil.process_iter(["cmdline"]) if data in " ".join(p.info["cmdline"] or [])]
        assert not left, left
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(other.root, ignore_errors=True)


def test_the_same_port_for_postgresql_and_the_ui_is_refused_in_one_line(tmp_path):
    port = free_port()
    result = run_command(server_command(port, tmp_path / "store", "--pg-port", str(port)), cwd=REPO, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --pg-port: {port} is --port too; expected two different ports (the MLflow UI listens on one, "
        "PostgreSQL on the other)"]
    assert not (tmp_path / "store").exists()

"""A real MLflow tracking server that goes away: nothing is lost, nothing is doubled.
Also: the harness's own servers and ranks listen on loopback only."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, REPO, free_port, run_command, seeded_store, stop_server

pytestmark = pytest.mark.slow

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")



def listening_addresses(pid: int, include_root: bool = True) -> set[str]:
    """Addresses that ``pid``'s process tree listens on (its children only, without the root)."""
    found = set()
    try:
        root = psutil.Process(pid)
        for proc in ([root] if include_root else []) + root.children(recursive=True):
            try:
                found |= {c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
            except psutil.NoSuchProcess:
                continue
    except psutil.NoSuchProcess:
        pass
    return found


class MlflowServer:
    """``harness mlflow-server`` on a free port; stopped and started again by its PID."""

    def __init__(self, store_dir):
        seeded_store(store_dir)
        self.store_dir, self.port, self.process = store_dir, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self):
        self.process = subprocess.Popen([sys.executable, "-m", "harness.cli", "mlflow-server", "--port", str(self.port),
                                         "--store-dir", str(self.store_dir)], cwd=REPO, start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2)
                return
            except OSError:
                assert self.process.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)

    def stop(self):
        stop_server(self.process, timeout=30)


@pytest.fixture(scope="module")
def module_server(tmp_path_factory):
    """One server for this module's tests (a start is seconds of imports): each test records to an experiment
    of its own."""
    server = MlflowServer(tmp_path_factory.mktemp("server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mlflow_server(module_server):
    """The module's server, running (a test that stopped it and failed before starting it again left it down)."""
    if module_server.process.poll() is not None:
        module_server.start()
    return module_server


def test_mlflow_server_listens_on_loopback_only(mlflow_server):
    addresses = listening_addresses(mlflow_server.process.pid)
    assert addresses and addresses <= set(LOOPBACK), addresses


def test_torchrun_ranks_listen_on_loopback_only(tmp_path):
    """The ranks (the harness's code: gloo, the per-attempt store client) bind 127.0.0.1.
    torchrun's own agent (the root, left out here) keeps its rendezvous TCPStore on
    all interfaces for the whole run; PyTorch offers no bind address for it (see README)."""
    process = subprocess.Popen([str(REPO / ".venv/bin/torchrun"), "--standalone", "--nproc_per_node=2",
                                str(REPO / "launch/train.py"), "--config", str(CONFIGS / "smoke.yaml"),
                                "--set", "tracking.enabled=false", "--set", "train.epochs=25",
                                "--set", f"checkpoint.dir={tmp_path}"],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = set()
    while process.poll() is None:
        seen |= listening_addresses(process.pid, include_root=False)
        time.sleep(0.3)
    assert process.returncode == 0
    assert seen and seen <= set(LOOPBACK), seen


def start_training(tmp_path, uri, epochs):
    """A smoke run recording to the experiment named after the test's folder."""
    return subprocess.Popen([sys.executable, str(REPO / "launch/train.py"), "--config", str(CONFIGS / "smoke.yaml"),
                             "--set", f"tracking.uri={uri}", "--set", f"checkpoint.dir={tmp_path}/ckpt",
                             "--set", f"train.epochs={epochs}", "--set", f"tracking.experiment={tmp_path.name}"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class paused:
    """SIGSTOP the training process while the server stops or starts (seconds, where an
    epoch takes a fraction of one), so the outage happens mid-run whatever the speed."""

    def __init__(self, process):
        self.process = process

    def __enter__(self):
        os.kill(self.process.pid, signal.SIGSTOP)

    def __exit__(self, *exc):
        os.kill(self.process.pid, signal.SIGCONT)


def wait_for(condition, what, timeout=180):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def the_run(uri, experiment_name):
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return client, runs


def assert_every_epoch_once(client, run_id, epochs):
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "test_accuracy", "epoch_s"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(1, epochs + 1)), key


def test_server_restart_mid_run_loses_and_doubles_nothing(tmp_path, mlflow_server):
    epochs = 30
    spool = tmp_path / "ckpt" / "smoke" / "mlflow-spool.jsonl"
    training = start_training(tmp_path, mlflow_server.uri, epochs)
    wait_for(lambda: (runs := the_run(mlflow_server.uri, tmp_path.name)[1])
             and "test_accuracy" in runs[0].data.metrics, "the first epoch's metrics")
    with paused(training):
        mlflow_server.stop()
    wait_for(lambda: spool.exists() and len(spool.read_text().splitlines()) >= 3, "records spooled while down")
    with paused(training):
        assert training.poll() is None, "training must go on while the server is down"
        mlflow_server.start()
    out, err = training.communicate(timeout=300)
    assert training.returncode == 0, err[-3000:]
    assert "spooling to" in err and "spooled records delivered" in err
    client, runs = the_run(mlflow_server.uri, tmp_path.name)
    assert len(runs) == 1
    assert_every_epoch_once(client, runs[0].info.run_id, epochs)
    assert not spool.exists()


def test_server_that_never_returns_leaves_a_spool_to_replay(tmp_path, mlflow_server):
    epochs = 12
    training = start_training(tmp_path, mlflow_server.uri, epochs)
    wait_for(lambda: (runs := the_run(mlflow_server.uri, tmp_path.name)[1])
             and "test_accuracy" in runs[0].data.metrics, "the first epoch's metrics")
    with paused(training):
        mlflow_server.stop()
    out, err = training.communicate(timeout=300)
    assert training.returncode == 0, err[-3000:]
    spool = tmp_path / "ckpt" / "smoke" / "mlflow-spool.jsonl"
    assert f"harness replay {spool}" in err and spool.exists()
    mlflow_server.start()
    result = run_command([sys.executable, "-m", "harness.cli", "replay", str(spool), "--tracking-uri", mlflow_server.uri],
                         cwd=REPO)
    assert result.returncode == 0, result.stderr
    client, runs = the_run(mlflow_server.uri, tmp_path.name)
    assert_every_epoch_once(client, runs[0].info.run_id, epochs)
    assert not spool.exists()


def test_unreachable_server_at_start_is_refused_before_training(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    result = run_command([sys.executable, str(REPO / "launch/train.py"), "--config", str(CONFIGS / "smoke.yaml"),
                          "--set", f"tracking.uri={uri}", "--set", f"checkpoint.dir={tmp_path}/ckpt"], cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: tracking.uri: MLflow server {uri} is unreachable")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ckpt").exists()


def test_unreachable_postgresql_at_start_is_refused_before_training(tmp_path):
    uri = f"postgresql://mlflow:hunter2-secret@127.0.0.1:{free_port()}/mlflow"
    result = run_command([sys.executable, str(REPO / "launch/train.py"), "--config", str(CONFIGS / "smoke.yaml"),
                          "--set", f"tracking.uri={uri}", "--set", f"checkpoint.dir={tmp_path}/ckpt"], cwd=tmp_path)
    assert result.returncode == 2
    masked = uri.replace("hunter2-secret", "***")
    assert result.stderr.strip().startswith(f"error: tracking.uri: database {masked} is unreachable"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "hunter2" not in result.stderr
    assert not (tmp_path / "ckpt").exists()

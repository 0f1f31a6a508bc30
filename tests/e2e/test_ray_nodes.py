"""Two Ray nodes on one machine: storage and records every node reaches, workers on both, a node lost mid-run.

The cluster is the session's head node (conftest.ray_cluster) plus a second node of
one CPU that joins it for this module (``ray start --address ... --block``, its own
temp dir and ports) and leaves after it: a second cluster would cost another ~2 GB
and two clusters on one host have confused Ray Train before (docs/cluster.md). The
records go to a real MLflow tracking server (``harness mlflow-server``, http), the
checkpoints to a folder both nodes see (one machine), said with ``--shared-storage``.
"""

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, REPO, free_ports, seeded_store
from harness.core.config import load_config
from harness.errors import InputError
from harness.launching.ray_cluster import ClusterNode, check_cluster, check_storage_path
from test_launchers import EPOCHS, RAY_JOB, assert_each_metric_logged_once_per_epoch
from test_tracking_server import MlflowServer

SMOKE = str(CONFIGS / "smoke.yaml")
HEAD, SECOND = ClusterNode("head-id", "10.0.0.1"), ClusterNode("second-id", "10.0.0.2")


def smoke(*overrides):
    return load_config(SMOKE, list(overrides))


# --- refusals that need no cluster ------------------------------------------------------


def _load_launcher(name):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("launcher", ["ray_job", "sweep"])
def test_storage_path_in_a_missing_folder_is_refused_before_ray_starts(launcher, tmp_path, monkeypatch, capsys):
    """A typo, or a shared file system that is not mounted: Ray would make the folders locally."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    missing = tmp_path / "not-mounted" / "ray"
    config = SMOKE if launcher == "ray_job" else str(CONFIGS / "sweep.yaml")
    extra = [] if launcher == "ray_job" else ["--launcher", "ray", "--report-dir", str(tmp_path / "reports")]
    store = seeded_store(tmp_path)
    capsys.readouterr()  # the store's making may log (the session's first); only the launcher's lines count
    status = _load_launcher(launcher).main(["--config", config, *extra, "--storage-path", str(missing),
                                            "--set", f"tracking.uri={store}",
                                            "--set", f"checkpoint.dir={tmp_path}/ckpt"])
    assert status == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --storage-path: {missing}: folder {missing.parent} does not exist; expected an existing folder, "
        "or a new one in an existing folder (on a cluster: a shared file system mounted on every node, or a URI "
        "such as s3://bucket/path)"]
    assert not missing.parent.exists() and not (tmp_path / "ckpt").exists()
    # The seeded store (and the lock preflight takes on it) only, with no run in it.
    assert {p.name for p in tmp_path.iterdir()} <= {"mlflow.db", "mlflow.db.lock"}
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_storage_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "ray").write_text("")
    with pytest.raises(InputError, match=r"--storage-path: .*/ray is a file; expected a folder"):
        check_storage_path(str(tmp_path / "ray"))


def test_storage_uris_and_new_folders_in_existing_ones_pass(tmp_path):
    for path in ("s3://bucket/runs", "gs://bucket/runs", str(tmp_path / "new"), f"file://{tmp_path}/new"):
        check_storage_path(path)
    assert not (tmp_path / "new").exists()  # checked, not made


def test_one_node_takes_local_storage_and_sqlite():
    check_cluster(smoke("tracking.uri=sqlite:////tmp/mlflow.db"), "/tmp/ray", False, 2, "PACK", [HEAD])


def test_local_storage_on_two_nodes_is_refused_unless_said_to_be_shared():
    cfg = smoke("tracking.uri=http://10.0.0.1:5000")
    with pytest.raises(InputError, match=r"^--storage-path: /tmp/ray is a folder on this machine, but the Ray "
                                         r"cluster has 2 nodes.*said with --shared-storage$"):
        check_cluster(cfg, "/tmp/ray", False, 2, "PACK", [HEAD, SECOND])
    check_cluster(cfg, "/tmp/ray", True, 2, "PACK", [HEAD, SECOND])
    check_cluster(cfg, "s3://bucket/runs", False, 2, "PACK", [HEAD, SECOND])


@pytest.mark.parametrize("uri", ["sqlite:////shared/mlflow.db", "file:///shared/mlruns"])
def test_a_tracking_file_on_two_nodes_is_refused_even_on_shared_storage(uri):
    with pytest.raises(InputError, match=r"^tracking.uri: .* is a file on this machine, but the Ray cluster has 2 "
                                         r"nodes.*expected an MLflow server every node reaches"):
        check_cluster(smoke(f"tracking.uri={uri}"), "/shared/ray", True, 2, "PACK", [HEAD, SECOND])
    check_cluster(smoke(f"tracking.uri={uri}", "tracking.enabled=false"), "/shared/ray", True, 2, "PACK",
                  [HEAD, SECOND])


def test_a_loopback_tracking_server_is_refused_when_the_nodes_are_on_several_machines():
    cfg = smoke("tracking.uri=http://127.0.0.1:5000")
    with pytest.raises(InputError, match=r"^tracking.uri: http://127.0.0.1:5000 is loopback"):
        check_cluster(cfg, "/shared/ray", True, 2, "PACK", [HEAD, SECOND])
    # Two nodes on one machine (this module's cluster): loopback reaches the server from both.
    check_cluster(cfg, "/shared/ray", True, 2, "PACK", [HEAD, ClusterNode("second-id", HEAD.address)])


def test_strict_spread_needs_a_node_per_worker():
    cfg = smoke("tracking.uri=http://10.0.0.1:5000")
    with pytest.raises(InputError, match=r"^--placement-strategy STRICT_SPREAD: 3 workers need 3 nodes \(one worker "
                                         r"per node\), but the Ray cluster has 2 alive node\(s\); expected "
                                         r"--num-workers at most 2"):
        check_cluster(cfg, "/shared/ray", True, 3, "STRICT_SPREAD", [HEAD, SECOND])
    check_cluster(cfg, "/shared/ray", True, 2, "STRICT_SPREAD", [HEAD, SECOND])
    check_cluster(cfg, "/shared/ray", True, 3, "SPREAD", [HEAD, SECOND])


# --- a real second node ---------------------------------------------------------------------


class SecondNode:
    """``ray start --address <head> --block`` with one CPU, its own temp dir and free ports; stopped by its PID."""

    def __init__(self, ray_cluster, log_dir: Path):
        self.cluster, self.log_dir = ray_cluster, log_dir
        # Ray's unix sockets live under --temp-dir, whose path must stay short.
        self.temp_dir = tempfile.mkdtemp(prefix="ray-node2-", dir="/tmp")
        self.process = None

    def start(self):
        flags = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
        # Both nodes' workers would otherwise take ports from the same default range (10002-19999).
        free = free_ports(len(flags) + 16)
        ports, worker_ports = dict(zip(flags, free)), ",".join(map(str, free[len(flags):]))
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
               **self.cluster["env"], "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
               "RAY_API_SERVER_ADDRESS": self.cluster["dashboard"]}  # as the head's (conftest.ray_cluster)
        self.log = open(self.log_dir / "node2.log", "a")
        self.process = subprocess.Popen(
            ["ray", "start", "--address", self.cluster["address"], "--block", "--num-cpus=1",
             "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
             f"--worker-port-list={worker_ports}", *(f"--{flag}={port}" for flag, port in ports.items())],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        # `ray start` says this once the GCS lists the node (it waits for the node's registration).
        deadline = time.monotonic() + 60
        while "Ray runtime started" not in (self.log_dir / "node2.log").read_text():
            assert self.process.poll() is None and time.monotonic() < deadline, (self.log_dir / "node2.log").read_text()
            time.sleep(0.5)

    def raylet(self):
        """The node's raylet process (None while it is not up)."""
        try:
            return next((p for p in psutil.Process(self.process.pid).children(recursive=True) if p.name() == "raylet"),
                        None)
        except psutil.NoSuchProcess:
            return None

    def stop(self):
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            try:  # whatever of the node outlived `ray start` (its own session, by PID)
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # made by __init__; the node's own logs are in it


@pytest.fixture(scope="module")
def two_nodes(ray_cluster, tmp_path_factory):
    """The session's head plus a second node, and an MLflow tracking server both reach; both gone afterwards."""
    tmp = tmp_path_factory.mktemp("two-nodes")
    node, server = SecondNode(ray_cluster, tmp), MlflowServer(tmp / "mlflow")
    try:
        node.start()
        server.start()
        yield {"node": node, "tracking_uri": server.uri, "tmp": tmp, **ray_cluster}
    finally:
        server.stop()
        node.stop()


def ray_job_args(tmp: Path, tracking_uri: str, *extra: str) -> list[str]:
    return [sys.executable, RAY_JOB, "--config", SMOKE, "--num-workers", "2", "--storage-path", str(tmp / "ray"),
            "--set", f"tracking.uri={tracking_uri}", "--set", f"checkpoint.dir={tmp}/ckpt",
            "--set", f"train.epochs={EPOCHS}", "--set", f"tracking.experiment={tmp.name}", *extra]


def cluster_env(two_nodes, **extra) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": two_nodes["address"], **two_nodes["env"], **extra}


@pytest.mark.slow
def test_two_node_cluster_refuses_a_local_storage_path_before_anything_starts(two_nodes, tmp_path):
    """Refused once the launcher has joined the cluster and counted its nodes. One launcher only (its
    start-up is ~10 s of imports): launch/sweep.py --launcher ray goes through the same start_ray
    (test_storage_path_in_a_missing_folder_...[sweep]), and the SQLite refusal is the same check's
    (test_a_tracking_file_on_two_nodes_...)."""
    result = subprocess.run(ray_job_args(tmp_path, two_nodes["tracking_uri"]), cwd=tmp_path, capture_output=True,
                            text=True, timeout=180, env=cluster_env(two_nodes))
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (f"error: --storage-path: {tmp_path / 'ray'} is a folder on this machine, but the Ray cluster "
                         "has 2 nodes, whose workers would each write their own; expected a URI every node reaches "
                         "(s3://..., gs://...), or a folder on a file system shared by every node at the same path, "
                         "said with --shared-storage"), lines
    # Above it only ray.init's own two lines (connecting, connected): joining is how the nodes are counted.
    assert [line for line in lines[:-1] if "Connect" not in line] == [], lines
    assert not (tmp_path / "ray").exists() and not (tmp_path / "ckpt").exists()
    assert MlflowClient(two_nodes["tracking_uri"]).get_experiment_by_name(tmp_path.name) is None


@pytest.mark.slow
def test_run_spread_over_two_nodes_loses_one_and_finishes_on_the_other_in_one_mlflow_run(two_nodes, tmp_path):
    """Rank 0 holds in epoch 2 (after epoch 1's checkpoint); the second node's raylet is SIGKILLed;
    Ray Train restarts both workers on the head (SPREAD allows that) from the checkpoint."""
    held = tmp_path / "held"
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(ray_job_args(tmp_path, two_nodes["tracking_uri"], "--shared-storage",
                                           "--placement-strategy", "SPREAD", "--max-failures", "1"),
                              cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env=cluster_env(two_nodes, HARNESS_INJECT_HOLD=f"step:2:0:{held}"))
    client = MlflowClient(two_nodes["tracking_uri"])
    try:
        deadline = time.monotonic() + 300
        while not held.exists():
            assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "driver.log").read_text()[-4000:]
            time.sleep(0.2)
        (before,) = client.search_runs([client.get_experiment_by_name(tmp_path.name).experiment_id])
        placed = before.data.tags["ray_worker_nodes"].split(",")
        assert len(placed) == 2 and len(set(placed)) == 2, placed  # one worker on each node
        raylet = two_nodes["node"].raylet()
        assert raylet is not None, "the second node has no raylet to kill"
        raylet.kill()  # SIGKILL
        assert driver.wait(timeout=300) == 0, (tmp_path / "driver.log").read_text()[-4000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        log.close()
    (run,) = client.search_runs([client.get_experiment_by_name(tmp_path.name).experiment_id])
    assert run.data.tags.get("resumed") == "true"
    after = run.data.tags["ray_worker_nodes"].split(",")
    assert len(set(after)) == 1 and after[0] in placed, (placed, after)  # both on the node that remained
    assert_each_metric_logged_once_per_epoch(client, run)
    assert not list((tmp_path / "ckpt" / "smoke").glob(".epoch-*")), "a half-written checkpoint was left"

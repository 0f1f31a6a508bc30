"""Fixtures and helpers shared by tests/unit and tests/e2e: the repo's paths, the real data set,
temporary MLflow stores, commands with the venv on PATH, and the session's Ray cluster (e2e only,
kept here with the rule that sends every test on it to one pytest-xdist worker)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# One intra-op thread per process, set before torch is imported here, in the pytest-xdist
# workers and (inherited) in every process a test starts. `make test` runs three workers
# on two cores, and their launchers start more processes: torch's default of one thread
# per core then makes the threads of different processes spin and wait on each other,
# many times over the work itself (a smoke run's Hessian most of all). The tiny models
# gain nothing from threads; torchrun and Ray already give each rank one. Set
# OMP_NUM_THREADS to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from harness.core.config import load_config  # noqa: E402
from harness.core.graph_step import GraphStep  # noqa: E402
from harness.core.train_loop import RunHooks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _read_each_idx_file_once() -> None:
    """In the pytest processes, an IDX file is decompressed once per content, not at every load_dataset:
    the in-process tests read the real Fashion-MNIST files hundreds of times (about 0.5 s each). Keyed by
    the file's path, size and modification time, so a test's damaged copy is read afresh; the processes
    a test starts read the files themselves."""
    from harness.core import data

    read = data.read_idx
    arrays: dict = {}

    def read_idx(path, expect_ndim=None):
        try:
            stat = os.stat(path)
        except (OSError, TypeError):
            return read(path, expect_ndim)
        key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, expect_ndim)
        if key not in arrays:
            arrays[key] = read(path, expect_ndim)
            arrays[key].flags.writeable = False  # the cached copy: no caller may change it
        return arrays[key].copy()  # a copy (milliseconds) for a caller that wraps it in a tensor

    data.read_idx = read_idx


_read_each_idx_file_once()


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"Fashion-MNIST files missing in {FASHION_DIR}: run `make data`")
    return FASHION_DIR


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A fresh working directory: checkpoints and the default mlflow.db land here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


_STORE_TEMPLATE: list[Path] = []


def trial_runs(client, experiment_ids: list, parent_run_id: str) -> list:
    """The child runs of a sweep's parent that are its trials: the report's interpolation run, also a child,
    left out."""
    children = client.search_runs(experiment_ids, f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return [run for run in children if run.data.tags.get("run_kind") != "interpolation"]


def seeded_store(directory: Path) -> str:
    """A private sqlite MLflow store in ``directory``, copied from one made once per session.

    Creating a store runs MLflow's schema migrations (about 3 s); a copy of a
    migrated, empty store is the same store for every test, in milliseconds.
    """
    import shutil
    import tempfile

    if not _STORE_TEMPLATE:
        from mlflow.tracking import MlflowClient

        template = Path(tempfile.mkdtemp(prefix="mlflow-template-")) / "mlflow.db"
        MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
        _STORE_TEMPLATE.append(template)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "mlflow.db"
    if not target.exists():
        shutil.copy(_STORE_TEMPLATE[0], target)
    return f"sqlite:///{target}"


def smoke_config(tmp_path: Path, *overrides: str):
    """configs/smoke.yaml with a private sqlite store and checkpoint folder."""
    return load_config(CONFIGS / "smoke.yaml", [f"tracking.uri={seeded_store(tmp_path)}",
                                                f"checkpoint.dir={tmp_path}/checkpoints", *overrides])


def train_run(cfg, ctx, hooks=None, dataset=None, parent_run_id=None):
    """Train one run of ``cfg`` on this rank: the launchers' train_trials with one trial."""
    from harness.launching.runs import train_trials

    return train_trials([cfg], ctx, hooks, dataset, parent_run_id)[0]


def run_command(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a real command (python, torchrun) with the repo's venv first on PATH."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}:{full_env.get('PATH', '')}"
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


# Overridable so that a second checkout can run its Ray tests beside these on one host.
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_server(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to a server the test started in its own session; its whole group is killed after ``timeout``."""
    import signal

    if process and process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: held open together while picked (one at a time, the kernel may
    hand out a port twice, and Ray refuses a node whose components share one)."""
    import contextlib
    import socket

    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


from harness.records.tracking_server import end_session, terminated_with_parent  # noqa: E402  (after OMP_NUM_THREADS)

RAY_GCS_PORT = int(os.environ.get("HARNESS_TEST_RAY_GCS_PORT", "6390"))
RAY_DASHBOARD_PORT = int(os.environ.get("HARNESS_TEST_RAY_DASHBOARD_PORT", "8265"))
# A node's other listeners, on free ports: Ray's fixed defaults (10001, 52365) would stop a
# second cluster on this host (another checkout's tests) from starting beside this one.
RAY_NODE_PORT_FLAGS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                       "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")


def ray_head_pid_file(gcs_port: int) -> Path:
    """Where a test session notes its Ray head ("<pid> <temp dir>"), per GCS port, so that the next
    session on that port can recognise one a killed session left and stop it."""
    import tempfile

    return Path(tempfile.gettempdir()) / f"harness-test-ray-head-{gcs_port}.pid"


def stop_stale_ray_head(pid_file: Path, wait_s: float = 30) -> None:
    """Stop the head that ``pid_file`` names if it still runs and is ours (its command line names the
    temp dir noted beside its PID); the file goes either way. Only that session is signalled."""
    import psutil

    try:
        pid, temp_dir = pid_file.read_text().split(maxsplit=1)
        head = psutil.Process(int(pid))
        ours = temp_dir.strip() in " ".join(head.cmdline())
    except (OSError, ValueError, psutil.Error):
        ours = False
    if ours:
        end_session(head.pid, wait_s)  # ray start --block and the node's processes: its own session
    pid_file.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One real Ray head node on 127.0.0.1 for the whole session, stopped by its PID.

    ``ray start --block`` stays in the foreground as the parent of the node's
    processes; SIGTERM to it drains the node and stops them all. It gets that SIGTERM
    from the kernel too when this pytest process dies, however it dies (a CI time-out),
    and a head that a killed session left anyway (noted in ``ray_head_pid_file``) is
    stopped before this one starts.
    """
    import secrets
    import tempfile
    import time
    import urllib.error
    import urllib.request

    import socket

    pid_file = ray_head_pid_file(RAY_GCS_PORT)
    stop_stale_ray_head(pid_file)
    # Another cluster on our ports would answer the readiness check below in place
    # of ours (and refuse our token): fail plainly instead.
    # xdist may finish the session fixture early (a worker briefly out of tests) and
    # start it again: give the previous head's ports a while to close.
    for port in (RAY_GCS_PORT, RAY_DASHBOARD_PORT):
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) != 0:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"port {port} on 127.0.0.1 is taken (another Ray cluster?); the test cluster needs it")
            time.sleep(1)
    # Ray's unix sockets live under --temp-dir, whose path must stay short.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    log = open(tmp_path_factory.mktemp("ray") / "ray-start.log", "w")
    # A token of this session's own, passed as RAY_AUTH_TOKEN (Ray's first token
    # source, ahead of ~/.ray/auth_token): `ray start` in token mode refuses to
    # start without one, and nothing may be written into the real HOME.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", **auth,
           # SIGTERM then stops the node at once instead of draining it for 30 s.
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           # Ray Train's controller polls its workers every 2 s by default; each fit
           # and each restart after a kill waits for a poll. The workers inherit this.
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
           # Ray Train starts a PreemptionWatcher actor (a Python process of its own) with every worker
           # group, restarts included, to hear of spot-instance preemptions; none come on this machine,
           # and every such process is seconds of imports on the test machine's two cores.
           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
           # The GCS declares a node dead after this many missed health checks, this far
           # apart (default 5 x 3 s): tests/e2e/test_ray_nodes.py kills a node's raylet, and
           # the run waits for that verdict before it restarts. A refused check (a dead
           # raylet) fails at once; a slow one still has the default 10 s to answer.
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
           # Ray Train's placement-group cleaner (an actor) asks the State API, whose address it
           # otherwise looks up in /tmp/ray/ray_current_cluster: with --temp-dir elsewhere that file
           # is stale or another cluster's, the cleaner dies, and a killed trial's CPUs stay reserved.
           "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{RAY_DASHBOARD_PORT}"}
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--num-cpus=2", f"--port={RAY_GCS_PORT}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={RAY_DASHBOARD_PORT}",
         "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp_dir}",
         f"--ray-client-server-port={free_ports(1)[0]}",
         *(f"--{flag}={port}" for flag, port in zip(RAY_NODE_PORT_FLAGS, free_ports(len(RAY_NODE_PORT_FLAGS))))],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=terminated_with_parent)
    pid_file.write_text(f"{head.pid} {temp_dir}\n")
    dashboard = f"http://127.0.0.1:{RAY_DASHBOARD_PORT}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{dashboard}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # it answers (asking for the auth token): it is up
            break
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                head.kill()
                pytest.fail(f"ray start failed; see {log.name}")
            time.sleep(1)
    # Every client of this cluster needs the mode and the token: JobSubmissionClient
    # in this process, and (through the inherited environment) `ray job submit`,
    # launch/ray_job.py and launch/sweep.py subprocesses. Restored afterwards.
    previous = {name: os.environ.get(name) for name in auth}
    os.environ.update(auth)
    try:
        yield {"address": f"127.0.0.1:{RAY_GCS_PORT}", "dashboard": dashboard, "pid": head.pid, "env": dict(auth)}
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        try:  # whatever of the node outlived `ray start` (its own session, by PID)
            os.killpg(head.pid, 9)
        except ProcessLookupError:
            pass
        pid_file.unlink(missing_ok=True)
        log.close()


# tryfirst: xdist's own hook turns the mark into the test's group, so the mark must
# be there before it runs (added after, the Ray tests were spread over both workers,
# each starting a cluster on the same ports).
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """`make test` runs three pytest-xdist workers (--dist loadgroup); every test on
    the Ray cluster goes to one of them, since the cluster listens on fixed ports
    and a second one on the same machine would collide.

    A module-scoped fixture (a torchrun job, a sweep, a server that several tests
    read) is made once per module and worker, and --dist loadgroup hands out the
    other tests one by one: the tests of a module that use one go to one worker
    together, as a group named after the module, so that it is made once. With the
    Ray tests if they share one with a Ray test. Tests in tests/e2e are marked e2e
    (-m 'not e2e' runs the unit tests alone)."""
    e2e = Path(__file__).parent / "e2e"
    on_ray = [item for item in items if "ray_cluster" in getattr(item, "fixturenames", ())]
    shared = {(item.module.__name__, name) for item in on_ray for name in _module_fixtures(item)}
    for item in items:
        if e2e in Path(item.fspath).parents:
            item.add_marker(pytest.mark.e2e)
        module_fixtures = _module_fixtures(item)
        if item in on_ray or any((item.module.__name__, name) in shared for name in module_fixtures):
            item.add_marker(pytest.mark.xdist_group("ray-cluster"))
        elif module_fixtures and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def _module_fixtures(item) -> list[str]:
    """The names of the module-scoped fixtures ``item`` uses (made once per module and worker)."""
    definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    return [name for name, defs in definitions.items() if defs and defs[-1].scope == "module"]


class FailAfterEpoch(RunHooks):
    """Hooks that break a run right after epoch ``epoch`` (its checkpoint is written): a crash to resume from."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def after_epoch(self, epoch, metrics, checkpoint, ctx):
        if epoch == self.epoch:
            raise RuntimeError("injected failure")


class UncapturedGraphStep(GraphStep):
    """A graph step that runs the body it would capture, on the same static buffers, without capturing it:
    how the body is checked against the eager step on a machine without CUDA."""

    def replay(self, measure: bool):
        return self.body(measure)


def stack_epoch(stack, epoch: int):
    """One epoch (the first is 0 or 1; the others follow it) of a stacked trainer outside the loop (no evaluation,
    record or checkpoint); each member's mean loss [K]. A member whose epoch loss is above DIVERGED_LOSS stops
    updating, as the loop stops its run."""
    import torch

    from harness.core.train_loop import DIVERGED_LOSS
    from harness.core.trainer import train_epoch

    loss_sum, samples, _ = train_epoch(stack, epoch, max(epoch - 1, 0) * stack.steps_per_epoch)
    mean_loss = loss_sum / samples
    stack.active &= torch.isfinite(mean_loss) & (mean_loss <= DIVERGED_LOSS)
    return mean_loss


def diverged(stack) -> list[bool]:
    """Per member of a stacked trainer: has it stopped updating?"""
    return [not bool(a) for a in stack.active.tolist()]


def member_state_dict(stack, k: int) -> dict:
    """Member k's parameters as its model's ``state_dict()`` names them (copies, not views)."""
    return {name: p[k].clone() for name, p in zip(stack.model.names, stack.model.parameters())}

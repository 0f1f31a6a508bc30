"""The tests' own Ray head dies with the test session however the session ends: a pytest stopped by
SIGTERM mid-test (a CI time-out) leaves no head on its ports for the next `make test` to trip on."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, free_ports, ray_head_pid_file

pytestmark = pytest.mark.slow

HOLDING_TEST = """
import os, time
from pathlib import Path

def test_hold_the_cluster(ray_cluster):
    Path(os.environ["HELD"]).write_text(str(ray_cluster["pid"]))
    time.sleep(600)
"""


def test_a_session_stopped_by_sigterm_takes_its_ray_head_with_it(tmp_path):
    gcs_port, dashboard_port = free_ports(2)
    (tmp_path / "test_hold.py").write_text(HOLDING_TEST)
    held = tmp_path / "held"
    # tests/conftest.py as a plugin: the session's ray_cluster fixture, on ports of this test's own.
    session = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q",
         "--rootdir", str(tmp_path), str(tmp_path / "test_hold.py")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "HELD": str(held),
             "HARNESS_TEST_RAY_GCS_PORT": str(gcs_port), "HARNESS_TEST_RAY_DASHBOARD_PORT": str(dashboard_port),
             "PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}"})
    try:
        deadline = time.monotonic() + 180
        while not held.exists():
            assert session.poll() is None and time.monotonic() < deadline, "the session's cluster never came up"
            time.sleep(0.5)
        head = int(held.read_text())
        assert ray_head_pid_file(gcs_port).read_text().split()[0] == str(head)
        session.send_signal(signal.SIGTERM)  # pytest has no handler: it dies at once, its teardown unrun
        session.wait(60)
        deadline = time.monotonic() + 60
        while psutil.pid_exists(head) and psutil.Process(head).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the Ray head outlived its test session"
            time.sleep(0.5)
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
        stop_what_is_left(gcs_port)


def stop_what_is_left(gcs_port: int) -> None:
    """If the head outlived the session (the claim failed), stop it as the next session would."""
    from conftest import stop_stale_ray_head

    if ray_head_pid_file(gcs_port).exists():
        stop_stale_ray_head(ray_head_pid_file(gcs_port))

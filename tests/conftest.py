"""Shared fixtures: the repo's paths, the real data set, temporary MLflow stores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


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


def smoke_config(tmp_path: Path, *overrides: str):
    """configs/smoke.yaml with a private sqlite store and checkpoint folder."""
    return load_config(CONFIGS / "smoke.yaml", [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                                                f"checkpoint.dir={tmp_path}/checkpoints", *overrides])


def run_command(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a real command (python, torchrun) with the repo's venv first on PATH."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}:{full_env.get('PATH', '')}"
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)

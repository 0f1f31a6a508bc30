# Two commands for a new machine: `make sweep` (the main job) and `make test`.
# Each sets up what it needs on first use: .venv with the pinned packages, and
# the Fashion-MNIST files. A second run finds both in place and goes straight on.

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
# torch 2.13.0: its CPU build lies on local disk on machines of this kind; where a
# GPU is present, plain PyPI serves the CUDA build. TORCH_PIP_ARGS lets a user
# point at another index (e.g. --index-url https://download.pytorch.org/whl/cpu).
TORCH_SPEC  ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP       := $(VENV)/.installed
FASHION_DIR := /usr/share/datasets/fashion-mnist
SWEEP_CONFIG ?= configs/sweep.yaml
NPROC       ?= 2
PYTEST_ARGS ?=
# Three pytest workers on a 2-core machine: most end-to-end tests wait on servers,
# polls and process start-up, so a third worker fills time that two leave idle (a fourth
# only makes the processes of all four wait longer for the cores).
# Tests on the Ray cluster all go to one worker, and so do a module's tests that share
# a module-scoped fixture (tests/conftest.py). tests/unit runs in the pytest process,
# tests/e2e starts real processes: PYTEST_ARGS="-m 'not e2e'" runs the unit tests alone.
TEST_WORKERS ?= 3

MLFLOW_PORT ?= 5000

.PHONY: sweep test setup data clean mlflow-server mlflow-server-pg screenshots gpu-data gpu-wheels

# PYTHONDONTWRITEBYTECODE is set on machines of this kind. With it, no .pyc is
# cached, and every process of a sweep or of the tests (torchrun ranks, Ray
# workers, MLflow servers) would compile ray and mlflow again; make test then
# runs over 15 minutes. Our commands run without it, so .venv keeps the bytecode.
unexport PYTHONDONTWRITEBYTECODE

sweep: setup data
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) launch/train.py --config $(SWEEP_CONFIG)

test: setup data
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=15 $(PYTEST_ARGS)

setup: $(STAMP)

# --no-compile: compiling all of ray, mlflow and torch at install time takes
# about 90 s, most of it for modules never imported. Python compiles what is
# imported, once, and caches it in .venv (see unexport above).
# (Comments stay outside recipes: make echoes a recipe's comment lines.)
$(STAMP): pyproject.toml requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-compile -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-compile --no-deps -e .
	touch $(STAMP)

# The data set: nothing to do where the files (or $$HARNESS_DATA_DIR) are present;
# else Debian's package where apt is usable; else say how to get it.
data:
	@if [ -n "$$HARNESS_DATA_DIR" ] || [ -f $(FASHION_DIR)/train-images-idx3-ubyte.gz ]; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing Fashion-MNIST: apt-get install dataset-fashion-mnist"; \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	else \
		echo "Fashion-MNIST not found in $(FASHION_DIR): run 'sudo apt-get install dataset-fashion-mnist'" \
		     "or set HARNESS_DATA_DIR to a folder with the four IDX files" >&2; exit 1; \
	fi

# A copy of the data set inside the repo (ignored by git), for a GPU machine that
# gets only the working tree: see launch/gpu_check.sh.
gpu-data: data
	mkdir -p .gpu-data && cp $${HARNESS_DATA_DIR:-$(FASHION_DIR)}/*-ubyte* .gpu-data/

# MLflow's client as Python 3.12 wheels for a GPU machine without it (launch/gpu-wheels.txt).
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl -r launch/gpu-wheels.txt

# The MLflow UI over this folder's mlflow.db, on 127.0.0.1 only.
mlflow-server: setup
	$(VENV)/bin/harness mlflow-server --port $(MLFLOW_PORT)

# The same UI over a PostgreSQL of its own in ./mlflow-pg/ (127.0.0.1 only, generated password in
# mlflow-pg/password), for many concurrent writers; stop it with Ctrl-C or kill <pid>: PostgreSQL stops too.
mlflow-server-pg: setup
	$(VENV)/bin/harness mlflow-server --backend postgresql --port $(MLFLOW_PORT)

# The MLflow UI screenshots in docs/ (docs/mlflow-ui.md), from a small real sweep in a
# temporary store (docs/screenshots.sh; needs chromium, about 5 minutes).
screenshots: setup data
	PY=$(PY) docs/screenshots.sh

clean:
	rm -rf $(VENV) checkpoints reports mlflow.db mlartifacts .pytest_cache

# Build the Docker images and run them: a smoke training in the image, then
# docker/compose.yaml's PostgreSQL-backed MLflow, Ray head and CPU worker with a
# submitted job (docker/check.sh; as root; ~10 min from nothing, see docker/README.md;
# not part of `make test`).
.PHONY: docker-check
docker-check:
	bash docker/check.sh

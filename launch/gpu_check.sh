#!/usr/bin/env bash
# The GPU check as one script, for a machine with one NVIDIA GPU and
# PyTorch, with or without MLflow, without Ray:
#   1. the CUDA-graph tests (real capture and replay, DDP at world size 1 on NCCL);
#   2. one torchrun rank on NCCL with the graph step (launch/train.py);
#   3. `harness bench --device cuda`: the table for docs/performance.md (again without the
#      graph-under-DDP path if the full run fails, so one broken path costs no table);
#   4. configs/sweep_gpu.yaml (7 batch sizes, 10 epochs, 1 seed, graph step on), timed;
#   5. the same sweep with the eager step, timed, for the comparison;
#   6. configs/critical_batch.yaml (the critical batch size at two targets), timed, then its full protocol
#      (configs/critical_batch_gpu.yaml: 8 seeds, 8 LRs, targets up to 0.88); at the end again without
#      the race (critical-batch-no-race: every trial to its target or budget) for what the race saves;
#   7. `harness capacity --device cuda` in fp32 and in bf16 (the bf16 step on CUDA):
#      time per step and peak memory against the batch, up to the first out-of-memory;
#   8. `harness bench --stack 16 --device cuda` (16 trials as one stacked model against
#      the same 16 one after another, graph step on both sides; its kernels profiled; again with
#      every side's products in TF32, stack-bench-tf32; both again with 32 trials, stack-bench-wide
#      and stack-bench-wide-tf32), and configs/critical_batch.yaml
#      without stacks, timed (step 6 runs it with its stacks); the stacked graph step's tests run
#      in step 1 (tests/unit/test_stacked_graph.py).
# The sweeps log to MLflow (a SQLite file) where MLflow can be imported; wheels
# in .whl/ (`make gpu-wheels`) are installed first if present. Elsewhere tracking is off.
# STEPS: the steps to run, by name (default: all); e.g. STEPS="environment graph-tests
# torchrun-nccl bench" is the short check that fits a 15-minute device lease.
# HARNESS_DATA_DIR: a folder with Fashion-MNIST's four IDX files (default
# .gpu-data, filled by `make gpu-data`). OUT: where logs and JSON go. STEP_TIMEOUT: seconds after
# which a step is stopped and counted failed (default: none), so one slow step cannot eat a lease.
# STACK: the trials stack-bench stacks (default 16; its table also times the stacked step's matrix
# products alone, the floor any stack has to stay above; its kernels, per batch size, stacked and one
# trial alone, go to $OUT/stack-profile/). WIDE_STACK: the trials stack-bench-wide and
# stack-bench-wide-tf32 stack (default 32), without a profile.
set -uo pipefail
out=${OUT:-reports/gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HARNESS_DATA_DIR=${HARNESS_DATA_DIR:-$PWD/.gpu-data}
py=${PYTHON:-python3}
status=0
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-check-site \
        .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/gpu-check-site
fi
if "$py" -c "import mlflow" 2>/dev/null; then
    tracking=(--set tracking.enabled=true --set tracking.uri=sqlite:////tmp/gpu-check-mlflow.db)
else
    tracking=(--set tracking.enabled=false)
fi
steps=" ${STEPS:-environment graph-tests torchrun-nccl bench sweep-graph sweep-eager critical-batch critical-batch-gpu capacity capacity-bf16 stack-bench stack-bench-tf32 stack-bench-wide stack-bench-wide-tf32 critical-batch-unstacked critical-batch-no-race} "
run() {  # run a named step (if STEPS names it), keep going after a failure, remember it
    local name=$1; shift
    case "$steps" in *" $name "*|*" ${name%-without-graph-ddp} "*) ;; *) return 0 ;; esac
    echo "== $name"
    local started=$(date +%s.%N)
    timeout "${STEP_TIMEOUT:-0}" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc, $(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $started }") s"
    [ "$rc" = 0 ] || status=1
}
run environment bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; \
    $py -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.nccl.version(), torch.cuda.get_device_name(0))'; \
    $py -c 'import mlflow; print(\"mlflow\", mlflow.__version__)' || echo 'no mlflow: the sweeps run with tracking off'"
run graph-tests "$py" -m pytest -q -p no:cacheprovider --tb=short -rs tests/e2e/test_graph_step.py tests/unit/test_stacked_graph.py \
    tests/unit/test_data_placement.py
run torchrun-nccl "$py" -m torch.distributed.run --standalone --nproc_per_node 1 launch/train.py \
    --config configs/fashion_mnist.yaml --set tracking.enabled=false --set train.device=cuda \
    --set train.progress=false --set performance.cuda_graph=true --set checkpoint.dir=/tmp/gpu-check-checkpoints
bench_args=(--config configs/fashion_mnist.yaml --device cuda --batch-sizes 32 128 512 2048 8192 --epochs 5)
run bench "$py" -m harness.cli bench "${bench_args[@]}" --json "$out/bench-cuda.json"
if [ ! -s "$out/bench-cuda.json" ]; then
    run bench-without-graph-ddp "$py" -m harness.cli bench "${bench_args[@]}" \
        --paths harness harness_ddp harness_graph --json "$out/bench-cuda.json"
fi
# The GPU sweep (configs/sweep_gpu.yaml): 7 batch sizes, 10 epochs, one seed, one GPU.
sweep_args=(--config configs/sweep_gpu.yaml --launcher local "${tracking[@]}" --set train.device=cuda)
run sweep-graph "$py" launch/sweep.py "${sweep_args[@]}" --set performance.cuda_graph=true \
    --set checkpoint.dir=/tmp/gpu-check-sweep-graph
run sweep-eager "$py" launch/sweep.py "${sweep_args[@]}" --set performance.cuda_graph=false \
    --set checkpoint.dir=/tmp/gpu-check-sweep-eager
# The critical-batch study: 10 batch sizes x 6 LRs x 4 seeds, two targets, each trial stopped at the last.
run critical-batch "$py" launch/sweep.py --config configs/critical_batch.yaml --launcher local "${tracking[@]}" \
    --set train.device=cuda --set checkpoint.dir=/tmp/gpu-check-critical --report-dir "$out/critical-report"
# Its full protocol: 8 seeds, 8 LRs, targets up to 0.88.
run critical-batch-gpu "$py" launch/sweep.py --config configs/critical_batch_gpu.yaml --launcher local \
    "${tracking[@]}" --set checkpoint.dir=/tmp/gpu-check-critical-gpu --report-dir "$out/critical-report-gpu"
# The note's hardware claims measured on the device, in fp32 and bf16.
run capacity "$py" -m harness.cli capacity --config configs/fashion_mnist.yaml --device cuda --epoch-samples 55000 \
    --no-mlflow --json "$out/capacity-cuda.json" --out "$out"
run capacity-bf16 "$py" -m harness.cli capacity --config configs/fashion_mnist.yaml --device cuda --epoch-samples 55000 \
    --set performance.precision=bf16 --no-mlflow --json "$out/capacity-cuda-bf16.json" --out "$out"
# Stacks of trials on the device, and the study without them for its time.
run stack-bench "$py" -m harness.cli bench --config configs/fashion_mnist.yaml --device cuda --stack "${STACK:-16}" \
    --batch-sizes 32 64 128 512 --epochs 3 --json "$out/bench-cuda-stack${STACK:-16}.json" \
    --profile "$out/stack-profile"
# The same with every side's products in TF32 (tensor cores): is fp32 GEMM what holds the stack back at 512?
run stack-bench-tf32 "$py" -m harness.cli bench --config configs/fashion_mnist.yaml --device cuda \
    --stack "${STACK:-16}" --batch-sizes 32 64 128 512 --epochs 3 --tf32 \
    --json "$out/bench-cuda-stack${STACK:-16}-tf32.json"
# The same two with a wider stack: at batch 32 a stack of 16 replayed its step in the time of 1.85
# trials alone, so more members may still be nearly free there.
run stack-bench-wide "$py" -m harness.cli bench --config configs/fashion_mnist.yaml --device cuda \
    --stack "${WIDE_STACK:-32}" --batch-sizes 32 64 128 512 --epochs 3 --json "$out/bench-cuda-stack${WIDE_STACK:-32}.json"
run stack-bench-wide-tf32 "$py" -m harness.cli bench --config configs/fashion_mnist.yaml --device cuda \
    --stack "${WIDE_STACK:-32}" --batch-sizes 32 64 128 512 --epochs 3 --tf32 \
    --json "$out/bench-cuda-stack${WIDE_STACK:-32}-tf32.json"
run critical-batch-unstacked "$py" launch/sweep.py --config configs/critical_batch.yaml --launcher local \
    "${tracking[@]}" --set train.device=cuda --set sweep.stack_trials=1 --set checkpoint.dir=/tmp/gpu-check-critical1 \
    --report-dir "$out/critical-report-unstacked"
run critical-batch-no-race "$py" launch/sweep.py --config configs/critical_batch.yaml --launcher local \
    "${tracking[@]}" --set train.device=cuda --set sweep.race_stop=null --set checkpoint.dir=/tmp/gpu-check-critical2 \
    --report-dir "$out/critical-report-no-race"
exit $status

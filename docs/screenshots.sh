#!/usr/bin/env bash
# Regenerates the MLflow UI screenshots in docs/ (make screenshots):
#  1. `make sweep`'s own command (configs/sweep.yaml in one torchrun process group of
#     2) into a fresh store in a temporary folder;
#  2. `harness mlflow-server` over that store on 127.0.0.1;
#  3. headless Chromium shots of the path docs/mlflow-ui.md shows, from the
#     experiment's link to the sweep's answer;
#  4. the server stopped by its PID, the temporary folder removed.
# Needs chromium (apt-get install chromium). Takes about 3 minutes on 2 cores.
# SCREENSHOT_STORE=DIR keeps the store in DIR and reuses it when it is there
# (to retake the shots without a new sweep).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"  # python -m harness.cli below imports this checkout's harness
PY=${PY:-$REPO/.venv/bin/python}
PORT=${SCREENSHOT_PORT:-5077}
TMP=$(mktemp -d)
WORK=${SCREENSHOT_STORE:-$TMP}
SERVER_PID=
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    rm -rf "$TMP"  # never $SCREENSHOT_STORE: the user's folder
}
trap cleanup EXIT

if [ ! -f "$WORK/mlflow.db" ]; then
    echo "screenshots: running make sweep's command into $WORK/mlflow.db"
    mkdir -p "$WORK"
    (cd "$WORK" && OMP_NUM_THREADS=1 "$(dirname "$PY")/torchrun" --standalone --nproc_per_node 2 \
        "$REPO/launch/train.py" --config "$REPO/configs/sweep.yaml" --set train.progress=false \
        --set "tracking.uri=sqlite:///$WORK/mlflow.db" --set "checkpoint.dir=$WORK/checkpoints" \
        --report-dir "$WORK/reports" > "$WORK/sweep.log" 2>&1)
    grep -A 6 '^The answer' "$WORK/sweep.log" || tail -n 20 "$WORK/sweep.log"
fi

echo "screenshots: starting harness mlflow-server on 127.0.0.1:$PORT"
"$PY" -m harness.cli mlflow-server --store-dir "$WORK" --port "$PORT" > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 60); do
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
    sleep 1
done

# The experiment, the sweep's parent run and its children, as the UI's URLs need them.
read -r EXPERIMENT PARENT CHILDREN < <("$PY" - "$WORK/mlflow.db" <<'EOF'
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient(tracking_uri=f"sqlite:///{sys.argv[1]}")
experiment = client.get_experiment_by_name("minibatch-harness").experiment_id
parent = client.search_runs([experiment], "tags.run_kind = 'sweep'")[0].info.run_id
children = [r.info.run_id for r in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'")
            if r.data.tags.get("run_kind") != "interpolation"]
print(experiment, parent, " ".join(children))
EOF
)
# shellcheck disable=SC2086  # CHILDREN: one argument per run id
"$PY" docs/screenshots.py "http://127.0.0.1:$PORT" docs "$EXPERIMENT" "$PARENT" $CHILDREN

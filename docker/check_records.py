"""docker/check.sh's last word: the job's records are in the MLflow server.

    python3 docker/check_records.py http://127.0.0.1:PORT EXPERIMENT

Reads the server through its REST API (the standard library only, so the host
needs no MLflow): the experiment has at least one run, every run is FINISHED with
metrics, and every (metric, step) of every run was logged once. Exits 1 saying
what is missing.
"""

import json
import sys
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.console import say, warn  # noqa: E402  (stdlib only: no venv needed)


def call(server: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(server + path, method="POST" if body is not None else "GET",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def repeated_steps(server: str, run_id: str, metric_key: str) -> list[int]:
    query = urllib.parse.urlencode({"run_id": run_id, "metric_key": metric_key, "max_results": 25000})
    history = call(server, f"/api/2.0/mlflow/metrics/get-history?{query}").get("metrics", [])
    return [step for step, count in Counter(m.get("step", 0) for m in history).items() if count > 1]


def problems_of(server: str, experiment_name: str) -> list[str]:
    query = urllib.parse.urlencode({"experiment_name": experiment_name})
    experiment_id = call(server, f"/api/2.0/mlflow/experiments/get-by-name?{query}")["experiment"]["experiment_id"]
    runs = call(server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]}).get("runs", [])
    if not runs:
        return [f"experiment {experiment_name!r} has no run"]
    problems = []
    for run in runs:
        info, metrics = run["info"], run["data"].get("metrics", [])
        name = info.get("run_name", info["run_id"])
        if info["status"] != "FINISHED":
            problems.append(f"run {name} is {info['status']}, not FINISHED")
        if not metrics:
            problems.append(f"run {name} has no metric")
        for metric in metrics:
            twice = repeated_steps(server, info["run_id"], metric["key"])
            if twice:
                problems.append(f"run {name}: {metric['key']} logged more than once at steps {twice[:5]}")
        say(f"run {name}: {info['status']}, {len(metrics)} metrics "
            f"({', '.join(sorted(m['key'] for m in metrics)[:6])}, ...)")
    return problems


def main(server: str, experiment_name: str) -> int:
    problems = problems_of(server, experiment_name)
    for problem in problems:
        warn(f"error: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))

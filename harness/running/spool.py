"""A local spool for MLflow records that could not be delivered, and their replay.

When the tracking server is down, the tracker appends each record (metrics of one
step, tags, the final status) to a JSON-lines file and goes on training. At the
next record, and at the end of the run, it replays the spool in order; once all
of it arrived the file is removed. If the server never comes back the file stays,
and ``harness replay <spool>`` delivers it later. Replay skips every (metric,
step) the run already holds, so nothing arrives twice.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator


class Spool:
    def __init__(self, path: Path):
        self.path = Path(path)

    def __bool__(self) -> bool:
        return self.path.exists() and self.path.stat().st_size > 0

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def records(self) -> Iterator[dict[str, Any]]:
        with open(self.path) as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def metrics_record(run_id: str, metrics: dict[str, float], step: int) -> dict[str, Any]:
    return {"op": "metrics", "run_id": run_id, "step": step, "timestamp_ms": int(time.time() * 1000),
            "metrics": metrics}


def logged_steps(client, run_id: str) -> set[tuple[str, int]]:
    """Every (metric, step) the tracking store already holds for ``run_id``."""
    keys = client.get_run(run_id).data.metrics.keys()
    return {(key, m.step) for key in keys for m in client.get_metric_history(run_id, key)}


def apply_record(client, record: dict[str, Any], logged: set[tuple[str, int]]) -> None:
    """Deliver one record; metrics already in ``logged`` are skipped, delivered ones added."""
    from mlflow.entities import Metric

    run_id = record["run_id"]
    if record["op"] == "metrics":
        step = record["step"]
        fresh = [Metric(k, float(v), record["timestamp_ms"], step) for k, v in record["metrics"].items()
                 if (k, step) not in logged]
        if fresh:
            client.log_batch(run_id, metrics=fresh)
            logged.update((m.key, step) for m in fresh)
    elif record["op"] == "tags":
        for key, value in record["tags"].items():
            client.set_tag(run_id, key, value)
    elif record["op"] == "terminate":
        client.set_terminated(run_id, status=record["status"])
    else:
        raise ValueError(f"unknown spool record {record['op']!r}")


RECORD_KEYS = {"metrics": ("run_id", "step", "timestamp_ms", "metrics"), "tags": ("run_id", "tags"),
               "terminate": ("run_id", "status")}


def parse_lines(spool: Spool) -> tuple[list[dict[str, Any]], list[int]]:
    """The well-formed records of a spool and the numbers (1-based) of the lines that are not."""
    records, bad = [], []
    with open(spool.path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                ok = isinstance(record, dict) and all(k in record for k in RECORD_KEYS.get(record.get("op"), ("?",)))
            except (UnicodeDecodeError, json.JSONDecodeError):
                ok = False
            if ok:
                records.append(record)
            else:
                bad.append(number)
    return records, bad


def replay(client, spool: Spool) -> tuple[int, list[int]]:
    """Deliver every well-formed record of a spool (dedup against the store).

    Returns (records delivered, numbers of malformed lines). The spool is removed
    only when every line was delivered; a damaged one is kept for inspection
    (replaying it again delivers nothing twice).
    """
    records, bad = parse_lines(spool)
    logged_by_run: dict[str, set] = {}
    count = 0
    for record in records:
        run_id = record["run_id"]
        if run_id not in logged_by_run:
            logged_by_run[run_id] = logged_steps(client, run_id)
        apply_record(client, record, logged_by_run[run_id])
        count += 1
    if not bad:
        spool.remove()
    return count, bad

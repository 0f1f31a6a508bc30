"""The plain writers of the tracking load test (tests/e2e/test_tracking_load.py): COUNT processes.

Each logs ``steps`` steps of ``keys`` metrics to its own MLflow run through the
harness's own tracker (``MLflowTracker``: the same calls, spool and
de-duplication a training run uses), after waiting for a gate file so that every
writer logs at the same time. Writer i writes what it did to
``<folder>/writer<i>.json``; ``writer<i>.ready`` says it is waiting at the gate.

The writers are forked from this process after the imports: each is a process
of its own with its own connections, and the test does not pay for loading torch
and MLflow once per writer (on a busy 2-core machine that took a minute).

    python tests/e2e/tracking_writer.py URI COUNT STEPS KEYS GATE FOLDER
"""

import json
import os
import sys
import time
import traceback
from pathlib import Path

from harness.core.config import load_config
from harness.core.distributed import DistContext
from harness.records.tracking import MLflowTracker

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GATE_TIMEOUT_S = 300


def write(uri: str, name: str, steps: int, keys: int, gate: Path, out: Path) -> None:
    cfg = load_config(CONFIGS / "smoke.yaml", [f"name={name}", f"tracking.uri={uri}", "tracking.experiment=load",
                                              f"checkpoint.dir={out.parent}/ckpt"])
    tracker = MLflowTracker(cfg, DistContext())
    run_id = tracker.start()
    out.with_suffix(".ready").touch()
    deadline = time.monotonic() + GATE_TIMEOUT_S
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    begin = time.time()
    for step in range(1, steps + 1):
        tracker.log_metrics({f"load_{k}": step + k / 100 for k in range(keys)}, step)
    tracker.finish()
    end = time.time()
    out.with_suffix(".json").write_text(json.dumps({"run_id": run_id, "begin": begin, "end": end,
                                                   "points": steps * keys, "spool_left": bool(tracker.spool)}))


def main(uri: str, count: int, steps: int, keys: int, gate: Path, folder: Path) -> int:
    children = []
    for index in range(count):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                write(uri, f"writer{index}", steps, keys, gate, folder / f"writer{index}")
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)  # a forked child must not run the parent's exit handlers
        children.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    return 0 if codes == [0] * count else 1


if __name__ == "__main__":
    uri, count, steps, keys, gate, folder = sys.argv[1:7]
    sys.exit(main(uri, int(count), int(steps), int(keys), Path(gate), Path(folder)))

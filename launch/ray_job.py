"""Train one run, or a sweep, with Ray Train workers all-reducing through DDP.

    python launch/ray_job.py --config configs/fashion_mnist.yaml --num-workers 2 [--use-gpu]

Joins the Ray cluster at $RAY_ADDRESS (set inside a Ray job) or starts a local one.
Each run is a ``TorchTrainer`` with ``FailureConfig(max_failures)``: a worker that
dies is restarted and the run resumes from its newest checkpoint, into the same
MLflow run. A sweep config runs every trial as its own TorchTrainer, concurrently
where the cluster has room, under one MLflow parent run.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import signals  # noqa: E402
from harness.launching.entrypoints import (ArgumentParser, add_config_arguments, add_ray_arguments,  # noqa: E402
                                         exits_on_input_error)


@signals.exits_on_termination(after="its unfinished MLflow run is marked KILLED (a new start trains afresh)")
@exits_on_input_error
def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    add_ray_arguments(parser)
    args = parser.parse_args(argv)
    from harness.commands import ray_job_command  # after parsing: --help answers without loading torch

    return ray_job_command(args)


if __name__ == "__main__":
    code = main()
    if code in signals.EXIT_CODES:
        # Stopped by a signal: everything is recorded, but Ray Train's fit is still
        # inside Ray's C++ client in another thread, and a normal interpreter exit
        # can crash there (SIGSEGV) instead of exiting with the signal's code.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

"""Run a batch-size sweep: every (LR rule, batch size, seed) trial, then the report.

    python launch/sweep.py --config configs/sweep.yaml [--launcher local|torchrun|ray] [--nproc N]

- ``local``: every trial in this process, one after another.
- ``torchrun``: every trial as its own ``torchrun --nproc_per_node N`` job.
- ``ray``: every trial as its own Ray Train run of N workers, concurrently where
  the cluster has room (joins $RAY_ADDRESS, else starts a local Ray).

One MLflow parent run holds one child run per trial. A trial that fails or
diverges is recorded and the sweep goes on. With tracking on, the sweep ends with
``harness report``'s table and the path of its plots.

SIGTERM or SIGINT stops the running trials with the sweep (a trial's torchrun and
its ranks, the Ray tasks) and ends the parent and child runs as KILLED (exit code
143 or 130); ``--resume`` continues the sweep.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import signals  # noqa: E402
from harness.launching.entrypoints import (ArgumentParser, add_config_arguments, add_ray_arguments,  # noqa: E402
                                         exits_on_input_error)

LAUNCHERS = ("local", "torchrun", "ray")


@signals.exits_on_termination
@exits_on_input_error
def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--launcher", default="local", choices=LAUNCHERS,
                        help="local: every trial in this process; torchrun: a torchrun job per trial; "
                             "ray: a Ray Train run per trial")
    parser.add_argument("--nproc", type=int, default=None,
                        help="ranks per trial (default: 1 with local, 2 with torchrun and ray)")
    parser.add_argument("--max-restarts", type=int, default=1, help="torchrun restarts per trial")
    parser.add_argument("--report-dir", default="reports", help="where the report's files go")
    parser.add_argument("--resume", action="store_true",
                        help="reopen the newest unfinished sweep of this name: skip finished trials, resume the rest")
    # Here the ranks per trial are --nproc for every launcher; --num-workers (shared
    # with launch/ray_job.py) is accepted with ray as the same thing, never a second value.
    add_ray_arguments(parser, num_workers_help="with --launcher ray: the same as --nproc "
                                               "(give one, or both equal; default: unset)")
    args = parser.parse_args(argv)
    from harness.commands import sweep_command  # after parsing: --help answers without loading torch

    return sweep_command(args)


if __name__ == "__main__":
    sys.exit(main())

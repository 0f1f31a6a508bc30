"""Train one run, or a whole sweep, on every rank of a torchrun job (or in this process).

    torchrun --standalone --nproc_per_node 2 launch/train.py --config configs/fashion_mnist.yaml
    python launch/train.py --config configs/seed.yaml --set optim.lr=0.05
    torchrun --standalone --nproc_per_node 2 launch/train.py --config configs/sweep.yaml \
        --set 'sweep.lr_factors=[0.5,1,2]' --trials 0,1,2   # batch 32's three LRs as one stack
    python launch/train.py --config configs/fashion_mnist.yaml --nnodes 2 --node-rank 0 \
        --rdzv-endpoint node0:29400 --rdzv-id run-42     # on node 0; --node-rank 1 on node 1

With --nnodes, the options are checked against the config before this process
becomes this node's torchrun (harness/launching/torchrun_nodes.py, docs/cluster.md).

A restart by ``torchrun --max-restarts`` continues from the newest checkpoint of
the same launch (torchrun's run id), into the same MLflow run; ``--resume``
continues from the run's newest checkpoint, whichever launch wrote it. SIGTERM or
SIGINT ends the run as KILLED (exit code 143 or 130); ``--resume`` continues it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import signals  # noqa: E402
from harness.launching.entrypoints import ArgumentParser, add_config_arguments, exits_on_input_error  # noqa: E402
from harness.launching.torchrun_nodes import add_node_arguments  # noqa: E402


@signals.exits_on_termination
@exits_on_input_error
def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("--trial", type=int, default=None,
                        help="with a sweep config: run only this trial (0-based; launch/sweep.py uses it)")
    parser.add_argument("--trials", default=None, metavar="I,J,...",
                        help="with a sweep config: train these trials (0-based, comma-separated) as one stack, "
                             "each its own MLflow run (launch/sweep.py uses it with sweep.stack_trials)")
    parser.add_argument("--parent-run-id", default=None, help="MLflow run to nest this run under")
    parser.add_argument("--report-dir", default="reports",
                        help="with a sweep config: where the report it ends with writes its files")
    parser.add_argument("--resolved-config", default=None, metavar="JSON",
                        help="the whole resolved config as JSON, used instead of --config and --set "
                             "(launch/sweep.py passes it so trials do not re-parse values as YAML)")
    add_node_arguments(parser)
    args = parser.parse_args(argv)
    from harness.commands import train_command  # after parsing: --help answers without loading torch

    return train_command(args, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())

"""One node of a multi-node torchrun job, started by launch/train.py itself: check, then become torchrun.

    python launch/train.py --config configs/fashion_mnist.yaml \\
        --nnodes 2 --node-rank 0 --nproc-per-node 1 --rdzv-endpoint node0:29400 --rdzv-id run-42

checks the node options against the config (every global batch size of the run or sweep must split
over nnodes x nproc-per-node ranks) and the run's input (``preflight``), then replaces this process
with ``torchrun --rdzv-backend c10d ...`` running launch/train.py with the same arguments, so a bad
option is one ``error:`` line and exit code 2 before torchrun starts anything. Under torchrun (RANK
set) the options are only compared with the job torchrun started. Torchrun started by hand works too
(docs/cluster.md): each rank then checks.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from harness.errors import InputError

TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "train.py"
ENDPOINT_EXPECTED = "expected HOST:PORT of node 0, the node that hosts the rendezvous (e.g. 10.0.0.1:29400)"


def add_node_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nnodes", default=None,
                        help="start this node of a torchrun job of NNODES nodes (default: no torchrun started here)")
    parser.add_argument("--node-rank", type=int, default=0,
                        help="with --nnodes: this node's number, 0..NNODES-1; node 0 hosts the rendezvous")
    parser.add_argument("--nproc-per-node", "--nproc", dest="nproc_per_node", default="1",
                        help="with --nnodes: ranks on this node")
    parser.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                        help="with --nnodes > 1: node 0's address and a free port, the same on every node")
    parser.add_argument("--rdzv-id", default=None,
                        help="with --nnodes > 1: an id for this launch, the same on every node, new for each launch")
    parser.add_argument("--local-addr", default=None,
                        help="with --nnodes: the address other nodes reach this one at (default: torchrun's, "
                             "this host's FQDN)")
    parser.add_argument("--max-restarts", type=int, default=1,
                        help="with --nnodes: worker-group restarts after a rank fails")


def node_counts(args: argparse.Namespace) -> tuple[int, int]:
    """(nodes, ranks per node) from --nnodes and --nproc-per-node, refused unless whole numbers >= 1."""
    for option, text in (("--nnodes", args.nnodes), ("--nproc-per-node", args.nproc_per_node)):
        if not text.isdigit() or int(text) < 1:
            raise InputError(f"{option}: expected a whole number of at least 1 (a fixed count: the world size "
                             f"sets each rank's share of the global batch), got {text!r}")
    return int(args.nnodes), int(args.nproc_per_node)


def starts_torchrun(args: argparse.Namespace) -> bool:
    """True in the process that starts this node's torchrun; False under torchrun or without --nnodes."""
    return args.nnodes is not None and "RANK" not in os.environ


def check_node_options(args: argparse.Namespace) -> int:
    """Refuse node options that do not describe one node of a fixed-size job; the job's world size."""
    nnodes, nproc_per_node = node_counts(args)
    if not 0 <= args.node_rank < nnodes:
        raise InputError(f"--node-rank: {args.node_rank} is not a node of --nnodes {nnodes}; "
                         f"expected 0..{nnodes - 1}")
    if args.max_restarts < 0:
        raise InputError(f"--max-restarts: expected 0 or more, got {args.max_restarts}")
    if nnodes > 1:
        if not args.rdzv_endpoint:
            raise InputError(f"--rdzv-endpoint: missing with --nnodes {nnodes}; {ENDPOINT_EXPECTED}")
        host, sep, port = args.rdzv_endpoint.rpartition(":")
        if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
            raise InputError(f"--rdzv-endpoint: got {args.rdzv_endpoint!r}; {ENDPOINT_EXPECTED}")
        if not args.rdzv_id:
            raise InputError(f"--rdzv-id: missing with --nnodes {nnodes}; expected an id for this launch, "
                             "the same on every node and new for each launch (a restart resumes only "
                             "checkpoints of its own launch)")
    return nnodes * nproc_per_node


def check_against_torchrun(args: argparse.Namespace) -> None:
    """Under torchrun: the node options, where given, must describe the job torchrun started.
    Without --nnodes, the options that only describe a node are refused rather than ignored."""
    if args.nnodes is None:
        given = [option for option, value, default in (
            ("--node-rank", args.node_rank, 0), ("--nproc-per-node", args.nproc_per_node, "1"),
            ("--rdzv-endpoint", args.rdzv_endpoint, None), ("--rdzv-id", args.rdzv_id, None),
            ("--local-addr", args.local_addr, None)) if value != default]
        if given:
            raise InputError(f"{given[0]}: only with --nnodes; expected --nnodes N as well, or torchrun's own "
                             "options when torchrun is started by hand")
        return
    started = int(os.environ.get("GROUP_WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    for option, given, want in zip(("--nnodes", "--nproc-per-node"), node_counts(args), started):
        if given != want:
            raise InputError(f"{option}: {given}, but torchrun started a job of {started[0]} node(s) with "
                             f"{started[1]} rank(s) each (world size "
                             f"{os.environ.get('WORLD_SIZE')}); expected the same numbers as torchrun's")


def torchrun_command(args: argparse.Namespace, train_argv: list[str]) -> list[str]:
    """This node's torchrun command line, running launch/train.py with ``train_argv``."""
    nnodes, nproc_per_node = node_counts(args)
    command = [str(Path(sys.executable).with_name("torchrun")), f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}",
               f"--max-restarts={args.max_restarts}"]
    if nnodes == 1:
        command.append("--standalone")  # a rendezvous of its own on a free port, a new id per launch
    else:
        # c10d assigns ranks itself (it ignores --node-rank); the node rank decides which
        # agent hosts the rendezvous store: node 0, whatever address the endpoint names.
        command += ["--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}", f"--rdzv-id={args.rdzv_id}",
                    f"--node-rank={args.node_rank}", f"--rdzv-conf=is_host={int(args.node_rank == 0)}"]
    if args.local_addr:
        command.append(f"--local-addr={args.local_addr}")
    return command + [str(TRAIN_SCRIPT), *train_argv]


def exec_torchrun(command: list[str]) -> None:
    """Become ``command``: torchrun then gets the terminal's signals itself, as if started by hand.

    torchrun gives each rank one OpenMP thread unless OMP_NUM_THREADS is set, and prints a four-line banner
    saying so; set here to that same 1 (unless the user chose a value), the ranks run as before, without it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.execv(command[0], command)

"""What a Ray run needs from the cluster it joins: storage and records every node reaches, room to spread.

On several nodes Ray places each worker (rank 0 included) on any node, which writes Ray Train's
checkpoints to ``--storage-path`` and the MLflow records to ``tracking.uri`` from there: a local
folder or SQLite file is then another one on each node, so a restarted run would not find its
checkpoint and the records would be split. ``check_storage_path`` (before joining Ray) and
``check_cluster`` (after, given the alive nodes) refuse that in one line before anything starts;
``preflight`` calls them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from harness.core.checkpoint import check_writable_dir
from harness.core.config import Config
from harness.errors import InputError

DEFAULT_STORAGE_PATH = "checkpoints/ray"


@dataclass(frozen=True)
class ClusterNode:
    node_id: str
    address: str


def is_storage_uri(path: str) -> bool:
    """``s3://...``, ``gs://...``, ``hdfs://...``: storage Ray Train reaches through pyarrow, not a local folder.
    ``file://`` is a local folder under another name."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", path)
    return bool(match) and match.group(1).lower() != "file"


def local_storage_path(path: str) -> str:
    """A ``file://`` URI as the folder it names; anything else as given."""
    return path[len("file://"):] if path.lower().startswith("file://") else path


def resolve_storage_path(path: str) -> str:
    """The storage path as workers elsewhere must see it: a URI as given, a folder absolute."""
    return path if is_storage_uri(path) else str(Path(local_storage_path(path)).resolve())


def check_storage_path(path: str) -> None:
    """A local ``--storage-path`` must be a folder, or a new folder in an existing one, and writable.

    A missing parent is the sign of a typo or of a shared file system that is not mounted, which Ray
    would paper over by making a local folder tree where the mount should be. The default may be made whole.
    """
    if is_storage_uri(path):
        return
    folder = Path(local_storage_path(path))
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--storage-path: {folder} is a file; expected a folder where Ray keeps run state")
    parent = folder.absolute().parent
    if not folder.exists() and path != DEFAULT_STORAGE_PATH and not parent.is_dir():
        raise InputError(f"--storage-path: {path}: folder {parent} does not exist; expected an existing folder, "
                         "or a new one in an existing folder (on a cluster: a shared file system mounted on every "
                         "node, or a URI such as s3://bucket/path)")
    check_writable_dir(folder, "--storage-path")


def alive_nodes() -> list[ClusterNode]:
    """The alive nodes of the Ray cluster this process has joined."""
    import ray

    return [ClusterNode(node["NodeID"], node["NodeManagerAddress"]) for node in ray.nodes() if node["Alive"]]


def check_cluster(cfg: Config, storage_path: str, shared_storage: bool, num_workers: int, placement_strategy: str,
                  nodes: list[ClusterNode]) -> None:
    """Refuse what cannot work on this cluster's ``nodes``: with several, a local storage path unless it is
    shared (``--shared-storage``) and a tracking store not every node reaches; too few for ``STRICT_SPREAD``."""
    count = len(nodes)
    if count > 1:
        if not is_storage_uri(storage_path) and not shared_storage:
            raise InputError(f"--storage-path: {storage_path} is a folder on this machine, but the Ray cluster has "
                             f"{count} nodes, whose workers would each write their own; expected a URI every node "
                             "reaches (s3://..., gs://...), or a folder on a file system shared by every node at the "
                             "same path, said with --shared-storage")
        if cfg.tracking.enabled:
            check_tracking_reachable(cfg.tracking.uri or "", nodes)
    if placement_strategy == "STRICT_SPREAD" and num_workers > count:
        raise InputError(f"--placement-strategy STRICT_SPREAD: {num_workers} workers need {num_workers} nodes (one "
                         f"worker per node), but the Ray cluster has {count} alive node(s); expected --num-workers "
                         f"at most {count}, or --placement-strategy SPREAD or PACK")


def check_tracking_reachable(uri: str, nodes: list[ClusterNode]) -> None:
    """A tracking store every node of a multi-node cluster can write: not a file, not this machine's loopback
    when the nodes are on other machines."""
    scheme = uri.partition(":")[0].split("+", 1)[0].lower()
    if scheme in ("sqlite", "file"):  # a file on the machine that opens it
        raise InputError(f"tracking.uri: {uri} is a file on this machine, but the Ray cluster has {len(nodes)} "
                         "nodes and rank 0 may run on any of them (a SQLite file is not safe on a shared file "
                         "system either); expected an MLflow server every node reaches (http://host:port, see "
                         "harness mlflow-server) or a database URI (postgresql://...)")
    host = urlparse(uri).hostname
    machines = {node.address for node in nodes}
    if host and is_loopback(host) and len(machines) > 1:
        raise InputError(f"tracking.uri: {uri} is loopback, which on each of the cluster's machines "
                         f"({', '.join(sorted(machines))}) is that machine itself; expected the tracking server's "
                         "address as every node reaches it")


def is_loopback(host: str) -> bool:
    try:
        return host.lower() == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

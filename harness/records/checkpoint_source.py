"""Another run's weights, named by the user: a checkpoint file, a run's checkpoint folder or an MLflow run id.

Owns turning that reference into a :class:`CheckpointSource` and the check that it fits a network, for
``checkpoint.init_from`` and ``harness interpolate``; every failure is one line naming the option (``key``).
The run id lookup is mlflow_store.run_checkpoint_path's, the checkpoint layout core/checkpoint.py's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from harness.core.checkpoint import check_model_weights, newest_in
from harness.core.config import Config
from harness.core.model import describe_model, is_mlp
from harness.errors import InputError
from harness.records.mlflow_store import default_tracking_uri, run_checkpoint_path

# MLflow's run ids are uuid4 hex strings; anything else that is not a path is a typo, not a lookup.
RUN_ID_PATTERN = re.compile(r"^[0-9a-f]{32}\Z")


@dataclass(frozen=True)
class CheckpointSource:
    path: Path  # the checkpoint file, absolute
    run_id: Optional[str]  # the MLflow run that wrote it (None: tracking was off)
    config: Config  # the resolved config it was trained with
    model_state: dict[str, torch.Tensor]  # on the CPU



def resolve_checkpoint(ref: str, tracking_uri: Optional[str], key: str) -> CheckpointSource:
    """The checkpoint ``ref`` names: a file, a folder (its newest ``epoch-*.pt``) or an MLflow run id
    (its ``checkpoint_path`` tag, looked up in ``tracking_uri``, default $MLFLOW_TRACKING_URI or ./mlflow.db)."""
    try:
        path, run_id = _locate(ref, tracking_uri or default_tracking_uri(), key)
    except (OSError, RuntimeError) as err:  # a name past the file system's limit, an unknown ~user, no access
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise InputError(f"{key}: {ref[:200]}{'...' if len(ref) > 200 else ''}: {reason}; expected a checkpoint "
                         "file, a run's checkpoint folder or an MLflow run id") from None
    state = _load(path, key)
    try:
        config = Config.from_dict(state["config"])
    except InputError as err:  # a config this version no longer accepts
        raise InputError(f"{key}: {path} holds a config this harness cannot read ({err}); expected a checkpoint "
                         "written by this version") from None
    check_model_weights(state, path, config, key)
    return CheckpointSource(path=path, run_id=run_id or state.get("run_id"), config=config,
                            model_state=state["model"])


def _locate(ref: str, tracking_uri: str, key: str) -> tuple[Path, Optional[str]]:
    given = Path(ref).expanduser()
    if given.is_file():
        return given.resolve(), None
    if given.is_dir():
        newest = newest_in(given)
        if newest is None:
            raise InputError(f"{key}: folder {given} holds no epoch-NNNN.pt checkpoint; expected a run's "
                             "checkpoint folder (checkpoint.dir/<name>), a checkpoint file or an MLflow run id")
        return newest.resolve(), None
    if not RUN_ID_PATTERN.match(ref):
        raise InputError(f"{key}: {ref} does not exist; expected a checkpoint file, a run's checkpoint folder "
                         "or an MLflow run id (32 hex digits)")
    tagged = Path(run_checkpoint_path(tracking_uri, ref, key))
    if not tagged.is_file():
        raise InputError(f"{key}: MLflow run {ref} recorded its checkpoint at {tagged}, which does not exist "
                         "(moved or deleted?); expected the file, or give its new path")
    return tagged.resolve(), ref


def _load(path: Path, key: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise InputError(f"{key}: {path}: cannot read it ({err.strerror}); expected a readable checkpoint file") \
            from None
    except Exception as err:  # torch raises several types for a file that is not a checkpoint
        raise InputError(f"{key}: {path} is not a harness checkpoint (unreadable: {type(err).__name__}); "
                         "expected an epoch-NNNN.pt file written by a run") from None
    if not isinstance(state, dict) or "config_fingerprint" not in state:
        raise InputError(f"{key}: {path} is not a harness checkpoint; expected an epoch-NNNN.pt file written "
                         "by a run (keys model, optimizer, config)")
    if "config" not in state:
        raise InputError(f"{key}: {path} holds no config (written before checkpoints stored theirs); expected a "
                         "checkpoint written by this version: train the run again")
    return state


def check_same_architecture(source: CheckpointSource, expected: Config, key: str) -> None:
    """Refuse a source whose network is not ``expected``'s: its weights would not load (other sizes)
    or would mean another function (another activation, another factory)."""
    found, wanted = describe_model(source.config), describe_model(expected)
    if found != wanted:
        keys = "model.hidden_sizes, model.activation" if is_mlp(expected) else "model.factory, model.kwargs"
        raise InputError(f"{key}: {source.path} holds a {found} network; expected {wanted} ({keys})")

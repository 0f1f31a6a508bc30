"""``harness interpolate``: Keskar et al. (2017)'s 1-D plot between two runs' solutions, written and recorded.

Owns the orchestration: refuse what cannot be compared before anything is written, score θ(α) on
the full training and test splits of run A's data config, write the CSV and plot, and log a new
MLflow run naming both sources. The walk along the line is harness/measure/interpolation.py's.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from harness.console import say
from harness.core.checkpoint import check_writable_dir
from harness.core.data import load_dataset
from harness.core.distributed import DistContext
from harness.core.evaluation import evaluate
from harness.core.model import build_model
from harness.errors import InputError
from harness.analysis.spread import write_rows
from harness.measure.interpolation import alpha_grid, interpolation_curve
from harness.records.checkpoint_source import CheckpointSource, check_same_architecture, resolve_checkpoint
from harness.records.mlflow_store import (check_experiment, check_tracking_server, check_tracking_uri,
                                          default_tracking_uri, record_finished_run)

COLUMNS = ("alpha", "train_loss", "train_accuracy", "test_loss", "test_accuracy")
METRIC_PREFIX = "interpolation/"  # MLflow keys: interpolation/train_loss, ..., step = point index
ARTIFACT_FOLDER = "interpolation"


RUN_KIND = "interpolation"  # the run_kind tag of its MLflow run


@dataclass
class InterpolationResult:
    csv_path: Path
    plot_path: Path
    run_id: Optional[str]  # the new MLflow run (None with log_to_mlflow=False)
    rows: list[dict[str, float]]  # one per α, keys COLUMNS


def run_interpolation(ref_a: str, ref_b: str, *, tracking_uri: Optional[str], experiment: str,
                      alpha_min: float = -1.0, alpha_max: float = 2.0, points: int = 25,
                      out_dir: str | Path = "reports", device: str = "auto", eval_batch_size: int = 10000,
                      label_a: Optional[str] = None, label_b: Optional[str] = None,
                      log_to_mlflow: bool = True, parent_run_id: Optional[str] = None) -> InterpolationResult:
    """Loss and accuracy along θ(α) = (1 − α)·θ_a + α·θ_b; ``ref_a``/``ref_b``: a checkpoint file, a run's
    checkpoint folder or an MLflow run id; ``parent_run_id``: the run (a sweep's) its MLflow run nests under."""
    alphas = alpha_grid(alpha_min, alpha_max, points)
    if eval_batch_size < 1:
        raise InputError(f"--eval-batch-size: {eval_batch_size}; expected a positive number")
    uri = tracking_uri or default_tracking_uri()
    source_a = resolve_checkpoint(ref_a, uri, "--run-a")
    source_b = resolve_checkpoint(ref_b, uri, "--run-b")
    check_same_architecture(source_b, source_a.config, "--run-b")
    _check_same_data(source_a, source_b)
    check_writable_dir(Path(out_dir), "--out")
    if log_to_mlflow:  # a store that would refuse the run is refused now, before the work
        check_tracking_uri(uri)
        check_tracking_server(uri)
        check_experiment(uri, experiment)
    ctx = DistContext(device=_device(device))
    label_a, label_b = label_a or _label(source_a, source_b, "a"), label_b or _label(source_b, source_a, "b")
    say(f"interpolating {label_a} ({source_a.path}) -> {label_b} ({source_b.path}): {points} points, "
        f"α {alpha_min:g}..{alpha_max:g}, on {ctx.device.type}")
    rows = score_line(source_a, source_b, alphas, ctx, eval_batch_size)
    directory = Path(out_dir) / f"interpolate-{_short(source_a)}-{_short(source_b)}"
    directory.mkdir(parents=True, exist_ok=True)
    csv_path = write_rows(directory / "interpolation.csv", COLUMNS,
                          ([f"{row[key]:.8g}" for key in COLUMNS] for row in rows))
    plot_path = directory / "interpolation.png"
    from harness.analysis import plots  # matplotlib only where a figure is drawn

    plots.interpolation(rows, plot_path, label_a, label_b)
    params = {"alpha_min": alpha_min, "alpha_max": alpha_max, "points": points, "eval_batch_size": eval_batch_size,
              "device": ctx.device.type}
    run_id = _record(uri, experiment, source_a, source_b, (ref_a, ref_b), (label_a, label_b), rows,
                     [csv_path, plot_path], params, parent_run_id) if log_to_mlflow else None
    return InterpolationResult(csv_path, plot_path, run_id, rows)


def score_line(source_a: CheckpointSource, source_b: CheckpointSource, alphas: list[float], ctx: DistContext,
               eval_batch_size: int) -> list[dict[str, float]]:
    """The rows of the curve: loss and accuracy on the full training and test splits of A's data config
    (its validation split and subsets, so 'train' is the set A trained on)."""
    dataset = load_dataset(source_a.config).to(ctx.device)
    model = build_model(source_a.config).to(ctx.device).eval()

    def score(network: torch.nn.Module) -> dict[str, float]:
        return {f"{name}_{kind}": value for name, split in (("train", dataset.train), ("test", dataset.test))
                for kind, value in zip(("loss", "accuracy"), evaluate(network, split, ctx, eval_batch_size))}

    curve = interpolation_curve(model, source_a.model_state, source_b.model_state, alphas, score)
    return [{"alpha": point.alpha, **point.scores} for point in curve]


def _check_same_data(source_a: CheckpointSource, source_b: CheckpointSource) -> None:
    """Another data set makes the line meaningless (the two losses are of different problems); other
    data settings (validation split, subsets, seed) only change which samples count: A's are used."""
    data_a, data_b = source_a.config.data, source_b.config.data
    same = data_a.dataset == data_b.dataset and (data_a.dataset != "synthetic" or data_a.synthetic == data_b.synthetic)
    if not same:
        raise InputError(f"--run-b: {source_b.path} was trained on {_data_name(data_b)}; expected run A's data set "
                         f"{_data_name(data_a)} ({source_a.path})")
    if data_a != data_b or source_a.config.seed != source_b.config.seed:
        say(f"note: the runs split {data_a.dataset} differently (data keys or seed); scoring on run A's splits")


def _data_name(data) -> str:
    if data.dataset != "synthetic":
        return data.dataset
    syn = data.synthetic
    return f"synthetic ({syn.num_train} train, {syn.num_features} features, {syn.num_targets} targets)"


def _device(requested: str) -> torch.device:
    if requested not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device: expected one of auto, cpu, cuda, got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise InputError("--device: 'cuda' was requested but no CUDA device is available; expected auto or cpu")
    return torch.device("cuda" if requested != "cpu" and torch.cuda.is_available() else "cpu")


def _label(source: CheckpointSource, other: CheckpointSource, letter: str) -> str:
    """``B=32``; when both runs share the batch size, the run's name tells them apart."""
    batch = source.config.optim.global_batch_size
    same = batch == other.config.optim.global_batch_size
    return f"{letter}: {source.config.name} B={batch}" if same else f"B={batch}"


def _short(source: CheckpointSource) -> str:
    """A folder-safe short name: the run id's first 8 digits, else the run's folder and epoch."""
    text = source.run_id[:8] if source.run_id else f"{source.path.parent.name}-{source.path.stem}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:60]


def _source_tags(letter: str, ref: str, source: CheckpointSource, label: str) -> dict[str, str]:
    tags = {f"source_{letter}": ref, f"source_{letter}_checkpoint": str(source.path), f"source_{letter}_label": label}
    if source.run_id:
        tags[f"source_{letter}_run_id"] = source.run_id
    return tags


def _record(uri: str, experiment: str, source_a: CheckpointSource, source_b: CheckpointSource,
            refs: tuple[str, str], labels: tuple[str, str], rows: list[dict[str, float]], files: list[Path],
            params: dict, parent_run_id: Optional[str] = None) -> str:
    """A new MLflow run (a child of ``parent_run_id`` where given): both sources in its tags, the grid in its
    params, one metric per point, the files."""
    from harness.records.tracking import git_commit

    tags = {"run_kind": RUN_KIND, "git_commit": git_commit(),
            **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}),
            **_source_tags("a", refs[0], source_a, labels[0]), **_source_tags("b", refs[1], source_b, labels[1]),
            "mlflow.note.content": (f"Keskar et al. (2017) interpolation θ(α) = (1 − α)·θ_a + α·θ_b between "
                                    f"`{labels[0]}` ({source_a.path}) and `{labels[1]}` ({source_b.path}). Metrics "
                                    "`interpolation/*` have step = point index (`interpolation/alpha` gives α); "
                                    f"CSV and plot: artifacts, folder `{ARTIFACT_FOLDER}/`.")}
    # Non-finite values (a blown-up loss far along the line) stay in the CSV, out of MLflow's charts.
    metrics = [(METRIC_PREFIX + key, row[key], index) for index, row in enumerate(rows)
               for key in COLUMNS if math.isfinite(row[key])]
    return record_finished_run(uri, experiment, f"interpolate {labels[0]} - {labels[1]}", tags, params, metrics,
                               files, ARTIFACT_FOLDER)


def earlier_result(client, parent_run_id: str, run_a: str, run_b: str, out_dir: Path) -> Optional[InterpolationResult]:
    """The FINISHED interpolation between runs ``run_a`` and ``run_b`` already nested under ``parent_run_id``,
    its files fetched into ``out_dir``; None where there is none (a report drawn again reuses it, and adds
    no second run)."""
    from harness.records.mlflow_store import child_runs

    for run in child_runs(client, parent_run_id):
        tags = run.data.tags
        if (tags.get("run_kind") == RUN_KIND and run.info.status == "FINISHED"
                and tags.get("source_a_run_id") == run_a and tags.get("source_b_run_id") == run_b):
            with _quiet_downloads():
                folder = Path(client.download_artifacts(run.info.run_id, ARTIFACT_FOLDER, str(out_dir)))
            csv_path, plot_path = folder / "interpolation.csv", folder / "interpolation.png"
            if csv_path.exists() and plot_path.exists():
                return InterpolationResult(csv_path, plot_path, run.info.run_id, [])
    return None


@contextlib.contextmanager
def _quiet_downloads():
    """MLflow draws a progress bar for every download: two small files need none."""
    before = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = before

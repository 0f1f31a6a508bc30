"""Read a finished sweep back from MLflow: tables (CSV, Markdown) and plots (PNG).

Owns turning a parent run's child runs into numbers per (LR rule, batch size), mean ± std over
seeds, logged back as the parent's artifacts and as metrics with step = batch size
(``by_batch/<column>_<rule>``), so MLflow charts them against batch size. Reads MLflow only.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from harness.errors import InputError
from harness.analysis import answer, critical, minima
from harness.analysis.spread import cell, write_rows
from harness.records.mlflow_store import child_runs, log_new_metrics, logged_steps, newest_sweep_run, open_client

# (column, metric key) of the summary; each gets a mean and a std over seeds.
SUMMARY_METRICS = (("test_accuracy", "test_accuracy"), ("gap_accuracy", "generalization_gap_accuracy"),
                   ("gap_loss", "generalization_gap_loss"), ("steps_to_target", "steps_to_target"),
                   ("noise_scale", "grad_noise_scale"), ("sharpness", "top_hessian_eigenvalue"))
ANSWER_END = "\n\n---\n\n"  # in the parent's description: the answer above it, what the sweep ran below
HISTORY_KEYS = ("train_loss", "test_loss", "global_step", minima.SHARPNESS_HISTORY)  # what the figures draw


@dataclass
class TrialRecord:
    run_id: str
    name: str
    lr_rule: str
    batch_size: int
    lr: float
    seed: int
    diverged: bool
    final: dict[str, float]
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    momentum: float = 0.0
    target_train_loss: Optional[float] = None  # the sweep compared its trials at this training loss


@dataclass
class Report:
    experiment_id: str
    directory: Path
    csv_path: Path
    markdown_path: Path
    markdown_table: str
    plots: list[Path]
    critical: list[critical.CriticalBatch] = field(default_factory=list)  # per target (ascending), per LR rule
    time_spent: dict[str, Optional[float]] = field(default_factory=dict)
    answer: list[str] = field(default_factory=list)  # the plain lines the report opens with (analysis/answer.py)


def find_sweep_run(client, experiment: str, sweep_run_id: Optional[str]):
    if sweep_run_id:
        try:
            run = client.get_run(sweep_run_id)
        except Exception:
            raise InputError(f"--sweep-run-id {sweep_run_id}: no such run in the tracking store") from None
        kind = run.data.tags.get("run_kind")
        if kind != "sweep":
            what = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} run" if kind else "not a sweep"
            raise InputError(f"--sweep-run-id {sweep_run_id}: run {run.info.run_name!r} is {what}; "
                             "expected the parent run of a sweep (tag run_kind = sweep)")
        return run
    run = newest_sweep_run(client, experiment)
    if run is None:
        raise InputError(f"--latest: no sweep run in experiment {experiment!r}; run launch/sweep.py first")
    return run


def collect_trials(client, parent) -> list[TrialRecord]:
    records = []
    for run in child_runs(client, parent.info.run_id, parent.info.experiment_id):
        params, tags = run.data.params, run.data.tags
        if "batch_size" not in params:  # not a trial: the report's own interpolation run
            continue
        records.append(TrialRecord(
            run_id=run.info.run_id, name=tags.get("trial", run.info.run_name), lr_rule=params.get("lr_rule", "none"),
            batch_size=int(params["batch_size"]), lr=float(params["lr"]), seed=int(params["seed"]),
            diverged=tags.get("diverged") == "true",
            final=critical.population_noise_scales(run.data.metrics, params),
            history={key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                     for key in HISTORY_KEYS if key in run.data.metrics},
            momentum=float(params.get("optim.momentum", 0.0)),
            target_train_loss=_smallest_loss_target(params.get("train.target_train_loss"))))
    return sorted(records, key=lambda r: (r.lr_rule, r.batch_size, r.lr, r.seed))


def _smallest_loss_target(param: Optional[str]) -> Optional[float]:
    """The training loss a trial ran to: train.target_train_loss as logged (``0.2``, or ``(0.3, 0.2)`` for
    several targets, whose smallest ends the run)."""
    if param in (None, "None"):
        return None
    return min(float(v) for v in param.strip("()[]").split(",") if v.strip())


def summarise(trials: list[TrialRecord]) -> list[minima.CellRow]:
    """One row per (rule, batch size, LR): the healthy trials' means; ``reached``: the validation accuracy target."""
    return minima.cell_rows(trials, SUMMARY_METRICS, lambda t: not t.diverged, lambda t: "steps_to_target" in t.final)


def markdown_table(rows: list[minima.CellRow]) -> str:
    header = ("| LR rule | batch | LR | seeds | test accuracy | gap (acc) | gap (loss) | steps to target "
              "| reached | noise scale | sharpness | diverged |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        s = row.stats
        lines.append(f"| {row.lr_rule} | {row.batch_size} | {row.lr:.4g} | {row.seeds} "
                     f"| {cell(*s['test_accuracy'], 4)} | {cell(*s['gap_accuracy'], 4)} | {cell(*s['gap_loss'], 4)} "
                     f"| {cell(*s['steps_to_target'], 0)} | {row.reached}/{row.seeds}"
                     f"{f' ({row.raced} stopped by the race)' if row.raced else ''} "
                     f"| {cell(*s['noise_scale'], 0)} | {cell(*s['sharpness'], 2)} | {row.diverged} |")
    return "\n".join(lines)


def write_csv(rows: list[minima.CellRow], path: Path) -> Path:
    columns = [c for c, _ in SUMMARY_METRICS]
    return write_rows(path, ["lr_rule", "batch_size", "lr", "seeds", "reached", "diverged"]
                      + [f"{c}_{part}" for c in columns for part in ("mean", "std")],
                      ([row.lr_rule, row.batch_size, row.lr, row.seeds, row.reached, row.diverged]
                       + [v for c in columns for v in row.stats[c]] for row in rows))


def tuned_rows(rows: list[minima.CellRow], tuned: list[critical.TunedBatch]) -> list[minima.CellRow]:
    """One row per (rule, batch size): the only one, or with an LR grid the tuned LR's (the smallest LR
    where none reached), so per-batch-size figures and the parent's ``by_batch/`` series stay one line."""
    best = {(t.lr_rule, t.batch_size): (t.best.lr if t.best else t.grid[0].lr) for t in tuned}
    return [row for row in rows if best[(row.lr_rule, row.batch_size)] == row.lr]


def log_parent_metrics(client, parent_run_id: str, rows: list[minima.CellRow],
                       results: list[critical.CriticalBatch]) -> None:
    """Each row's means on the parent run, step = batch size; the critical batch size's numbers
    (critical.parent_metrics: single values at step 0, per batch size at step = batch size, per target at
    step = round(1000 target)); each per-batch-size series again against log2 of the batch size."""
    from mlflow.entities import Metric, RunTag

    values: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rows:
        means = {column: mean for column, (mean, _std) in row.stats.items() if math.isfinite(mean)}
        for column, value in {**means, "diverged": float(row.diverged)}.items():
            values[f"by_batch/{column}_{row.lr_rule}"][row.batch_size] = value
    single, series = critical.parent_metrics(results)
    by_batch = {**values, **{key: s for key, s in series.items() if "_by_target" not in key}}
    values.update({key: {0: value} for key, value in single.items()})
    values.update(series)
    values.update(log2_batch_series(by_batch))
    near = {f"grad_noise_scale_batch_sizes_{r.lr_rule}": ",".join(map(str, r.near_batch_sizes))
            for r in results if r.near_batch_sizes and r.target == results[-1].target}  # the fixed names' target
    if near:  # which trials the parent's grad_noise_scale_* medians are over
        client.log_batch(parent_run_id, tags=[RunTag(k, v) for k, v in near.items()])
    now_ms = int(time.time() * 1000)
    metrics = [Metric(key, value, now_ms, step) for key, by_step in values.items() for step, value in by_step.items()]
    log_new_metrics(client, parent_run_id, metrics, logged_steps(client, parent_run_id))


def log2_batch_series(by_batch: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """Each per-batch-size series again against log2 of the batch size, so that MLflow's charts (a linear
    axis of steps) space 32, 64, 128, ... evenly: ``by_log2_batch/<name>`` with step = log2(B) where every batch
    size is a power of two, else ``by_log2_batch_x100/<name>`` with step = round(100 log2(B))."""
    sizes = {b for series in by_batch.values() for b in series}
    whole = all(b > 0 and b & (b - 1) == 0 for b in sizes)
    prefix, scale = ("by_log2_batch/", 1) if whole else ("by_log2_batch_x100/", 100)
    return {prefix + key.removeprefix("by_batch/"): {round(scale * math.log2(b)): v for b, v in series.items()}
            for key, series in by_batch.items()}


def build_report(tracking_uri: str, experiment: str, sweep_run_id: Optional[str] = None,
                 out_dir: str | Path = "reports", interpolate: bool = True) -> Report:
    """Read the sweep, write table and plots under ``out_dir/<sweep run id>/``, log them to the parent run;
    ``interpolate``: also the loss along the line between the smallest and largest healthy batch size."""
    from harness.analysis import plots

    client = open_client(tracking_uri)
    parent = find_sweep_run(client, experiment, sweep_run_id)
    trials = collect_trials(client, parent)
    if not trials:
        raise InputError(f"sweep run {parent.info.run_id}: no child runs; expected one per trial")
    results = critical.analyse(trials)
    largest = results[-1].target
    last = [r for r in results if r.target == largest]  # the largest target's, one per rule
    rows = summarise(trials)
    per_batch = tuned_rows(rows, [t for r in last for t in r.tuned])
    directory = Path(out_dir) / parent.info.run_id
    directory.mkdir(parents=True, exist_ok=True)
    csv_path, markdown_path = write_csv(rows, directory / "summary.csv"), directory / "summary.md"
    target = parent.data.params.get("metrics.target_val_accuracy")
    has_target = target not in (None, "None") or largest is not None  # without one there is no S(B) to fit
    stopped = parent.data.params.get("train.stop_at_target") == "True"
    answer_lines = answer.plain_answer(results if has_target else [], rows, stopped, str(target))
    table = markdown_table(rows) + ("\n\n" + critical.markdown(results) if has_target else "")
    target_label = (f"val acc ≥ {largest:g}" if largest is not None else f"val acc ≥ {target}" if has_target
                    else "target")
    drawn = plots.draw_all(trials, per_batch, directory, target_label) + (
        plots.draw_critical(last, directory, target_label) if has_target else [])
    if len(results) > len(last):  # several targets
        drawn.append(plots.critical_vs_target(results, directory / "critical_batch_vs_target.png"))
    text, figures = _minima_sections(client, tracking_uri, experiment, parent.info.run_id, trials, directory,
                                     interpolate)
    table, drawn = table + text, drawn + figures
    opening = answer_lines[0] + "\n\n" + "\n".join(answer_lines[1:]) + "\n\n" if answer_lines else ""
    markdown_path.write_text(f"# Sweep {parent.info.run_name} ({parent.info.run_id})\n\n{opening}{table}\n")
    for path in [csv_path, markdown_path, *drawn]:
        client.log_artifact(parent.info.run_id, str(path), artifact_path="report")
    log_parent_metrics(client, parent.info.run_id, per_batch, results)
    if answer_lines:  # the run's description, what its Overview opens with in the MLflow UI: the answer first
        described = parent.data.tags.get("mlflow.note.content", "")
        described = described.split(ANSWER_END, 1)[1] if ANSWER_END in described else described  # a report's again
        client.set_tag(parent.info.run_id, "mlflow.note.content",
                       answer_lines[0] + "\n\n" + "\n".join(answer_lines[1:]) + ANSWER_END + described)
    return Report(parent.info.experiment_id, directory, csv_path, markdown_path, table, drawn, results,
                  critical.time_spent([t.final for t in trials]), answer_lines)


def _minima_sections(client, tracking_uri: str, experiment: str, parent_run_id: str, trials: list[TrialRecord],
                     directory: Path, interpolate: bool) -> tuple[str, list[Path]]:
    """The equal-loss table, sharpness trajectories and interpolation the sweep has: Markdown to append, figures."""
    from harness.analysis import plots

    text, drawn = "", []
    targets = {t.target_train_loss for t in trials if t.target_train_loss is not None}
    if targets:
        text += "\n\n" + minima.markdown(minima.equal_loss_rows(trials), min(targets))
        text += "".join("\n\n" + d.line() for d in minima.extremes_difference(trials))
    several_rules = len({t.lr_rule for t in trials}) > 1
    curves = minima.sharpness_curves(trials, lambda t: f"B={t.batch_size} lr {t.lr:.3g}" + (
        f" ({t.lr_rule})" if several_rules else ""))
    if curves:
        drawn.append(plots.sharpness_trajectories(curves, directory / "sharpness_vs_steps.png",
                                                  "Sharpness during training (dashed: 2(1+β)/η of the trial's LR)"))
    pair = minima.interpolation_pair(trials) if interpolate else None
    if pair:
        from harness.analysis.interpolation import earlier_result, run_interpolation

        small, large = pair
        try:
            result = earlier_result(client, parent_run_id, small.run_id, large.run_id, directory) or run_interpolation(
                small.run_id, large.run_id, tracking_uri=tracking_uri, experiment=experiment, out_dir=directory,
                label_a=f"B={small.batch_size}", label_b=f"B={large.batch_size}", parent_run_id=parent_run_id)
        except InputError as err:  # e.g. checkpoints switched off: the rest of the report still stands
            text += f"\n\nInterpolation between B={small.batch_size} and B={large.batch_size} not drawn: {err}"
        else:
            drawn += [result.plot_path, result.csv_path]
            text += (f"\n\nInterpolation θ(α) = (1-α)·θ(B={small.batch_size}) + α·θ(B={large.batch_size}), seed "
                     f"{small.seed}: {result.plot_path.name}, MLflow run {result.run_id}")
    return text, drawn

"""The escape experiment: does a small batch leave the region a large batch settled in (and the reverse)?

Owns ``harness escape``'s runs. Per seed, a finished sweep's healthy smallest- and largest-batch
trials continue from their final weights (fresh optimizer) four ways: large → small, small → large,
and the controls large → large and small → small, which tell a change from what more training does
anyway. A continuation adopts the batch size and LR of its target and reads sharpness every epoch.
The runs are children of one MLflow parent (``run_kind`` ``escape``, tag ``escape_of``), whose
artifacts get the before → after table and the sharpness plot. One rank, in this process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from harness.console import say
from harness.core import distributed
from harness.core.config import Config
from harness.errors import InputError
from harness.analysis import minima
from harness.analysis.report import TrialRecord, collect_trials, find_sweep_run
from harness.analysis.spread import mean_std, write_rows
from harness.launching.preflight import check_init_from, preflight
from harness.launching.run_lock import run_folders_held
from harness.sweeps.sweep import SweepProgress, run_trials, sweep_parent_run

# What the table reads before (the source trial's final metrics) and after (the continuation's).
READOUTS = (("train_loss", "train loss", 4), ("test_accuracy", "test accuracy", 4),
            ("test_loss", "test loss", 4), (minima.SHARPNESS, "λ_max", 2), ("weight_norm", "‖θ‖", 1))


@dataclass
class Continuation:
    source: TrialRecord  # whose final weights it starts from
    adopted: TrialRecord  # whose batch size and LR it trains with
    cfg: Config


def continuation_config(source_cfg: Config, source: TrialRecord, adopted: TrialRecord, epochs: int,
                        name: str, tracking_uri: str, experiment: str) -> Config:
    """``source_cfg`` (the source trial's own config) continued from its final weights with ``adopted``'s
    batch size and LR for ``epochs`` epochs, sharpness read at step 0 and after every epoch."""
    raw = source_cfg.to_dict()
    raw["name"] = f"{name}-bs{source.batch_size}-to-bs{adopted.batch_size}-seed{source.seed}"
    raw["optim"].update(global_batch_size=adopted.batch_size, lr=adopted.lr, warmup_epochs=0.0)
    raw["train"].update(epochs=epochs, max_steps=None, target_train_loss=None, stop_at_target=False)
    raw["metrics"].update(sharpness=True, sharpness_every=1, sharpness_every_unit="epochs", target_val_accuracy=None,
                          exact_noise_samples=None)
    raw["checkpoint"].update(enabled=True, init_from=source.run_id)
    raw["tracking"].update(enabled=True, uri=tracking_uri, experiment=experiment)
    raw["trial"] = {**(raw.get("trial") or {}), "sweep": name, "lr_rule": adopted.lr_rule}
    raw.pop("sweep", None)
    return Config.from_dict(raw)


def plan_continuations(trials: list[TrialRecord], epochs: int, name: str, tracking_uri: str,
                       experiment: str) -> list[Continuation]:
    """The four continuations per seed both ends of the sweep share (see the module's docstring)."""
    from harness.records.checkpoint_source import resolve_checkpoint

    healthy = [t for t in trials if minima.is_healthy(t)]
    first = minima.interpolation_pair(trials)
    if first is None:
        raise InputError("--sweep-run-id: the sweep has fewer than two healthy batch sizes (not diverged, loss target "
                         "reached where set); expected a smallest and a largest to continue")
    plan = []
    for seed in sorted({t.seed for t in healthy}):
        ends = [[t for t in healthy if t.lr_rule == first[0].lr_rule and t.batch_size == end.batch_size
                 and t.seed == seed] for end in first]
        if not all(ends):
            continue
        small, large = (min(end, key=lambda t: t.final.get(minima.STEPS, math.inf)) for end in ends)
        # Each source's own config, read once from its checkpoint (both of its continuations start from it).
        configs = {t.run_id: resolve_checkpoint(t.run_id, tracking_uri, key="--sweep-run-id").config
                   for t in (small, large)}
        plan += [Continuation(source, adopted, continuation_config(configs[source.run_id], source, adopted, epochs,
                                                                   name, tracking_uri, experiment))
                 for source, adopted in ((large, small), (large, large), (small, large), (small, small))]
    return plan


def run_escape(tracking_uri: str, experiment: str, sweep_run_id: Optional[str], epochs: int,
               out_dir: str | Path = "reports") -> Path:
    """Run the continuations of a finished sweep and write the escape table; returns the table's path."""
    if epochs < 1:
        raise InputError(f"--epochs: {epochs}; expected a positive number of epochs")
    from harness.records.mlflow_store import open_client

    client = open_client(tracking_uri)
    parent = find_sweep_run(client, experiment, sweep_run_id)
    name = f"escape-{parent.data.tags.get('sweep_name', parent.info.run_name)}"[:60]
    plan = plan_continuations(collect_trials(client, parent), epochs, name, tracking_uri, experiment)
    # Everything is checked before the first continuation starts: the store, folders and data once
    # (they share the sweep's), and every continuation's init_from.
    dataset = preflight(plan[0].cfg, 1, use_gpu=plan[0].cfg.train.device == "cuda")
    for continuation in plan[1:]:
        check_init_from(continuation.cfg)
    ctx = distributed.local_context(plan[0].cfg.train.device)
    parent_cfg = Config.from_dict({**plan[0].cfg.to_dict(), "name": name, "trial": None})
    progress = SweepProgress(len(plan))
    with run_folders_held([c.cfg for c in plan], "escape run"), \
            sweep_parent_run(parent_cfg, ctx, trials=[c.cfg for c in plan], kind="escape") as escape:
        client.set_tag(escape.run_id, "escape_of", parent.info.run_id)
        for index, continuation in enumerate(plan):
            progress.starting_stack([index], [continuation.cfg], f"from {continuation.source.name}")
            escape.outcomes += run_trials([continuation.cfg], ctx, dataset, escape.run_id, resume=False)
        records = {r.name: r for r in collect_trials(client, client.get_run(escape.run_id))}
        directory = Path(out_dir) / escape.run_id
        directory.mkdir(parents=True, exist_ok=True)
        rows = escape_rows(plan, {trial: record.final for trial, record in records.items()})
        table_path = directory / "escape.md"
        table_path.write_text(f"# Escape from {parent.info.run_name} ({parent.info.run_id}), {epochs} epochs\n\n"
                              + escape_markdown(rows, epochs) + "\n")
        drawn = [table_path, write_escape_csv(rows, directory / "escape.csv"), _draw(plan, records, directory)]
        for path in drawn:
            client.log_artifact(escape.run_id, str(path), artifact_path="report")
    say("\n" + escape_markdown(rows, epochs), f"\nescape report: {directory}")
    return table_path


def _draw(plan: list[Continuation], records: dict[str, TrialRecord], directory: Path) -> Path:
    from harness.analysis import plots

    labels = {c.cfg.name: f"B={c.source.batch_size} → B={c.adopted.batch_size}" for c in plan}
    curves = minima.sharpness_curves([records[c.cfg.name] for c in plan if c.cfg.name in records],
                                     lambda record: labels[record.name])
    return plots.sharpness_trajectories(curves, directory / "escape_sharpness.png",
                                        "Sharpness while continuing (dashed: 2(1+β)/η of the continuation's LR)")


@dataclass
class EscapeRow:
    source_batch: int
    adopted_batch: int
    adopted_lr: float
    momentum: float
    seeds: int
    before: dict[str, float]  # READOUTS key -> mean over the seeds
    after: dict[str, float]


def escape_rows(plan: list[Continuation], finals: dict[str, dict[str, float]]) -> list[EscapeRow]:
    """One row per (source batch, adopted batch): before and after values over the seeds that finished."""
    groups: dict[tuple[int, int], list[Continuation]] = {}
    for c in plan:
        if c.cfg.name in finals:
            groups.setdefault((c.source.batch_size, c.adopted.batch_size), []).append(c)

    def means(metrics: list[dict[str, float]]) -> dict[str, float]:
        return {key: mean_std([m.get(key, math.nan) for m in metrics])[0] for key, _, _ in READOUTS}

    return [EscapeRow(*sizes, members[0].adopted.lr, members[0].cfg.optim.momentum, len(members),
                      means([c.source.final for c in members]), means([finals[c.cfg.name] for c in members]))
            for sizes, members in groups.items()]


def _before_after(b: float, a: float, digits: int) -> str:
    return "-" if math.isnan(b) and math.isnan(a) else f"{b:.{digits}f} → {a:.{digits}f}"


def escape_markdown(rows: list[EscapeRow], epochs: int) -> str:
    lines = [f"Each row: a sweep trial's final weights continued for {epochs} epochs with another (or its own) batch "
             "size and that batch size's LR, fresh optimizer; before → after, mean over seeds. λ_max: top Hessian "
             "eigenvalue; limit: 2(1+β)/η of the continuation's LR.", "",
             "| from | continued with | LR | seeds | " + " | ".join(label for _, label, _ in READOUTS)
             + " | λ_max / limit after |", "|" + "---|" * (5 + len(READOUTS))]
    for row in rows:
        limit = minima.stability_limit(row.adopted_lr, row.momentum)
        ratio = row.after[minima.SHARPNESS] / limit
        lines.append(f"| B={row.source_batch} | B={row.adopted_batch} | {row.adopted_lr:.4g} | {row.seeds} | "
                     + " | ".join(_before_after(row.before[k], row.after[k], d) for k, _, d in READOUTS)
                     + f" | {'-' if math.isnan(ratio) else f'{ratio:.2f}'} |")
    return "\n".join(lines)


def write_escape_csv(rows: list[EscapeRow], path: Path) -> Path:
    return write_rows(path, ["from_batch", "continued_with_batch", "lr", "seeds"]
                      + [f"{k}_{when}" for k, _, _ in READOUTS for when in ("before", "after")],
                      ([row.source_batch, row.adopted_batch, row.adopted_lr, row.seeds]
                       + [getattr(row, when)[k] for k, _, _ in READOUTS for when in ("before", "after")]
                       for row in rows))

"""The note's second claim, read from a finished sweep: batch sizes compared at equal training loss.

Owns, from harness/analysis/report.py's trial records: the table per (LR rule, batch size, LR)
of a sweep whose trials stop at ``train.target_train_loss`` (steps and epochs to it; test
accuracy, loss, gaps and sharpness there), each trial's edge-of-stability limit 2(1 + β)/η
(Cohen et al. 2021) and sharpness path, and the two trials the report interpolates between.
Pure. Only trials that reached the loss target are averaged: one that ran out of budget sits
at a higher loss.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

from harness.analysis.critical import RACE_BOUND
from harness.analysis.spread import cell, mean_std

# Per-trial metrics the training loop logs (core/evaluation.py).
STEPS, EPOCHS = "steps_to_train_loss_target", "epochs_to_train_loss_target"
SHARPNESS = "top_hessian_eigenvalue"
SHARPNESS_HISTORY = "by_step/top_hessian_eigenvalue"
# (column, final metric) read at the target, mean and std over the trials that reached it.
AT_TARGET = (("test_accuracy", "test_accuracy"), ("test_loss", "test_loss"), ("train_loss", "train_loss"),
             ("gap_accuracy", "generalization_gap_accuracy"), ("gap_loss", "generalization_gap_loss"),
             ("steps", STEPS), ("epochs", EPOCHS), ("sharpness", SHARPNESS), ("weight_norm", "weight_norm"))


def stability_limit(lr: float, momentum: float) -> float:
    """2(1 + β)/η: the largest Hessian eigenvalue at which gradient descent with heavy-ball momentum β
    and LR η is still stable on a quadratic (Cohen et al. 2021; 2/η without momentum)."""
    return 2.0 * (1.0 + momentum) / lr


def sharpness_curves(trials: list, label) -> list[tuple[str, list[tuple[int, float]], float]]:
    """(``label(trial)``, λ_max history, stability limit) of every healthy trial with two sharpness readings or more
    (a path needs two), for plots.sharpness_trajectories."""
    return [(label(t), t.history[SHARPNESS_HISTORY], stability_limit(t.lr, t.momentum))
            for t in trials if not t.diverged and len(t.history.get(SHARPNESS_HISTORY, ())) > 1]


def is_healthy(trial) -> bool:
    """Not diverged, and reached the loss target where the sweep had one."""
    return not trial.diverged and (trial.target_train_loss is None or STEPS in trial.final)


@dataclass
class CellRow:
    """One (LR rule, batch size, LR) of a sweep, as the report's tables show it."""
    lr_rule: str
    batch_size: int
    lr: float
    momentum: float
    seeds: int
    reached: int
    diverged: int
    stats: dict[str, tuple[float, float]]  # column -> (mean, std) over the trials averaged
    raced: int = 0  # trials the steps-to-target race stopped (train.race_stop): neither reached nor not

    @property
    def limit(self) -> float:
        return stability_limit(self.lr, self.momentum)


def cell_rows(trials: list, columns, averaged, reached) -> list[CellRow]:
    """One row per (rule, batch size, LR): ``columns`` over the trials ``averaged`` keeps; ``reached`` counts."""
    groups: dict[tuple[str, int, float], list] = defaultdict(list)
    for trial in trials:
        groups[(trial.lr_rule, trial.batch_size, trial.lr)].append(trial)
    rows = []
    for (rule, batch_size, lr), members in sorted(groups.items()):
        kept = [t for t in members if averaged(t)]
        stats = {column: mean_std([t.final[key] for t in kept if key in t.final]) for column, key in columns}
        rows.append(CellRow(rule, batch_size, lr, members[0].momentum, len(members), sum(map(reached, members)),
                            sum(t.diverged for t in members), stats,
                            sum(RACE_BOUND in t.final for t in members)))
    return rows


def equal_loss_rows(trials: list) -> list[CellRow]:
    """One row per (rule, batch size, LR), its columns over the seeds that reached the loss target."""
    return cell_rows(trials, AT_TARGET, _reached_loss, _reached_loss)


def _reached_loss(trial) -> bool:
    return not trial.diverged and STEPS in trial.final


def interpolation_pair(trials: list) -> Optional[tuple]:
    """(small, large): healthy trials of the smallest and largest healthy batch size, same LR rule and (lowest
    shared) seed, each the fewest steps to target among its LRs; None with fewer than two healthy sizes."""
    healthy = [t for t in trials if is_healthy(t)]
    for rule in sorted({t.lr_rule for t in healthy}):
        members = [t for t in healthy if t.lr_rule == rule]
        sizes = sorted({t.batch_size for t in members})
        if len(sizes) < 2:
            continue
        seeds = sorted({t.seed for t in members if t.batch_size == sizes[0]}
                       & {t.seed for t in members if t.batch_size == sizes[-1]})
        if not seeds:
            continue
        return tuple(min((t for t in members if t.batch_size == size and t.seed == seeds[0]),
                         key=lambda t: t.final.get(STEPS, math.inf)) for size in (sizes[0], sizes[-1]))
    return None


@dataclass(frozen=True)
class Difference:
    """Test accuracy at the smallest batch minus at the largest, over their seeds that reached the loss
    target: Welch's t-test (unequal variances) and its 95% interval."""
    lr_rule: str
    small: int
    large: int
    small_values: tuple[float, ...]
    large_values: tuple[float, ...]
    difference: float
    low: float
    high: float
    p_value: float

    def line(self) -> str:
        return (f"Test accuracy at B={self.small} minus B={self.large} (lr rule {self.lr_rule}): "
                f"{self.difference:+.4f} (95% interval {self.low:+.4f}..{self.high:+.4f}; Welch's t-test "
                f"p = {self.p_value:.3g}; {len(self.small_values)} and {len(self.large_values)} seeds)")


def extremes_difference(trials: list) -> list[Difference]:
    """Per LR rule, the smallest and the largest batch size with at least two seeds at the loss target (at each,
    the LR with the most such seeds: a rule's sweep has one LR per batch size): is the small batch's test
    accuracy higher?"""
    from scipy import stats

    differences = []
    for rule in sorted({t.lr_rule for t in trials}):
        cells: dict[int, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
        for t in trials:
            if t.lr_rule == rule and _reached_loss(t) and "test_accuracy" in t.final:
                cells[t.batch_size][t.lr].append(t.final["test_accuracy"])
        sizes = sorted(b for b, by_lr in cells.items() if max(map(len, by_lr.values())) >= 2)
        if len(sizes) < 2:
            continue
        small, large = (max(cells[b].values(), key=len) for b in (sizes[0], sizes[-1]))
        result = stats.ttest_ind(small, large, equal_var=False)
        low, high = result.confidence_interval(0.95)
        differences.append(Difference(rule, sizes[0], sizes[-1], tuple(small), tuple(large),
                                      float(sum(small) / len(small) - sum(large) / len(large)),
                                      float(low), float(high), float(result.pvalue)))
    return differences


def markdown(rows: list[CellRow], target: float) -> str:
    """The table at equal training loss, and what it rests on."""
    lines = [f"### Batch sizes at equal training loss ({target:g}, full training split)", "",
             "Columns read at the first evaluation whose full training loss reached the target, mean ± std over "
             "the seeds that reached it (a trial that ran out of budget is counted in 'reached', not averaged in). "
             "Sharpness: top Hessian eigenvalue λ_max there; 2(1+β)/η: the edge-of-stability limit of the trial's "
             "LR η and momentum β (Cohen et al. 2021). ‖θ‖: the weights' norm there (sharpness depends on the "
             "weights' scale, Dinh et al. 2017).", "",
             "| LR rule | batch | LR | reached | steps to loss | epochs to loss | test accuracy | test loss "
             "| gap (acc) | gap (loss) | λ_max | 2(1+β)/η | λ_max / limit | ‖θ‖ |",
             "|" + "---|" * 14]
    for row in rows:
        s = row.stats
        ratio = s["sharpness"][0] / row.limit if math.isfinite(s["sharpness"][0]) else math.nan
        lines.append(f"| {row.lr_rule} | {row.batch_size} | {row.lr:.4g} | {row.reached}/{row.seeds} "
                     f"| {cell(*s['steps'], 0)} | {cell(*s['epochs'], 1)} | {cell(*s['test_accuracy'], 4)} "
                     f"| {cell(*s['test_loss'], 4)} | {cell(*s['gap_accuracy'], 4)} | {cell(*s['gap_loss'], 4)} "
                     f"| {cell(*s['sharpness'], 2)} | {row.limit:.3g} | {'-' if math.isnan(ratio) else f'{ratio:.2f}'} "
                     f"| {cell(*s['weight_norm'], 1)} |")
    return "\n".join(lines)

"""The critical batch size of a finished sweep: the LR tuned per batch size, the fit of S(B), the parent's numbers.

Pure, from harness/analysis/report.py's trial records: the best LR per (LR rule, batch size) (Shallue
et al. 2018: batch-size claims hold only with the optimizer tuned per batch size), the bootstrap fit of
S(B) = S_min (1 + B_crit/B) over seeds (McCandlish et al. 2018; harness/measure/critical_batch.py),
the noise scale near B_crit, the parent run's metrics (fixed names, so sweeps compare), the Markdown.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional

from harness.measure.critical_batch import NotEnoughBatchSizes, StepsFit, bootstrap_fit

FIT_MIN_BATCH_SIZES = 3
INTERVAL_LEVEL = 0.9  # of the bootstrap interval of B_crit
# Per-trial metrics the training loop logs.
STEPS, SAMPLES = "steps_to_target", "samples_to_target"
RACE_BOUND = "steps_to_target_lower_bound"  # a trial the race stopped (train.race_stop) took more steps than this
NOISE_PROBE, NOISE_EXACT = "grad_noise_scale_at_target", "grad_noise_scale_exact_at_target"
# Cumulative within a run (the last logged value is the run's total), and what each one times.
TIME_METRICS = {"time_train_s": "training", "time_eval_s": "evaluation", "time_epoch_eval_s": "epoch-end evaluation",
                "time_probe_s": "probes", "time_sharpness_s": "sharpness", "time_tracking_s": "tracking"}


@dataclass
class LrCell:
    """One LR at one batch size: steps to target per seed (inf where the seed never reached it)."""
    lr: float
    trials: list  # TrialRecord, one per seed

    @property
    def steps(self) -> list[float]:
        return [steps_of(t) for t in self.trials]

    @property
    def median_steps(self) -> float:
        return statistics.median(self.steps)


@dataclass
class TunedBatch:
    """The best LR of one (rule, batch size): fewest median steps over seeds, a median that reached."""
    lr_rule: str
    batch_size: int
    grid: list[LrCell]  # ascending LR
    best: Optional[LrCell]  # None: no LR's median reached the target

    @property
    def reached(self) -> bool:
        return self.best is not None

    @property
    def edge(self) -> str:
        """'smallest' / 'largest' where the best LR is a grid edge (the optimum may lie beyond), else ''."""
        if self.best is None or len(self.grid) < 2:
            return ""
        return "smallest" if self.best is self.grid[0] else "largest" if self.best is self.grid[-1] else ""

    @property
    def race_stopped(self) -> int:
        return sum(math.isfinite(race_bound(t)) for c in self.grid for t in c.trials)

    @property
    def race_doubt(self) -> list[float]:
        """LRs with seeds the race stopped whose median, counting those seeds at their lower bounds, is at most
        the tuned median: there the race, not the training, may have decided the tuned LR."""
        tuned = self.best.median_steps if self.best else math.inf
        return [c.lr for c in self.grid if c is not self.best and any(math.isfinite(race_bound(t)) for t in c.trials)
                and statistics.median(min(steps_of(t), race_bound(t)) for t in c.trials) <= tuned]

    def values(self, key: str) -> list[float]:
        """``key`` of the best LR's seeds that reached the target and logged it (samples fall back to B x steps)."""
        reached = [t for t in self.best.trials if math.isfinite(steps_of(t))] if self.best else []
        values = [t.final.get(key, self.batch_size * steps_of(t) if key == SAMPLES else math.nan) for t in reached]
        return [v for v in values if math.isfinite(v)]

    def median(self, key: str) -> float:
        return _median(self.values(key))

    @property
    def median_samples(self) -> float:
        """Median over the best LR's seeds of samples to target, a seed that never reached counting as
        infinitely many (as in ``median_steps``, so the two medians describe the same seeds)."""
        if self.best is None:
            return math.nan
        samples = self.values(SAMPLES)
        return statistics.median(samples + [math.inf] * (len(self.best.trials) - len(samples)))


@dataclass
class CriticalBatch:
    """One LR rule's answer: the tuned batch sizes, the fit (or why there is none), B_simple near B_crit."""
    lr_rule: str
    tuned: list[TunedBatch]
    fit: Optional[StepsFit] = None
    low: float = math.nan
    high: float = math.nan
    why_no_fit: str = ""
    near_batch_sizes: tuple[int, ...] = ()  # where B_simple was read: the reached sizes around B_crit
    noise_scale: float = math.nan  # median grad_noise_scale_at_target over their tuned trials
    noise_scale_exact: float = math.nan


def steps_of(trial) -> float:
    """Steps to target of one trial; inf where it never reached the target (or diverged)."""
    value = trial.final.get(STEPS, math.inf)
    return math.inf if trial.diverged or not math.isfinite(value) else value


def race_bound(trial) -> float:
    """The lower bound on the steps of a trial the race stopped; inf for any other."""
    value = trial.final.get(RACE_BOUND, math.inf)
    return math.inf if trial.diverged or not math.isfinite(value) else value


def tune(trials: list) -> list[TunedBatch]:
    """Per (rule, batch size): the LR whose median steps over seeds is fewest (ties: the smaller LR)."""
    cells: dict[tuple[str, int], dict[float, list]] = {}
    for trial in trials:
        cells.setdefault((trial.lr_rule, trial.batch_size), {}).setdefault(trial.lr, []).append(trial)
    tuned = []
    for (rule, batch_size), by_lr in sorted(cells.items()):
        grid = [LrCell(lr, by_lr[lr]) for lr in sorted(by_lr)]
        reached = [c for c in grid if math.isfinite(c.median_steps)]
        tuned.append(TunedBatch(rule, batch_size, grid, min(reached, key=lambda c: (c.median_steps, c.lr), default=None)))
    return tuned


def critical_batch(rule: str, tuned: list[TunedBatch], resamples: int = 1000, seed: int = 0) -> CriticalBatch:
    """Fit S(B) to one rule's tuned steps (bootstrap over the best LR's seeds), and read B_simple near B_crit."""
    mine = [t for t in tuned if t.lr_rule == rule]
    result = CriticalBatch(rule, mine)
    # Best-LR seeds that never reached stay out of the fit: their steps are unknown, not infinite.
    steps_by_batch = {t.batch_size: t.values(STEPS) for t in mine if t.reached}
    if len(steps_by_batch) < FIT_MIN_BATCH_SIZES:
        sizes = ", ".join(map(str, sorted(steps_by_batch))) or "none"
        result.why_no_fit = (f"no fit of S(B) for lr rule {rule}: {len(steps_by_batch)} batch size(s) reached the "
                             f"target ({sizes}); it needs at least {FIT_MIN_BATCH_SIZES}")
        return result
    try:
        result.fit, result.low, result.high = bootstrap_fit(steps_by_batch, resamples=resamples, seed=seed,
                                                            level=INTERVAL_LEVEL)
    except NotEnoughBatchSizes as err:
        result.why_no_fit = f"no fit of S(B) for lr rule {rule}: {err}"
        return result
    if not result.fit.valid:  # never a negative or infinite critical batch size on the parent run
        result.why_no_fit = f"no valid fit of S(B) for lr rule {rule}: {result.fit.problem}"
        result.fit, result.low, result.high = None, math.nan, math.nan
        return result
    result.near_batch_sizes = near = nearest_batch_sizes(sorted(steps_by_batch), result.fit.b_crit)
    by_size = {t.batch_size: t for t in mine}
    result.noise_scale, result.noise_scale_exact = (_median([v for b in near for v in by_size[b].values(key)])
                                                    for key in (NOISE_PROBE, NOISE_EXACT))
    return result


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def nearest_batch_sizes(sizes: list[int], b_crit: float) -> tuple[int, ...]:
    """The batch sizes that bracket ``b_crit`` (the largest below it and the smallest at or above it);
    the one nearest it where it lies outside ``sizes`` (or is not a positive number)."""
    if not (math.isfinite(b_crit) and b_crit > 0):
        return ()
    return tuple([b for b in sizes if b < b_crit][-1:] + [b for b in sizes if b >= b_crit][:1])


def parent_metrics(results: list[CriticalBatch]) -> tuple[dict[str, float], dict[str, dict[int, float]]]:
    """(single values, per-batch-size series with step = batch size) for the sweep's parent run. The
    primary rule's numbers carry the fixed names (``critical_batch_size``, ``tuned_lr``, ...); with several
    rules each rule's also appear as ``<name>_<rule>``. Numbers that do not exist are left out, never NaN."""
    rules = [r.lr_rule for r in results]
    primary = "none" if "none" in rules else min(rules)  # "none": its LR grid is the tuning
    single: dict[str, float] = {}
    series: dict[str, dict[int, float]] = {}
    for result in results:
        suffixes = ([""] if result.lr_rule == primary else []) + ([f"_{result.lr_rule}"] if len(rules) > 1 else [])
        values = {"critical_batch_size": result.fit.b_crit if result.fit else math.nan,
                  "critical_batch_size_low": result.low, "critical_batch_size_high": result.high,
                  "min_steps_to_target": result.fit.s_min if result.fit else math.nan,
                  "min_samples_to_target": result.fit.e_min if result.fit else math.nan,
                  "grad_noise_scale_at_target": result.noise_scale,
                  "grad_noise_scale_exact": result.noise_scale_exact}
        per_batch = {"tuned_lr": {t.batch_size: t.best.lr for t in result.tuned if t.reached},
                     "tuned_steps_to_target": {t.batch_size: t.best.median_steps for t in result.tuned if t.reached},
                     "tuned_samples_to_target": {t.batch_size: t.median_samples for t in result.tuned if t.reached}}
        for suffix in suffixes:
            single.update({k + suffix: v for k, v in values.items() if math.isfinite(v)})
            series.update({k + suffix: {b: v for b, v in s.items() if math.isfinite(v)} for k, s in per_batch.items()})
    return single, series


def _spread(median: float, values: list[float], digits: int, missing: int) -> str:
    if not values:
        return "not reached"
    text = f"{median:.{digits}f}"
    if len(values) > 1:
        text += f" [{min(values):.{digits}f}, {max(values):.{digits}f}]"
    return text + (f" ({missing} seed(s) not reached)" if missing else "")


def markdown(results: list[CriticalBatch]) -> str:
    """The tuned table per rule and the answer: B_crit with its interval beside B_simple (probe, exact)."""
    lines = []
    for result in results:
        lines += [f"### LR tuned per batch size (lr rule {result.lr_rule})", "",
                  "Steps and samples: median over the best LR's seeds (a seed that never reached counts as infinite) "
                  "[min, max over the seeds that reached]; B_simple: median at the target over those seeds.", "",
                  "| batch | tuned LR | on the grid's edge | LRs tried | steps to target | samples to target "
                  "| B_simple at target (probe) | B_simple (exact) |", "|---|---|---|---|---|---|---|---|"]
        for t in result.tuned:
            missing = sum(not math.isfinite(s) for s in t.best.steps) if t.best else 0
            lr = f"{t.best.lr:.4g}" if t.best else "none reached"
            noise = [f"{t.median(k):.0f}" if math.isfinite(t.median(k)) else "-" for k in (NOISE_PROBE, NOISE_EXACT)]
            lines.append(f"| {t.batch_size} | {lr} | {t.edge or 'no'} | {len(t.grid)} "
                         f"| {_spread(t.best.median_steps if t.best else math.nan, t.values(STEPS), 0, missing)} "
                         f"| {_spread(t.median_samples, t.values(SAMPLES), 0, missing)} "
                         f"| {noise[0]} | {noise[1]} |")
        lines.append("")
        edges = [f"{t.batch_size} ({t.edge})" for t in result.tuned if t.edge]
        if edges:
            lines += [f"Best LR on the grid's edge (the optimum may lie beyond it; widen the grid): "
                      f"{', '.join(edges)}.", ""]
        stopped = sum(t.race_stopped for t in result.tuned)
        if stopped:
            doubt = [f"{t.batch_size} (LR {', '.join(f'{lr:.4g}' for lr in t.race_doubt)})"
                     for t in result.tuned if t.race_doubt]
            lines += [f"Race stop: {stopped} trial(s) stopped short of the target at k times the steps of the fastest "
                      "trial of their batch size, each with a lower bound on its steps; " +
                      (f"the race may have decided the tuned LR at {', '.join(doubt)}: rerun with a larger "
                       "sweep.race_stop." if doubt else "none of them could have been a tuned LR."), ""]
        lines += [answer_line(result), ""]
    return "\n".join(lines)


def answer_line(result: CriticalBatch) -> str:
    """B_crit (fit, interval) beside B_simple probe and exact, with their ratios; or why there is no fit."""
    if result.fit is None:
        return result.why_no_fit
    fit = result.fit
    near = ", ".join(map(str, result.near_batch_sizes)) or "none"
    sizes = [t.batch_size for t in result.tuned if t.reached]
    line = (f"lr rule {result.lr_rule}: B_crit = {fit.b_crit:.4g} ({INTERVAL_LEVEL:.0%} bootstrap interval "
            f"{result.low:.4g}..{result.high:.4g}), S_min = {fit.s_min:.4g} steps, E_min = {fit.e_min:.4g} samples; "
            f"{_b_simple('probe', result.noise_scale, fit.b_crit)}, "
            f"{_b_simple('exact', result.noise_scale_exact, fit.b_crit)}; "
            f"B_simple is the median over the tuned trials at batch sizes {near} (the nearest to B_crit)")
    if not min(sizes) <= fit.b_crit <= max(sizes):
        line += (f". B_crit lies outside the batch sizes that reached the target ({min(sizes)}..{max(sizes)}): "
                 "an extrapolation")
    if all(len(t.values(STEPS)) < 2 for t in result.tuned if t.reached):
        line += ". One seed per batch size: the interval says nothing about seed noise"
    return line


def _b_simple(name: str, value: float, b_crit: float) -> str:
    ratio = (f"B_crit / B_simple = {b_crit / value:.2f}" if math.isfinite(b_crit) and math.isfinite(value) and value > 0
             else "no ratio")
    return f"B_simple ({name}) = {f'{value:.4g}' if math.isfinite(value) else 'not recorded'} ({ratio})"


def time_spent(trial_metrics: list[dict[str, float]]) -> dict[str, Optional[float]]:
    """Each time_*_s metric summed over the trials (final metrics each) that logged it; None where none did."""
    values = {key: [m[key] for m in trial_metrics if key in m and math.isfinite(m[key])] for key in TIME_METRICS}
    return {key: sum(v) if v else None for key, v in values.items()}

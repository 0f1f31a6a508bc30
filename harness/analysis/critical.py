"""The critical batch size of a finished sweep: the LR tuned per batch size, the fits of S(B), the parent's numbers.

Pure, from harness/analysis/report.py's trial records, once per held-out accuracy target: the best LR per
(LR rule, batch size) (Shallue et al. 2018: batch-size claims hold only with the optimizer tuned per batch
size), the fits of S(B) = S_min (1 + B_crit/B) (McCandlish et al. 2018; harness/measure/critical_batch.py)
with a bootstrap over seeds and the LR choice and B_crit with each batch size left out, the noise scales
near B_crit, the parent run's metrics (fixed names, so sweeps compare), the Markdown.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from typing import Optional

from harness.measure.critical_batch import (LEAST_SQUARES, RELATIVE_ERROR, NotEnoughBatchSizes, SeedSteps, StepsFit,
                                            bootstrap_interval, fit_least_squares, fit_relative_error, leave_one_out)
from harness.measure.exact_noise import RESOLVED_WITHIN_STD_ERRORS, population_noise_scale

FIT_MIN_BATCH_SIZES = 3
INTERVAL_LEVEL = 0.9  # of the bootstrap interval of B_crit
RESAMPLES = 1000
# Per-trial metrics the training loop logs.
STEPS, SAMPLES = "steps_to_target", "samples_to_target"
RACE_BOUND = "steps_to_target_lower_bound"  # a trial the race stopped (train.race_stop) took more steps than this
NOISE_PROBE, NOISE_EXACT = "grad_noise_scale_at_target", "grad_noise_scale_exact_at_target"
NOISE_HESSIAN = "grad_noise_scale_hessian_at_target"  # B_noise = tr(HΣ)/GᵀHG (McCandlish et al. 2018, App. A)
# With several targets a trial logs these once per target as <key>_<t>, t = f"{target:g}"; the unsuffixed key
# holds the largest target's. RACE_BOUND has no suffix: it bounds every target the trial had not reached.
PER_TARGET = (STEPS, SAMPLES, NOISE_PROBE, NOISE_EXACT, NOISE_HESSIAN)
# What the exact B_simple and B_noise at a target are the ratio of, over the examples they were read on, and
# the config key saying how many (harness/core/crossing.py).
COMPONENTS = {NOISE_EXACT: ("grad_trace_cov_exact_at_target", "grad_sq_norm_exact_at_target",
                            "metrics.exact_noise_samples"),
              NOISE_HESSIAN: ("grad_trace_hess_cov_at_target", "grad_hess_grad_at_target",
                              "metrics.hessian_noise_samples")}
# The sampling error of an estimated trace (tr(H Sigma) comes from a subsample): B_noise reads +inf,
# unresolved, where that error leaves it unbounded (measure/exact_noise.py population_noise_scale).
TRACE_STD_ERRORS = {NOISE_HESSIAN: "grad_trace_hess_cov_std_error_at_target"}
UNRESOLVED = "unresolved"  # printed for a noise scale whose interval is unbounded above, and why:
UNRESOLVED_WHY = (f"tr(HΣ) {RESOLVED_WITHIN_STD_ERRORS:g} standard errors above its estimate leaves no GᵀHG after "
                  "the N-sample correction (more metrics.hessian_noise_samples or hessian_noise_deviations would "
                  "bound it)")
NO_INTERVAL = "no interval: one seed per batch size and LR (sweep.seeds with 2 or more gives one)"
# Cumulative within a run (the last logged value is the run's total), and what each one times.
TIME_METRICS = {"time_train_s": "training", "time_eval_s": "evaluation", "time_epoch_eval_s": "epoch-end evaluation",
                "time_probe_s": "probes", "time_sharpness_s": "sharpness", "time_tracking_s": "tracking",
                "time_replay_s": "exact crossings"}


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

    @property
    def seed_steps(self) -> SeedSteps:
        """What the bootstrap resamples: the seeds' steps and the race's lower bounds."""
        return SeedSteps(self.steps, [race_bound(t) for t in self.trials])


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
        """``key`` of the best LR's seeds that reached the target and logged it (samples fall back to B x steps);
        a noise scale may be +inf (unresolved), and a median over such values may be too."""
        reached = [t for t in self.best.trials if math.isfinite(steps_of(t))] if self.best else []
        values = [t.final.get(key, self.batch_size * steps_of(t) if key == SAMPLES else math.nan) for t in reached]
        return [v for v in values if not math.isnan(v)]

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
    """One LR rule's answer at one target: the tuned batch sizes, the fits (or why there is none), B_crit with
    each batch size left out, and the noise scales near B_crit."""
    lr_rule: str
    tuned: list[TunedBatch]
    target: Optional[float] = None  # None: the sweep's one target (its trials log no suffixed keys)
    fit: Optional[StepsFit] = None  # the relative-error fit: the answer
    least_squares: Optional[StepsFit] = None  # least squares on 1/B, beside it
    low: float = math.nan
    high: float = math.nan
    resamples_skipped: int = 0  # bootstrap resamples without a valid fit, left out of the interval
    resamples: int = 0
    leave_one_out: dict[int, float] = field(default_factory=dict)  # B_crit without that batch size (NaN: no fit)
    why_no_fit: str = ""
    near_batch_sizes: tuple[int, ...] = ()  # where B_simple was read: the reached sizes around B_crit
    noise_scale: float = math.nan  # median grad_noise_scale_at_target over their tuned trials
    noise_scale_exact: float = math.nan
    noise_scale_hessian: float = math.nan  # B_noise

    @property
    def one_seed(self) -> bool:
        """Every (batch size, LR) ran one seed: B_crit has no interval over seeds."""
        return all(len(c.trials) < 2 for t in self.tuned for c in t.grid)

    def interval_text(self, digits: str = ".4g") -> str:
        """B_crit's interval as the report prints it, or why there is none."""
        if self.one_seed:
            return NO_INTERVAL
        low, high = (f"{v:{digits}}" if math.isfinite(v) else "-" for v in (self.low, self.high))
        return f"{INTERVAL_LEVEL:.0%} interval {low}..{high} over seeds and the LR choice"

    @property
    def leave_one_out_max_ratio(self) -> float:
        """The most B_crit moves (a factor, at least 1) when one batch size is left out; NaN without values."""
        moved = [max(v / self.fit.b_crit, self.fit.b_crit / v) for v in self.leave_one_out.values()
                 if self.fit and math.isfinite(v)]
        return max(moved, default=math.nan)


def population_noise_scales(final: dict[str, float], params: dict[str, str]) -> dict[str, float]:
    """``final`` with the exact B_simple and B_noise at each target recomputed from their logged components as
    the training set's (measure/exact_noise.py ``population_noise_scale``, N from the run's ``params``), so a
    run that logged the ratio over its N examples alone reads as one that logs the population's. B_noise is
    +inf where its tr(H Sigma)'s sampling error leaves it unbounded."""
    out = dict(final)
    for key, (trace_key, quadratic_key, count_key) in COMPONENTS.items():
        count = params.get(count_key)
        if count in (None, "None"):
            continue
        for name, trace in final.items():
            suffix = name[len(trace_key):]
            if not name.startswith(trace_key) or (suffix and not suffix.startswith("_")):
                continue
            if quadratic_key + suffix in final:
                std_error = final.get(TRACE_STD_ERRORS[key] + suffix, 0.0) if key in TRACE_STD_ERRORS else 0.0
                value = population_noise_scale(trace, final[quadratic_key + suffix], int(count), std_error)
                if value > 0:  # +inf included: unresolved, which the report says
                    out[key + suffix] = value
                else:  # NaN or negative: nothing to read
                    out.pop(key + suffix, None)
    return out


def steps_of(trial) -> float:
    """Steps to target of one trial; inf where it never reached the target (or diverged)."""
    value = trial.final.get(STEPS, math.inf)
    return math.inf if trial.diverged or not math.isfinite(value) else value


def race_bound(trial) -> float:
    """The lower bound on the steps of a trial the race stopped; inf for any other."""
    value = trial.final.get(RACE_BOUND, math.inf)
    return math.inf if trial.diverged or not math.isfinite(value) else value


def targets(trials: list) -> list[Optional[float]]:
    """The targets the trials logged numbers for, ascending: every t of a ``<key>_<t>`` in :data:`PER_TARGET`;
    [None] where no trial has one (one target: the unsuffixed keys). A target no trial reached logs no key."""
    found = set()
    for trial in trials:
        for name in trial.final:
            for key in PER_TARGET:
                if name.startswith(key + "_"):
                    try:
                        found.add(float(name[len(key) + 1:]))
                    except ValueError:  # e.g. steps_to_target_lower_bound
                        pass
    return sorted(t for t in found if math.isfinite(t)) or [None]


def at_target(trial, target: Optional[float], last: Optional[float]):
    """``trial`` with the unsuffixed :data:`PER_TARGET` keys holding ``target``'s values (absent where it did
    not reach it), so tuning and fitting read one target; ``last``: the largest target, whose values the
    unsuffixed keys already hold."""
    if target is None:
        return trial
    final = {k: v for k, v in trial.final.items() if k not in PER_TARGET or target == last}
    final.update({k: trial.final[f"{k}_{target:g}"] for k in PER_TARGET if f"{k}_{target:g}" in trial.final})
    if STEPS in final:  # it reached this target: a race bound belongs to a harder one it fell short of
        final.pop(RACE_BOUND, None)
    return dataclasses.replace(trial, final=final)


def analyse(trials: list, resamples: int = RESAMPLES, seed: int = 0) -> list[CriticalBatch]:
    """Per target (ascending) and LR rule: tune the LR per batch size and fit S(B) (:func:`critical_batch`)."""
    every = targets(trials)
    rules = sorted({t.lr_rule for t in trials})
    results = []
    for target in every:
        tuned = tune([at_target(t, target, every[-1]) for t in trials])
        results += [critical_batch(rule, tuned, resamples, seed, target) for rule in rules]
    return results


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


def critical_batch(rule: str, tuned: list[TunedBatch], resamples: int = RESAMPLES, seed: int = 0,
                   target: Optional[float] = None) -> CriticalBatch:
    """Fit S(B) to one rule's tuned steps (both fits, the bootstrap over seeds and LR choice, each batch size left
    out), and read the noise scales near B_crit."""
    mine = [t for t in tuned if t.lr_rule == rule]
    result = CriticalBatch(rule, mine, target)
    # Best-LR seeds that never reached stay out of the fit: their steps are unknown, not infinite.
    medians = {t.batch_size: statistics.median(t.values(STEPS)) for t in mine if t.values(STEPS)}
    what = f"lr rule {rule}" + (f", target {target:g}" if target is not None else "")
    if len(medians) < FIT_MIN_BATCH_SIZES:
        sizes = ", ".join(map(str, sorted(medians))) or "none"
        result.why_no_fit = (f"no fit of S(B) for {what}: {len(medians)} batch size(s) reached the "
                             f"target ({sizes}); it needs at least {FIT_MIN_BATCH_SIZES}")
        return result
    if max(len(t.grid) for t in mine) < 2:
        result.why_no_fit = (f"no B_crit for {what}: one LR per batch size, so no batch size's steps are its fewest "
                             "(B_crit is read from steps with the LR tuned per batch size); sweep.lr_factors with 2 or "
                             "more values tunes it")
        return result
    sizes, steps = sorted(medians), [medians[b] for b in sorted(medians)]
    try:
        fit = fit_relative_error(sizes, steps)
    except NotEnoughBatchSizes as err:
        result.why_no_fit = f"no fit of S(B) for {what}: {err}"
        return result
    least_squares = fit_least_squares(sizes, steps)
    result.least_squares = least_squares if least_squares.valid else None
    if not fit.valid:  # never a negative or infinite critical batch size on the parent run
        result.why_no_fit = f"no valid fit of S(B) for {what}: {fit.problem}"
        return result
    result.fit = fit
    if not result.one_seed:  # one seed per LR: the bootstrap has nothing to resample, so no interval
        interval = bootstrap_interval({t.batch_size: [c.seed_steps for c in t.grid] for t in mine},
                                      resamples=resamples, seed=seed, level=INTERVAL_LEVEL)
        result.low, result.high, result.resamples_skipped = interval.low, interval.high, interval.skipped
        result.resamples = resamples
    if len(sizes) > FIT_MIN_BATCH_SIZES:
        result.leave_one_out = {int(b): v for b, v in leave_one_out(sizes, steps).items()}
    result.near_batch_sizes = near = nearest_batch_sizes(sizes, fit.b_crit)
    by_size = {t.batch_size: t for t in mine}
    result.noise_scale, result.noise_scale_exact, result.noise_scale_hessian = (
        _median([v for b in near for v in by_size[b].values(key)]) for key in (NOISE_PROBE, NOISE_EXACT, NOISE_HESSIAN))
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
    """(single values, series) for the sweep's parent run. The single values and the per-batch-size series
    (step = batch size: ``tuned_lr``, ...) are the largest target's; each number also gets a series
    ``<name>_by_target`` with step = round(1000 t) (e.g. 850 for 0.85), so MLflow plots it against the target.
    The primary rule's numbers carry the fixed names; with several rules each rule's also appear as
    ``<name>_<rule>``. Numbers that do not exist are left out, never NaN."""
    rules = list(dict.fromkeys(r.lr_rule for r in results))
    primary = "none" if "none" in rules else min(rules)  # "none": its LR grid is the tuning
    last = results[-1].target if results else None
    single: dict[str, float] = {}
    series: dict[str, dict[int, float]] = {}
    for result in results:
        suffixes = ([""] if result.lr_rule == primary else []) + ([f"_{result.lr_rule}"] if len(rules) > 1 else [])
        values = _numbers(result)
        for suffix in suffixes:
            if result.target is not None:
                step = round(1000 * result.target)
                for key, value in values.items():
                    if math.isfinite(value):
                        series.setdefault(f"{key}_by_target{suffix}", {})[step] = value
            if result.target != last:
                continue
            single.update({k + suffix: v for k, v in values.items() if math.isfinite(v)})
            series.update({k + suffix: {b: v for b, v in s.items() if math.isfinite(v)}
                           for k, s in _per_batch(result).items()})
    return single, series


def _numbers(result: CriticalBatch) -> dict[str, float]:
    """The parent's single numbers of one result (NaN where there is none)."""
    fit, least_squares = result.fit, result.least_squares
    return {"critical_batch_size": fit.b_crit if fit else math.nan,
            "critical_batch_size_low": result.low, "critical_batch_size_high": result.high,
            "critical_batch_size_least_squares": least_squares.b_crit if least_squares else math.nan,
            "critical_batch_size_leave_one_out_max_ratio": result.leave_one_out_max_ratio,
            "critical_batch_size_resamples_skipped": float(result.resamples_skipped) if fit else math.nan,
            "min_steps_to_target": fit.s_min if fit else math.nan,
            "min_samples_to_target": fit.e_min if fit else math.nan,
            "grad_noise_scale_at_target": result.noise_scale,
            "grad_noise_scale_exact": result.noise_scale_exact,
            "grad_noise_scale_hessian": result.noise_scale_hessian}


def _per_batch(result: CriticalBatch) -> dict[str, dict[int, float]]:
    reached = [t for t in result.tuned if t.reached]
    return {"tuned_lr": {t.batch_size: t.best.lr for t in reached},
            "tuned_steps_to_target": {t.batch_size: t.best.median_steps for t in reached},
            "tuned_samples_to_target": {t.batch_size: t.median_samples for t in reached}}


def _spread(median: float, values: list[float], digits: int, missing: int) -> str:
    if not values:
        return "not reached"
    text = f"{median:.{digits}f}"
    if len(values) > 1:
        text += f" [{min(values):.{digits}f}, {max(values):.{digits}f}]"
    return text + (f" ({missing} seed(s) not reached)" if missing else "")


def _number(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "-"


def _noise_number(value: float, digits: str = ".4g") -> str:
    """A noise scale: +inf is one its sampling error leaves unbounded (population_noise_scales)."""
    return f"{value:{digits}}" if math.isfinite(value) else UNRESOLVED if value == math.inf else "-"


def _target_name(target: Optional[float]) -> str:
    return "the target" if target is None else f"{target:g}"


def markdown(results: list[CriticalBatch]) -> str:
    """The largest target's tuned table and answer per rule, then per rule one row per target (B_crit from
    both fits, the leave-one-out range, B_simple and B_noise), and with several targets the tuned steps."""
    last = results[-1].target if results else None
    lines = []
    for result in results:
        if result.target == last:
            lines += tuned_table(result) + [answer_line(result), ""]
            lines += [leave_one_out_line(result), ""] if result.fit else []
    for rule in dict.fromkeys(r.lr_rule for r in results):
        mine = [r for r in results if r.lr_rule == rule]
        lines += by_target_table(mine)
        lines += steps_by_target_table(mine) if len(mine) > 1 else []
    return "\n".join(lines)


def tuned_table(result: CriticalBatch) -> list[str]:
    """Markdown lines: per batch size the tuned LR, its steps and samples to target and the noise scales;
    the grid-edge and race notes."""
    target = f", target {result.target:g}" if result.target is not None else ""
    lines = [f"### LR tuned per batch size (lr rule {result.lr_rule}{target})", "",
             "Steps and samples: median over the best LR's seeds (a seed that never reached counts as infinite) "
             "[min, max over the seeds that reached]; B_simple, B_noise: median at the target over those seeds.", "",
             "| batch | tuned LR | on the grid's edge | LRs tried | steps to target | samples to target "
             "| B_simple at target (probe) | B_simple (exact) | B_noise |", "|---|---|---|---|---|---|---|---|---|"]
    for t in result.tuned:
        missing = sum(not math.isfinite(s) for s in t.best.steps) if t.best else 0
        lr = f"{t.best.lr:.4g}" if t.best else "none reached"
        noise = [_noise_number(t.median(k), ".0f") for k in (NOISE_PROBE, NOISE_EXACT, NOISE_HESSIAN)]
        lines.append(f"| {t.batch_size} | {lr} | {t.edge or 'no'} | {len(t.grid)} "
                     f"| {_spread(t.best.median_steps if t.best else math.nan, t.values(STEPS), 0, missing)} "
                     f"| {_spread(t.median_samples, t.values(SAMPLES), 0, missing)} | {' | '.join(noise)} |")
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
    return lines


def by_target_table(results: list[CriticalBatch]) -> list[str]:
    """Markdown lines: one rule's B_crit per target from both fits, the leave-one-out range, B_simple, B_noise."""
    lines = [f"### Critical batch size per target (lr rule {results[0].lr_rule})", "",
             f"B_crit: the relative-error fit (least squares on log S) with its {INTERVAL_LEVEL:.0%} bootstrap "
             "interval over seeds and the LR choice, and least squares on 1/B; leave-one-out: the range of B_crit "
             "with each batch size left out; B_simple, B_noise: median over the tuned trials at the batch sizes "
             f"nearest B_crit; B_noise {UNRESOLVED}: {UNRESOLVED_WHY}.", "",
             f"| target | B_crit ({RELATIVE_ERROR}) | B_crit ({LEAST_SQUARES}) | leave-one-out range "
             "| B_simple (probe) | B_simple (exact) | B_noise |", "|---|---|---|---|---|---|---|"]
    for r in results:
        interval = "no interval: one seed" if r.one_seed else f"{_number(r.low)}..{_number(r.high)}"
        answer = f"{r.fit.b_crit:.4g} ({interval})" if r.fit else "no valid fit"
        answer += f", {r.resamples_skipped} of {r.resamples} resamples without a fit" if r.resamples_skipped else ""
        other = _number(r.least_squares.b_crit) if r.least_squares else "-"
        moved = [v for v in r.leave_one_out.values() if math.isfinite(v)]
        spread = f"{min(moved):.4g}..{max(moved):.4g}" if moved else "-"
        noise = " | ".join(_noise_number(v) for v in (r.noise_scale, r.noise_scale_exact, r.noise_scale_hessian))
        lines.append(f"| {_target_name(r.target)} | {answer} | {other} | {spread} | {noise} |")
    # The largest target's reason is in its answer line; the others' go here.
    reasons = [r.why_no_fit for r in results if r.fit is None and r.target != results[-1].target]
    return lines + [""] + (reasons + [""] if reasons else [])


def steps_by_target_table(results: list[CriticalBatch]) -> list[str]:
    """Markdown lines: one rule's tuned median steps (and tuned LR) per batch size, one column per target."""
    names = [_target_name(r.target) for r in results]
    sizes = sorted({t.batch_size for r in results for t in r.tuned})
    cells = {(i, t.batch_size): f"{t.best.median_steps:.0f} (LR {t.best.lr:.4g})" if t.best else "not reached"
             for i, r in enumerate(results) for t in r.tuned}
    lines = [f"### Tuned steps to target per target (lr rule {results[0].lr_rule})", "",
             "| batch | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {b} | " + " | ".join(cells.get((i, b), "-") for i in range(len(results))) + " |" for b in sizes]
    return lines + [""]


def answer_line(result: CriticalBatch) -> str:
    """B_crit from the relative-error fit (interval) and from least squares on 1/B, beside B_simple (probe,
    exact) and B_noise with their ratios; or why there is no fit."""
    if result.fit is None:
        return result.why_no_fit + (f"; {LEAST_SQUARES} gives {result.least_squares.b_crit:.4g}"
                                    if result.least_squares else "")
    fit = result.fit
    near = ", ".join(map(str, result.near_batch_sizes)) or "none"
    sizes = [t.batch_size for t in result.tuned if t.reached]
    target = f", target {result.target:g}" if result.target is not None else ""
    skipped = (f"; {result.resamples_skipped} of {result.resamples} resamples gave no valid fit and are left out"
               if result.resamples_skipped else "")
    other = (f"{LEAST_SQUARES} gives {result.least_squares.b_crit:.4g}" if result.least_squares
             else f"{LEAST_SQUARES} gives no valid fit")
    line = (f"lr rule {result.lr_rule}{target}: B_crit = {fit.b_crit:.4g} ({RELATIVE_ERROR}, "
            f"{result.interval_text()}{skipped}); {other}; "
            f"S_min = {fit.s_min:.4g} steps, E_min = {fit.e_min:.4g} samples; "
            f"{_noise_scale('B_simple (probe)', 'B_simple', result.noise_scale, fit.b_crit)}, "
            f"{_noise_scale('B_simple (exact)', 'B_simple', result.noise_scale_exact, fit.b_crit)}"
            + (f", {_noise_scale('B_noise', 'B_noise', result.noise_scale_hessian, fit.b_crit)}"
               if not math.isnan(result.noise_scale_hessian) else "") +
            f"; B_simple is the median over the tuned trials at batch sizes {near} (the nearest to B_crit)")
    if not min(sizes) <= fit.b_crit <= max(sizes):
        line += (f". B_crit lies outside the batch sizes that reached the target ({min(sizes)}..{max(sizes)}): "
                 "an extrapolation")
    return line


def leave_one_out_line(result: CriticalBatch) -> str:
    """B_crit with each batch size left out, and the most it moves."""
    if not result.leave_one_out:
        return (f"Leaving one batch size out: not done, it needs at least {FIT_MIN_BATCH_SIZES + 1} batch sizes "
                "that reached the target.")
    moves = ", ".join(f"B={b} → {v:.4g}" if math.isfinite(v) else f"B={b} → no valid fit"
                      for b, v in result.leave_one_out.items())
    return (f"Leaving one batch size out ({RELATIVE_ERROR}): {moves}; B_crit moves by at most a factor of "
            f"{result.leave_one_out_max_ratio:.2f}.")


def _noise_scale(name: str, symbol: str, value: float, b_crit: float) -> str:
    if value == math.inf:
        return f"{name} {UNRESOLVED} ({UNRESOLVED_WHY})"
    ratio = (f"B_crit / {symbol} = {b_crit / value:.2f}" if math.isfinite(b_crit) and math.isfinite(value)
             and value > 0 else "no ratio")
    return f"{name} = {f'{value:.4g}' if math.isfinite(value) else 'not recorded'} ({ratio})"


def time_spent(trial_metrics: list[dict[str, float]]) -> dict[str, Optional[float]]:
    """Each time_*_s metric summed over the trials (final metrics each) that logged it; None where none did."""
    values = {key: [m[key] for m in trial_metrics if key in m and math.isfinite(m[key])] for key in TIME_METRICS}
    return {key: sum(v) if v else None for key, v in values.items()}

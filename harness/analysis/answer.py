"""The few plain lines a sweep's report opens with: what the sweep tried, which batch sizes scale, the
critical batch size with its interval (or the one line saying why the sweep cannot give one), and what the
generalization gap does between the smallest and the largest batch.

Pure, from harness/analysis/critical.py's results (the largest target's, the primary LR rule's) and, for a
sweep without a target, the report's rows. The numbers are the tables' own; this only says them in words.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

from harness.analysis import critical

GAP = "generalization_gap_accuracy"


def primary(results: list[critical.CriticalBatch]) -> Optional[critical.CriticalBatch]:
    """The result the answer speaks for: the largest target's, LR rule "none" where swept (its LR grid is the
    tuning), else the first rule by name."""
    if not results:
        return None
    last = [r for r in results if r.target == results[-1].target]
    rules = {r.lr_rule: r for r in last}
    return rules.get("none", rules[min(rules)])


def plain_answer(results: list[critical.CriticalBatch], rows: list, stopped_at_target: bool,
                 target_text: str = "the target") -> list[str]:
    """The answer's lines; ``rows``: the report's CellRows (for a sweep without a target);
    ``stopped_at_target``: the trials ended at the target (train.stop_at_target), so their gaps are read there;
    ``target_text``: the sweep's one target as the config wrote it (a result for it carries no number)."""
    result = primary(results)
    if result is None:
        return _without_target(rows)
    tuned = result.tuned
    sizes = [t.batch_size for t in tuned]
    lrs = max(len(t.grid) for t in tuned)
    seeds = max(len(c.trials) for t in tuned for c in t.grid)
    target = f"held-out accuracy {result.target:g}" if result.target is not None else f"held-out accuracy {target_text}"
    lines = [f"The answer: {sum(len(c.trials) for t in tuned for c in t.grid)} trials, batch {sizes[0]} to "
             f"{sizes[-1]}, {_count(lrs, 'LR')} x {_count(seeds, 'seed')} per batch size, trained to {target}."]
    reached = [t for t in tuned if t.reached]
    missed = [str(t.batch_size) for t in tuned if not t.reached]
    steps = ", ".join(f"{t.batch_size}: {t.best.median_steps:.0f}" for t in reached)
    lines.append(f"- Steps to {target} at each batch size's best LR{' (median over seeds)' if seeds > 1 else ''}: "
                 + (steps + (f"; not reached: {', '.join(missed)}" if missed else "") if reached
                    else "no batch size reached it within its budget") + ".")
    if len(reached) >= 2:
        lines.append("- " + _scaling(reached))
    lines.append("- " + _critical(result))
    edges = [f"{t.batch_size} ({t.edge})" for t in reached if t.edge]
    if edges:
        lines.append(f"- The best LR sits on the grid's edge at batch {', '.join(edges)}: a wider grid may find fewer "
                     "steps there.")
    gap = _gap(reached, stopped_at_target)
    if gap:
        lines.append("- " + gap)
    return lines


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def _scaling(reached: list[critical.TunedBatch]) -> str:
    """How much each step up in batch size cut the steps, against perfect scaling (the batch's factor)."""
    parts = []
    for small, large in zip(reached, reached[1:]):
        factor = large.batch_size / small.batch_size
        cut = small.best.median_steps / large.best.median_steps
        parts.append(f"{small.batch_size} to {large.batch_size} ({factor:g}x the batch): {cut:.2g}x fewer")
    return ("Each larger batch cut the steps (perfect scaling: by the batch's factor): " + "; ".join(parts) + ".")


def _critical(result: critical.CriticalBatch) -> str:
    """B_crit in words, or why this sweep cannot give it."""
    if result.fit is None:
        return result.why_no_fit[0].upper() + result.why_no_fit[1:] + "."
    fit = result.fit
    return (f"Critical batch size B_crit = {fit.b_crit:.0f} ({result.interval_text('.0f')}): there a run takes "
            f"twice the fewest steps ({fit.s_min:.0f}) and twice the fewest samples ({fit.e_min:,.0f}); below it a "
            "larger batch saves steps almost in proportion, above it a larger batch mostly costs samples.")


def _gap(reached: list[critical.TunedBatch], stopped_at_target: bool) -> str:
    """The generalization gap (train minus test accuracy) at the smallest and largest batch that reached, at
    their best LRs, and whether the seeds' spread separates the two."""
    if len(reached) < 2:
        return ""
    ends = []
    for tuned in (reached[0], reached[-1]):
        values = [t.final[GAP] for t in tuned.best.trials if GAP in t.final and math.isfinite(t.final[GAP])]
        if not values:
            return ""
        ends.append((tuned.batch_size, values))
    (small, a), (large, b) = ends
    when = "when each run stopped at the target" if stopped_at_target else "at the end of each run"

    def text(values):
        return f"{statistics.mean(values):.4f}" + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")

    difference = statistics.mean(b) - statistics.mean(a)
    if len(a) < 2 or len(b) < 2:
        verdict = "one seed: no spread to judge the difference by"
    else:
        spread = math.hypot(statistics.stdev(a), statistics.stdev(b))
        verdict = ("the same within the seeds' spread" if abs(difference) <= spread
                   else f"{'larger' if difference > 0 else 'smaller'} at the larger batch, by {abs(difference):.4f}")
    return (f"Generalization gap (train minus test accuracy) {when}: {text(a)} at batch {small}, {text(b)} at "
            f"batch {large}: {verdict}.")


def _without_target(rows: list) -> list[str]:
    """A sweep at a fixed budget: the best test accuracy per batch size (no steps to compare)."""
    best: dict[int, float] = {}
    for row in rows:
        mean = row.stats.get("test_accuracy", (math.nan, math.nan))[0]
        if math.isfinite(mean):
            best[row.batch_size] = max(best.get(row.batch_size, -math.inf), mean)
    if not best:
        return []
    values = ", ".join(f"{b}: {v:.4f}" for b, v in sorted(best.items()))
    return ["The answer: no target (metrics.target_val_accuracy), so no steps to compare and no B_crit; the same "
            f"budget for every batch size gives test accuracy (best LR, mean over seeds) {values}."]

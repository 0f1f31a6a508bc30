"""Steps, samples and wall-clock to a target for every batch size, predicted from one small-batch run.

McCandlish et al. 2018 (SCIENCE.md): with the LR tuned at each batch size, training to a target takes
S(B) = S_min (1 + B_noise / B) steps and E(B) = E_min (1 + B / B_noise) samples at batch B, E_min =
S_min B_noise, so the critical batch B_crit = E_min / S_min is B_noise. A run at batch B0 that reaches the
target in S(B0) steps fixes S_min = S(B0) / (1 + B_noise / B0); which B_noise to use is the question, as
the noise scale grows over training. Two forms:

- **at the target** (the answer): B_noise is the noise scale read over the last stretch of the run
  (``TARGET_STRETCH`` of its steps), as McCandlish et al. compare B_crit with the noise scale at the loss
  reached. S(B0) is the run's own step count by construction.
- **integrated** (beside it): the rule applied piece by piece. The run reads B_i at its steps t_i; its
  steps t_i .. t_(i+1) are dS_min,i = (t_(i+1) - t_i) / (1 + B_i / B0) optimal steps, and
  S(B) = sum_i dS_min,i (1 + B_i / B), E_min = sum_i dS_min,i B_i: B_crit is the noise scale averaged over
  training by optimal steps, smaller than at the target.

Both rest on the run's LR being about the tuned one at B0. The LR each batch would take, from the run's
LR at B0: the noise-scale rule (McCandlish et al. eq. 2.6, eps(B) = eps_max / (1 + B_crit / B), so
eps(B) = lr0 (1 + B_crit / B0) / (1 + B_crit / B)), or the linear or sqrt rule. Time per step comes from
``harness capacity``'s measurement: a batch beyond the largest that fits runs as micro-batches of that
one, accumulated (the time scales with their number).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence


TARGET_STRETCH = 0.2  # the noise scale "at the target": read over this last fraction of the run's steps


@dataclass(frozen=True)
class NoiseReading:
    step: int  # the run's step (at batch B0) where the reading starts
    b_noise: float  # the noise scale over the steps up to the next reading


def at_target(readings: Sequence[dict], end_step: int, count: int, stretch: float = TARGET_STRETCH) -> float:
    """The noise scale over the last ``stretch`` of the steps before ``end_step`` (at least the last two
    readings): the readings' mean tr(Sigma) over their mean |G|^2, corrected for ``count`` samples
    (``population_noise_scale``; the uncorrected ratio, a lower bound, where that leaves nothing or more than
    ``count``: N samples do not resolve it).
    ``readings``: dicts with step, trace, grad_sq."""
    from harness.measure.exact_noise import population_noise_scale

    before = [r for r in readings if r["step"] < end_step]
    last = [r for r in before if r["step"] >= (1 - stretch) * end_step] or before[-2:]
    if len(last) < 2:
        last = before[-2:]
    trace = sum(r["trace"] for r in last) / len(last)
    quadratic = sum(r["grad_sq"] for r in last) / len(last)
    population = population_noise_scale(trace, quadratic, count)
    return population if math.isfinite(population) and 0 < population <= count else trace / quadratic


@dataclass(frozen=True)
class Predicted:
    """One candidate batch's row of the answer."""

    batch_size: int
    steps: float  # at the target's noise scale
    steps_integrated: float
    samples: float
    lr: float
    step_s: Optional[float]  # time per step on the device (None: not measured)
    wall_s: Optional[float]  # steps x step_s
    micro_batches: int  # 1, or the accumulation a batch beyond the largest that fits needs


def optimal_steps(readings: Sequence[NoiseReading], end_step: int, b0: int) -> list[tuple[float, float]]:
    """Per stretch between readings (the last one ends at ``end_step``): (dS_min, its noise scale)."""
    stretches = []
    for reading, following in zip(readings, [*readings[1:], None]):
        stop = following.step if following else end_step
        if stop > reading.step:
            stretches.append(((stop - reading.step) / (1 + reading.b_noise / b0), reading.b_noise))
    return stretches


def minimum_steps_and_samples(readings: Sequence[NoiseReading], end_step: int, b0: int) -> tuple[float, float]:
    """(S_min, E_min) of the run's stretch of training."""
    stretches = optimal_steps(readings, end_step, b0)
    if not stretches:
        raise ValueError("no step between the first reading and the end: nothing to predict from")
    return sum(d for d, _ in stretches), sum(d * b for d, b in stretches)


def predicted_steps(readings: Sequence[NoiseReading], end_step: int, b0: int, batch: int) -> float:
    """S(B) for ``batch`` (module doc)."""
    return sum(d * (1 + b / batch) for d, b in optimal_steps(readings, end_step, b0))


def lr_for(rule: str, batch: int, b0: int, lr0: float, b_crit: float) -> float:
    """The LR at ``batch`` by ``rule`` (noise, linear, sqrt, none), from ``lr0`` at ``b0``."""
    if rule == "noise":
        return lr0 * (1 + b_crit / b0) / (1 + b_crit / batch)
    if rule == "linear":
        return lr0 * batch / b0
    if rule == "sqrt":
        return lr0 * math.sqrt(batch / b0)
    return lr0


def step_seconds_at(batch: int, measured: dict[int, float], largest: int) -> tuple[Optional[float], int]:
    """Time per step at ``batch`` and its micro-batches: measured (powers of two, by log-log interpolation
    between them), or, beyond ``largest``, ceil(batch / largest) accumulated passes of ``largest``."""
    if not measured:
        return None, 1
    if batch > largest:
        passes = math.ceil(batch / largest)
        return passes * measured[largest], passes
    if batch in measured:
        return measured[batch], 1
    below = max((b for b in measured if b < batch), default=None)
    above = min((b for b in measured if b > batch), default=None)
    if below is None or above is None:
        return measured[below or above], 1
    fraction = math.log(batch / below) / math.log(above / below)
    return math.exp(math.log(measured[below]) + fraction * math.log(measured[above] / measured[below])), 1


def predict(readings: Sequence[NoiseReading], end_step: int, b0: int, lr0: float, candidates: Sequence[int],
            lr_rule: str, step_seconds: Optional[dict[int, float]] = None, largest: Optional[int] = None,
            b_at_target: Optional[float] = None) -> dict:
    """The answer's numbers: S_min, E_min, B_crit and a ``Predicted`` row per candidate batch, at the target's
    noise scale ``b_at_target`` (the integrated form where it is None) and integrated."""
    s_min_integrated, e_min_integrated = minimum_steps_and_samples(readings, end_step, b0)
    b_crit_integrated = e_min_integrated / s_min_integrated
    b_crit = b_crit_integrated if b_at_target is None else b_at_target
    s_min = end_step / (1 + b_crit / b0) if b_at_target is not None else s_min_integrated
    rows = []
    for batch in sorted(set(candidates)):
        integrated = predicted_steps(readings, end_step, b0, batch)
        steps = integrated if b_at_target is None else s_min * (1 + b_crit / batch)
        step_s, passes = step_seconds_at(batch, step_seconds or {}, largest or max(step_seconds or {0: 0}))
        rows.append(Predicted(batch, steps, integrated, steps * batch, lr_for(lr_rule, batch, b0, lr0, b_crit),
                              step_s, None if step_s is None else steps * step_s, passes))
    return {"s_min": s_min, "e_min": s_min * b_crit, "b_crit": b_crit, "s_min_integrated": s_min_integrated,
            "e_min_integrated": e_min_integrated, "b_crit_integrated": b_crit_integrated,
            "rows": [asdict(r) for r in rows]}


def recommend(prediction: dict, flat_until: Optional[int], largest: Optional[int]) -> dict:
    """The batch that minimises predicted wall-clock, the one that minimises samples, and which limit binds."""
    rows = prediction["rows"]
    fewest_samples = min(rows, key=lambda r: r["samples"])
    timed = [r for r in rows if r["wall_s"] is not None]
    fastest = min(timed, key=lambda r: r["wall_s"]) if timed else None
    b_crit = prediction["b_crit"]
    if fastest is None:
        binds = (f"statistics only (no time per step measured): beyond B_crit ~ {b_crit:.0f} a larger batch saves "
                 "few steps for many more samples")
    elif flat_until is not None and b_crit < flat_until:
        binds = (f"statistics bind: the device runs batches up to {flat_until} in about the same time per step, "
                 f"but beyond the critical batch ~ {b_crit:.0f} a larger batch saves few steps "
                 f"(fastest predicted: {fastest['batch_size']})")
    else:
        limit = flat_until if flat_until is not None else largest
        binds = (f"hardware binds: time per step grows beyond batch {limit}, below the critical batch "
                 f"~ {b_crit:.0f} where steps would keep falling (fastest predicted: {fastest['batch_size']})")
    return {"fastest_batch": fastest["batch_size"] if fastest else None,
            "fewest_samples_batch": fewest_samples["batch_size"], "binds": binds}

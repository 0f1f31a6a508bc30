"""The exact step at which a run reaches a target, and the noise scale read around it.

Evaluations run every few steps (core/evaluation.py), so the first one that finds a target
reached says only that the crossing lies after the last evaluation below it. The data order is a
pure function of (seed, epoch) and a step is a pure function of the state and the batch, so the
steps since then can be trained again: ``Replay`` keeps the engine's state at recent checked
points and the batches since, and ``Replay.crossings`` re-trains from there, evaluating after
every step, to find the first step at or above each target. A second pass reads the exact
B_simple (measure/exact_noise.py) after each of the ``metrics.noise_window_steps`` steps up to
the crossing and averages its two components, and B_noise (measure/hessian_noise.py) at the
crossing. Both passes train the engine's ``replica`` of the members that crossed (a stack's
others are not trained again); the engine's own state is put back as it was, so training goes
on untouched.

A crossing is exact within the interval where an evaluation first sees it: accuracy that rises
above a target and falls below it again between two evaluations is not seen. A window reaches back
no further than the snapshots do: not past the start of the process (a resumed run's checkpoint);
``grad_noise_scale_exact_window_steps_at_target`` says how many states it held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from harness.core.evaluation import evaluate_members, synchronized_now
from harness.core.step import unwrap
from harness.measure.exact_noise import exact_noise_scale, population_noise_scale
from harness.measure.hessian_noise import hessian_noise_scale


@dataclass
class Crossing:
    """One member's target, reached at ``step``: ``samples`` seen by then, and what was measured there."""

    target: float
    step: int
    samples: int
    noise: dict[str, float] = field(default_factory=dict)
    resolution: int = 1  # 1: the exact step; more: it lies within this many steps before ``step``


class Replay:
    """The engine's state at recent checked points (steps where every pending target was below), and the
    batches trained since the oldest of them. The oldest kept lies at least ``window`` steps before the
    newest check, so a window of steps ending at any later crossing can be trained again."""

    def __init__(self, engine, window: int):
        self.engine, self.window = engine, window
        self.snapshots: list[tuple[int, list[torch.Tensor]]] = []  # (global step, the engine's state then)
        self.batches: list[tuple[torch.Tensor, int]] = []  # (indices, global batch size) of each step since
        self.checked = -1  # the last checked step
        self.layout = None  # the engine's first state tensor when the snapshots were taken

    def record(self, indices: torch.Tensor, global_batch_size: int) -> None:
        if self.snapshots:
            self.batches.append((indices, global_batch_size))

    def forget(self) -> None:
        """The snapshots no longer fit the engine."""
        self.snapshots, self.batches = [], []

    def keep(self, rows: list[int]) -> None:
        """Members left the engine, which kept ``rows``: the snapshots and batches keep those rows too, so a
        window still reaches back past the change."""
        if self.snapshots:
            index = torch.tensor(rows, device=self.batches[0][0].device if self.batches else None)
            self.snapshots = [(step, self.engine.select_state(state, rows)) for step, state in self.snapshots]
            self.batches = [(indices.index_select(0, index.to(indices.device)), size)
                            for indices, size in self.batches]
            self.layout = self.engine.training_state()[0]

    def checked_below(self, global_step: int) -> None:
        """Every pending target was checked below at ``global_step``: a start for a later replay."""
        if self.snapshots and self.engine.training_state()[0] is not self.layout:
            self.forget()  # the engine's tensors are new and ``keep`` was not told
        self.layout = self.engine.training_state()[0]
        self.checked = global_step
        if not self.snapshots or global_step - self.snapshots[-1][0] >= max(1, self.window // 4):
            self.snapshots.append((global_step, [t.clone() for t in self.engine.training_state()]))
        # The oldest snapshot is needed only while the next one is too recent to start a window from.
        while len(self.snapshots) > 1 and self.snapshots[1][0] <= global_step + 1 - self.window:
            dropped = self.snapshots[1][0] - self.snapshots[0][0]
            self.snapshots.pop(0)
            del self.batches[:dropped]

    def crossings(self, members: list, rows: list[int], global_step: int,
                  samples_now: list[int]) -> list[list[Crossing]]:
        """For each of ``members`` (the engine's ``rows``, whose evaluation at ``global_step`` found
        ``evals.crossed`` reached), the first step at or above each crossed target and the noise scales around
        it. ``samples_now``: each member's samples seen at ``global_step``."""
        ctx = members[0].trainer.ctx
        started = synchronized_now(ctx.device)
        if self.snapshots and self.engine.training_state()[0] is not self.layout:
            self.forget()  # cannot happen while the loop shrinks the engine only where it checks
        if not self.snapshots:  # nothing to go back to: the crossing is placed at this evaluation
            first = [{t: global_step for t in m.evals.crossed} for m in members]
            noise = self._noise(members, [m.trainer.model for m in members], first, [global_step])
        else:
            now = [t.clone() for t in self.engine.training_state()]
            base, state = self.snapshots[0]
            _restore(self.engine, state)
            replica, models = self.engine.replica(rows, [m.cfg for m in members])
            if replica is not self.engine:
                _restore(self.engine, now)  # the live engine goes on from where it was
            at_base = [t.clone() for t in replica.training_state()]
            pick = (lambda indices: indices) if replica is self.engine else (
                lambda indices, rows=torch.tensor(rows, device=ctx.device): indices[rows])
            steps = _Steps(replica, at_base, base, [(pick(indices), size) for indices, size in self.batches])
            first = self._first_steps(members, models, steps, global_step)
            noise = self._noise(members, models, first, steps.up_to(max(s for f in first for s in f.values())))
            if replica is self.engine:
                _restore(self.engine, now)
        share = (synchronized_now(ctx.device) - started) / len(members)
        base = self.snapshots[0][0] if self.snapshots else global_step
        sizes = [size for _, size in self.batches]
        result = []
        for k, (m, found) in enumerate(zip(members, first)):
            m.counters.replay_seconds += share
            result.append([Crossing(t, step, samples_now[k] - sum(sizes[step - base:global_step - base]),
                                    noise[k].get(t, {}), 1 if self.snapshots else global_step - self.checked)
                           for t, step in sorted(found.items())])
        return result

    def _first_steps(self, members: list, models: list, steps: "_Steps", global_step: int) -> list[dict[float, int]]:
        """Each member's first step at or above each of its crossed targets: after the last check, the
        subset evaluated after every step trained again (none where that check was the step before)."""
        first: list[dict[float, int]] = [{} for _ in members]
        if self.checked >= global_step - 1:
            return [{t: global_step for t in m.evals.crossed} for m in members]
        cfg, ctx = members[0].cfg, members[0].trainer.ctx
        for step in steps.up_to(global_step):
            if step <= self.checked:
                continue
            scores = evaluate_members(models, members[0].evals.subset, ctx, cfg.train.eval_batch_size)
            for found, m, (_, accuracy) in zip(first, members, scores):
                found.update({t: step for t in m.evals.crossed if t not in found and accuracy >= t})
            if all(len(found) == len(m.evals.crossed) for found, m in zip(first, members)):
                break
        for found, m in zip(first, members):  # the replica's rounding kept one below: the evaluation's step
            found.update({t: global_step for t in m.evals.crossed if t not in found})
        return first

    def _noise(self, members: list, models: list, first: list[dict[float, int]],
               states) -> list[dict[float, dict[str, float]]]:
        """Per member and target: the exact |G|^2 and tr(Sigma) after each step of the window ending at the
        crossing (as far back as ``states``, the steps each state is after, reach), averaged, and their ratio;
        B_noise at the crossing."""
        metrics_cfg = members[0].cfg.metrics
        train_set = members[0].trainer.train_set
        noise: list[dict[float, dict[str, float]]] = [{} for _ in members]
        exact_count, hessian_count = metrics_cfg.exact_noise_samples, metrics_cfg.hessian_noise_samples
        if (exact_count is None and hessian_count is None) or len(train_set) < 2:
            return noise
        sums: dict[tuple[int, float], list[float]] = {}  # (member, target) -> [|G|^2 sum, tr(Sigma) sum, steps]
        for step in states:
            for k, (m, model, found) in enumerate(zip(members, models, first)):
                targets = [t for t, crossing in found.items() if crossing - self.window < step <= crossing]
                if not targets:
                    continue
                with m.trainer.train_step.on_training_stream():
                    if exact_count is not None:
                        subset = train_set.head(exact_count)
                        exact = exact_noise_scale(unwrap(model), subset.features, subset.targets)
                        for t in targets:
                            total = sums.setdefault((k, t), [0.0, 0.0, 0])
                            total[0] += exact.grad_sq_norm
                            total[1] += exact.trace_cov
                            total[2] += 1
                    at_crossing = [t for t in targets if found[t] == step]
                    if hessian_count is not None and at_crossing:
                        subset = train_set.head(hessian_count)
                        hessian = hessian_noise_scale(unwrap(model), subset.features, subset.targets,
                                                      metrics_cfg.hessian_noise_deviations)
                        for t in at_crossing:
                            noise[k].setdefault(t, {}).update(_hessian_metrics(hessian, len(subset)))
        count = min(exact_count or 0, len(train_set))
        for (k, t), (sq_norm, trace, steps) in sums.items():
            sq_norm, trace = sq_norm / steps, trace / steps
            noise[k].setdefault(t, {}).update(grad_sq_norm_exact_at_target=sq_norm,
                                              grad_trace_cov_exact_at_target=trace,
                                              grad_noise_scale_exact_window_steps_at_target=float(steps))
            b_simple = population_noise_scale(trace, sq_norm, count)
            if b_simple == b_simple:
                noise[k][t]["grad_noise_scale_exact_at_target"] = b_simple
        return noise


class _Steps:
    """An engine's replica at a snapshot, and the batches after it: ``up_to(step)`` puts the snapshot back and
    trains again up to ``step``, yielding the step each state is after (the snapshot's first)."""

    def __init__(self, engine, state: list[torch.Tensor], base: int, batches: list[tuple[torch.Tensor, int]]):
        self.engine, self.state, self.base, self.batches = engine, state, base, batches

    def up_to(self, last_step: int):
        _restore(self.engine, self.state)
        yield self.base
        for offset, (indices, global_batch_size) in enumerate(self.batches[:last_step - self.base]):
            self.engine.train_step(indices, global_batch_size, self.base + offset + 1)
            yield self.base + offset + 1


def _restore(engine, state: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for live, saved in zip(engine.training_state(), state):
            live.copy_(saved)  # in place: a captured CUDA graph holds these addresses


def _hessian_metrics(hessian, count: int) -> dict[str, float]:
    """B_noise's metrics at a target: its components over ``count`` examples, the sampling error of tr(H Sigma),
    and B_noise of the training set they were drawn from, where it is positive and resolved."""
    metrics = {"grad_hess_grad_at_target": hessian.grad_hess_grad,
               "grad_trace_hess_cov_at_target": hessian.trace_hess_cov,
               "grad_trace_hess_cov_std_error_at_target": hessian.trace_hess_cov_std_error}
    b_noise = population_noise_scale(hessian.trace_hess_cov, hessian.grad_hess_grad, count,
                                     hessian.trace_hess_cov_std_error)
    if math.isfinite(b_noise) and b_noise > 0:  # unresolved (inf): its components are logged, not the ratio
        metrics.update(grad_noise_scale_hessian_at_target=b_noise,
                       grad_noise_scale_hessian_rel_error_at_target=hessian.b_noise_rel_error)
    return metrics

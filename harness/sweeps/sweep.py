"""Sweeps: expand a sweep config into trial configs and run them under one parent run.

Owns what every sweep driver shares: the trials (LR rule x batch size x LR x seed), the
parent run (skip-on-resume, outcomes), the progress line, the summary table and the report
that ends a sweep; and the local driver, ``run_sweep``. The drivers that start other
processes per trial (torchrun, Ray) are in ``sweep_drivers``. A trial that fails or
diverges is recorded and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Optional

from harness import signals
from harness.core.checkpoint import Checkpoints
from harness.core.config import Config, trial_name
from harness.console import say
from harness.core.data import Dataset, load_dataset
from harness.core.distributed import DistContext, broadcast_from_main
from harness.errors import InputError
from harness.core.stacked import SHARED_KEYS, check_stackable, dotted, stack_refusal
from harness.core.train_loop import RunHooks, RunResult
from harness.analysis.critical import TIME_METRICS, time_spent
from harness.analysis.report import build_report
from harness.records.mlflow_store import ui_links
from harness.records.tracking import display_name, make_tracker, sweep_display_name
from harness.launching.runs import train_trials


def trial_lr(cfg: Config, rule: str, batch_size: int, grid_value: Optional[float]) -> float:
    """A grid LR as given, else the rule's LR times the grid factor if any: ``none`` keeps the base LR,
    ``linear`` scales it by B/B0 (Goyal et al. 2017), ``sqrt`` by sqrt(B/B0) (Hoffer et al. 2017)."""
    sweep = cfg.sweep
    if sweep.lrs:
        return grid_value
    ratio = batch_size / sweep.base_batch_size
    rule_lr = cfg.optim.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]
    return rule_lr * grid_value if sweep.lr_factors else rule_lr


def expand_trials(cfg: Config) -> list[Config]:
    """One run config per (LR rule, batch size, grid LR, seed), in that order, without the sweep section.
    Without an LR grid (sweep.lrs, sweep.lr_factors) the grid is one LR, the rule's."""
    sweep = cfg.sweep
    trials = []
    for rule, batch_size, grid_value, seed in itertools.product(sweep.lr_rules, sweep.batch_sizes, sweep.lr_grid(),
                                                                sweep.seeds):
        raw = cfg.to_dict()
        raw.pop("sweep")
        raw.update(name=trial_name(cfg.name, rule, batch_size, seed, sweep.lr_label(grid_value)), seed=seed,
                   trial={"sweep": cfg.name, "lr_rule": rule, "base_lr": cfg.optim.lr,
                          "base_batch_size": sweep.base_batch_size})
        raw["optim"].update(global_batch_size=batch_size, lr=trial_lr(cfg, rule, batch_size, grid_value))
        if rule != "none":
            raw["optim"]["warmup_epochs"] = sweep.warmup_epochs
        if sweep.budget_steps is not None:
            raw["train"]["max_steps"] = sweep.budget_steps
        if cfg.train.stop_at_target and cfg.train.race_stop is None:
            raw["train"]["race_stop"] = sweep.race_stop
        trials.append(Config.from_dict(raw))
    return trials


def _sweep_trials(cfg: Config, flag: str) -> list[Config]:
    if not cfg.is_sweep:
        raise InputError(f"{flag}: {cfg.name!r} is not a sweep config; expected a config with a sweep section")
    return expand_trials(cfg)


def select_trial(cfg: Config, index: int) -> Config:
    """Trial ``index`` of a sweep config (the order of ``expand_trials``)."""
    trials = _sweep_trials(cfg, f"--trial {index}")
    if not 0 <= index < len(trials):
        raise InputError(f"--trial {index}: expected 0..{len(trials) - 1} for the {len(trials)} trials of {cfg.name!r}")
    return trials[index]


def select_trials(cfg: Config, text: str) -> list[Config]:
    """Trials ``text`` (``"0,2,5"``, 0-based, the order of ``expand_trials``) of a sweep config, to train
    as one stack (launch/train.py --trials), refused in one line unless they can share one. Every rank
    trains on the first trial's data, so trials whose data differ by seed must not share a stack."""
    try:
        indices = [int(part) for part in text.split(",")]
    except ValueError:
        raise InputError(f"--trials {text}: expected comma-separated trial indices, e.g. 0,1,2") from None
    trials = _sweep_trials(cfg, f"--trials {text}")
    for index in indices:
        if not 0 <= index < len(trials):
            raise InputError(f"--trials {text}: trial {index} does not exist; expected indices 0..{len(trials) - 1} "
                             f"for the {len(trials)} trials of {cfg.name!r}")
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        raise InputError(f"--trials {text}: trial {repeated[0]} given more than once; expected each trial once")
    members = [trials[i] for i in indices]
    check_stackable(members)
    seeds, data = sorted({m.seed for m in members}), members[0].data
    # The seed draws the validation split, digits' test split and synthetic data.
    if len(seeds) > 1 and (data.validation_size > 0 or data.dataset in ("digits", "synthetic")):
        raise InputError(f"--trials {text}: trials of seeds {', '.join(map(str, seeds))} hold different data "
                         f"(the split of {data.dataset} depends on the seed); expected trials of one seed")
    return members


def pending_stacks(cfg: Config, trials: list[Config], parent: "SweepParent",
                   split_by_seed: bool = False) -> list[list[int]]:
    """The indices of the trials still to run, in stacks of trials that share core/stacked.py's SHARED_KEYS
    (sweep order, up to ``sweep.stack_trials`` each; one trial each without it). ``split_by_seed``: one
    seed's trials per stack (where each process loads its first trial's data, whose split depends on it)."""
    pending = [i for i, trial in enumerate(trials) if not parent.skip(trial)]
    refusal = stack_refusal(cfg) if cfg.sweep.stacks else None
    if refusal:
        say(f"[{cfg.name}] trials one at a time, not stacked (sweep.stack_trials {cfg.sweep.stack_trials}): "
            f"model.factory {cfg.model.factory} cannot be stacked: {refusal}")
    if not cfg.sweep.stacks or refusal:
        return [[i] for i in sorted(pending, key=lambda i: race_order(cfg, trials[i], i))]
    groups: dict[tuple, list[int]] = {}
    for i in pending:
        key = tuple(repr(dotted(trials[i], k)) for k in SHARED_KEYS) + ((trials[i].seed,) if split_by_seed else ())
        groups.setdefault(key, []).append(i)
    stacks = []
    for members in groups.values():
        size = len(members) if cfg.sweep.stack_trials == "auto" else cfg.sweep.stack_trials
        stacks += [members[i:i + size] for i in range(0, len(members), size)]
    return sorted(stacks)


def race_order(cfg: Config, trial: Config, index: int) -> tuple:
    """Where trial ``index`` runs among its batch size's trials one by one: where trials race to their target
    over an LR grid of factors, the rule's own LR first, then the factors out from it (the likeliest fastest
    first, so the race's best is known early); else in sweep order."""
    if trial.train.race_stop is None or not cfg.sweep.lr_factors:
        return (index,)
    rule_lr = trial_lr(cfg, trial.trial.lr_rule, trial.optim.global_batch_size, 1.0)
    return (trial.trial.lr_rule, trial.optim.global_batch_size, abs(math.log(trial.optim.lr / rule_lr)),
            trial.optim.lr, index)


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class SweepProgress:
    """The line each trial (or stack) of a sweep starts with: trial i of N, time elapsed, an ETA (the mean
    duration times the trials left, skipped ones included, so it errs long)."""

    def __init__(self, total: int):
        self.total = total
        self.started_s = time.monotonic()
        self.trial_started_s: Optional[float] = None
        self.last_count = 1  # trials in the stack that started last
        self.durations_s: list[float] = []

    def starting_stack(self, indices: list[int], trials: list[Config], how: str = "") -> None:
        """Trials ``indices`` start (together, as one stack, when there are several)."""
        now = time.monotonic()
        if self.trial_started_s is not None:
            # A stack's time is its trials' time: each counts as an equal share of it.
            self.durations_s += [(now - self.trial_started_s) / self.last_count] * self.last_count
        self.trial_started_s, self.last_count = now, len(indices)
        left = self.total - indices[0]
        eta = (f"ETA {format_duration(sum(self.durations_s) / len(self.durations_s) * left)}"
               if self.durations_s else "ETA after the first trial")
        which = (f"trial {indices[0] + 1}/{self.total}" if len(indices) == 1 else
                 f"trials {', '.join(str(i + 1) for i in indices)}/{self.total} as one stack")
        names = f"{display_name(trials[0])} ({trials[0].name})" if len(trials) == 1 else stack_summary(trials)
        say(f"[sweep] {which} ({format_duration(now - self.started_s)} elapsed, {eta}): "
            f"{names}{': ' + how if how else ''}")


def stack_summary(trials: list[Config]) -> str:
    """What a stack's trials span, in one short phrase: ``batch 32, LR 0.1/0.2/0.4, seeds 0/1``."""
    def values(what: str, items, text=str) -> str:
        distinct = list(dict.fromkeys(items))
        return f"{what}{'s' if len(distinct) > 1 and what != 'LR' else ''} {'/'.join(text(v) for v in distinct)}"

    parts = [values("batch", (t.optim.global_batch_size for t in trials)),
             values("LR", (t.optim.lr for t in trials), lambda v: f"{v:.4g}"),
             values("seed", (t.seed for t in trials))]
    rules = {t.trial.lr_rule for t in trials if t.trial}
    return ", ".join(parts + ([values("rule", sorted(rules))] if len(rules) > 1 else []))


@dataclass
class TrialOutcome:
    cfg: Config
    result: Optional[RunResult]  # None where the trial ran in another process (torchrun) or was skipped
    error: Optional[str] = None
    skipped: bool = False
    stopped_early: Optional[str] = None  # the scheduler that stopped the trial (Ray Tune's ASHA)


@dataclass
class SweepParent:
    """The sweep's MLflow parent run; the driver fills ``outcomes`` as trials end. ``finished`` names
    the trials an earlier, interrupted attempt of this sweep completed (empty unless resuming): they are skipped."""
    run_id: Optional[str]
    finished: frozenset = frozenset()
    ctx: Optional[DistContext] = None
    outcomes: list[TrialOutcome] = field(default_factory=list)

    def skip(self, trial: Config) -> bool:
        if trial.name in self.finished:
            self.outcomes.append(TrialOutcome(trial, None, skipped=True))
            say(f"[{trial.name}] finished in an earlier attempt: skipped", ctx=self.ctx)
            return True
        return False


@contextlib.contextmanager
def sweep_parent_run(cfg: Config, ctx: DistContext, resume: bool = False, trials: Optional[list[Config]] = None,
                     kind: str = "sweep"):
    """Start the parent run (or, resuming, reopen the newest unfinished one of this sweep); end it FINISHED
    with trial counts, KILLED on a termination signal, or FAILED if the sweep breaks; child runs still
    RUNNING then end with the parent's status. ``trials``: the runs it holds (default: ``expand_trials``),
    in the order its outcomes end up in; ``kind``: the parent's ``run_kind`` tag."""
    trials = expand_trials(cfg) if trials is None else trials
    tracker = make_tracker(cfg, ctx)
    previous = tracker.unfinished_sweep_run(cfg.name) if resume else None
    finished = tracker.finished_children(previous) if previous else frozenset()
    # Only the main rank reads MLflow (the others hold a NullTracker): in a process group, every
    # rank must skip the trials it skips (a torchrun restart resumes), or refuse as it does.
    found, finished = broadcast_from_main((previous is not None, finished), ctx)
    if resume and not found:
        raise InputError(f"--resume: no unfinished sweep named {cfg.name!r} in experiment "
                         f"{cfg.tracking.experiment!r}; expected one that was interrupted")
    if not resume:
        # A new sweep starts every trial from scratch: a later --resume must not pick up older checkpoints.
        for trial in trials:
            Checkpoints(trial, ctx).clear()
    try:  # start inside: a signal held back during start is raised as it returns
        parent = SweepParent(tracker.start(resume_run_id=previous), finished, ctx)
        tracker.set_tags({"run_kind": kind})
        yield parent
        order = {trial.name: i for i, trial in enumerate(trials)}
        parent.outcomes.sort(key=lambda outcome: order[outcome.cfg.name])
        tracker.set_tags({"trials": len(parent.outcomes),
                          "trials_failed": sum(o.error is not None for o in parent.outcomes)})
        # A trial whose process died without a word (SIGKILL, out of memory) left its run RUNNING.
        tracker.end_running_children(parent.run_id, "FAILED")
        tracker.finish("FINISHED")
    except BaseException as err:
        # As in train_loop.train: a termination signal is raised once, so if it lands during the first
        # attempt the second one runs to its end. Children first: an unstoppable trial must not stay RUNNING.
        try:
            status = signals.end_status(err)
            tracker.end_running_children(tracker.run_id, status)
            tracker.finish(status)
        except signals.Terminated:
            tracker.end_running_children(tracker.run_id, "KILLED")
            tracker.finish("KILLED")
            raise
        raise


def run_stacks(cfg: Config, ctx: DistContext, resume: bool, run_stack, how,
               split_by_seed: bool = False) -> SweepParent:
    """The sweep's pending stacks one after another under one parent run, each through ``run_stack(members,
    indices, parent)`` (its outcomes) after its progress line (``how(indices)``: how it runs)."""
    trials = expand_trials(cfg)
    progress = SweepProgress(len(trials)) if ctx.is_main else None
    if progress:  # what the sweep holds, and how to make it shorter
        say(f"[sweep] {sweep_display_name(cfg).split(': ', 1)[-1]}: {len(trials)} trials; fewer with --set "
            "sweep.seeds=[0], a shorter sweep.batch_sizes or sweep.lrs, or a smaller train.epochs")
    with sweep_parent_run(cfg, ctx, resume, trials) as parent:
        for indices in pending_stacks(cfg, trials, parent, split_by_seed):
            members = [race_from(trials[i], parent.outcomes) for i in indices]
            if progress:
                progress.starting_stack(indices, members, how(indices))
            parent.outcomes += run_stack(members, indices, parent)
    return parent


def race_from(trial: Config, outcomes: list[TrialOutcome]) -> Config:
    """``trial`` with train.race_best_steps: the fewest steps to the target among the trials of its batch size
    (and LR rule) this process has run (a trial run by another process reports nothing back here)."""
    if trial.train.race_stop is None:
        return trial
    steps = [o.result.metrics["steps_to_target"] for o in outcomes
             if o.result and "steps_to_target" in o.result.metrics and o.cfg.trial == trial.trial
             and o.cfg.optim.global_batch_size == trial.optim.global_batch_size]
    if not steps:
        return trial
    return trial.model_copy(update={"train": trial.train.model_copy(update={"race_best_steps": int(min(steps))})})


def run_sweep(cfg: Config, ctx: DistContext, dataset: Optional[Dataset] = None, resume: bool = False) -> SweepParent:
    """Run every trial in this process group, one after another, as children of one parent run."""
    dataset = dataset or load_dataset(cfg)
    # Every trial of the sweep shares this process's dataset, so stacks need not split by seed.
    return run_stacks(cfg, ctx, resume,
                      lambda members, _, parent: run_trials(members, ctx, dataset, parent.run_id, resume),
                      how=lambda _: f"in this process group of {ctx.world_size}")


def run_trials(members: list[Config], ctx: DistContext, dataset: Dataset, parent_run_id,
              resume: bool) -> list[TrialOutcome]:
    """``members`` (one trial, or a stack of them) as one run of the loop; one outcome per member, all failed
    if it fails."""
    try:
        results = train_trials(members, ctx, hooks=RunHooks(resume=resume), dataset=dataset,
                               parent_run_id=parent_run_id)
        return [TrialOutcome(trial, result) for trial, result in zip(members, results)]
    except Exception as err:  # one broken trial or stack must not stop the sweep
        if ctx.world_size > 1:
            raise  # the other ranks may be inside a collective: only a restart can recover
        traceback.print_exc()
        return [TrialOutcome(trial, None, f"{type(err).__name__}: {err}") for trial in members]


SUMMARY_KEYS = ("train_loss", "test_loss", "test_accuracy", "generalization_gap_accuracy", "generalization_gap_loss")


def summary_table(outcomes: list[TrialOutcome]) -> str:
    """The table ``make sweep`` ends with: one row per trial, final-epoch numbers."""
    header = ["rule", "batch", "lr", "seed", "train loss", "test loss", "test acc", "gap (acc)", "gap (loss)", "status"]
    rows = []
    for o in outcomes:
        m = o.result.metrics if o.result else {}
        status = ("failed" if o.error else "skipped" if o.skipped else "done" if o.result is None
                  else "diverged" if o.result.diverged else f"stopped ({o.stopped_early})" if o.stopped_early
                  else "ok")
        rows.append([o.cfg.trial.lr_rule if o.cfg.trial else "none", str(o.cfg.optim.global_batch_size),
                     f"{o.cfg.optim.lr:.4g}", str(o.cfg.seed)]
                    + [f"{m[k]:.4f}" if k in m else "-" for k in SUMMARY_KEYS] + [status])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def where_the_time_went(spent: dict[str, Optional[float]], elapsed_s: float) -> str:
    """One line: each time_*_s metric summed over the trials, its share of the sweep's wall time,
    and evaluation against training. A resumed sweep's trials carry the time of earlier launches,
    which this launch's wall time does not hold: their shares are then of the sum."""
    total = sum(value for value in spent.values() if value is not None)
    basis, of = elapsed_s, format_duration(elapsed_s)
    if total > elapsed_s:
        basis, of = total, f"their sum {format_duration(total)}: trials resumed from an earlier launch carry its time"
    parts = [f"{TIME_METRICS[key]} " + (f"{format_duration(value)} ({value / basis:.0%})"
                                        if value is not None and basis > 0 else "not recorded")
             for key, value in spent.items()]
    line = f"where the time went (summed over trials, share of {of}): {', '.join(parts)}"
    train, evaluation = spent.get("time_train_s"), spent.get("time_eval_s")
    if train and evaluation is not None:
        line += f"; evaluation / training = {evaluation / train:.0%}"
    return line


def report_sweep(cfg: Config, parent: SweepParent, report_dir: str, elapsed_s: float) -> None:
    """The lines a sweep launch ends with: with tracking, ``harness report``'s table, where its
    files went and the links into the MLflow UI; without, the summary table; and the trial count."""
    outcomes = parent.outcomes
    if cfg.tracking.enabled:
        say(f"building the report from MLflow ({cfg.tracking.uri})")
        report = build_report(cfg.tracking.uri, cfg.tracking.experiment, sweep_run_id=parent.run_id, out_dir=report_dir)
        say("", *report.answer, "\n" + report.markdown_table,
            f"\nreport: {report.directory} (plots: {', '.join(p.name for p in report.plots)})")
        spent = report.time_spent
    else:
        say(summary_table(outcomes))
        spent = time_spent([o.result.metrics for o in outcomes if o.result])
    failed = sum(o.error is not None for o in outcomes)
    say(f"{len(outcomes)} trials, {failed} failed, {format_duration(elapsed_s)}", where_the_time_went(spent, elapsed_s))
    if cfg.tracking.enabled:
        say(*ui_links(cfg.tracking.uri, report.experiment_id, parent.run_id))

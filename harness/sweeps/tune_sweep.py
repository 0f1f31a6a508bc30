"""A sweep on Ray as a Ray Tune experiment: one Tune trial per sweep trial (or per stack, with
``sweep.stack_trials``), each a function trainable that builds and fits its TorchTrainer (Ray
Train V2's Train + Tune pattern; ``Tuner(TorchTrainer)`` is gone in V2).

Owns: the trainable, what each Train run forwards to Tune, how many trials run at once, ASHA early
stopping (a stopped trial's run ends FINISHED, tagged ``stopped_early: asha``), failed trials' runs,
stopping on a termination signal, and the placement groups Ray Train leaves behind. The trials and
parent run are ``sweep``'s; one Train run is ``ray_train``'s.
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Optional

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from harness import signals
from harness.console import say, warn
from harness.core.config import Config
from harness.core.distributed import DistContext
from harness.core.train_loop import RunResult
from harness.errors import InputError
from harness.records.mlflow_store import end_runs_of_launch, end_stopped_run
from harness.records.tracking import display_name
from harness.launching.ray_train import RayOptions, build_trainer, new_launch_id, result_dict, run_results
from harness.sweeps.sweep import SweepParent, TrialOutcome, expand_trials, pending_stacks, sweep_parent_run

ASHA_METRIC = "val_accuracy"  # maximised
ASHA_TIME_ATTR = "epoch"  # epochs trained, as each report says (a restarted worker group repeats none)
STOP_WAIT_S = 30  # for the trials to go after a termination signal; then the parent run ends their runs KILLED
LEFTOVER_QUIET_S = 2.0  # ``remove_leftover_placement_groups`` stops after this long without a new leftover
# Set by the main thread on a termination signal, read by Tune's loop (``SignalStopper``):
# module-level, since Tune pickles its run config and an Event does not pickle.
_STOP_ALL = threading.Event()


class EpochsToTune(TuneReportCallback):
    """Forward rank 0's report of every trained epoch to this Tune trial, with the run's epoch count
    (runs in the Train controller). Epoch 0 (the initial checkpoint) has no metrics to rank;
    ``total_epochs`` tells ``TrialLines.on_trial_result`` a trial's last epoch."""

    def __init__(self, total_epochs: int):
        super().__init__()
        self.total_epochs = total_epochs

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and metrics[0].get("epoch", 0) >= 1:
            super().after_report(run_context, [{**metrics[0], "total_epochs": self.total_epochs}], checkpoint)


def run_trial(config: dict, trials: list, stacks: dict, launch_ids: dict, options: RayOptions,
              parent_run_id: Optional[str], resume: bool) -> dict:
    """The Tune function trainable: fit the TorchTrainer of the sweep trials ``stacks[config["trial_index"]]``;
    rank 0's RunResults as Tune's final result, the only way they reach the driver. A failure raises: the
    driver ends its MLflow runs (here, a Tune stop could kill this process halfway through)."""
    index = config["trial_index"]
    members = [trials[i] for i in stacks[index]]
    trainer = build_trainer(members, options, launch_ids[index], parent_run_id, resume,
                            callbacks=(EpochsToTune(members[0].total_epochs),))
    results = run_results(trainer.fit(), members)
    return {"run_results": [result_dict(result) for result in results]}


def concurrency(options: RayOptions, cluster: dict, num_trials: int) -> tuple[int, str]:
    """How many trials fit on the cluster (``ray.cluster_resources()``) at once, and why: Ray Train gives
    each worker 1 CPU (and 1 GPU with use_gpu); the trainable and Train's controller take none."""
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    per_trial = f"{options.num_workers} worker(s) x 1 CPU{' + 1 GPU' if options.use_gpu else ''} per trial"
    fits = int(cpus // options.num_workers)
    if options.use_gpu:
        fits = min(fits, int(gpus // options.num_workers))
    why = f"{cpus:g} CPUs{f', {gpus:g} GPUs' if options.use_gpu else ''} in the cluster, {per_trial}"
    if fits < 1:
        warn(f"[sweep] the cluster has too few resources for one trial ({why}): the trials wait for more")
    return max(1, min(fits, num_trials)), why


def asha_scheduler(cfg: Config, trials: list[Config]) -> Optional[ASHAScheduler]:
    """ASHA on validation accuracy (maximised) over epochs, or None without ``sweep.early_stopping: asha``."""
    sweep = cfg.sweep
    if sweep.early_stopping != "asha":
        return None
    max_epochs = max(t.total_epochs for t in trials)
    if sweep.asha_grace_period >= max_epochs:
        raise InputError(f"sweep.asha_grace_period: {sweep.asha_grace_period} epochs leaves ASHA nothing to stop "
                         f"in trials of at most {max_epochs} epochs; expected < {max_epochs}")
    # stop_last_trials=False: a trial that reaches max_t ends by itself; a stop there would
    # race its workers' last MLflow writes.
    return ASHAScheduler(time_attr=ASHA_TIME_ATTR, metric=ASHA_METRIC, mode="max", max_t=max_epochs,
                         grace_period=sweep.asha_grace_period, reduction_factor=sweep.asha_reduction_factor,
                         stop_last_trials=False)


class SignalStopper(tune.Stopper):
    """Stops every trial once the driver caught a termination signal (``_STOP_ALL``)."""

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return _STOP_ALL.is_set()


class TrialLines(tune.Callback):
    """The console lines of the trials as Tune starts and ends them; remembers which ASHA stopped early
    (with ASHA, a result Tune marks done before the trial's last epoch is its stop)."""

    def __init__(self, trials: list[Config], stacks: dict[int, list[int]], asha: bool):
        self.trials, self.stacks, self.asha = trials, stacks, asha
        self.total = len(stacks)
        self.started = 0
        self.stopped_early: dict[int, dict] = {}  # trial index -> its last result

    def _trial(self, trial) -> tuple[int, Config]:
        index = trial.config["trial_index"]
        return index, self.trials[index]

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started += 1
        index, cfg = self._trial(trial)
        stack = self.stacks[index]
        if len(stack) > 1:
            say(f"[sweep] trials {', '.join(str(i + 1) for i in stack)} started as one stack "
                f"({self.started}/{self.total} Ray Tune trials of this attempt): "
                f"{', '.join(self.trials[i].name for i in stack)}")
            return
        say(f"[sweep] trial {index + 1} started ({self.started}/{self.total} of this attempt): "
            f"{display_name(cfg)} ({cfg.name}) as a Ray Tune trial")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        index, cfg = self._trial(trial)
        epoch = result.get(ASHA_TIME_ATTR)
        if self.asha and result.get("done") and epoch is not None and epoch < result.get("total_epochs", math.inf) \
                and not _STOP_ALL.is_set():
            self.stopped_early[index] = dict(result)
            say(f"[{cfg.name}] stopped early by ASHA after epoch {epoch} of {result['total_epochs']} "
                f"({ASHA_METRIC} {result.get(ASHA_METRIC, float('nan')):.4f})")

    def on_trial_error(self, iteration, trials, trial, **info):
        _, cfg = self._trial(trial)
        warn(f"[{cfg.name}] failed (Ray Tune trial {trial.trial_id})")


def run_tune_sweep(cfg: Config, options: RayOptions, resume: bool = False) -> SweepParent:
    """Every trial of ``cfg`` not finished in an earlier attempt, as one Ray Tune experiment under
    one MLflow parent run. Ray must be connected (``entrypoints.connect_ray``)."""
    trials = expand_trials(cfg)
    scheduler = asha_scheduler(cfg, trials)  # before anything starts: it may refuse the config
    ctx = DistContext(world_size=options.num_workers, launcher="ray")
    with sweep_parent_run(cfg, ctx, resume, trials) as parent:
        # With sweep.stack_trials, a Tune trial trains a stack. Each worker loads its first trial's
        # data, so trials whose data differ by seed go in different stacks, as under torchrun.
        stacks = pending_stacks(cfg, trials, parent, split_by_seed=True)
        if stacks:
            outcomes = _run_experiment(cfg, trials, {stack[0]: stack for stack in stacks}, options, scheduler,
                                       parent.run_id, resume)
            parent.outcomes += [outcomes[index] for stack in stacks for index in stack]
    return parent


def _run_experiment(cfg: Config, trials: list[Config], stacks: dict[int, list[int]], options: RayOptions, scheduler,
                    parent_run_id: Optional[str], resume: bool) -> dict[int, TrialOutcome]:
    """``stacks`` (first trial's index -> the trials trained together) as one Tune trial each; every trial's outcome."""
    import ray

    limit, why = concurrency(options, ray.cluster_resources(), len(stacks))
    count = sum(len(stack) for stack in stacks.values())
    say(f"[sweep] Ray Tune: {count} trials"
        + (f" in {len(stacks)} stacks (a Ray Tune trial each)" if count > len(stacks) else "")
        + f", at most {limit} at a time ({why})"
        + (f"; ASHA on {ASHA_METRIC} (grace {cfg.sweep.asha_grace_period} epochs, "
           f"reduction factor {cfg.sweep.asha_reduction_factor:g})" if scheduler else ""))
    launch_ids = {index: new_launch_id(trials[index]) for index in stacks}
    lines = TrialLines(trials, stacks, asha=scheduler is not None)
    # The trainable's final result (run_results) does not carry ASHA's metric: without this,
    # Tune refuses it when a scheduler is set. The metric is checked by config (a validation split).
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    trainable = tune.with_parameters(run_trial, trials=trials, stacks=stacks, launch_ids=launch_ids, options=options,
                                     parent_run_id=parent_run_id, resume=resume)

    def name_of(trial) -> str:
        index = trial.config["trial_index"]
        size = len(stacks[index])
        return trials[index].name + (f"-stack{size}" if size > 1 else "")

    tuner = tune.Tuner(
        # No CPU for the trainable (it only waits on its TorchTrainer), none for Train's controller:
        # a trial's resources are its workers', and max_concurrent_trials is counted in those.
        # One byte of memory: Tune refuses a placement group that asks for nothing.
        tune.with_resources(trainable, {"cpu": 0, "memory": 1}),
        param_space={"trial_index": tune.grid_search(sorted(stacks))},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=limit, num_samples=1,
                                    trial_name_creator=name_of, trial_dirname_creator=name_of),
        # verbose=0: the trials' own lines (TrialLines) instead of Tune's status tables, unless asked for.
        run_config=tune.RunConfig(name=new_launch_id(cfg), storage_path=options.storage_path,
                                  verbose=None if options.verbose else 0,
                                  stop=SignalStopper(), callbacks=[lines],
                                  failure_config=tune.FailureConfig(max_failures=0)))
    _STOP_ALL.clear()
    try:
        # Off the main thread Tune leaves SIGINT alone (it would otherwise end the experiment quietly and return).
        grid = signals.call_interruptibly(tuner.fit, "ray-tune-fit", _stop_all_trials, STOP_WAIT_S,
                                          stop_on_error=False)
    finally:
        remove_leftover_placement_groups()
    outcomes = {}
    for result in grid:
        index = result.config["trial_index"]
        members = [trials[i] for i in stacks[index]]
        outcomes.update(zip(stacks[index], _outcomes(members, launch_ids[index], result,
                                                     lines.stopped_early.get(index))))
    return outcomes


def _outcomes(members: list[Config], launch_id: str, result, stopped: Optional[dict]) -> list[TrialOutcome]:
    """One Tune trial's outcome per sweep trial it trained; ends the MLflow runs its workers could not
    end (failed, stopped early). The trials of a stack fail together: they ran in one Train run."""
    first = members[0]
    if result.error is not None:
        error = f"{type(result.error).__name__}: {str(result.error).strip().splitlines()[-1][:300]}"
        for trial in members:
            warn(f"[{trial.name}] failed: {error}")
        end_runs_of_launch(first, launch_id, "FAILED")  # a worker that died could not end them
        return [TrialOutcome(trial, None, error) for trial in members]
    if stopped is not None:  # ASHA: never a stack (commands.refuse_stacks_under_asha)
        end_stopped_run(first, launch_id, {"stopped_early": "asha", "stopped_early_epoch": str(stopped["epoch"])})
        metrics = {k: v for k, v in stopped.items() if isinstance(v, float)}
        return [TrialOutcome(first, RunResult(None, int(stopped["epoch"]), int(stopped.get("global_step", 0)),
                                              metrics), stopped_early="asha")]
    finals = result.metrics.get("run_results")
    if finals is None:  # no final result reached Tune
        return [TrialOutcome(trial, None) for trial in members]
    return [TrialOutcome(trial, RunResult(final["run_id"], final["epochs_completed"], final["global_step"],
                                          final["metrics"], diverged=final["diverged"]))
            for trial, final in zip(members, finals)]


def remove_leftover_placement_groups(quiet_s: float = LEFTOVER_QUIET_S, poll_s: float = 0.25) -> list[str]:
    """Remove every placement group this driver's Ray job holds (its id ends with the job's), until none has
    turned up for ``quiet_s``; the ids removed. Why: Ray Train 2.60 leaks them. A Train controller that Tune
    stops while it makes its worker group's placement group can have the group registered after the GCS saw
    it die; the GCS never removes it, and the next sweep's trial waits for its CPUs for ever (docs/cluster.md).
    Such a group turns up within a few hundred ms, hence the quiet spell. A failure here is only a warning."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    removed: list[str] = []
    try:
        job = ray.get_runtime_context().get_job_id()
        last_found = time.monotonic()
        while time.monotonic() - last_found < quiet_s:
            for group_id, group in placement_group_table().items():
                if group_id.endswith(job) and group["state"] != "REMOVED" and group_id not in removed:
                    remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(group_id)))
                    removed.append(group_id)
                    last_found = time.monotonic()
            time.sleep(poll_s)
    except Exception as err:  # noqa: BLE001 - see the docstring
        warn(f"[sweep] could not remove this sweep's leftover Ray placement groups: {type(err).__name__}: {err}")
    if removed:
        say(f"[sweep] removed {len(removed)} placement group(s) Ray Train left behind: {', '.join(removed)}")
    return removed


def _stop_all_trials(_err: BaseException) -> None:
    """On a termination signal ``SignalStopper`` has Tune stop every trial (their Train runs die with their trainables)."""
    _STOP_ALL.set()

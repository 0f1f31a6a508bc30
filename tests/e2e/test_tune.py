"""Ray sweeps as a Ray Tune experiment: every trial a child run of one parent, ASHA stopping
hopeless trials (FINISHED, tagged), concurrency from the cluster, and early stopping refused
where there is no Tune."""

import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, run_command, seeded_store, trial_runs
from harness.core.config import load_config
from harness.errors import InputError

# 2 batch sizes x 2 seeds. At lr 0.1, batch 16 makes ~77 steps in epoch 1 (validation
# accuracy ~0.9); batch 512 makes 2 (near chance): ASHA's rung at epoch 1 can tell them apart.
TUNE_SWEEP = """
name: tuned
data: {dataset: digits, validation_size: 200}
model: {hidden_sizes: [32], activation: relu}
optim: {lr: 0.1, momentum: 0.9, global_batch_size: 16}
train: {epochs: 3, progress: false}
metrics: {target_val_accuracy: 0.5, sharpness_samples: 128, sharpness_iterations: 5}
tracking: {experiment: tuned, log_model: false}
sweep: {batch_sizes: [16, 512], seeds: [0, 1], lr_rules: [none]}
"""


def run_tune_sweep(tmp_path, *args, env=None, keep_config=False):
    config = tmp_path / "tuned.yaml"
    if not keep_config:
        config.write_text(TUNE_SWEEP)
    return run_command([sys.executable, str(REPO / "launch/sweep.py"), "--config", str(config),
                        "--set", f"tracking.uri={seeded_store(tmp_path)}", "--set", f"checkpoint.dir={tmp_path}/ckpt",
                        "--report-dir", str(tmp_path / "reports"), "--storage-path", str(tmp_path / "ray"), *args],
                       cwd=tmp_path, env=env, timeout=600)


def sweep_runs(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("tuned").experiment_id
    parents = client.search_runs([experiment], "tags.run_kind = 'sweep'")
    assert len(parents) == 1
    children = trial_runs(client, [experiment], parents[0].info.run_id)
    return client, parents[0], {c.data.tags["trial"]: c for c in children}


@pytest.mark.slow
def test_ray_sweep_trains_each_trial_as_a_ray_train_run_and_asha_stops_the_hopeless_one_finished_and_tagged(
        tmp_path, ray_cluster):
    # The sweep's records apart from the launcher (names, by_step and by_batch series, a diverged trial):
    # tests/e2e/test_sweep.py; a diverged run's result through Ray Train: tests/unit/test_ray_fit.py.
    # One seed, 2 workers a trial: the cluster's 2 CPUs run one trial at a time, in grid order, so the
    # batch-16 trial has passed the rung at epoch 1 before the batch-512 one reaches it.
    (tmp_path / "tuned.yaml").write_text(TUNE_SWEEP.replace("seeds: [0, 1]", "seeds: [0]"))
    result = run_tune_sweep(tmp_path, "--launcher", "ray", "--nproc", "2", "--set", "sweep.early_stopping=asha",
                            env={"RAY_ADDRESS": ray_cluster["address"], **ray_cluster["env"]}, keep_config=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "[sweep] Ray Tune: 2 trials, at most 1 at a time (2 CPUs in the cluster" in result.stdout
    assert "2 trials, 0 failed" in result.stdout
    client, parent, children = sweep_runs(tmp_path)
    assert parent.info.status == "FINISHED"
    assert (parent.data.tags["trials"], parent.data.tags["trials_failed"]) == ("2", "0")
    assert sorted(children) == ["tuned-none-bs16-seed0", "tuned-none-bs512-seed0"]
    stopped = {name: c for name, c in children.items() if c.data.tags.get("stopped_early") == "asha"}
    # The batch-512 trial is below the cutoff at the rung (the batch-16 trial's value there).
    assert set(stopped) == {"tuned-none-bs512-seed0"}
    for name, child in children.items():
        assert child.info.status == "FINISHED", name
        assert (child.data.params["launcher"], child.data.params["world_size"]) == ("ray", "2")
        epochs = {m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")}
        if name in stopped:
            # Stopped at a rung before its last epoch. Its workers train on until Tune's stop
            # kills them (a digits epoch is ~0.1 s), so its history may go further than the rung.
            assert int(child.data.tags["stopped_early_epoch"]) in epochs - {3}, name
            assert f"[{name}] stopped early by ASHA after epoch" in result.stdout
        else:
            assert epochs == {1, 2, 3}, name
    first_epoch = {name: min(client.get_metric_history(c.info.run_id, "val_accuracy"), key=lambda m: m.step).value
                   for name, c in children.items()}
    assert first_epoch["tuned-none-bs512-seed0"] < first_epoch["tuned-none-bs16-seed0"]
    # The report, from the runs in MLflow, beside the parent run.
    assert (tmp_path / "reports" / parent.info.run_id / "summary.csv").stat().st_size > 0
    assert "report/summary.csv" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    # ASHA's stops left no placement group holding the cluster's CPUs (Ray Train can leak one;
    # the sweep removes its job's leftovers, tune_sweep.remove_leftover_placement_groups).
    assert live_placement_groups(ray_cluster) == []


def live_placement_groups(ray_cluster):
    """The cluster's placement groups not REMOVED, once none of a job just ended is still being removed
    (up to 10 s). Asked of the dashboard's State API over HTTP with the cluster's token: a driver of
    its own would cost an interpreter's start, and this process's Ray client may have settled its
    auth mode before the ray_cluster fixture set the token (the State API then refuses it)."""
    import json
    import time
    import urllib.request

    request = urllib.request.Request(f"{ray_cluster['dashboard']}/api/v0/placement_groups?limit=10000&detail=false",
                                     headers={"Authorization": f"Bearer {ray_cluster['env']['RAY_AUTH_TOKEN']}"})
    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(request, timeout=30) as response:
            groups = json.loads(response.read())["data"]["result"]["result"]
        live = [g["placement_group_id"] for g in groups if g["state"] != "REMOVED"]
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(0.5)


# A driver that holds two placement groups of its own job (one made by the driver, created; one made
# by one of its actors, as Ray Train's controller makes a worker group's, pending: it asks for both
# CPUs while another job holds one), and has a third made by an actor 0.7 s after it starts removing
# its job's leftovers (as a dying controller's group turns up after Tune has returned).
LEFTOVER_DRIVER = """
import json, os, time, ray
from ray.util.placement_group import placement_group, placement_group_table
from harness.sweeps.tune_sweep import remove_leftover_placement_groups

ray.init(address=os.environ["RAY_ADDRESS"])
made_by_driver = placement_group([{"CPU": 1}])
ray.get(made_by_driver.ready(), timeout=60)

@ray.remote(num_cpus=0)
class Controller:
    def make(self, delay_s=0.0):
        time.sleep(delay_s)
        return placement_group([{"CPU": 2}]).id.hex()

made_by_actor = ray.get(Controller.remote().make.remote())
late_controller = Controller.remote()
ray.get(late_controller.__ray_ready__.remote())
before = {k: v["state"] for k, v in placement_group_table().items()}
made_late = late_controller.make.remote(0.7)
removed = remove_leftover_placement_groups()
after = {k: v["state"] for k, v in placement_group_table().items()}
print(json.dumps({"own": [made_by_driver.id.hex(), made_by_actor, ray.get(made_late)], "removed": removed,
                  "before": before, "after": after}))
"""

OTHER_JOB_DRIVER = """
import os, sys, ray
from ray.util.placement_group import get_placement_group, placement_group, remove_placement_group

ray.init(address=os.environ["RAY_ADDRESS"], namespace="leftover-test")  # a named group lives in a namespace
if sys.argv[1] == "make":
    group = placement_group([{"CPU": 1}], name="another-jobs-group", lifetime="detached")
    ray.get(group.ready(), timeout=60)
    print(group.id.hex())
else:
    remove_placement_group(get_placement_group("another-jobs-group"))
"""


@pytest.mark.slow
def test_a_sweep_removes_the_placement_groups_its_job_left_and_no_other_jobs(tmp_path, ray_cluster):
    import json

    env = {"RAY_ADDRESS": ray_cluster["address"], **ray_cluster["env"], "PYTHONPATH": str(REPO)}
    other = run_command([sys.executable, "-c", OTHER_JOB_DRIVER, "make"], cwd=tmp_path, env=env, timeout=120)
    assert other.returncode == 0, other.stderr[-3000:]
    other_group = other.stdout.split()[-1]
    try:
        result = run_command([sys.executable, "-c", LEFTOVER_DRIVER], cwd=tmp_path, env=env, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        seen = json.loads(result.stdout.splitlines()[-1])
        made_by_driver, made_by_actor, made_late = seen["own"]
        assert (seen["before"][made_by_driver], seen["before"][made_by_actor]) == ("CREATED", "PENDING")
        assert made_late not in seen["before"]  # it turned up while the leftovers were being removed
        assert sorted(seen["removed"]) == sorted(seen["own"])
        assert {seen["after"][group] for group in seen["own"]} == {"REMOVED"}
        # The other job's group (detached, so it outlived its job) is not this sweep's to remove.
        assert seen["before"][other_group] == seen["after"][other_group] == "CREATED"
    finally:
        cleanup = run_command([sys.executable, "-c", OTHER_JOB_DRIVER, "remove"], cwd=tmp_path, env=env, timeout=120)
        assert cleanup.returncode == 0, cleanup.stderr[-3000:]
    assert live_placement_groups(ray_cluster) == []


def test_the_summary_table_says_which_trials_asha_stopped():
    from harness.core.train_loop import RunResult
    from harness.sweeps.sweep import TrialOutcome, summary_table

    cfg = load_config(REPO / "configs/smoke.yaml")
    table = summary_table([TrialOutcome(cfg, RunResult("r1", 1, 8), stopped_early="asha"),
                           TrialOutcome(cfg, RunResult("r2", 2, 16))])
    assert [line.split()[-1] for line in table.splitlines()[2:]] == ["(asha)", "ok"]
    assert "stopped (asha)" in table


@pytest.mark.parametrize("launcher", ["local", "torchrun"])
def test_asha_without_the_ray_launcher_is_refused_before_anything_starts(tmp_path, launcher):
    result = run_tune_sweep(tmp_path, "--launcher", launcher, "--set", "sweep.early_stopping=asha")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: sweep.early_stopping: asha stops trials through Ray Tune, not with --launcher {launcher}; "
        "expected --launcher ray (launch/sweep.py) or sweep.early_stopping=none"]
    assert not (tmp_path / "ckpt").exists()
    assert MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_experiment_by_name("tuned") is None


@pytest.mark.parametrize("override, complaint", [
    ("sweep.early_stopping=hyperband", "sweep.early_stopping"),
    ("sweep.asha_reduction_factor=1", "sweep.asha_reduction_factor: expected a number > 1"),
    ("sweep.asha_grace_period=0", "sweep.asha_grace_period: expected a positive number"),
])
def test_bad_early_stopping_keys_name_the_key(tmp_path, override, complaint):
    (tmp_path / "tuned.yaml").write_text(TUNE_SWEEP)
    with pytest.raises(InputError, match=complaint.replace(".", r"\.")):
        load_config(tmp_path / "tuned.yaml", [override])


def test_asha_needs_a_validation_split(tmp_path):
    (tmp_path / "tuned.yaml").write_text(TUNE_SWEEP)
    with pytest.raises(InputError, match=r"sweep\.early_stopping: asha .* expected data\.validation_size > 0"):
        load_config(tmp_path / "tuned.yaml", ["sweep.early_stopping=asha", "data.validation_size=0"])


def test_a_grace_period_as_long_as_the_trials_is_refused(tmp_path):
    from harness.sweeps.sweep import expand_trials
    from harness.sweeps.tune_sweep import asha_scheduler

    (tmp_path / "tuned.yaml").write_text(TUNE_SWEEP)
    cfg = load_config(tmp_path / "tuned.yaml", ["sweep.early_stopping=asha", "sweep.asha_grace_period=3"])
    with pytest.raises(InputError, match=r"sweep\.asha_grace_period: 3 epochs .* expected < 3"):
        asha_scheduler(cfg, expand_trials(cfg))
    scheduler = asha_scheduler(cfg.replace(**{"sweep.asha_grace_period": 1}), expand_trials(cfg))
    assert (scheduler._metric, scheduler._time_attr, scheduler._max_t) == ("val_accuracy", "epoch", 3)
    assert scheduler._metric_op == 1.0  # maximised


@pytest.mark.parametrize("cluster, num_workers, use_gpu, num_trials, expected", [
    ({"CPU": 2.0}, 1, False, 4, 2),  # two 1-worker trials on 2 CPUs
    ({"CPU": 2.0}, 2, False, 4, 1),
    ({"CPU": 16.0}, 2, False, 3, 3),  # never more than there are trials
    ({"CPU": 16.0, "GPU": 1.0}, 1, True, 4, 1),  # the GPUs bound it
    ({"CPU": 16.0, "GPU": 8.0}, 2, True, 8, 4),
    ({"CPU": 1.0}, 2, False, 4, 1),  # too small for one: one waits, not none
])
def test_concurrency_counts_trials_that_fit_the_cluster(cluster, num_workers, use_gpu, num_trials, expected):
    from harness.launching.ray_train import RayOptions
    from harness.sweeps.tune_sweep import concurrency

    limit, why = concurrency(RayOptions(num_workers=num_workers, use_gpu=use_gpu), cluster, num_trials)
    assert limit == expected
    assert f"{num_workers} worker(s) x 1 CPU" in why

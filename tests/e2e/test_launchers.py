"""torchrun and Ray Train: the same loop, DDP over 2 real processes, exact resume after SIGKILL.

Slow: every test here starts real processes (torchrun ranks, a Ray head node,
Ray Train workers, a Ray job). Still run in CI, on the smoke config.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import CONFIGS, REPO, run_command, seeded_store, train_run
from harness.core.config import load_config
from harness.core.evaluation import is_evaluation_step

pytestmark = pytest.mark.slow

TRAIN = str(REPO / "launch/train.py")
RAY_JOB = str(REPO / "launch/ray_job.py")
EPOCHS = 3
# Every launcher here trains configs/smoke.yaml: its evaluation schedule decides which
# steps val_subset_accuracy is logged at (harness/core/evaluation.py).
SMOKE_CONFIG = load_config(CONFIGS / "smoke.yaml")
# Subset accuracies the smoke run reaches within its epochs, each at a step found exactly.
TARGETS = "metrics.target_val_accuracy=[0.25, 0.4]"
# A user's own model (tests/user_models.py, imported from the repository root): the Ray job trains it, so the
# Ray tests show a factory's model trained, checkpointed and resumed on the cluster as the MLP is elsewhere.
USER_MODEL = "model.factory=tests.user_models:tiny_cnn"


def _settings(tmp, *extra):
    return ["--set", f"tracking.uri={seeded_store(tmp)}", "--set", f"checkpoint.dir={tmp}/ckpt",
            "--set", f"train.epochs={EPOCHS}", *extra]


def torchrun(tmp, nproc, *extra, env=None, max_restarts=0):
    args = [str(REPO / ".venv/bin/torchrun") if (REPO / ".venv/bin/torchrun").exists() else "torchrun",
            "--standalone", f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}", TRAIN,
            "--config", str(CONFIGS / "smoke.yaml"), *_settings(tmp, *extra)]
    result = run_command(args, cwd=tmp, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def final_params(tmp):
    return torch.load(tmp / "ckpt" / "smoke" / f"epoch-{EPOCHS:04d}.pt", weights_only=True)["model"]


def single_process_params(tmp, *overrides):
    """configs/smoke.yaml with the global batch in one process at world size 1, trained here by the loop that
    launch/train.py runs without torchrun (train_run; a new interpreter adds only its imports): final parameters."""
    from harness.core.distributed import DistContext

    train_run(load_config(CONFIGS / "smoke.yaml", [f"tracking.uri={seeded_store(tmp)}", f"checkpoint.dir={tmp}/ckpt",
                                                   f"train.epochs={EPOCHS}", *overrides]), DistContext())
    return final_params(tmp)


def only_run(tmp):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


# configs/smoke.yaml from batch 16: the exact B_simple on 256 samples every 4 steps, the batch the largest
# power of two at most that, up to 256 (seen growing 16 -> 32 -> 64 -> 128 within 3 epochs).
GROWING = ["optim.global_batch_size=16", "optim.batch_schedule=noise_scale", "optim.batch_noise_every=4",
           "metrics.exact_noise_samples=256", "optim.max_global_batch_size=256", "metrics.sharpness=false"]


def batches_taken(tmp) -> list[tuple[int, float]]:
    client, run = only_run(tmp)
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "by_step/batch_size"))


def set_flags(overrides):
    return [arg for item in overrides for arg in ("--set", item)]


# Logged once, at the end of training (train_loop.sharpness).
SHARPNESS_METRICS = {"top_hessian_eigenvalue", "bottom_hessian_eigenvalue", "hessian_eigensolver_converged",
                     "hessian_vector_products"}


def assert_each_metric_logged_once_per_epoch(client, run):
    assert run.info.status == "FINISHED"
    # by_step/<metric> repeats an epoch metric with step = the optimizer step at that epoch's end
    global_steps = [int(m.value) for m in client.get_metric_history(run.info.run_id, "global_step")]
    assert len(global_steps) == EPOCHS
    last = global_steps[-1]  # the budget's last step is evaluated too
    evaluated = [step for step in range(1, last)
                 if is_evaluation_step(SMOKE_CONFIG, step, SMOKE_CONFIG.steps_per_epoch())] + [last]
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        if "_target" in key:  # measured where a target is reached: once
            assert len(steps) == 1, (key, steps)
            continue
        expected = ([EPOCHS] if key in SHARPNESS_METRICS else global_steps if key.startswith("by_step/")
                    else evaluated if key == "val_subset_accuracy"  # step resolution: step = optimizer step
                    else sorted(set(evaluated) | set(global_steps)) if key == "train_loss_window"
                    else list(range(1, EPOCHS + 1)))
        assert steps == expected, (key, steps)


@pytest.fixture(scope="module")
def torchrun_two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrun2")
    result = torchrun(tmp, 2, "--set", TARGETS)
    (tmp / CONSOLE).write_text(result.stdout + result.stderr)
    return tmp


CONSOLE = "console.txt"  # a launcher's whole output (stdout, then stderr), kept beside its run's records
# A run's lines besides its epoch lines: the time line and the last line; under Ray also the driver's "connecting
# to the Ray cluster" line and Ray's two warnings on a success (its token authentication's, its core's about
# Ray Train's PreemptionWatcher actor).
OTHER_LINES = {"torchrun": 2, "ray": 5}
# What a successful run must not print: Ray Train's per-report, checkpoint and worker-group INFO lines, Ray's
# log deduplication notes, a traceback, a progress bar (forwarded one line per redraw under Ray), torchrun's banner.
CHATTER = ("Reporting training result", "Checkpoint successfully created", "Started training worker group",
           "[repeated ", "Ray deduplicates logs", "Traceback", "step/s", "OMP_NUM_THREADS")


def assert_each_epoch_printed_once_among_few_lines(output: str, launcher: str) -> None:
    """Rank 0's line for each epoch, exactly once, in an output of at most ``OTHER_LINES[launcher]`` more."""
    lines = [line for line in output.splitlines() if line.strip()]
    epoch_lines = [line for line in lines if "[smoke] epoch " in line]
    for epoch in range(1, EPOCHS + 1):
        assert sum(f"[smoke] epoch {epoch}/{EPOCHS} " in line for line in lines) == 1, (epoch, output[-4000:])
    assert len(epoch_lines) == EPOCHS, epoch_lines
    others = [line for line in lines if line not in epoch_lines]
    assert len(others) <= OTHER_LINES[launcher], others
    for chatter in CHATTER:
        assert chatter not in output, (chatter, output[-4000:])


def test_two_torchrun_ranks_print_each_epoch_once_among_few_lines(torchrun_two_ranks):
    output = (torchrun_two_ranks / CONSOLE).read_text()
    assert_each_epoch_printed_once_among_few_lines(output, "torchrun")
    assert output.strip().splitlines()[-1].startswith("finished smoke: ")


def test_torchrun_two_gloo_ranks_record_one_finished_run(torchrun_two_ranks):
    client, run = only_run(torchrun_two_ranks)
    assert run.data.params["world_size"] == "2" and run.data.params["launcher"] == "torchrun"
    assert run.data.params["per_rank_batch_size"] == "32"
    assert_each_metric_logged_once_per_epoch(client, run)


def test_two_ranks_match_one_process_and_reach_each_target_at_the_step_it_finds_evaluating_every_step(
        torchrun_two_ranks, tmp_path):
    single = single_process_params(tmp_path, TARGETS, "metrics.eval_every_steps=1")
    double = final_params(torchrun_two_ranks)
    worst = max(float((single[k] - double[k]).abs().max()) for k in single)
    assert worst <= 1e-5, worst
    (_, two_ranks), (_, one) = only_run(torchrun_two_ranks), only_run(tmp_path)
    for key in ("steps_to_target_0.25", "steps_to_target_0.4"):
        assert two_ranks.data.metrics[key] == one.data.metrics[key], key


def test_a_users_model_trains_on_two_torchrun_ranks_as_in_one_process(tmp_path, monkeypatch):
    """tests/user_models.py's CNN, imported by each rank from PYTHONPATH, against the loop in this process."""
    for folder in ("ranks", "one"):
        (tmp_path / folder).mkdir()
    torchrun(tmp_path / "ranks", 2, "--set", USER_MODEL, env={"PYTHONPATH": str(REPO)})
    monkeypatch.syspath_prepend(str(REPO))
    single = single_process_params(tmp_path / "one", USER_MODEL)
    double = final_params(tmp_path / "ranks")
    worst = max(float((single[k] - double[k]).abs().max()) for k in single)
    assert worst <= 1e-5, worst


def ray_job(tmp, ray_cluster, *extra, env=None):
    result = run_command([sys.executable, RAY_JOB, "--config", str(CONFIGS / "smoke.yaml"), "--num-workers", "2",
                          "--storage-path", str(tmp / "ray"), *_settings(tmp, "--set", USER_MODEL, *extra)],
                         cwd=tmp, env={"RAY_ADDRESS": ray_cluster["address"], "PYTHONPATH": str(REPO), **ray_cluster["env"],
                                       **(env or {})},
                         timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def ray_job_submitted(ray_cluster, tmp_path_factory):
    """A run of a user's model submitted as a Ray job to the head node, as a cluster user would."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    tmp = tmp_path_factory.mktemp("rayjob")
    # The token as an explicit header: Ray caches the token it first finds in each
    # process, which an earlier test in this pytest process may have read elsewhere.
    client = JobSubmissionClient(ray_cluster["dashboard"],
                                 headers={"Authorization": f"Bearer {ray_cluster['env']['RAY_AUTH_TOKEN']}"})
    settings = " ".join(_settings(tmp, "--set", USER_MODEL))
    job_id = client.submit_job(
        entrypoint=f"python launch/ray_job.py --config configs/smoke.yaml --num-workers 2 "
                   f"--storage-path {tmp}/ray {settings}",
        runtime_env={"working_dir": str(REPO), "excludes": [".venv", ".git", "checkpoints", "*.db"]})
    deadline = time.monotonic() + 600
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, "the Ray job did not finish in time"
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    return tmp, logs


def test_ray_job_submission_trains_on_the_cluster(ray_job_submitted):
    tmp, logs = ray_job_submitted
    client, run = only_run(tmp)
    assert run.data.params["launcher"] == "ray" and run.data.params["world_size"] == "2"
    assert_each_metric_logged_once_per_epoch(client, run)
    assert "finished smoke on Ray" in logs


def test_ray_job_prints_each_epoch_line_once_and_ends_naming_the_mlflow_run(ray_job_submitted):
    tmp, logs = ray_job_submitted
    _, run = only_run(tmp)
    # Ray's own INFO chatter stays off the console (--verbose or HARNESS_RAY_VERBOSE=1 brings it back).
    assert_each_epoch_printed_once_among_few_lines(logs, "ray")
    lines = logs.strip().splitlines()
    assert lines[-1].startswith("finished smoke on Ray") and lines[-1].endswith(f"MLflow run {run.info.run_id}"), \
        lines[-3:]


def test_a_ray_run_records_the_keys_and_reaches_the_parameters_of_the_loop_that_launch_train_runs(
        ray_job_submitted, tmp_path, monkeypatch):
    """Against the loop run in this process (what launch/train.py runs, under torchrun or alone):
    the Ray tests share one pytest worker, and a torchrun job here would add its start to theirs."""
    monkeypatch.syspath_prepend(str(REPO))
    single = single_process_params(tmp_path, USER_MODEL)
    _, ray_run = only_run(ray_job_submitted[0])
    _, single_run = only_run(tmp_path)
    assert set(ray_run.data.params) == set(single_run.data.params)
    assert set(ray_run.data.metrics) == set(single_run.data.metrics)
    on_ray = final_params(ray_job_submitted[0])
    worst = max(float((single[k] - on_ray[k]).abs().max()) for k in single)
    assert worst <= 1e-5, worst


def test_ray_worker_sigkilled_while_writing_a_checkpoint_mid_schedule_resumes_to_the_batches_and_weights_of_one_process(
        ray_cluster, tmp_path, monkeypatch):
    """Rank 0 dies while writing epoch 3's checkpoint; Ray Train restarts the workers from epoch 2's, whose
    schedule state says which batch comes next: the batch grows with the noise scale (GROWING), so a restart
    that lost the state would take other batches. (A kill in the middle of an epoch on Ray:
    tests/e2e/test_stacked_ray.py.) The note's MLP: a user's CNN's convolutions round with the process's thread
    count, and at batch 16 and LR up to 0.28 that grows past 1e-5 even between two processes of one launcher."""
    monkeypatch.syspath_prepend(str(REPO))
    ray_dir, single_dir = tmp_path / "ray", tmp_path / "single"
    ray_dir.mkdir(), single_dir.mkdir()
    marker = tmp_path / "killed-checkpoint"
    ray_job(ray_dir, ray_cluster, "--max-failures", "1", *set_flags([*GROWING, "model.factory=null"]),
            env={"HARNESS_INJECT_FAULT": f"checkpoint:3:0:{marker}"})
    assert marker.exists(), "the fault was never injected"
    client, run = only_run(ray_dir)
    assert run.data.tags.get("resumed") == "true" and run.info.status == "FINISHED"
    for key in run.data.metrics:  # the epoch replayed after the restart is not logged twice
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == sorted(set(steps)), (key, steps)
    assert not list((ray_dir / "ckpt" / "smoke").glob(".epoch-*")), "a half-written checkpoint was left"
    single = single_process_params(single_dir, *GROWING)
    assert batches_taken(ray_dir) == batches_taken(single_dir) and len({v for _, v in batches_taken(ray_dir)}) >= 2
    on_ray = final_params(ray_dir)
    assert max(float((single[k] - on_ray[k]).abs().max()) for k in single) <= 1e-5


def test_sigterm_to_ray_job_ends_its_run_killed(ray_cluster, tmp_path):
    """The driver's workers die with it and cannot end their MLflow run: the driver
    ends it (found by its launch_id tag) as KILLED, and exits 143."""
    log = open(tmp_path / "output.log", "w")
    process = subprocess.Popen(
        [sys.executable, RAY_JOB, "--config", str(CONFIGS / "smoke.yaml"), "--num-workers", "1",
         "--storage-path", str(tmp_path / "ray"), *_settings(tmp_path), "--set", "train.epochs=2000"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # The driver used to die of SIGSEGV here now and then (fresh clones, the machine busy), without a
        # faulthandler trace (Ray's C++ client holds SIGSEGV): it shut Ray down under fit's thread
        # (ray_train.end_orphaned_run). PYTHONFAULTHANDLER stays, for a crash that is Python's.
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", "RAY_ADDRESS": ray_cluster["address"],
             **ray_cluster["env"]})
    try:
        deadline = time.monotonic() + 300
        while "epoch 2/" not in (tmp_path / "output.log").read_text():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "output.log").read_text()[-3000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 143, (tmp_path / "output.log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
    client, run = only_run(tmp_path)
    assert run.info.status == "KILLED"
    assert run.data.tags["launch_id"].startswith("smoke-")

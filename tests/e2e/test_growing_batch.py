"""A batch that grows with the noise scale, under torchrun and Ray Train: the same batches, the same
parameters as the loop in one process, and after a SIGKILL in the middle of the schedule the run resumes
to the same end."""


from conftest import REPO
from test_launchers import final_params, only_run, ray_job, single_process_params, torchrun

# configs/smoke.yaml from batch 16: the exact B_simple on 256 samples every 4 steps, the batch the largest
# power of two at most that, up to 256 (seen growing 16 -> 32 -> 64 -> 128 within 3 epochs).
GROWING = ["optim.global_batch_size=16", "optim.batch_schedule=noise_scale", "optim.batch_noise_every=4",
           "metrics.exact_noise_samples=256", "optim.max_global_batch_size=256", "metrics.sharpness=false"]


def _batches(tmp) -> list[tuple[int, float]]:
    client, run = only_run(tmp)
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "by_step/batch_size"))


def _flags(overrides):
    return [arg for item in overrides for arg in ("--set", item)]


def test_two_torchrun_ranks_sigkilled_mid_schedule_resume_to_the_batches_and_weights_of_one_process(tmp_path):
    marker = tmp_path / "killed"
    # Rank 1 dies at epoch 2's middle step, after the batch has grown; torchrun restarts both ranks from epoch 1's
    # checkpoint, whose schedule state says which batch comes next.
    torchrun(tmp_path, 2, *_flags(GROWING), env={"HARNESS_INJECT_FAULT": f"step:2:1:{marker}"}, max_restarts=1)
    assert "killed step epoch 2 rank 1" in marker.read_text()
    client, run = only_run(tmp_path)
    assert run.data.tags.get("resumed") == "true" and run.info.status == "FINISHED"
    grown = _batches(tmp_path)
    sizes = [value for _, value in grown]
    assert grown[0] == (0, 16.0) and sizes == sorted(sizes) and len(set(sizes)) >= 3, grown
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    single = single_process_params(single_dir, *GROWING)
    assert _batches(single_dir) == grown
    resumed = final_params(tmp_path)
    assert max(float((single[k] - resumed[k]).abs().max()) for k in single) <= 1e-5


def test_a_growing_batch_on_ray_train_workers_takes_the_batches_and_reaches_the_weights_of_one_process(
        ray_cluster, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    ray_dir, single_dir = tmp_path / "ray", tmp_path / "single"
    ray_dir.mkdir(), single_dir.mkdir()
    # The note's MLP (the job's default is a user's CNN, whose convolutions round with the process's thread
    # count: at batch 16 and LR up to 0.28 that grows past 1e-5 even between two processes of one launcher).
    ray_job(ray_dir, ray_cluster, *_flags([*GROWING, "model.factory=null"]))
    single = single_process_params(single_dir, *GROWING)
    assert _batches(ray_dir) == _batches(single_dir) and len({v for _, v in _batches(ray_dir)}) >= 2
    on_ray = final_params(ray_dir)
    assert max(float((single[k] - on_ray[k]).abs().max()) for k in single) <= 1e-5

"""A batch that grows with the noise scale under torchrun: the same batches, the same parameters as the loop
in one process, and after a SIGKILL in the middle of the schedule the run resumes to the same end. (The same
on Ray Train, killed while writing a checkpoint: tests/e2e/test_launchers.py.)"""

from test_launchers import GROWING, batches_taken, set_flags, final_params, only_run, single_process_params, torchrun


def test_two_torchrun_ranks_sigkilled_mid_schedule_resume_to_the_batches_and_weights_of_one_process(tmp_path):
    marker = tmp_path / "killed"
    # Rank 1 dies at epoch 2's middle step, after the batch has grown; torchrun restarts both ranks from epoch 1's
    # checkpoint, whose schedule state says which batch comes next.
    torchrun(tmp_path, 2, *set_flags(GROWING), env={"HARNESS_INJECT_FAULT": f"step:2:1:{marker}"}, max_restarts=1)
    assert "killed step epoch 2 rank 1" in marker.read_text()
    client, run = only_run(tmp_path)
    assert run.data.tags.get("resumed") == "true" and run.info.status == "FINISHED"
    grown = batches_taken(tmp_path)
    sizes = [value for _, value in grown]
    assert grown[0] == (0, 16.0) and sizes == sorted(sizes) and len(set(sizes)) >= 3, grown
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    single = single_process_params(single_dir, *GROWING)
    assert batches_taken(single_dir) == grown
    resumed = final_params(tmp_path)
    assert max(float((single[k] - resumed[k]).abs().max()) for k in single) <= 1e-5

"""Multi-node torchrun on one machine: two torchrun agents (``--nnodes 2``, one rank each) that
meet through a c10d rendezvous on 127.0.0.1, as two hosts would through node 0's address.

Slow: real torchrun agents and ranks, real data (configs/smoke.yaml), real MLflow store.
"""

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch

from conftest import CONFIGS, REPO, free_port
from test_launchers import (EPOCHS, TRAIN, _settings, assert_each_metric_logged_once_per_epoch, final_params, only_run,
                            single_process_params)

pytestmark = pytest.mark.slow

TORCHRUN = str(REPO / ".venv/bin/torchrun") if (REPO / ".venv/bin/torchrun").exists() else "torchrun"
NODES = 2
# A run that hangs (ranks that disagree wait in a collective for the process group's 300 s
# timeout) fails the test well before that, with both agents' output.
RUN_TIMEOUT_S = 240



def two_nodes(tmp, *extra, env=None, max_restarts=0, node_settings=None, by_hand=True, config="smoke.yaml"):
    """Start node 0 and node 1 as two torchrun agents and wait for both; their outputs.

    ``by_hand``: run torchrun's own command line (docs/cluster.md); else launch/train.py
    --nnodes, which checks its options and becomes the same torchrun. ``node_settings[n]``:
    more launch/train.py arguments for node ``n`` only. Node 0 hosts the rendezvous store
    (is_host=1), as the host named in --rdzv-endpoint would; --local-addr keeps the
    workers' own store and gloo on loopback.
    """
    endpoint, run_id = f"127.0.0.1:{free_port()}", f"test-{uuid.uuid4().hex[:8]}"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    full_env["PATH"] = f"{sys.executable.rsplit('/', 1)[0]}:{full_env.get('PATH', '')}"
    agents = []
    for node in range(NODES):
        log = open(tmp / f"node{node}.log", "w")
        train = [TRAIN, "--config", str(CONFIGS / config), *_settings(tmp, *extra),
                 *(node_settings or {}).get(node, [])]
        nodes = [f"--nnodes={NODES}", f"--node-rank={node}", "--nproc-per-node=1", f"--rdzv-endpoint={endpoint}",
                 f"--rdzv-id={run_id}", "--local-addr=127.0.0.1", f"--max-restarts={max_restarts}"]
        command = ([TORCHRUN, *nodes, "--rdzv-backend=c10d", f"--rdzv-conf=is_host={int(node == 0)}", *train]
                   if by_hand else [sys.executable, *train, *nodes])
        agents.append((subprocess.Popen(command, cwd=tmp, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True), log))
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        codes = [_wait_until(agent, deadline) for agent, _ in agents]
    finally:
        for agent, log in agents:
            if agent.poll() is None:  # our own agents and their ranks: their own sessions
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
            log.close()
    outputs = [(tmp / f"node{node}.log").read_text() for node in range(NODES)]
    assert codes == [0] * NODES, "\n".join(f"--- node {n} (exit {c})\n{o[-3000:]}"
                                            for n, (c, o) in enumerate(zip(codes, outputs)))
    return outputs


def _wait_until(agent, deadline):
    """The agent's exit code, or "hung" if it is still running at ``deadline``."""
    try:
        return agent.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return "hung"


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nodes2")
    two_nodes(tmp)
    return tmp


def test_two_torchrun_nodes_record_one_finished_run(two_node_run):
    client, run = only_run(two_node_run)
    assert run.data.params["world_size"] == "2" and run.data.params["launcher"] == "torchrun"
    assert_each_metric_logged_once_per_epoch(client, run)


def test_two_torchrun_nodes_match_one_process_with_the_global_batch(two_node_run, tmp_path):
    single, double = single_process_params(tmp_path), final_params(two_node_run)
    worst = max(float((single[k] - double[k]).abs().max()) for k in single)
    assert worst <= 1e-5, worst


def test_rank_killed_on_one_node_restarts_both_and_resumes_exactly_without_a_shared_checkpoint_folder(
        two_node_run, tmp_path):
    """Started by launch/train.py --nnodes on each node. Rank 1 dies (SIGKILL) mid-epoch 2. Its agent restarts its worker; the other agent, whose
    rank was healthy, must restart its own for the new rendezvous round, and both ranks must
    agree that this is a restart. Each node has a checkpoint folder of its own: only rank 0
    writes and reads one, and the other rank gets the state it resumes from through rank 0."""
    marker = tmp_path / "killed"
    folders = [tmp_path / f"node{node}-ckpt" for node in range(NODES)]
    two_nodes(tmp_path, env={"HARNESS_INJECT_FAULT": f"step:2:1:{marker}"}, max_restarts=1, by_hand=False,
              node_settings={node: ["--set", f"checkpoint.dir={folders[node]}"] for node in range(NODES)})
    assert marker.exists(), "the fault was never injected"
    written = [folder for folder in folders if (folder / "smoke").is_dir()]
    assert len(written) == 1, [list(folder.rglob("*")) for folder in folders]  # rank 0's node only
    client, run = only_run(tmp_path)
    assert run.data.tags.get("resumed") == "true"
    assert_each_metric_logged_once_per_epoch(client, run)
    resumed = torch.load(written[0] / "smoke" / f"epoch-{EPOCHS:04d}.pt", weights_only=True)["model"]
    straight = final_params(two_node_run)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_rank_refuses_node_options_that_differ_from_the_job_torchrun_started(tmp_path):
    """torchrun started by hand with one node; launch/train.py told --nnodes 2: every rank
    refuses (exit 2, one line) before its process group, and torchrun fails."""
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node=1", TRAIN, "--config",
                             str(CONFIGS / "smoke.yaml"), *_settings(tmp_path), "--nnodes", "2"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    refusals = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: ")]
    assert refusals == ["error: --nnodes: 2, but torchrun started a job of 1 node(s) with 1 rank(s) each (world "
                        "size 1); expected the same numbers as torchrun's"], result.stderr[-3000:]
    assert not (tmp_path / "ckpt").exists()


def test_sweep_in_one_process_group_over_two_nodes_resumes_after_a_rank_is_killed(tmp_path):
    """launch/train.py with a sweep config runs every trial in one process group. After the
    restart only rank 0 can read which trials the sweep finished (the others record nothing):
    every rank must still skip and resume the same trials, or they fall out of step."""
    from mlflow.tracking import MlflowClient

    marker = tmp_path / "killed"
    small = ["--set", "data.train_subset=512", "--set", "data.validation_size=256", "--set", "data.test_subset=512",
             "--set", "model.hidden_sizes=[32]", "--set", "sweep.batch_sizes=[32,64]", "--set", "train.epochs=1",
             "--set", "train.progress=false", "--set", "tracking.experiment=nodes-sweep", "--set", "sweep.seeds=[0]",
             "--set", "sweep.lrs=null"]
    two_nodes(tmp_path, *small, env={"HARNESS_INJECT_FAULT": f"step:1:1:{marker}"}, max_restarts=1,
              config="sweep.yaml")
    assert marker.exists(), "the fault was never injected"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("nodes-sweep").experiment_id])
    parents = [r for r in runs if r.data.tags.get("run_kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")
                and r.data.tags.get("run_kind") != "interpolation"]
    assert len(parents) == 1 and len(children) == 2, [(r.info.run_name, r.info.status) for r in runs]
    # Rank 0 ends the sweep as launch/sweep.py does: the report, opening with the answer in words.
    output = (tmp_path / "node0.log").read_text()
    assert "The answer: 2 trials, batch 32 to 64, 1 LR x 1 seed per batch size" in output
    assert "2 trials, 0 failed" in output and (tmp_path / "reports" / parents[0].info.run_id / "summary.md").exists()
    assert {r.info.status for r in runs} == {"FINISHED"}
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "test_accuracy")] == [1]

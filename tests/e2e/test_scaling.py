"""``harness scaling``: the cost model's arithmetic against independent counts, its table from a capacity
result, and (slow) its check against two real gloo processes on 127.0.0.1 (no performance asserted beyond
"the fit reproduces its own data within a factor")."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import CONFIGS, REPO, run_command
from harness.bench.scaling import (Link, all_reduce_s, parameter_count, predict,
                                     ring_bytes_sent_per_rank, step_time_at, stops_paying)
from harness.bench.scaling_check import fit_link

SMOKE = CONFIGS / "smoke.yaml"  # 784-32-10: 25,450 parameters, 101,800 gradient bytes


def _simulated_ring_all_reduce(values_per_rank: list[list[float]]) -> tuple[list[list[float]], list[int]]:
    """A ring all-reduce run by hand: W - 1 reduce-scatter steps then W - 1 all-gather steps, each rank
    sending one of W chunks to its right neighbour; returns every rank's result and the elements each sent."""
    world = len(values_per_rank)
    n = len(values_per_rank[0])
    bounds = [(c * n // world, (c + 1) * n // world) for c in range(world)]
    data = [list(v) for v in values_per_rank]
    sent = [0] * world
    for phase in ("reduce-scatter", "all-gather"):
        for step in range(world - 1):
            # Rank r sends chunk (r - step) in the reduce-scatter, (r + 1 - step) in the all-gather.
            messages = []
            for rank in range(world):
                chunk = (rank - step + (1 if phase == "all-gather" else 0)) % world
                low, high = bounds[chunk]
                messages.append(((rank + 1) % world, low, high, data[rank][low:high]))
                sent[rank] += high - low
            for target, low, high, values in messages:
                for i, value in zip(range(low, high), values):
                    data[target][i] = data[target][i] + value if phase == "reduce-scatter" else value
    return data, sent


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_ring_formula_counts_the_bytes_a_simulated_ring_all_reduce_sends(world):
    n = 24  # divisible by every world size here, so every chunk is n / W
    values = [[float(rank * 100 + i) for i in range(n)] for rank in range(world)]
    result, sent = _simulated_ring_all_reduce(values)
    total = [sum(v[i] for v in values) for i in range(n)]
    assert all(r == total for r in result)  # the simulation is a correct all-reduce
    assert sent == [ring_bytes_sent_per_rank(world, n)] * world == [2 * (world - 1) * n / world] * world


def test_all_reduce_time_is_latency_steps_plus_ring_bytes_over_bandwidth():
    link = Link("test", bandwidth_bytes_s=1e9, latency_s=1e-5, source="test")
    gradient = parameter_count([784, 500, 10]) * 4
    assert gradient == (784 * 500 + 500 + 500 * 10 + 10) * 4 == 1_590_040  # the note's network, fp32
    assert all_reduce_s(1, gradient, link) == 0
    assert all_reduce_s(2, gradient, link) == pytest.approx(2 * 1e-5 + gradient / 1e9)
    assert all_reduce_s(8, gradient, link) == pytest.approx(14 * 1e-5 + 2 * 7 / 8 * gradient / 1e9)
    assert all_reduce_s(8, gradient, link, "tree") == pytest.approx(6 * 1e-5 + 2 * 7 / 8 * gradient / 1e9)


def test_step_time_is_interpolated_log_log_and_never_extrapolated():
    measured = {1: 1.0, 4: 4.0, 16: 8.0}
    assert step_time_at(measured, 4) == 4.0
    assert step_time_at(measured, 2) == pytest.approx(2.0)  # halfway in log between 1 and 4: sqrt(1 * 4)
    assert step_time_at(measured, 8) == pytest.approx(math.sqrt(4.0 * 8.0))
    assert step_time_at(measured, 16) == 8.0
    assert step_time_at(measured, 32) is None and step_time_at(measured, 0.5) is None


def test_rows_are_speedup_over_one_device_at_the_same_global_batch_and_stacked_trials_are_w_times_it():
    measured = {64: 0.010, 128: 0.012, 256: 0.020}
    link = Link("test", 1e9, 0.0, "test")
    rows = predict(measured, 1e6, [1, 2, 4], [link], global_batches=[256])
    by_world = {r["world_size"]: r for r in rows}
    comm2 = ring_bytes_sent_per_rank(2, 1e6) / 1e9  # 1 ms
    assert by_world[2]["step_s"] == pytest.approx(0.012 + comm2)
    assert by_world[2]["speedup"] == pytest.approx(0.020 / (0.012 + comm2))
    assert by_world[2]["efficiency"] == pytest.approx(by_world[2]["speedup"] / 2)
    assert by_world[4]["per_rank_batch_size"] == 64
    for row in rows:
        assert row["samples_per_s"] == pytest.approx(256 / row["step_s"])
        assert row["stacked_trials_samples_per_s"] == pytest.approx(row["world_size"] * 256 / 0.020)
        # Data parallelism's throughput is its efficiency times the stacked trials'.
        assert row["samples_per_s"] == pytest.approx(row["efficiency"] * row["stacked_trials_samples_per_s"])
        assert row["step_overlap_s"] == max(row["compute_s"], row["all_reduce_s"])
    assert by_world[1]["efficiency"] == 1 and by_world[1]["all_reduce_s"] == 0
    # A per-rank batch outside the measured range gives no row (W = 8 would need batch 32).
    assert not predict(measured, 1e6, [8], [link], global_batches=[256])


def test_stops_paying_is_the_largest_prefix_of_batches_below_the_floor():
    def rows(efficiencies):
        return [{"link": "l", "world_size": 8, "global_batch_size": b, "efficiency": e}
                for b, e in efficiencies.items()]

    (verdict,) = stops_paying(rows({64: 0.1, 128: 0.3, 256: 0.6, 512: 0.4, 1024: 0.8}))
    assert verdict["stops_paying_up_to_batch"] == 128 and verdict["next_batch"] == 256
    assert verdict["later_below_floor"] == [512]
    (verdict,) = stops_paying(rows({64: 0.7, 128: 0.9}))
    assert verdict["stops_paying_up_to_batch"] is None
    (verdict,) = stops_paying(rows({64: 0.1, 128: 0.2}))
    assert verdict["stops_paying_up_to_batch"] == 128 and verdict["next_batch"] is None


def test_fit_recovers_the_latency_and_bandwidth_that_made_the_times():
    true = Link("true", 2e9, 5e-5, "test")
    points = [(n, all_reduce_s(2, n, true)) for n in (256, 4096, 65536, 1 << 20, 1 << 24)]
    fitted = fit_link(points)
    assert fitted.latency_s == pytest.approx(5e-5) and fitted.bandwidth_bytes_s == pytest.approx(2e9)


def test_table_from_the_committed_capacity_json_covers_every_world_size_and_link(tmp_path, capsys):
    from harness.cli import main

    out = tmp_path / "scaling.json"
    status = main(["scaling", "--from-json", str(REPO / "docs/bench/capacity-cpu.json"), "--world-sizes", "2", "8",
                   "--link", "ethernet-100g", "--link-gbps", "25", "--link-latency-us", "10", "--json", str(out)])
    assert status == 0
    data = json.loads(out.read_text())
    assert data["parameters"] == 397_510 and data["gradient_bytes"] == 1_590_040
    assert [link["name"] for link in data["links"]] == ["ethernet-100g", "custom-25gbps"]
    assert data["links"][1]["bandwidth_bytes_s"] == 25e9 / 8 and data["links"][1]["latency_s"] == pytest.approx(1e-5)
    assert {(r["link"], r["world_size"]) for r in data["rows"]} == {
        (link, w) for link in ("ethernet-100g", "custom-25gbps") for w in (1, 2, 8)}
    assert len(data["verdicts"]) == 4
    printed = capsys.readouterr().out
    assert "| 8192 |" in printed and "over ethernet-100g, W = 8:" in printed


@pytest.mark.slow
def test_measured_loopback_all_reduce_fits_within_a_factor_and_predictions_follow_the_formula(tmp_path):
    out = tmp_path / "check.json"
    result = run_command([sys.executable, "-m", "harness.cli", "scaling", "--measure", "--config", str(SMOKE),
                          "--batch-sizes", "32", "128", "--json", str(out)], cwd=REPO,
                         env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["world_size"] == 2 and data["threads_per_rank"] == 1 and data["gradient_bytes"] == 101_800
    sizes = [p["bytes"] for p in data["allreduce"]]
    assert 101_800 in sizes and len(sizes) >= 8 and all(p["median_s"] > 0 for p in data["allreduce"])
    link = Link("fit", data["fit"]["bandwidth_bytes_s"], data["fit"]["latency_s"], "fit")
    assert link.bandwidth_bytes_s > 0 and link.latency_s >= 0
    ratios = [p["median_s"] / all_reduce_s(2, p["bytes"], link) for p in data["allreduce"]]
    assert ratios == pytest.approx([p["measured_over_predicted"] for p in data["allreduce"]])
    # How well the fit reproduces these timings is printed, not asserted (timings jitter with the machine's
    # load); that the fit recovers the alpha and beta that made a set of times is tested above.
    assert all(r > 0 for r in ratios)
    assert [s["global_batch_size"] for s in data["steps"]] == [32, 128]
    for s in data["steps"]:
        predicted = s["one_rank_half_batch_step_s"] + all_reduce_s(2, 101_800, link)
        assert s["predicted_two_rank_step_s"] == pytest.approx(predicted)
        assert s["measured_over_predicted"] == pytest.approx(s["two_rank_step_s"] / predicted)
        assert s["two_rank_step_s"] > 0 and s["two_rank_compute_only_s"] > 0
    assert "fitted loopback link" in result.stdout and "| 128 |" in result.stdout


@pytest.mark.slow
def test_sigterm_during_the_measurement_leaves_no_rank_behind(tmp_path):
    """The ranks sit in gloo collectives, where the SIGINT that torch sends a spawned child when its parent
    dies does not reach Python: without the parent ending them, they would wait for their peer for minutes."""
    log = tmp_path / "output.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "harness.cli", "scaling", "--measure", "--config",
                                    str(SMOKE), "--batch-sizes", "32", "128", "512"], cwd=REPO, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "ranks joined" not in log.read_text():  # both ranks are in the process group from here on
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        children = {child: " ".join(child.cmdline()) for child in psutil.Process(process.pid).children(recursive=True)}
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
        # One line, and a tool without --resume does not send the user to it.
        stopped = [line for line in log.read_text().splitlines() if line.startswith("stopped: ")]
        assert stopped == ["stopped: terminated by SIGTERM; a run it started is marked KILLED"], stopped
    finally:
        if process.poll() is None:  # a failed test must not leave the measurement running
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    ranks = [child for child, command in children.items() if "spawn_main" in command]
    assert len(ranks) == 2
    # The ranks are ended before the command exits; multiprocessing's resource tracker ends by itself once
    # the command's end closes its pipe, a moment later.
    _, alive = psutil.wait_procs(ranks, timeout=0)
    assert not [children[p] for p in alive if _running(p)]
    _, alive = psutil.wait_procs(list(children), timeout=30)
    assert not [children[p] for p in alive if _running(p)]


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # ended between the wait and the look
        return False

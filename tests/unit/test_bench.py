"""The benchmark runs on CPU at a tiny size and writes JSON of the documented shape (no timing asserted).
The `harness bench` command runs through its main() in the pytest process."""

import collections
import json
import re

import pytest
import torch

from conftest import CONFIGS, stack_epoch
from harness.core.config import load_config
from harness.bench.bench import PATHS


def bench(capsys, *args) -> tuple[int, str, str]:
    """``harness bench --config configs/smoke.yaml ARGS`` in this process: the same main() the command line
    calls (the bench runs in its process either way), without a new interpreter's imports. Its exit status,
    stdout and stderr."""
    from harness.cli import main as harness_main

    status = harness_main(["bench", "--config", str(CONFIGS / "smoke.yaml"), *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err.strip()


def test_bench_json_has_every_path_at_every_batch_size(tmp_path, capsys):
    out = tmp_path / "bench.json"
    status, stdout, stderr = bench(capsys, "--device", "cpu", "--batch-sizes", "32", "128", "--epochs", "1",
                                   "--json", str(out))
    assert status == 0, stderr
    data = json.loads(out.read_text())
    assert {"device", "device_name", "torch", "train_samples", "epochs_timed", "timings"} <= set(data)
    assert data["device"] == "cpu" and data["train_samples"] == 512
    rows = {(t["batch_size"], t["path"]): t for t in data["timings"]}
    assert set(rows) == {(b, p) for b in (32, 128) for p in PATHS}
    for batch in (32, 128):
        assert rows[(batch, "dataloader")]["speedup_vs_dataloader"] == 1.0
        for path in ("dataloader", "harness", "harness_ddp"):
            row = rows[(batch, path)]
            assert row["seconds_per_epoch"] > 0 and len(row["epoch_seconds"]) == 1
            assert abs(row["samples_per_s"] * row["seconds_per_epoch"] - 512) < 1e-6 * 512
        for path in ("harness_graph", "harness_graph_ddp"):  # CUDA graphs: not on a CPU, and the row says why
            row = rows[(batch, path)]
            assert row["seconds_per_epoch"] is None and row["speedup_vs_dataloader"] is None
            assert row["note"] == "unavailable: the device is cpu, and CUDA graphs need a CUDA device"
    assert "| 128 | harness_ddp |" in stdout


def test_bench_says_what_it_times_how_to_time_less_and_the_time_left_after_each_batch(capsys):
    status, stdout, stderr = bench(capsys, "--device", "cpu", "--batch-sizes", "256", "512", "--epochs", "1",
                                   "--paths", "harness")
    assert status == 0, stderr
    head, first, second = stdout.splitlines()[:3]
    assert head == ("bench on cpu: dataloader, harness, each 1 warm-up and 1 timed epochs of 512 samples, at batch "
                    "256, 512; --epochs 1, fewer --batch-sizes or --paths shorten it")
    assert re.fullmatch(r"  batch 256: dataloader \S+ s/epoch, harness \S+ s/epoch \[1/2, \d+ s; about \d+ s left\]",
                        first), first
    assert re.fullmatch(r"  batch 512: .* \[2/2, \d+ s; done\]", second), second


def refused(capsys, *args) -> tuple[int, str]:
    """A refused bench (as test_bad_input.py runs the harness command's other refusals): exit status, stderr."""
    status, _, stderr = bench(capsys, *args)
    return status, stderr


def test_bench_refuses_a_batch_larger_than_the_data(capsys):
    status, stderr = refused(capsys, "--batch-sizes", "4096")
    assert status == 2
    assert stderr == "error: --batch-sizes: 4096 is outside 1..512 (the training set)"


def test_bench_times_only_the_paths_asked_for_beside_the_peer(tmp_path, capsys):
    out = tmp_path / "bench.json"
    status, _, stderr = bench(capsys, "--device", "cpu", "--batch-sizes", "64", "--epochs", "1", "--paths",
                              "harness_ddp", "--json", str(out))
    assert status == 0, stderr
    assert [t["path"] for t in json.loads(out.read_text())["timings"]] == ["dataloader", "harness_ddp"]


def test_bench_stack_times_k_trials_stacked_against_them_one_after_another(tmp_path, capsys):
    out = tmp_path / "stack.json"
    status, stdout, stderr = bench(capsys, "--device", "cpu", "--stack", "3", "--batch-sizes", "64", "100",
                                   "--epochs", "1", "--json", str(out))
    assert status == 0, stderr
    data = json.loads(out.read_text())
    assert data["stack"] == 3 and data["train_samples"] == 512 and data["device"] == "cpu"
    assert [row["batch_size"] for row in data["timings"]] == [64, 100]  # 100: an uneven last batch
    for row in data["timings"]:
        assert row["sequential_s_per_epoch"] > 0 and row["stacked_s_per_epoch"] > 0
        assert row["speedup"] == row["sequential_s_per_epoch"] / row["stacked_s_per_epoch"]
        assert row["speedup_bound"] == row["sequential_s_per_epoch"] / row["matmuls_s_per_epoch"]
    assert stdout.startswith("bench --stack 3 on cpu: 3 trials one after another and stacked, each 1 warm-up and 1 "
                             "timed epochs of 512 samples, at batch 64, 100; --epochs 1, a smaller --stack or fewer "
                             "--batch-sizes shorten it\n  batch 64: one after another ")
    assert re.search(r"\n  batch 100: one after another \S+ s/epoch, stacked \S+ s/epoch \[2/2, \d+ s; done\]\n",
                     stdout), stdout
    assert "| 100 |" in stdout and "sequential / stacked" in stdout
    assert "bound (sequential / matmuls)" in stdout


def test_interleaved_timing_takes_one_epoch_of_every_side_per_round_after_one_warm_up_each():
    from harness.bench.bench import time_interleaved

    calls = []
    seconds = time_interleaved({side: (lambda epoch, side=side: calls.append((side, epoch)))
                                for side in ("sequential", "stacked")}, torch.device("cpu"), epochs=3)
    assert calls == [("sequential", 0), ("stacked", 0), ("sequential", 1), ("stacked", 1),
                     ("sequential", 2), ("stacked", 2), ("sequential", 3), ("stacked", 3)]
    assert [len(seconds[side]) for side in ("sequential", "stacked")] == [3, 3]


@pytest.mark.parametrize("batch_size", [64, 100, 2048])
def test_the_matmul_floor_runs_exactly_the_stacked_steps_matrix_products(batch_size):
    """The bound's epoch and a real stacked epoch call bmm/baddbmm(_) with the same shapes, the same number of
    times (100: an uneven last batch; 2048 x 3 members: more than one pass on a CPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from harness.core.data import load_dataset
    from harness.core.stacked import CPU_PASS_SAMPLES, StackedTrainer
    from harness.bench.stack_bench import matmuls_only_epoch, stack_members

    class Products(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("bmm", "baddbmm", "baddbmm_"):
                self.seen[(name, *(tuple(a.shape) for a in args[:3]))] += 1
            return func(*args, **(kwargs or {}))

    cfg = load_config(CONFIGS / "smoke.yaml", ["metrics.noise_scale=false", f"optim.global_batch_size={batch_size}",
                                               "data.train_subset=2200"])
    members = stack_members(cfg, 3)
    dataset = load_dataset(cfg)
    stacked = StackedTrainer(members, [dataset.train] * 3)
    with Products() as real:
        stack_epoch(stacked, 0)
    with Products() as floor:
        matmuls_only_epoch(stacked)(0)
    assert floor.seen == real.seen and sum(real.seen.values()) > 0
    # The step folds the weight gradients into the momentum where all members fit one CPU pass.
    # (2048: the full batches take two passes and do not fold; the last batch of 152 does.)
    folded_full_batches = any(key[0] == "baddbmm_" and key[2][-1] == batch_size for key in real.seen)
    assert folded_full_batches == (3 * batch_size <= CPU_PASS_SAMPLES)


def test_bench_stack_profile_writes_where_each_sides_epoch_goes(tmp_path, capsys):
    status, _, stderr = bench(capsys, "--device", "cpu", "--stack", "2", "--batch-sizes", "64", "--epochs", "1",
                              "--profile", str(tmp_path / "profiles"))
    assert status == 0, stderr
    table = (tmp_path / "profiles" / "stack2-batch64.txt").read_text()
    stacked, alone = table.split("== one trial alone")
    # 512 samples at batch 64: 8 steps, each one forward baddbmm per layer for the stack, addmm for a trial.
    assert stacked.startswith("== the stack of 2: one epoch of 8 steps") and "aten::baddbmm" in stacked
    assert "aten::addmm" in alone and "aten::baddbmm " not in alone


def test_bench_refuses_a_profile_without_a_stack(tmp_path, capsys):
    status, stderr = refused(capsys, "--profile", str(tmp_path))
    assert status == 2
    assert stderr == (f"error: --profile: {tmp_path} without --stack; expected --stack K (only the "
                      "stack bench profiles its epochs)")


def test_tf32_matmuls_holds_cudas_fp32_products_in_tf32_inside_and_restores_the_setting():
    from harness.bench.bench import tf32_matmuls

    before = torch.backends.cuda.matmul.fp32_precision
    with tf32_matmuls(True):
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cuda.matmul.fp32_precision == before
    with tf32_matmuls(False):
        assert torch.backends.cuda.matmul.fp32_precision == before


def test_bench_refuses_tf32_off_a_gpu(capsys):
    status, stderr = refused(capsys, "--device", "cpu", "--stack", "2", "--tf32")
    assert status == 2
    assert stderr == ("error: --tf32: the device is cpu; expected a CUDA device (TF32 is the "
                      "tensor-core format of NVIDIA GPUs)")


def test_bench_refuses_a_stack_of_zero_trials(capsys):
    status, stderr = refused(capsys, "--stack", "0")
    assert status == 2
    assert stderr == "error: --stack: 0; expected a positive number of trials to stack"

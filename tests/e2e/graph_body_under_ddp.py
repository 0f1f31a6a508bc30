"""Run by tests/e2e/test_graph_step.py under torchrun (2 gloo ranks): the graph step's
body, uncaptured, against the eager step, with DDP and its noise-probe comm hook."""

import gc
import sys
from pathlib import Path

# The repo (harness), and tests/, tests/unit, tests/e2e (conftest and the test modules imported below).
TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS.parent), str(TESTS), str(TESTS / "unit"), str(TESTS / "e2e")]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from harness.core import distributed  # noqa: E402
from harness.core.step import unwrap  # noqa: E402
from test_graph_step import STEP_TEST_OVERRIDES, assert_same_state, untracked_smoke_config, trained  # noqa: E402


def main() -> int:
    ctx = distributed.init_from_env("cpu")
    eager = graph = None
    try:
        cfg = untracked_smoke_config(Path(sys.argv[1]), *STEP_TEST_OVERRIDES)
        eager = trained(cfg, ctx, graph="none")
        graph = trained(cfg, ctx, graph="body")
        assert graph.train_step.warmup_steps_left == 0, "no step ran through the graph body"
        assert_same_state(graph, eager, rtol=1e-5, atol=1e-6)
        # DDP kept the replicas identical: rank 0's parameters equal this rank's.
        for param in unwrap(graph.model).parameters():
            rank0 = param.detach().clone()
            dist.broadcast(rank0, src=0)
            torch.testing.assert_close(param.detach(), rank0, rtol=0, atol=0)
    finally:
        # The DDP replicas go before the process group: a reducer destroyed at interpreter
        # exit, after its group, sometimes aborted the process ("terminate called without
        # an active exception") once both ranks had printed their verdict.
        del eager, graph
        gc.collect()
        distributed.shutdown()
    print(f"rank {ctx.rank}: the graph body matches the eager step under DDP", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

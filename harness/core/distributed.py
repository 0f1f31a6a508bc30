"""Who am I in the job: DistContext, process-group setup and teardown, reductions.

Owns ``torch.distributed``: torchrun's init/shutdown, reading a process group
that Ray Train made, the choice of backend and device, and the few collectives
the loop needs. ``world_size == 1`` without a process group is a normal case.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from harness.errors import InputError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    launcher: str = "local"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1 or (dist.is_available() and dist.is_initialized())


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto``: this rank's GPU when CUDA is present, else the CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise InputError("train.device: 'cuda' was requested but no CUDA device is available; "
                         "expected 'auto' or 'cpu' on this machine")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def local_context(requested_device: str = "auto") -> DistContext:
    return DistContext(device=pick_device(requested_device))


def torchrun_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment, before any init."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


# PyTorch's CUDA-graph notes: NCCL's async error handling must be off in a process
# group whose collectives are captured (its watchdog queries captured work).
COLLECTIVE_CAPTURE_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}


def allow_collective_capture() -> None:
    """Prepare this process for capturing NCCL collectives; call before the process group exists.

    A value the user set is kept. Ray Train sets the variable to 1 in its workers
    unless it is set already, so the Ray launcher passes it in the workers' environment.
    """
    for name, value in COLLECTIVE_CAPTURE_ENV.items():
        os.environ.setdefault(name, value)


def init_from_env(requested_device: str = "auto", timeout_s: float = 300) -> DistContext:
    """torchrun: join the process group (NCCL with one GPU per rank, else gloo)."""
    rank, local_rank, world_size = torchrun_world()
    device = pick_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, store=_attempt_store(rank, world_size, timeout_s),
                            timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device, launcher="torchrun")


def _attempt_store(rank: int, world_size: int, timeout_s: float) -> dist.Store:
    """torchrun's TCPStore, with keys private to this restart attempt.

    After ``--max-restarts`` relaunches the ranks, the agent's store still holds
    the previous attempt's gloo addresses under the same keys, and a new rank can
    dial a dead peer ("Connection refused"). A prefix per attempt keeps them apart.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")),
                          world_size, is_master=(rank == 0 and not agent_hosts_store),
                          timeout=timedelta(seconds=timeout_s), multi_tenant=not agent_hosts_store)
    return dist.PrefixStore(f"harness/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def context_from_process_group(requested_device: str, launcher: str = "ray") -> DistContext:
    """Ray Train made the process group already; only read it. Never init or destroy here."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device, launcher=launcher)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum over ranks in place (a no-op with one process). Every rank must call it."""
    if ctx.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_gradients(model: torch.nn.Module, ctx: DistContext) -> None:
    """What DDP does for autograd, for the hand-written engine: mean of the ranks' gradients."""
    if ctx.world_size == 1:
        return
    grads = [p.grad for p in model.parameters()]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


"""Who am I in the job: DistContext, process-group setup and teardown, reductions.

Owns ``torch.distributed``: torchrun's init/shutdown, reading Ray Train's process group, the
backend and device, and the few collectives the loop needs. ``world_size == 1`` is normal.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn, Optional

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


def _rank_device(requested: str, local_rank: int) -> torch.device:
    """This rank's device, made CUDA's current one where it is a GPU."""
    device = pick_device(requested, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


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
    A value the user set is kept (the Ray launcher passes it in the workers' environment)."""
    for name, value in COLLECTIVE_CAPTURE_ENV.items():
        os.environ.setdefault(name, value)


def init_from_env(requested_device: str = "auto", timeout_s: float = 300,
                  attempt: Optional[int] = None) -> DistContext:
    """torchrun: join the process group (NCCL with one GPU per rank, else gloo) for restart ``attempt``
    (``agree_on_attempt``'s number, the same on every rank; None asks for it here)."""
    rank, local_rank, world_size = torchrun_world()
    if attempt is None:
        attempt = agree_on_attempt(timeout_s)
    device = _rank_device(requested_device, local_rank)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                            store=_attempt_store(rank, world_size, timeout_s, attempt),
                            timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device, launcher="torchrun")


def _uses_agent_store() -> bool:
    """torchrun's agent hosts the workers' TCPStore (c10d and static rendezvous, unless
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): the store, and every key in it, outlives a restart."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _torchrun_store(rank: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    agent_hosts_store = _uses_agent_store()
    return dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")),
                         world_size, is_master=(rank == 0 and not agent_hosts_store),
                         timeout=timedelta(seconds=timeout_s), multi_tenant=not agent_hosts_store)


def _attempt_store(rank: int, world_size: int, timeout_s: float, attempt: int) -> dist.Store:
    """torchrun's TCPStore, with keys private to this restart attempt: after a restart the agent's
    store still holds the previous attempt's gloo addresses, and a new rank could dial a dead peer.
    Without the agent's store, rank 0 hosts a new one every attempt: nothing is stale."""
    store = _torchrun_store(rank, world_size, timeout_s)
    return dist.PrefixStore(f"harness/attempt-{attempt}" if _uses_agent_store() else "harness", store)


# How often rank 0 looks for ranks that wait to learn the attempt (agree_on_attempt).
_WELCOME_POLL_S = 0.02


def rank_zero_refusal(name: str, attempt: int, refusal: Optional[str], timeout_s: float = 300) -> Optional[str]:
    """Under torchrun, before the process group: rank 0's ``refusal`` (None, or a one-line error) on every rank,
    through the agent's store under this attempt's key ``name``; the others' own ``refusal`` is not used.

    For a check only rank 0 can make (it alone holds the run's folder): the others would
    otherwise wait for a rank 0 that has exited. Without the agent's store, each keeps its own."""
    rank, _, world_size = torchrun_world()
    if world_size == 1 or not _uses_agent_store():
        return refusal
    store = _torchrun_store(rank, world_size, timeout_s)
    key = f"harness/{name}/{attempt}"
    if rank == 0:
        store.set(key, refusal or "")
        return refusal
    store.wait([key], timedelta(seconds=timeout_s))
    return store.get(key).decode() or None


def agree_on_attempt(timeout_s: float = 300) -> int:
    """Under torchrun: which restart attempt this is (0: the launch's first), the same number on every rank.
    TORCHELASTIC_RESTART_COUNT differs between nodes: an agent whose own ranks were healthy
    restarts them for the other node's re-rendezvous without counting a restart. The agent's
    store outlives restarts, so rank 0 counts its own starts there and hands the count to the
    others. A rank cannot tell this attempt's key from one the previous attempt left, so each
    other rank asks under a fresh nonce and rank 0 answers every new one until all ranks have
    confirmed. Without the agent's store, the restart count is all there is: rank 0's is the
    one that matters (it alone decides whether to resume).
    """
    rank, _, world_size = torchrun_world()
    if not _uses_agent_store():
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    store = _torchrun_store(rank, world_size, timeout_s)
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"harness/hello/{rank}", nonce)
        store.wait([f"harness/welcome/{nonce}"], timedelta(seconds=timeout_s))
        attempt = int(store.get(f"harness/welcome/{nonce}"))
        store.add(f"harness/joined/{attempt}", 1)
        return attempt
    attempt = store.add("harness/attempts", 1) - 1
    answered: dict[int, bytes] = {}
    deadline = time.monotonic() + timeout_s
    while store.add(f"harness/joined/{attempt}", 0) < world_size - 1:
        for other in range(1, world_size):
            key = f"harness/hello/{other}"
            if store.check([key]) and (nonce := store.get(key)) != answered.get(other):
                store.set(f"harness/welcome/{nonce.decode()}", str(attempt))
                answered[other] = nonce
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0: not every rank of {world_size} joined attempt {attempt} within "
                               f"{timeout_s:.0f} s")
        time.sleep(_WELCOME_POLL_S)
    return attempt


def broadcast_from_main(value: Any, ctx: DistContext) -> Any:
    """The main rank's ``value`` on every rank (any picklable object); every rank of a process group
    must call it. Without a process group (one process, or a driver that only starts ranks) it is ``value``."""
    if ctx.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, device=ctx.device if ctx.device.type == "cuda" else None)
    return box[0]


def context_from_process_group(requested_device: str, launcher: str = "ray") -> DistContext:
    """Ray Train made the process group already; only read it. Never init or destroy here."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size,
                       device=_rank_device(requested_device, local_rank), launcher=launcher)


def shutdown(finished: bool = False) -> None:
    """Leave the process group. ``finished`` (every rank ends its work here): meet at a barrier first, so no
    rank tears down its gloo connections while a peer still uses them (a peer then aborts, SIGABRT)."""
    if dist.is_available() and dist.is_initialized():
        if finished and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def end_rank_process(exit_code: int) -> NoReturn:
    """End a torchrun rank whose work is done and recorded, without the interpreter's finalization.

    Gloo's worker threads and DDP's reducer live on as C++ objects after ``destroy_process_group``; torn
    down while the interpreter finalizes, one of them now and then ends the process with SIGABRT
    ("terminate called without an active exception"), and torchrun counts a rank that finished as failed
    (and restarts, or fails the job). Python's exit handlers still run, and the output is flushed."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


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
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


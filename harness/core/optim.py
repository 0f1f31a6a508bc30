"""The learning-rate schedule and the update, written once for K members at a time: a run alone is K = 1.

Owns the schedule (``Schedule``: linear warmup, then the LR held or decayed to 0, one formula for
every member at once), the update (``Optimizer``: momentum SGD, Nesterov, Adam, AdamW) over
member-stacked [K, n] blocks with a mask that freezes members, and its state (rows kept when
members leave a stack; each member's slice a checkpoint's ``optimizer``: ``MemberState``). The
blocks are a stack's flat buffers (core/stacked.py) or a run alone's parameters viewed as [1, n]
(core/step.py). The LR, hyperparameters and Adam's step count are device tensors, so a step reads
nothing back and a CUDA graph can capture it (core/graph_step.py).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from harness.core.config import SCHEDULES, Config, OptimConfig
from harness.errors import InputError

# Schedule.lr serves this many steps' LRs from one evaluation of lr_at: a step then launches no kernel for its LR.
TABLE_STEPS = 1024
# The state each update keeps, per member and parameter; Adam's step count is one number per member.
STATE_KEYS = {"sgd": ("momentum_buffer",), "nesterov": ("momentum_buffer",),
              "adam": ("step", "exp_avg", "exp_avg_sq"), "adamw": ("step", "exp_avg", "exp_avg_sq")}


class Schedule:
    """Every member's LR schedule as [K] tensors on the device: ``lr_at(step)`` is the formula, ``lr(step)``
    the same values read from a table of the coming steps."""

    def __init__(self, base_lr: torch.Tensor, warmup_steps: torch.Tensor, decay_end: torch.Tensor,
                 kind: torch.Tensor):
        self.base_lr, self.warmup_steps, self.decay_end, self.kind = base_lr, warmup_steps, decay_end, kind
        self._table: Optional[torch.Tensor] = None  # [TABLE_STEPS, K]: the LRs from step _first on
        self._first = 0

    @classmethod
    def of(cls, members: list[Config], steps_in_epoch: int, device) -> Schedule:
        """The members' schedules: warmup of round(warmup_epochs * steps per epoch) steps (as every run counts
        it), decay to the end of the step budget."""
        def column(values, dtype=torch.float64):
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(column([m.optim.lr for m in members]),
                   column([round(m.optim.warmup_epochs * steps_in_epoch) for m in members]),
                   column([m.step_budget(steps_in_epoch) for m in members]),
                   column([SCHEDULES.index(m.optim.schedule) for m in members], torch.long))

    def lr_at(self, steps) -> torch.Tensor:
        """The LR at ``steps`` (an int: [K]; a [S] tensor: [S, K]), in float64 as Python floats compute it.

        While step < warmup_steps: base_lr * (step + 1) / warmup_steps (Goyal et al. 2017). Then
        base_lr * f(progress), progress = (step - warmup_steps) / (decay_end - warmup_steps) held in [0, 1],
        with f by ``kind`` (an index into config.SCHEDULES): 1 (constant), 1 - progress (linear) or
        (1 + cos(pi * progress)) / 2 (cosine, Loshchilov & Hutter 2017). A decay reaches 0 at decay_end,
        the step after the run's last, so no step trains at LR 0.
        """
        step = torch.as_tensor(steps, dtype=torch.float64, device=self.base_lr.device).unsqueeze(-1)
        # clamp: members without warmup (0 steps) take the other branch; the division must not make a NaN there.
        ramp = self.base_lr * (step + 1) / self.warmup_steps.clamp_min(1)
        progress = ((step - self.warmup_steps) / (self.decay_end - self.warmup_steps).clamp_min(1)).clamp(0, 1)
        factor = torch.where(self.kind == SCHEDULES.index("linear"), 1 - progress,
                             torch.where(self.kind == SCHEDULES.index("cosine"),
                                         (1 + torch.cos(math.pi * progress)) / 2, 1.0))
        return torch.where(step < self.warmup_steps, ramp, self.base_lr * factor)

    def lr(self, step: int) -> torch.Tensor:
        """``lr_at(step)``, [K] float64, as a view of a table evaluated once per TABLE_STEPS steps."""
        if self._table is None or not 0 <= step - self._first < len(self._table):
            self._first = step
            self._table = self.lr_at(torch.arange(step, step + TABLE_STEPS, dtype=torch.float64,
                                                  device=self.base_lr.device))
        return self._table[step - self._first]

    def select(self, rows: torch.Tensor) -> Schedule:
        """The schedules of members ``rows`` only."""
        return Schedule(*(t[rows] for t in (self.base_lr, self.warmup_steps, self.decay_end, self.kind)))


class Optimizer:
    """One update for K members at once, each with its own hyperparameters and ``name`` shared.

    ``step(params, grads, lr, active)`` takes [K, n] blocks (row k: member k's parameters) and
    updates each member as torch.optim's optimizer of that name updates a run alone:
    - sgd: d = g + wd * p; buf = momentum * buf + d (buf = d on the first step: a zero buffer gives
      exactly that); p -= lr * buf. nesterov: the same buf, then p -= lr * (d + momentum * buf).
    - adam: d = g + wd * p; m = lerp(m, d, 1 - beta1); v = beta2 * v + (1 - beta2) * d^2;
      p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps) (Kingma & Ba 2015, Algorithm 1
      with torch's placement of eps). adamw: d = g and p *= 1 - lr * wd first (Loshchilov & Hutter 2019).
    Every pass is in place on the blocks, each member's hyperparameters a [K, 1] column: on a CPU
    stack a fresh [K, n] temporary per operation cost more than the arithmetic (docs/performance.md).
    The gradient blocks become d in place: the next step overwrites them anyway.

    A member whose ``active`` is false keeps its parameters and state: its d is zeroed (its gradient
    may be NaN), its LR is 0, its decay rates 1, and Adam's step count stays. On a CPU the zeroing is
    an ``index_fill_`` over the frozen rows, free while none is; finding them is a host sync, so on a
    GPU (``host_sync_free``) one ``torch.where`` on the mask zeroes them, as a CUDA graph needs.
    """

    def __init__(self, members: list[OptimConfig], params: list[torch.Tensor]):
        self.name = members[0].name  # one for every member of a stack (core/stacked.py SHARED_KEYS)
        self.dtype, device = params[0].dtype, params[0].device
        self.host_sync_free = device.type == "cuda"
        # [K] each, float64 as torch.optim's Python numbers are.
        hyper = torch.tensor([[m.momentum, m.weight_decay, *m.betas, m.eps] for m in members], dtype=torch.float64,
                             device=device).T.contiguous()
        self.hyper = dict(zip(("momentum", "weight_decay", "beta1", "beta2", "eps"), hyper))
        # Known when the optimizer is built, so skipping the pass costs no host sync per step.
        self.has_weight_decay = bool((self.hyper["weight_decay"] != 0).any())
        self.state = {key: [torch.zeros(len(members), 1, dtype=torch.float64, device=device)] if key == "step"
                      else [torch.zeros_like(p) for p in params] for key in STATE_KEYS[self.name]}
        self._columns()
        self._zero = torch.zeros((), dtype=self.dtype, device=device)  # where(..., out=) takes no number

    def _columns(self) -> None:
        """The hyperparameters as the [K, 1] columns a pass multiplies by, in the parameters' dtype (as
        torch.optim's Python numbers are cast in its kernels)."""
        hyper = {key: value.unsqueeze(1) for key, value in self.hyper.items()}
        hyper.update(one_minus_beta1=1 - hyper["beta1"], one_minus_beta2=1 - hyper["beta2"])
        self.columns = {key: value.to(self.dtype) for key, value in hyper.items()}

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the members ``rows``, in this order (new tensors: views of the old rows keep their values)."""
        self.hyper = {key: value[rows] for key, value in self.hyper.items()}
        self.state = {key: [block.index_select(0, rows) for block in blocks] for key, blocks in self.state.items()}
        self._columns()

    def state_tensors(self) -> list[torch.Tensor]:
        return [block for blocks in self.state.values() for block in blocks]

    def shared_momentum(self) -> Optional[float]:
        """For plain SGD whose members share one momentum, that momentum (what folding the gradient into
        the momentum buffer needs: core/stacked.py); otherwise None."""
        shared = self.hyper["momentum"].unique()
        return float(shared.to(self.dtype)) if self.name == "sgd" and len(shared) == 1 else None

    @torch.no_grad()
    def step(self, params: list[torch.Tensor], grads: list[torch.Tensor], lr: torch.Tensor,
             active: Optional[torch.Tensor] = None, folded: tuple[int, ...] | range = ()) -> None:
        """One update of [K, n] blocks ``params`` from ``grads`` (laid out as the state) with ``lr`` [K].
        ``active`` [K] bool: only these members update (None: all). ``folded`` (sgd, every member active):
        blocks whose momentum buffer already holds momentum * buf + g (core/stacked.py)."""
        adam = self.name in ("adam", "adamw")
        # Adam's corrections are formed in float64, as torch.optim forms them in Python floats.
        lr = lr.to(torch.float64 if adam else self.dtype).unsqueeze(1)
        rows = None if active is None else active.unsqueeze(1)
        lr = lr if rows is None else torch.where(rows, lr, 0.0)
        blocks = list(zip(params, grads, *(self.state[key] for key in STATE_KEYS[self.name] if key != "step")))
        if adam:
            self._adam(blocks, lr, rows, self._freezer(active))
        else:
            self._sgd(blocks, lr, rows, self._freezer(active), folded)

    def _freezer(self, active: Optional[torch.Tensor]) -> Callable[[torch.Tensor], object]:
        """What zeroes the frozen members' rows of a d block (the class docstring's two ways)."""
        if active is None:
            return lambda d: None
        if self.host_sync_free:
            rows = active.unsqueeze(1)
            return lambda d: torch.where(rows, d, self._zero, out=d)
        frozen = torch.nonzero(~active).view(-1)
        return lambda d: d.index_fill_(0, frozen, 0)

    def _sgd(self, blocks, lr: torch.Tensor, rows: Optional[torch.Tensor], freeze, folded) -> None:
        weight_decay = self.columns["weight_decay"]
        momentum = self.columns["momentum"] if rows is None else torch.where(rows, self.columns["momentum"], 1.0)
        for index, (p, d, buf) in enumerate(blocks):
            if index in folded:
                if self.has_weight_decay:
                    buf.addcmul_(weight_decay, p)  # SGD's d = g + wd * p, its g already in buf
                p.addcmul_(lr, buf, value=-1)
                continue
            if self.has_weight_decay:
                d.addcmul_(weight_decay, p)
            freeze(d)
            # buf = d + momentum * buf in one pass (SGD's mul_ then add_ is two; the result differs by rounding).
            torch.addcmul(d, momentum, buf, out=buf)
            update = d.addcmul_(momentum, buf) if self.name == "nesterov" else buf
            # p + (-1) * lr * update: SGD's p - lr * update, the sign flip exact.
            p.addcmul_(lr, update, value=-1)

    def _adam(self, blocks, lr: torch.Tensor, rows: Optional[torch.Tensor], freeze) -> None:
        columns = self.columns
        steps = self.state["step"][0]
        steps.add_(1.0 if rows is None else rows)
        # At least 1: a member frozen before its first step would otherwise divide 0 by 0 below.
        t = steps.clamp_min(1)
        step_size = (lr / (1 - self.hyper["beta1"].unsqueeze(1) ** t)).to(self.dtype)
        correction2_sqrt = (1 - self.hyper["beta2"].unsqueeze(1) ** t).sqrt().to(self.dtype)
        one_minus_beta1, beta2, one_minus_beta2 = (columns[k] for k in ("one_minus_beta1", "beta2", "one_minus_beta2"))
        if rows is not None:
            one_minus_beta1 = torch.where(rows, one_minus_beta1, 0.0)
            beta2, one_minus_beta2 = torch.where(rows, beta2, 1.0), torch.where(rows, one_minus_beta2, 0.0)
        decoupled = self.name == "adamw"
        if decoupled and self.has_weight_decay:
            shrink = (1 - lr * self.hyper["weight_decay"].unsqueeze(1)).to(self.dtype)  # 1 where lr is 0
        for p, d, exp_avg, exp_avg_sq in blocks:
            if decoupled and self.has_weight_decay:
                p.mul_(shrink)
            elif self.has_weight_decay:
                d.addcmul_(columns["weight_decay"], p)
            freeze(d)
            exp_avg.lerp_(d, one_minus_beta1)
            exp_avg_sq.mul_(beta2).addcmul_(d, d * one_minus_beta2)
            ratio = exp_avg_sq.sqrt().div_(correction2_sqrt).add_(columns["eps"])
            torch.div(exp_avg, ratio, out=ratio)
            p.addcmul_(step_size, ratio, value=-1)

    def member(self, row: int) -> MemberState:
        """Member ``row``'s slice of the state, for its checkpoints."""
        return MemberState(self, row)

    def state_dict(self) -> dict:
        """A run alone's (K = 1) state, as ``MemberState.state_dict``."""
        return self.member(0).state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.member(0).load_state_dict(state)


class MemberState:
    """One member's rows of an optimizer's state: what its checkpoint saves and loads. Views: a member that
    leaves a stack keeps its rows of the old tensors, which no step touches any more."""

    def __init__(self, optimizer: Optimizer, row: int):
        self.name = optimizer.name
        self.rows = {key: [block[row] for block in blocks] for key, blocks in optimizer.state.items()}

    def state_dict(self) -> dict:
        """``{"name": the update, key: the member's state under key, its parameters' end to end}``: one
        format whatever the layout of the blocks, so a stack member's checkpoint resumes as a run alone."""
        return {"name": self.name, **{key: torch.cat(rows) for key, rows in self.rows.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name or not all(key in state for key in self.rows):
            raise InputError(f"optimizer: a checkpoint of {state.get('name', 'another optimizer')!r}; expected the "
                             f"state of {self.name!r} (keys {', '.join(self.rows)})")
        for key, rows in self.rows.items():
            for row, saved in zip(rows, state[key].split([row.numel() for row in rows])):
                row.copy_(saved)

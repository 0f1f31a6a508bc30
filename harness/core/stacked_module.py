"""The parameters of a stack's members (``MemberLayout``, ``StackedParameters``), and K copies of any model
(``model.factory``'s) as one stacked model through ``torch.func`` (``StackedModule``).

The stacked step (core/stacked.py ``StackedTrainer``) asks its model for the members' parameters on a
leading K axis in one flat buffer, each member's loss and gradients on its own batch, and per-member
squared norms. For the note's MLP ``StackedMLP`` computes the loss and gradients with batched matrix
products and a hand-written backward; for any other model this module does, with PyTorch's ensembling
pattern: ``vmap`` over the members of ``grad`` of the loss of ``functional_call`` on one stateless copy
of the architecture. Each member's gradient is the gradient its run alone takes through autograd (the
same loss, the same samples), so a member equals its trial alone up to float rounding
(tests/unit/test_stacked.py), and resumes bit for bit on a CPU (tests/unit/test_optim_resume.py).

A model whose forward reads or writes state besides its parameters (buffers: batch norm's running
statistics, for one) cannot be stacked so: ``unstackable_reason`` says why, and sweeps train its trials
one at a time.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from harness.core.config import Config
from harness.core.model import build_model, returns_loss


def unstackable_reason(model: torch.nn.Module) -> Optional[str]:
    """Why ``model`` cannot train as a member of a functional stack; None where it can."""
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        return (f"its forward keeps state besides its parameters (buffers {', '.join(buffers[:3])}"
                f"{'...' if len(buffers) > 3 else ''}, as batch norm's running statistics are)")
    if any(not p.requires_grad for p in model.parameters()):
        return "some of its parameters are frozen (requires_grad false)"
    return None


class MemberLayout:
    """Where each member's parameters lie in one flat 1-D buffer (gradients share the layout; the optimizer's
    state takes the shapes of its ``blocks``, the [K, n] pieces the update and the norms walk over).

    Member-major (on a GPU): member k's parameters end to end in row k of one [K, P] block, so one
    elementwise pass updates every parameter of every member. Parameter-major (on a CPU): each
    parameter's [K, n] block in turn, so each weight's gradient is a contiguous [K, d_l, d_{l-1}]:
    a CPU's bmm into a batch-strided view runs one GEMM per member (docs/steps.md).
    """

    def __init__(self, shapes: list[tuple[int, ...]], member_major: bool):
        self.shapes, self.member_major = shapes, member_major
        self.sizes = [math.prod(shape) for shape in shapes]
        self.width = sum(self.sizes)  # P: one member's parameters

    def select(self, views: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """A new buffer holding only the members ``rows`` of the [K, ...] tensors ``views``, in this layout."""
        picked = [v.index_select(0, rows.to(v.device)).reshape(len(rows), -1) for v in views]
        return torch.cat(picked, dim=1).reshape(-1) if self.member_major else torch.cat([p.reshape(-1) for p in picked])

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` as [K, *shape] views, one per parameter tensor in ``parameters()`` order."""
        members = flat.numel() // self.width
        if self.member_major:
            pieces = flat.view(members, self.width).split(self.sizes, dim=1)
        else:
            pieces = flat.split([members * size for size in self.sizes])
        return [piece.view(members, *shape) for piece, shape in zip(pieces, self.shapes)]

    def blocks(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` as the [K, n] pieces an elementwise pass with per-member [K, 1] columns walks over."""
        members = flat.numel() // self.width
        if self.member_major:
            return [flat.view(members, self.width)]
        return [view.reshape(members, -1) for view in self.views(flat)]


class StackedParameters:
    """K members' parameters (``models``, each built from its own config and seed: its run alone's initial
    weights) on a leading K axis in one flat buffer, and their gradients in another of the same layout: ``flat_parameters``,
    ``flat_gradients``, their [K, *shape] views (``parameters()``, ``stacked_gradients``) and [K, n]
    ``parameter_blocks``/``gradient_blocks``, ``keep``, ``member_squared_norms``. The stacked model of
    core/stacked.py's step: the MLP's (``StackedMLP``) or any other's (``StackedModule``)."""

    def __init__(self, models: list[torch.nn.Module], member_major: bool, device: torch.device | str = "cpu"):
        self.names = [name for name, _ in models[0].named_parameters()]  # as a member's state_dict names them
        self.layout = MemberLayout([tuple(p.shape) for p in models[0].parameters()], member_major=member_major)
        stacked = [torch.stack([p.detach() for p in same]) for same in zip(*(m.parameters() for m in models))]
        self.flat_parameters = self.layout.select(stacked, torch.arange(len(models))).to(device)
        self._make_views()

    def _make_views(self) -> None:
        self.stacked_parameters = self.layout.views(self.flat_parameters)
        self.flat_gradients = torch.zeros_like(self.flat_parameters)
        self.stacked_gradients = self.layout.views(self.flat_gradients)
        # The [K, n] pieces the optimizer updates (core/optim.py).
        self.parameter_blocks = self.layout.blocks(self.flat_parameters)
        self.gradient_blocks = self.layout.blocks(self.flat_gradients)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the members ``rows`` (new tensors; views of the old rows still see the old values)."""
        self.flat_parameters = self.layout.select(self.parameters(), rows)
        self._make_views()

    @property
    def num_members(self) -> int:
        return self.stacked_parameters[0].shape[0]

    def parameters(self) -> list[torch.Tensor]:
        """[K, *shape] per parameter, in a member's ``parameters()`` order."""
        return self.stacked_parameters

    def member_squared_norms(self, flat: torch.Tensor) -> torch.Tensor:
        """[K] float64: each member's squared norm over all of ``flat`` (laid out as ``flat_gradients``), one
        norm kernel per block, in the gradients' own precision as a run alone's probe takes them."""
        return sum(torch.linalg.vector_norm(block, dim=1).double().square() for block in self.layout.blocks(flat))


class StackedModule(StackedParameters):
    """K models of one architecture (model.factory's): each member's loss and gradients through torch.func."""

    def __init__(self, members: list[Config], member_major: bool, device: torch.device | str = "cpu"):
        models = [build_model(cfg) for cfg in members]
        super().__init__(models, member_major, device)
        # One copy of the architecture, its own parameters never read: functional_call supplies each member's.
        self.template = copy.deepcopy(models[0]).to("meta")

    def members_per_pass(self, batch: int) -> int:
        """All members in one ``vmap`` on a GPU, where a pass costs its launches; one at a time on a CPU, where
        a pass costs its arithmetic anyway and a batched convolution's rounding would depend on how many
        members share the pass (a member resumed beside fewer others would then not end bit for bit as it
        would have)."""
        return self.num_members if self.stacked_parameters[0].device.type != "cpu" else 1

    def loss_and_gradients(self, x: torch.Tensor, y: torch.Tensor, normalizer: float,
                           rows: slice = slice(None), fold=None) -> tuple[torch.Tensor, bool]:
        """Per member of ``rows`` (samples x [k, b, ...], y [k, b]): C_k = sum_i CE(f(x_ki), y_ki) / normalizer
        as [k], its gradient written into its rows of ``flat_gradients``. Never folds (``fold`` is the
        MLP's)."""
        template = self.template

        def member_loss(params, xs, ys):
            if returns_loss(template):  # its own mean loss over the member's batch
                return functional_call(template, params, (xs, ys)) * len(ys) / normalizer
            logits = functional_call(template, params, (xs,))
            return F.cross_entropy(logits, ys, reduction="sum") / normalizer

        params = {name: p[rows] for name, p in zip(self.names, self.stacked_parameters)}
        with torch.enable_grad():
            gradients, loss = vmap(grad_and_value(member_loss))(params, x, y)
        for name, stacked_gradient in zip(self.names, self.stacked_gradients):
            stacked_gradient[rows].copy_(gradients[name])
        return loss.detach(), False

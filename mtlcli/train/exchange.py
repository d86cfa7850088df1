"""What the ranks of a training exchange in a step, chosen once from the ranks and the weighting's
declared capabilities (see ``mtlcli.distributed`` for the invariant every kind keeps):

- ``none``: one process; every exchange is the identity;
- ``ddp``: the plain backward pass goes through ``DistributedDataParallel`` (its all-reduce
  overlaps the backward pass);
- ``collectives``: a strategy that takes per-task gradients (``task_gradients``) sums them
  itself over the ranks, on the bare model, and the rest is summed in one all-reduce; so does a
  scheme's own step (``Capabilities.step``), which runs its forward passes on the bare model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mtlcli import distributed
from mtlcli.distributed import Ranks
from mtlcli.models.base import scheme
from mtlcli.models.blocks import sparse_embeddings
from mtlcli.weighting.base import WeightingStrategy


@dataclass
class Exchange:
    ranks: Ranks
    ddp: bool
    checked: bool = field(default=False, init=False)  # DDP's every-parameter-used check, done once

    @classmethod
    def choose(cls, ranks: Ranks, strategy: WeightingStrategy, own_step: bool = False) -> Exchange:
        """``own_step``: the scheme or the training objective trains by its own step (no DDP around
        its forward passes)."""
        return cls(ranks, ranks.active and not strategy.capabilities.task_gradients and not own_step)

    @property
    def kind(self) -> str:
        """``none``, ``ddp`` or ``collectives`` (the summary's ``exchange``)."""
        return "none" if not self.ranks.active else "ddp" if self.ddp else "collectives"

    def bind(self, model: nn.Module) -> nn.Module:
        """Prepare ``model`` for this exchange: its row-wise tables take the union of the ranks'
        rows, a scheme that takes global-batch statistics sums them over the ranks; returns what
        the forward pass runs through (the model, or DDP around it)."""
        union = self.ranks.union if self.ranks.active else None
        for _, table in sparse_embeddings(model):
            table.share_rows(union)
        sums = scheme(model).capabilities.sum_over_ranks
        if sums is not None:
            sums(self.ranks.sum if self.ranks.active else None)
        return distributed.data_parallel(model, self.ranks) if self.ddp else model

    def losses(self, sums: Tensor, counts: Tensor) -> Tensor:
        """The global batch's mean losses [T] from this rank's sums and counts [T]."""
        return distributed.global_losses(sums, counts, self.ranks)

    def backward(self, strategy: WeightingStrategy, losses: Tensor, model: nn.Module) -> Tensor:
        """The strategy's backward pass, then every gradient made the one-process step's; returns
        the strategy's weights [T]."""
        if not self.ranks.active:
            return strategy.backward(losses, model)
        with distributed.across(self.ranks):
            weights = strategy.backward(losses, model)
        if self.ddp and not self.checked:  # on the first step of this process (a resumed run's too)
            distributed.check_all_used(model)
            self.checked = True
        own = list(strategy.capabilities.parameters)
        distributed.sum_gradients(model, own, self.ranks, summed_by_ddp=self.ddp)
        return weights

    def batch_rows(self, x: Tensor) -> Tensor:
        """The global batch's rows of ``x`` [B_rank, ...] -> [B, ...], in rank order (the one
        process's order): this rank's slice is ``x`` itself (its graph kept), the other ranks'
        are values without a graph, so a loss of the whole batch computed on every rank sends
        each rank's gradient to its own rows only, and the ranks' gradients add up to the
        one-process gradient. Booleans travel as bytes. ``x`` itself when alone."""
        if not self.ranks.active:
            return x
        flag = x.dtype == torch.bool
        values = self.ranks.gather(x.detach().to(torch.uint8) if flag else x.detach())
        values = values.bool() if flag else values
        sizes = self.ranks.gather(torch.tensor([x.shape[0]], device=x.device))
        start = int(sizes[: self.ranks.rank].sum())
        return torch.cat([values[:start], x, values[start + x.shape[0] :]])

    def sum_gradients(self, model: nn.Module, others: list[nn.Parameter]) -> None:
        """Sum the gradients of ``model`` and of ``others`` (parameters outside it, e.g. a training
        objective's) over the ranks, for a step that ran its backward pass on the bare model."""
        if not self.ranks.active:
            return
        distributed.sum_gradients(model, [], self.ranks)
        for param in others:
            if param.grad is not None:
                param.grad.copy_(self.ranks.sum(param.grad))

"""DB-MTL: dual balancing of the loss scales and the gradient magnitudes.

Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Kwok, "Dual-Balancing for Multi-Task Learning", 2023
(arXiv:2308.12029), Algorithm 1.
Loss-scale balancing: every task trains on log L_k, so that a loss's scale does not set its
gradient's. Gradient-magnitude balancing: on the shared parameters each task keeps a moving
average of the gradients of its log-loss,

    ĝ_k ← β_t ĝ_k + (1 − β_t) ∇ log L_k,   β_t = β / t^σ   (t the step, from 1; ĝ_k = 0 at first)

and the update gives every task the largest of their norms:

    d = max_i ||ĝ_i|| · Σ_k ĝ_k / ||ĝ_k||

``beta`` is β and ``sigma`` σ (0 keeps β_t = β). Task-specific parameters get the gradient of
Σ_k log L_k. The moving averages are state (checkpointed); on several processes every rank
keeps the same ĝ, from the gradients summed over the ranks. A table that trains row-wise (its
rows differ every step) enters ĝ_k with its rows' current gradient, unaveraged. log L_k is taken of L_k + 1e-8, so
that a zero loss stays finite. The logged weights are the balancing factors max_i ||ĝ_i|| / ||ĝ_k||.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field, NonNegativeFloat
from torch import Tensor, nn

from mtlcli import distributed
from mtlcli.weighting.base import StrategyCapabilities, WeightingParams, register_weighting
from mtlcli.weighting.gradients import assign_shared_gradient, shared_task_gradients, split_parameters

EPS = 1e-8


class DBMTLParams(WeightingParams):
    beta: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    sigma: NonNegativeFloat = 0.0


def balance_magnitudes(averages: Tensor) -> tuple[Tensor, Tensor]:
    """(d [P], factors [T]) from the moving averages ĝ [T, P]: d = Σ_k factor_k ĝ_k with
    factor_k = max_i ||ĝ_i|| / ||ĝ_k|| (0 for a task whose ĝ_k is zero)."""
    norms = averages.norm(dim=1)
    factors = torch.where(norms > 0, norms.max() / norms.clamp_min(1e-30), torch.zeros_like(norms))
    return factors @ averages, factors


class DBMTL:
    def __init__(self, beta: float, sigma: float) -> None:
        self.beta, self.sigma = beta, sigma
        self.step = 0
        self.averages: Tensor | None = None

    @property
    def capabilities(self) -> StrategyCapabilities:
        return StrategyCapabilities(state=self, task_gradients=True)  # ĝ and the step count

    def backward(self, losses: Tensor, model: nn.Module) -> Tensor:
        logs = (losses + EPS).log()
        shared, own = split_parameters(model)
        if not shared:
            logs.sum().backward()
            return torch.ones_like(losses.detach())
        ranks = distributed.backward_ranks()
        grads = ranks.sum(shared_task_gradients(logs, shared))
        self.step += 1
        beta = self.beta / self.step**self.sigma
        # a row-wise table's rows change every step: they enter with this step's gradient alone
        kept = torch.cat([torch.full((p.numel(),), isinstance(p, nn.Parameter), device=grads.device) for p in shared])
        if self.averages is None or self.averages.shape[1] != int(kept.sum()):
            self.averages = torch.zeros_like(grads[:, kept])
        self.averages = beta * self.averages.to(grads.device) + (1 - beta) * grads[:, kept]
        current = grads.clone()
        current[:, kept] = self.averages
        update, factors = balance_magnitudes(current)
        assign_shared_gradient(update / ranks.world, shared)
        if own:
            torch.autograd.backward(logs.sum(), inputs=own)
        return factors.detach()

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "step": torch.tensor(self.step),
            "averages": self.averages if self.averages is not None else torch.zeros(0),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.step = int(state["step"])
        self.averages = state["averages"].clone() if state["averages"].numel() else None


@register_weighting("db_mtl", DBMTLParams, "log losses and gradient magnitudes balanced to the largest (2023)")
def build(params: DBMTLParams, tasks: list[str]) -> DBMTL:
    return DBMTL(params.beta, params.sigma)

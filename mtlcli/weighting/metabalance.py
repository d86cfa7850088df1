"""MetaBalance: rescale auxiliary gradients toward the target task's gradient magnitude.

He, Feng, Cheng, Ji, Guo, Caverlee, "MetaBalance: Improving Multi-Task Recommendations via
Adapting Gradient Magnitudes of Auxiliary Tasks", WWW 2022, Algorithm 1. On the shared parameters,
with g_k the gradient of task k and moving averages of the gradient norms

    m_k ← β · m_k + (1 − β) · ||g_k||      (m_k = 0 before the first step)

each auxiliary gradient is replaced by

    g_aux ← g_aux · (m_target / m_aux) · r + g_aux · (1 − r)

and the update is g_target + Σ_aux g_aux (strategy C of the paper: both shrink and enlarge).
r is the relax factor (``relax``): 1 gives the auxiliary gradients the target's magnitude, 0
leaves them as they are. ``target`` defaults to the first task. The norms are taken over the whole
shared gradient vector, as in the paper's algorithm (the authors' optimiser applies the same rule
to each parameter tensor separately). Task-specific parameters get their ordinary gradient.

The logged weights are the coefficients: 1 for the target, (m_target / m_aux) · r + 1 − r for
each auxiliary task.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field
from torch import Tensor, nn

from mtlcli.registry import did_you_mean
from mtlcli.weighting.base import StrategyCapabilities, WeightingParams, register_weighting
from mtlcli.weighting.gradients import backward_with_shared

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class MetaBalanceParams(WeightingParams):
    target: str | None = None
    relax: Fraction = 0.7
    beta: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9


def check(params: MetaBalanceParams, recipe: Any) -> list[tuple[str, str]]:
    tasks = list(recipe.tasks)
    if params.target is None or params.target in tasks:
        return []
    hint = did_you_mean(params.target, tasks)
    return [("target", f"unknown task {params.target!r}{hint}; tasks: {', '.join(tasks)}")]


class MetaBalance:
    def __init__(self, n_tasks: int, target: int, relax: float, beta: float) -> None:
        self.target, self.relax, self.beta = target, relax, beta
        self.norms = torch.zeros(n_tasks)

    def rescale(self, norms: Tensor) -> Tensor:
        """Update the moving averages with this step's gradient norms [T]; return the coefficients [T]."""
        self.norms = self.beta * self.norms + (1 - self.beta) * norms
        ratio = self.norms[self.target] / self.norms.clamp_min(1e-12)
        coef = ratio * self.relax + (1 - self.relax)
        coef[self.target] = 1.0
        return coef

    def combine(self, grads: Tensor, losses: Tensor) -> Tensor:
        return self.rescale(grads.norm(dim=1).detach()).to(grads.dtype)

    @property
    def capabilities(self) -> StrategyCapabilities:
        return StrategyCapabilities(state=self, task_gradients=True)  # the moving averages of the norms

    def backward(self, losses: Tensor, model: nn.Module) -> Tensor:
        return backward_with_shared(losses, model, self.combine)

    def state_dict(self) -> dict[str, Tensor]:
        return {"norms": self.norms}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.norms = state["norms"].clone()


@register_weighting(
    "metabalance", MetaBalanceParams, "auxiliary gradients rescaled toward the target task's (WWW 2022)", check
)
def build(params: MetaBalanceParams, tasks: list[str]) -> MetaBalance:
    target = tasks.index(params.target) if params.target is not None else 0
    return MetaBalance(len(tasks), target, params.relax, params.beta)

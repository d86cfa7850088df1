"""GradVac: gradient vaccine, toward each task pair's usual gradient similarity.

Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and Improving Multi-task
Optimization in Massively Multilingual Models", ICLR 2021, Algorithm 1. Each ordered task pair
(i, j) keeps a target similarity φ̂_ij (0 at the start). On the shared parameters, each task
gradient g_i starts as g_i' = g_i; for every other task j, in a random order drawn anew for each i
and each step, with φ_ij = cos(g_i', g_j): if φ_ij < φ̂_ij, g_i' is moved toward g_j until their
cosine is φ̂_ij,

    g_i' ← g_i' + ||g_i'|| (φ̂_ij √(1 − φ_ij²) − φ_ij √(1 − φ̂_ij²)) / (||g_j|| √(1 − φ̂_ij²)) · g_j

and in every case the target follows φ̂_ij ← (1 − β) φ̂_ij + β φ_ij (``beta``). The update is
Σ_i g_i'. Task-specific parameters get their ordinary gradient; the order comes from a generator
seeded with ``seed``. With φ̂ = 0 the rule is PCGrad's projection, so GradVac generalises it from
"not conflicting" to "as aligned as usual".

Every g_i' is a combination Σ_j C_ij g_j of the raw gradients, so the procedure runs on the K × K
Gram matrix, and the logged weights are c_j = Σ_i C_ij. The paper also keeps one target per
parameter group (layer); here the shared parameters are one group (docs/methods.md).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor, nn

from mtlcli.weighting.base import StrategyCapabilities, WeightingParams, register_weighting
from mtlcli.weighting.gradients import backward_with_shared

EPS = 1e-12


class GradVacParams(WeightingParams):
    beta: Annotated[float, Field(gt=0.0, le=1.0)] = 0.01
    seed: int = 0


def gradvac_coefficients(gram: Tensor, targets: Tensor, beta: float, generator: torch.Generator) -> Tensor:
    """C [T, T] with g_i' = Σ_j C_ij g_j, from the Gram matrix [T, T]; updates ``targets`` [T, T]
    (φ̂) in place."""
    n = gram.shape[0]
    coef = torch.eye(n, dtype=gram.dtype)
    for i in range(n):
        for j in torch.randperm(n, generator=generator).tolist():
            if j == i or gram[j, j] <= 0:
                continue
            norm_i = math.sqrt(max(float(coef[i] @ gram @ coef[i]), 0.0))
            norm_j = math.sqrt(float(gram[j, j]))
            cos = float(coef[i] @ gram[:, j]) / max(norm_i * norm_j, EPS)
            target = float(targets[i, j])
            if cos < target:
                coef[i, j] += (
                    norm_i
                    * (target * math.sqrt(max(1 - cos**2, 0.0)) - cos * math.sqrt(max(1 - target**2, 0.0)))
                    / max(norm_j * math.sqrt(max(1 - target**2, 0.0)), EPS)
                )
            targets[i, j] = (1 - beta) * target + beta * cos
    return coef


class GradVac:
    def __init__(self, n_tasks: int, beta: float, seed: int) -> None:
        self.beta = beta
        self.targets = torch.zeros(n_tasks, n_tasks, dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)

    def combine(self, grads: Tensor, losses: Tensor) -> Tensor:
        gram = (grads @ grads.T).double()
        return gradvac_coefficients(gram, self.targets, self.beta, self.generator).sum(0).to(grads.dtype)

    @property
    def capabilities(self) -> StrategyCapabilities:
        return StrategyCapabilities(state=self, task_gradients=True)  # the targets and the order's generator

    def backward(self, losses: Tensor, model: nn.Module) -> Tensor:
        return backward_with_shared(losses, model, self.combine)

    def state_dict(self) -> dict[str, Tensor]:
        return {"targets": self.targets, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.targets = state["targets"].clone().double()
        self.generator.set_state(state["generator"].to(torch.uint8))


@register_weighting("gradvac", GradVacParams, "task gradients steered to each pair's usual similarity (ICLR 2021)")
def build(params: GradVacParams, tasks: list[str]) -> GradVac:
    return GradVac(len(tasks), params.beta, params.seed)

"""PCGrad: projecting conflicting gradients.

Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task Learning", NeurIPS 2020,
Algorithm 1. On the shared parameters, each task gradient g_i starts as g_i^PC = g_i; for every other
task j, in a random order drawn anew for each i and each step, if g_i^PC · g_j < 0 it is projected
onto the normal plane of g_j:

    g_i^PC ← g_i^PC − (g_i^PC · g_j / ||g_j||²) · g_j

and the update is Σ_i g_i^PC. Task-specific parameters get their ordinary gradient. The order comes
from a generator seeded with ``seed``.

Every g_i^PC is a linear combination Σ_j C_ij g_j of the original gradients, so the whole procedure
runs on the K × K Gram matrix; the update is Σ_j c_j g_j with c_j = Σ_i C_ij, and c is what is
logged as the weights (1 for every task when no gradients conflict).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtlcli.weighting.base import SeededDraws, StrategyCapabilities, WeightingParams, register_weighting
from mtlcli.weighting.gradients import backward_with_shared


class PCGradParams(WeightingParams):
    seed: int = 0


def pcgrad_coefficients(gram: Tensor, generator: torch.Generator) -> Tensor:
    """C [T, T] with g_i^PC = Σ_j C_ij g_j, from the Gram matrix gram[i, j] = g_i · g_j."""
    n = gram.shape[0]
    coef = torch.eye(n, dtype=gram.dtype)
    for i in range(n):
        for j in torch.randperm(n, generator=generator).tolist():
            if j == i:
                continue
            dot = coef[i] @ gram[:, j]
            if dot < 0 and gram[j, j] > 0:
                coef[i, j] -= dot / gram[j, j]
    return coef


class PCGrad:
    def __init__(self, seed: int) -> None:
        self.draws = SeededDraws(seed)

    def combine(self, grads: Tensor, losses: Tensor) -> Tensor:
        gram = (grads @ grads.T).double()
        return pcgrad_coefficients(gram, self.draws.generator).sum(0).to(grads.dtype)

    @property
    def capabilities(self) -> StrategyCapabilities:
        return StrategyCapabilities(state=self.draws, task_gradients=True)  # the projection order

    def backward(self, losses: Tensor, model: nn.Module) -> Tensor:
        return backward_with_shared(losses, model, self.combine)


@register_weighting("pcgrad", PCGradParams, "project conflicting task gradients off each other (NeurIPS 2020)")
def build(params: PCGradParams, tasks: list[str]) -> PCGrad:
    return PCGrad(params.seed)

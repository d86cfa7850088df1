"""Aligned-MTL: align the task gradients' principal components.

Senushkin, Patakin, Kuznetsov, Konushin, "Independent Component Alignment for Multi-Task
Learning", CVPR 2023, Algorithm 1. With G = [g_1 … g_K] the task gradients on the shared
parameters and its Gram matrix GᵀG = V Λ Vᵀ, the gradients are replaced by

    Ĝ = σ_min · G V Λ^(-1/2) Vᵀ,   σ_min = √λ_min

whose Gram matrix is σ_min² · I: the aligned task gradients are orthogonal and of one norm (the
system's condition number is 1), and its smallest singular value keeps the scale of the update.
The update is Ĝ w with w the task preferences, here w = 1 for every task (the plain sum, as
``equal``). Task-specific parameters get their ordinary gradient.

Eigenvalues below ``1e-10 · λ_max`` belong to directions no task moves (linearly dependent
gradients); they are left out of V, Λ and λ_min, as the paper's reduction to the non-zero
singular values does. The logged weights are the coefficients c = σ_min V Λ^(-1/2) Vᵀ w of the
raw gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtlcli.weighting.base import StrategyCapabilities, WeightingParams, register_weighting
from mtlcli.weighting.gradients import backward_with_shared

RANK_TOL = 1e-10


class AlignedMTLParams(WeightingParams):
    pass


def aligned_coefficients(gram: Tensor) -> Tensor:
    """c [T] with Ĝ·1 = G c, from the Gram matrix GᵀG [T, T]; zero when every gradient is zero."""
    values, vectors = torch.linalg.eigh(gram.double())
    keep = values > RANK_TOL * values.max().clamp_min(0)
    if not bool(keep.any()) or float(values.max()) <= 0:
        return torch.zeros(gram.shape[0], dtype=gram.dtype)
    values, vectors = values[keep], vectors[:, keep]
    balance = values.min().sqrt() * (vectors / values.sqrt()) @ vectors.T  # σ_min V Λ^(-1/2) Vᵀ
    return balance.sum(1).to(gram.dtype)


class AlignedMTL:
    def combine(self, grads: Tensor, losses: Tensor) -> Tensor:
        return aligned_coefficients(grads @ grads.T).to(grads.dtype)

    capabilities = StrategyCapabilities(task_gradients=True)

    def backward(self, losses: Tensor, model: nn.Module) -> Tensor:
        return backward_with_shared(losses, model, self.combine)


@register_weighting("aligned_mtl", AlignedMTLParams, "task gradients aligned to one condition number (CVPR 2023)")
def build(params: AlignedMTLParams, tasks: list[str]) -> AlignedMTL:
    return AlignedMTL()

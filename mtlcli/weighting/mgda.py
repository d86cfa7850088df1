"""MGDA: the min-norm point in the convex hull of the task gradients.

Sener, Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018. On the shared
parameters the update is Σ_k α_k g_k with

    α = argmin_{α ≥ 0, Σ α_k = 1} || Σ_k α_k g_k ||²

found in closed form for two tasks (α_1 = clip((g_2 − g_1)·g_2 / ||g_1 − g_2||², 0, 1),
α_2 = 1 − α_1; Algorithm 1) and by the paper's Frank–Wolfe solver for more (Algorithm 2).
Task-specific parameters get their ordinary gradient. ``normalize: l2`` first divides each g_k by its
norm (the paper's implementation offers this); the logged weights are then the coefficients of
the raw gradients, α_k / ||g_k||.

``upper_bound: true`` is MGDA-UB (section 3.3): the task gradients are taken on the scheme's shared
representation z instead of the shared parameters (the min-norm problem on ∂L_k/∂z minimises an
upper bound of the original one), so the per-task passes stop at z and one backward pass of
Σ_k α_k L_k trains the shared parameters. Every scheme says what its z is (``SharedRepresentation``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import PositiveInt
from torch import Tensor, nn

from mtlcli.weighting.base import StrategyCapabilities, WeightingParams, register_weighting
from mtlcli.weighting.gradients import backward_with_representation, backward_with_shared


class MGDAParams(WeightingParams):
    normalize: Literal["none", "l2"] = "none"
    max_iter: PositiveInt = 250
    upper_bound: bool = False


def min_norm_pair(aa: float, ab: float, bb: float) -> float:
    """γ in [0, 1] minimising ||γ a + (1 − γ) b||², from a·a, a·b and b·b."""
    denom = aa - 2 * ab + bb
    if denom <= 0:
        return 0.5
    return min(max((bb - ab) / denom, 0.0), 1.0)


def min_norm_weights(gram: Tensor, max_iter: int = 250, tol: float = 1e-10) -> Tensor:
    """α on the simplex minimising αᵀ gram α (Frank–Wolfe; exact for two tasks). gram: [T, T]."""
    n = gram.shape[0]
    if n == 1:
        return torch.ones(1, dtype=gram.dtype)
    if n == 2:
        gamma = min_norm_pair(float(gram[0, 0]), float(gram[0, 1]), float(gram[1, 1]))
        return torch.tensor([gamma, 1 - gamma], dtype=gram.dtype)
    alpha = torch.full((n,), 1.0 / n, dtype=gram.dtype)
    for _ in range(max_iter):
        t = int(torch.argmin(gram @ alpha))
        # Line search between the current point v = Σ α g and the vertex g_t.
        vv = float(alpha @ gram @ alpha)
        vt = float(gram[t] @ alpha)
        tt = float(gram[t, t])
        gamma = min_norm_pair(tt, vt, vv)
        step = gamma * (torch.nn.functional.one_hot(torch.tensor(t), n).to(gram.dtype) - alpha)
        alpha = alpha + step
        if float(step.abs().sum()) < tol:
            break
    return alpha


class MGDA:
    def __init__(self, normalize: str, max_iter: int, upper_bound: bool = False) -> None:
        self.normalize, self.max_iter, self.upper_bound = normalize, max_iter, upper_bound

    @property
    def capabilities(self) -> StrategyCapabilities:
        """MGDA-UB reads the model's shared representation: the loop has it kept."""
        return StrategyCapabilities(needs_representation=self.upper_bound, task_gradients=True)

    def combine(self, grads: Tensor, losses: Tensor) -> Tensor:
        scale = torch.ones(grads.shape[0], dtype=torch.float64)
        if self.normalize == "l2":
            scale = 1.0 / grads.double().norm(dim=1).clamp_min(1e-12)
        g = grads.double() * scale[:, None]
        alpha = min_norm_weights(g @ g.T, self.max_iter)
        return (alpha * scale).to(grads.dtype)

    def backward(self, losses: Tensor, model: nn.Module) -> Tensor:
        if self.upper_bound:
            return backward_with_representation(losses, model, self.combine)
        return backward_with_shared(losses, model, self.combine)


@register_weighting("mgda", MGDAParams, "min-norm convex combination of the task gradients (NeurIPS 2018)")
def build(params: MGDAParams, tasks: list[str]) -> MGDA:
    return MGDA(params.normalize, params.max_iter, params.upper_bound)

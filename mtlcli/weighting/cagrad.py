"""CAGrad: conflict-averse gradient descent.

Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021,
Algorithm 1. With g_0 = (1/K) Σ_k g_k the average gradient on the shared parameters and
φ = c² ||g_0||², find

    w* = argmin_{w on the simplex}  g_wᵀ g_0 + √φ · ||g_w||,   g_w = Σ_k w_k g_k

(the dual of maximising the worst task's improvement within a ball of radius √φ around g_0) and
update along d = g_0 + (√φ / ||g_w*||) · g_w*. c = 0 gives plain gradient descent on the average
loss. The dual is a K-dimensional convex problem on the Gram matrix, solved by projected gradient
descent with backtracking. Task-specific parameters get their ordinary gradient.

The logged weights are the coefficients of d = Σ_k (1/K + λ w*_k) g_k, λ = √φ / ||g_w*||. Like
the paper (and unlike ``equal``), the shared update is on the scale of the average gradient; with
Adam an overall scale makes no difference.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import NonNegativeFloat
from torch import Tensor, nn

from mtlcli.weighting.base import StrategyCapabilities, WeightingParams, register_weighting
from mtlcli.weighting.gradients import backward_with_shared

EPS = 1e-12


class CAGradParams(WeightingParams):
    c: NonNegativeFloat = 0.5


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {w ≥ 0, Σ w = 1}."""
    u = np.sort(v)[::-1]
    cum = np.cumsum(u) - 1.0
    k = np.arange(1, len(v) + 1)
    rho = int(np.nonzero(u - cum / k > 0)[0][-1])
    return np.maximum(v - cum[rho] / (rho + 1), 0.0)


def cagrad_dual(gram: np.ndarray, c: float, max_iter: int = 500, tol: float = 1e-12) -> np.ndarray:
    """w* on the simplex minimising wᵀ G b + c·||g_0||·sqrt(wᵀ G w), b = 1/K (G = Gram matrix)."""
    n = gram.shape[0]
    b = np.full(n, 1.0 / n)
    gb = gram @ b
    radius = c * math.sqrt(max(float(b @ gb), 0.0))

    def value(w: np.ndarray) -> float:
        return float(w @ gb + radius * math.sqrt(max(float(w @ gram @ w), 0.0) + EPS))

    w = b.copy()
    f = value(w)
    step = 1.0 / max(float(np.abs(gram).max()), EPS)
    for _ in range(max_iter):
        gw = gram @ w
        grad = gb + radius * gw / math.sqrt(max(float(w @ gw), 0.0) + EPS)
        while True:
            candidate = project_simplex(w - step * grad)
            f_new = value(candidate)
            if f_new <= f - 1e-4 * float(grad @ (w - candidate)) or step < 1e-20:
                break
            step *= 0.5
        moved = float(np.abs(candidate - w).sum())
        w, f = candidate, f_new
        step *= 2.0
        if moved < tol:
            break
    return w


def cagrad_coefficients(gram: Tensor, c: float) -> Tensor:
    """Coefficients [T] of the CAGrad direction d = Σ_k coef_k g_k, from the Gram matrix [T, T]."""
    g = gram.detach().double().cpu().numpy()
    n = g.shape[0]
    w = cagrad_dual(g, c)
    g0_norm = math.sqrt(max(float(np.full(n, 1.0 / n) @ g @ np.full(n, 1.0 / n)), 0.0))
    gw_norm = math.sqrt(max(float(w @ g @ w), 0.0))
    lam = c * g0_norm / (gw_norm + EPS)
    return torch.from_numpy(1.0 / n + lam * w)


class CAGrad:
    def __init__(self, c: float) -> None:
        self.c = c

    def combine(self, grads: Tensor, losses: Tensor) -> Tensor:
        return cagrad_coefficients(grads @ grads.T, self.c).to(grads.dtype)

    capabilities = StrategyCapabilities(task_gradients=True)

    def backward(self, losses: Tensor, model: nn.Module) -> Tensor:
        return backward_with_shared(losses, model, self.combine)


@register_weighting("cagrad", CAGradParams, "conflict-averse gradient: best worst-task improvement near the mean")
def build(params: CAGradParams, tasks: list[str]) -> CAGrad:
    return CAGrad(params.c)

"""Nash-MTL: the Nash bargaining solution among the tasks.

Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, "Multi-Task Learning as a
Bargaining Game", ICML 2022. The update on the shared parameters is d = Σ_k α_k g_k with α the
positive solution of

    GᵀG α = 1/α   (elementwise: g_kᵀ d = 1/α_k for every task)

the Nash bargaining point of the tasks' utilities g_kᵀ d (Theorem 3.1). Task-specific parameters
get their ordinary gradient.

Solved in-house and exactly: GᵀG α = 1/α is the stationarity condition of the strictly convex
f(α) = ½ αᵀ GᵀG α − Σ_k log α_k on α > 0, so damped Newton steps on f (backtracking to stay
positive) find the unique solution in a few iterations, warm-started from the last step's α.
The paper approximates the same point by a sequence of convex programs (cvxpy); no solver is
needed here. Two choices (docs/methods.md): like the authors' implementation, the Gram matrix is
divided by its Frobenius norm first, so that the update keeps the scale of the gradients
(the exact solution's update always has norm √K); and a ridge of 1e-6 · I is added to it, so that
a solution exists when the gradients are linearly dependent (it caps α_k near 10³). The logged
weights are α.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import PositiveInt
from torch import Tensor, nn

from mtlcli.weighting.base import StrategyCapabilities, WeightingParams, register_weighting
from mtlcli.weighting.gradients import backward_with_shared

RIDGE = 1e-6


class NashMTLParams(WeightingParams):
    max_iter: PositiveInt = 50


def nash_weights(gram: np.ndarray, start: np.ndarray | None = None, max_iter: int = 50) -> np.ndarray:
    """α > 0 with gram α = 1/α (gram [T, T] positive definite), by Newton's method on
    ½ αᵀ gram α − Σ log α."""
    n = gram.shape[0]
    alpha = np.ones(n) if start is None else start.copy()

    def value(a: np.ndarray) -> float:
        return float(0.5 * a @ gram @ a - np.log(a).sum())

    f = value(alpha)
    for _ in range(max_iter):
        grad = gram @ alpha - 1.0 / alpha
        hessian = gram + np.diag(1.0 / alpha**2)
        step = -np.linalg.solve(hessian, grad)
        decrement = float(-grad @ step)
        if decrement < 1e-20:
            break
        t = 1.0
        while np.any(alpha + t * step <= 0):
            t *= 0.5
        while value(alpha + t * step) > f - 0.25 * t * decrement and t > 1e-12:
            t *= 0.5
        alpha = alpha + t * step
        f = value(alpha)
    return alpha


class NashMTL:
    def __init__(self, n_tasks: int, max_iter: int) -> None:
        self.max_iter = max_iter
        self.alpha = torch.ones(n_tasks, dtype=torch.float64)

    def combine(self, grads: Tensor, losses: Tensor) -> Tensor:
        gram = (grads @ grads.T).double().numpy()
        scale = float(np.linalg.norm(gram))
        if scale <= 0:
            return torch.zeros(grads.shape[0], dtype=grads.dtype)
        normalised = gram / scale + RIDGE * np.eye(len(gram))
        self.alpha = torch.from_numpy(nash_weights(normalised, self.alpha.numpy(), self.max_iter))
        return self.alpha.to(grads.dtype)

    @property
    def capabilities(self) -> StrategyCapabilities:
        return StrategyCapabilities(state=self, task_gradients=True)  # the last α (the warm start)

    def backward(self, losses: Tensor, model: nn.Module) -> Tensor:
        return backward_with_shared(losses, model, self.combine)

    def state_dict(self) -> dict[str, Tensor]:
        return {"alpha": self.alpha}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.alpha = state["alpha"].clone().double()


@register_weighting("nash_mtl", NashMTLParams, "Nash bargaining among the task gradients (ICML 2022)")
def build(params: NashMTLParams, tasks: list[str]) -> NashMTL:
    return NashMTL(len(tasks), params.max_iter)

"""Nash-MTL (ICML 2022) against its bargaining equations on hand-made gradients."""

from __future__ import annotations

import numpy as np
import torch

from mtlcli.weighting.nash_mtl import RIDGE, nash_weights
from tests.weighting.test_weighting_strategies import step


def test_weights_solve_the_bargaining_equations() -> None:
    grads = torch.tensor([[1.0, 0.0, 0.5, 2.0], [1.0, 1.0, 0.0, -1.0], [0.0, -1.0, 2.0, 0.5]])
    weights, update = step("nash_mtl", grads.tolist())
    gram = (grads @ grads.T).double()
    normalised = gram / torch.linalg.norm(gram) + RIDGE * torch.eye(3, dtype=torch.float64)
    alpha = weights.double()
    # GᵀG α = 1/α on the normalised Gram matrix: every task's utility times its weight is 1
    assert torch.allclose(alpha * (normalised @ alpha), torch.ones(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(update, weights @ grads, atol=1e-5)


def test_orthogonal_gradients_get_the_inverse_square_root_of_their_norm() -> None:
    weights, _ = step("nash_mtl", [[3.0, 0.0], [0.0, 4.0]])
    frobenius = (81.0 + 256.0) ** 0.5
    expected = [(9 / frobenius + RIDGE) ** -0.5, (16 / frobenius + RIDGE) ** -0.5]
    assert torch.allclose(weights.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)


def test_newton_reaches_the_solution_from_a_far_start() -> None:
    gram = np.array([[2.0, -0.5], [-0.5, 0.3]])
    alpha = nash_weights(gram, start=np.array([100.0, 1e-3]))
    assert np.allclose(alpha * (gram @ alpha), 1.0, atol=1e-8)

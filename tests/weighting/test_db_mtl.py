"""DB-MTL (2023) against its update rule on hand-made gradients."""

from __future__ import annotations

import math

import torch

from tests.weighting.test_weighting_strategies import Linear, TwoHeads, build


def backward(strategy, grads: list[list[float]], losses_at: list[float]) -> tuple:  # type: ignore[no-untyped-def]
    model = Linear(2)
    losses = torch.tensor(grads) @ model.theta + torch.tensor(losses_at)
    weights = strategy.backward(losses, model)
    return weights, model.theta.grad


def test_log_losses_then_every_average_gets_the_largest_norm() -> None:
    weights, update = backward(build("db_mtl", beta=0.9), [[2.0, 0.0], [0.0, 1.0]], [2.0, 0.5])
    # ∇log L = g / L: (1, 0) and (0, 2); ĝ = 0.1 ∇log L, norms 0.1 and 0.2; factors 2 and 1
    assert torch.allclose(weights, torch.tensor([2.0, 1.0]))
    assert torch.allclose(update, torch.tensor([0.2, 0.2]))


def test_moving_averages_over_steps_with_a_decaying_beta() -> None:
    strategy = build("db_mtl", beta=0.8, sigma=1.0)
    backward(strategy, [[1.0, 0.0], [0.0, 1.0]], [1.0, 1.0])  # β_1 = 0.8
    _, update = backward(strategy, [[0.0, 1.0], [1.0, 1.0]], [1.0, 1.0])  # β_2 = 0.4
    first = torch.tensor([[1.0, 0.0], [0.0, 1.0]]) * 0.2
    averages = 0.4 * first + 0.6 * torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    norms = averages.norm(dim=1)
    assert torch.allclose(update, (norms.max() / norms) @ averages)


def test_task_parameters_get_the_gradient_of_the_log_losses() -> None:
    model = TwoHeads()
    build("db_mtl").backward(model.losses(), model)
    assert model.a.grad is not None and model.b.grad is not None
    # ∂ log(a θ_0)/∂a = 1/a
    assert math.isclose(float(model.a.grad), 1 / 3, rel_tol=1e-6)
    assert math.isclose(float(model.b.grad), 1 / 5, rel_tol=1e-6)

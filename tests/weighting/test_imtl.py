"""IMTL (ICLR 2021) against its definition on hand-made gradients."""

from __future__ import annotations

import math

import torch

from mtlcli.weighting.imtl import imtl_coefficients
from tests.weighting.test_weighting_strategies import Linear, TwoHeads, build, step


def test_two_tasks_get_equal_projections_in_closed_form() -> None:
    weights, update = step("imtl", [[1.0, 0.0], [0.0, 2.0]])
    # d = α_1 g_1 + α_2 g_2 with d·u_1 = d·u_2 and α_1 + α_2 = 1: α = (2/3, 1/3)
    assert torch.allclose(weights, torch.tensor([2 / 3, 1 / 3]))
    assert torch.allclose(update, torch.tensor([2 / 3, 2 / 3]))


def test_the_update_projects_equally_on_every_unit_gradient() -> None:
    grads = torch.tensor([[1.0, 0.2, 0.5, -1.0], [0.3, 2.0, 0.0, 0.4], [-0.5, 0.1, 3.0, 0.2]], dtype=torch.float64)
    alpha = imtl_coefficients(grads @ grads.T)
    d = alpha @ grads
    projections = grads @ d / grads.norm(dim=1)
    assert torch.allclose(projections, projections[0].expand(3))
    assert math.isclose(float(alpha.sum()), 1.0)


def test_scales_learn_toward_unit_scaled_losses_and_scale_the_gradients() -> None:
    strategy = build("imtl")
    with torch.no_grad():
        strategy.log_scale.copy_(torch.tensor([math.log(2.0), 0.0]))
    model = Linear(2)
    losses = torch.tensor([[1.0, 0.0], [0.0, 2.0]]) @ model.theta + torch.tensor([2.0, 0.5])
    weights = strategy.backward(losses, model)
    # ∂(e^s L − s)/∂s = e^s L − 1
    assert torch.allclose(strategy.log_scale.grad, torch.tensor([3.0, -0.5]))
    # scaled gradients (2, 0) and (0, 2): equal norms, so α = (1/2, 1/2); raw coefficients α e^s
    assert torch.allclose(weights, torch.tensor([1.0, 0.5]))


def test_task_parameters_get_the_scaled_losses_gradient() -> None:
    strategy = build("imtl")
    with torch.no_grad():
        strategy.log_scale.copy_(torch.tensor([math.log(3.0), 0.0]))
    model = TwoHeads()
    strategy.backward(model.losses(), model)
    assert model.a.grad is not None and model.b.grad is not None
    assert math.isclose(float(model.a.grad), 3.0 * 1.0)  # e^s · ∂(a θ_0)/∂a = 3 · θ_0
    assert math.isclose(float(model.b.grad), 2.0)

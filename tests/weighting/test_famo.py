"""FAMO (NeurIPS 2023) against its update rules on hand-made losses."""

from __future__ import annotations

import math

import torch

from mtlcli.weighting.famo import famo_logit_gradient
from tests.weighting.test_weighting_strategies import Linear, build


def test_first_step_weights_each_loss_by_its_inverse_on_the_simplex() -> None:
    strategy = build("famo")
    model = Linear(2)
    grads = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    weights = strategy.backward(grads @ model.theta + torch.tensor([1.0, 3.0]), model)
    # z uniform: w_k = c z_k / L_k with c = 1 / Σ z_i / L_i
    assert torch.allclose(weights, torch.tensor([0.75, 0.25]))
    assert model.theta.grad is not None
    assert torch.allclose(model.theta.grad, torch.tensor([0.75, 0.5]))


def test_logit_gradient_is_the_softmax_jacobian_times_the_log_loss_decrease() -> None:
    logits = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    before, after = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), torch.tensor([0.8, 1.9, 0.45])
    delta = before.log() - after.double().log()
    (torch.softmax(logits, 0) @ delta).backward()
    expected = logits.grad + 0.01 * logits.detach()
    got = famo_logit_gradient(logits.detach(), before, after.double(), 0.01)
    assert torch.allclose(got, expected)


def test_the_task_whose_loss_fell_least_gains_weight_by_one_adam_step() -> None:
    strategy = build("famo", lr=0.025, decay=0.0)
    strategy.backward(torch.tensor([1.0, 3.0], requires_grad=True), Linear(2))
    losses = torch.tensor([0.5, 2.9], requires_grad=True)  # task 0 halved, task 1 barely moved
    weights = strategy.backward(losses, Linear(2))
    # Adam's first step moves each logit by lr against its gradient's sign: ξ = (−0.025, 0.025)
    z = torch.softmax(torch.tensor([-0.025, 0.025]), 0)
    expected = (z / losses.detach()) / (z / losses.detach()).sum()
    assert torch.allclose(weights, expected)
    assert math.isclose(float(strategy.logits[1] - strategy.logits[0]), 0.05, rel_tol=1e-6)

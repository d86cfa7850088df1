"""GradVac (ICLR 2021) against its update rule on hand-made gradients."""

from __future__ import annotations

import math

import torch

from mtlcli.weighting.gradvac import gradvac_coefficients
from tests.weighting.test_weighting_strategies import Linear, build, step


def test_with_zero_targets_a_conflict_is_projected_away_as_pcgrad_does() -> None:
    weights, update = step("gradvac", [[1.0, 0.0], [-1.0, 1.0]])
    # g_1' = g_1 − (g_1·g_2/|g_2|²) g_2 = (0.5, 0.5); g_2' = g_2 − (g_2·g_1/|g_1|²) g_1 = (0, 1)
    assert torch.allclose(update, torch.tensor([0.5, 1.5]))
    assert torch.allclose(weights, torch.tensor([2.0, 1.5]))


def test_a_gradient_is_steered_to_the_target_similarity() -> None:
    gram = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)  # g_1 = (1, 0), g_2 = (0, 2)
    targets = torch.tensor([[0.0, 0.5], [-0.1, 0.0]], dtype=torch.float64)
    coef = gradvac_coefficients(gram, targets, 0.01, torch.Generator().manual_seed(0))
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    new = coef @ g
    cos = float(new[0] @ g[1] / (new[0].norm() * g[1].norm()))
    assert math.isclose(cos, 0.5, rel_tol=1e-9)  # g_1 moved toward g_2 to the target
    assert torch.allclose(new[1], g[1])  # cos 0 ≥ target −0.1: g_2 unchanged
    # the targets follow φ̂ ← (1 − β) φ̂ + β φ with this step's similarity (0 for both pairs)
    assert torch.allclose(targets, torch.tensor([[0.0, 0.495], [-0.099, 0.0]], dtype=torch.float64))


def test_targets_move_toward_the_observed_similarity_over_steps() -> None:
    strategy = build("gradvac", beta=0.5)
    for _ in range(2):
        model = Linear(2)
        strategy.backward(torch.tensor([[1.0, 1.0], [1.0, 0.0]]) @ model.theta + 1.0, model)
    cos = 1 / math.sqrt(2)  # no conflict with targets below it: both gradients are left alone
    assert torch.allclose(strategy.targets, torch.tensor([[0.0, 0.75 * cos], [0.75 * cos, 0.0]], dtype=torch.float64))

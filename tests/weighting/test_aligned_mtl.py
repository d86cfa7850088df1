"""Aligned-MTL (CVPR 2023) against its definition on hand-made gradients."""

from __future__ import annotations

import torch

from mtlcli.weighting.aligned_mtl import aligned_coefficients
from tests.weighting.test_weighting_strategies import step


def test_update_is_the_sum_of_the_aligned_gradients_from_the_svd() -> None:
    grads = [[1.0, 0.0, 0.5], [1.0, 1.0, 0.0], [0.0, -1.0, 2.0]]
    weights, update = step("aligned_mtl", grads)
    g = torch.tensor(grads).T  # [P, T]: columns are the task gradients
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    aligned = s.min() * u @ vh  # σ_min · G V Λ^(-1/2) Vᵀ = σ_min U Vᵀ
    assert torch.allclose(update, aligned.sum(1), atol=1e-5)
    assert torch.allclose(g @ weights, update, atol=1e-5)
    gram = aligned.T @ aligned  # orthogonal, every norm σ_min
    assert torch.allclose(gram, s.min() ** 2 * torch.eye(3), atol=1e-5)


def test_orthogonal_gradients_are_brought_to_the_smallest_norm() -> None:
    weights, update = step("aligned_mtl", [[2.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(weights, torch.tensor([0.5, 1.0]))
    assert torch.allclose(update, torch.tensor([1.0, 1.0]))


def test_a_dependent_gradient_leaves_the_weights_finite() -> None:
    coef = aligned_coefficients(torch.tensor([[1.0, 2.0], [2.0, 4.0]]))  # g_2 = 2 g_1
    assert torch.isfinite(coef).all()
    assert float(coef @ torch.tensor([[1.0, 2.0], [2.0, 4.0]]) @ coef) > 0

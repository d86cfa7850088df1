"""DEPHN's gate control (mtlcli/models/gate_control.py): each formula against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mtlcli.explain.correlation import pearson
from mtlcli.models.blocks import FieldLayout
from mtlcli.models.gate_control import (
    FieldMapping,
    LabelCorrelation,
    controlled_gate_logits,
    gate_coefficients,
    gate_difference,
    label_moments,
    pearson_from_moments,
    virtual_gradient,
)


def test_field_mapping_scales_each_field() -> None:
    mapping = FieldMapping(FieldLayout(n_categorical=2, dim=2, n_numeric=1))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    assert torch.equal(mapping(x), x)  # s starts at 1: the flat input
    with torch.no_grad():
        mapping.scales.copy_(torch.tensor([2.0, 0.5, 3.0]))
    out = mapping(x)
    assert out.shape == (1, 5)
    assert out[0].tolist() == [2.0, 4.0, 1.5, 2.0, 15.0]
    out.sum().backward()
    assert mapping.scales.grad is not None
    # d/ds_f of Σ φ(x) is the sum of field f's entries
    assert mapping.scales.grad.tolist() == [3.0, 7.0, 5.0]
    assert list(mapping.state_dict()) == ["scales"]


def test_the_virtual_gradient_scales_the_gate_path_only() -> None:
    torch.manual_seed(0)
    gate, expert = nn.Linear(3, 4), nn.Linear(3, 4)
    x = torch.randn(5, 3)

    def grads(coefficient: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gate.zero_grad()
        expert.zero_grad()
        logits = virtual_gradient(gate(x), coefficient)  # [B, n]
        loss = (torch.softmax(logits, -1) * expert(x)).sum()
        loss.backward()
        assert gate.weight.grad is not None and expert.weight.grad is not None
        return loss.detach(), gate.weight.grad.clone(), expert.weight.grad.clone()

    loss1, gate1, expert1 = grads(1.0)
    loss3, gate3, expert3 = grads(torch.tensor(3.0))
    assert torch.equal(loss1, loss3)  # the forward pass is the identity
    assert torch.allclose(gate3, 3.0 * gate1, rtol=1e-6, atol=0.0)
    assert torch.equal(expert3, expert1)
    assert torch.equal(virtual_gradient(x, 2.0), x)
    with pytest.raises(ValueError, match="one number per gate"):
        virtual_gradient(x, torch.ones(3))


def test_a_controlled_gate_scales_its_own_and_its_mappings_gradients_only() -> None:
    torch.manual_seed(0)
    layout = FieldLayout(n_categorical=2, dim=2, n_numeric=1)
    gate, mapping = nn.Linear(5, 3), FieldMapping(layout)
    with torch.no_grad():
        mapping.scales.uniform_(0.5, 1.5)
    x = torch.randn(4, 5, dtype=torch.float64)
    gate.double()
    mapping.double()
    target = torch.randn(4, 3, dtype=torch.float64)

    def grads(coefficient: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        gate.zero_grad()
        mapping.zero_grad()
        leaf = x.clone().requires_grad_()
        logits = controlled_gate_logits(gate, mapping, leaf, torch.tensor(coefficient, dtype=torch.float64))
        ((torch.softmax(logits, -1) * target).sum()).backward()
        assert gate.weight.grad is not None and mapping.scales.grad is not None and leaf.grad is not None
        return logits.detach(), gate.weight.grad.clone(), mapping.scales.grad.clone(), leaf.grad

    logits1, gate1, scales1, x1 = grads(1.0)
    logits4, gate4, scales4, x4 = grads(4.0)
    assert torch.equal(logits4, logits1)
    assert torch.equal(logits1, gate(mapping(x)).detach())  # gate(φ(x))
    assert torch.allclose(gate4, 4.0 * gate1, rtol=1e-12, atol=0.0)
    assert torch.allclose(scales4, 4.0 * scales1, rtol=1e-12, atol=0.0)
    assert torch.allclose(x4, x1, rtol=1e-12, atol=1e-15)  # the shared input's gradient is not scaled


def test_gate_difference_is_the_mean_total_variation_to_the_other_gates() -> None:
    mean_gates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    # TV(0,1) = 1, TV(0,2) = TV(1,2) = 0.5
    assert gate_difference(mean_gates).tolist() == [0.75, 0.75, 0.5]
    alike = torch.tensor([[0.2, 0.3, 0.5], [0.2, 0.3, 0.5]])
    assert gate_difference(alike).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="two tasks"):
        gate_difference(torch.tensor([[1.0, 0.0]]))


LABELS = torch.tensor(
    [
        [1.0, 1.0, 1.0],
        [0.0, 0.0, 1.0],
        [1.0, 0.0, 1.0],
        [0.0, 0.0, 1.0],
        [1.0, 9.0, 1.0],  # task 1 unobserved here: its 9 must not count
        [7.0, 1.0, 1.0],  # task 0 unobserved here
    ]
)
MASK = torch.tensor([[True] * 3] * 4 + [[True, False, True], [False, True, True]])


def test_pearson_on_the_rows_both_tasks_observe() -> None:
    rho, defined = pearson_from_moments(label_moments(LABELS, MASK))
    # x = (1, 0, 1, 0), y = (1, 0, 0, 0): cov 0.5, var 1 and 0.75 -> 0.5 / sqrt(0.75)
    assert rho[0, 1].item() == pytest.approx(0.5 / math.sqrt(0.75), abs=1e-12)
    assert rho[1, 0].item() == pytest.approx(rho[0, 1].item(), abs=1e-12)
    assert rho[0, 1].item() == pytest.approx(pearson(LABELS[:4, 0], LABELS[:4, 1]), abs=1e-12)
    assert bool(defined[0, 1]) and not bool(defined[0, 2]) and not bool(defined[1, 2])  # task 2 is constant
    assert rho[0, 2].item() == 0.0
    # moments are sums: two halves of a batch give the whole batch's moments
    halves = label_moments(LABELS[:3], MASK[:3]) + label_moments(LABELS[3:], MASK[3:])
    assert torch.equal(halves, label_moments(LABELS, MASK))


def test_label_correlation_is_a_moving_average_kept_in_the_state_dict() -> None:
    tracker = LabelCorrelation(3, decay=0.9)
    first = tracker.update(label_moments(LABELS, MASK))
    r = 0.5 / math.sqrt(0.75)
    # the first defined batch sets the average; a pair never seen (task 2's) counts 0
    assert first.tolist() == pytest.approx([r / 2, r / 2, 0.0], abs=1e-12)
    anti = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])  # ρ_01 = -1, ρ_02 = -0.5
    second = tracker.update(label_moments(anti, torch.ones(3, 3, dtype=torch.bool)))
    smoothed = 0.9 * r + 0.1 * 1.0
    rho_12 = pearson(anti[:, 1], anti[:, 2])
    assert rho_12 is not None
    assert second.tolist() == pytest.approx(
        [(smoothed + 0.5) / 2, (smoothed + abs(rho_12)) / 2, (0.5 + abs(rho_12)) / 2], abs=1e-12
    )
    # a batch on which nothing is defined leaves the average
    flat = tracker.update(label_moments(torch.ones(3, 3), torch.ones(3, 3, dtype=torch.bool)))
    assert torch.equal(flat, second)
    restored = LabelCorrelation(3, decay=0.9)
    restored.load_state_dict(tracker.state_dict())
    assert set(tracker.state_dict()) == {"average", "seen"}
    assert torch.equal(restored.task_correlation(), second)


def test_lambda_responds_to_gate_difference_and_to_correlation_within_its_clip() -> None:
    def lam(d: float, c: float) -> float:
        return gate_coefficients(torch.tensor([d]), torch.tensor([c])).item()

    # λ = clip(exp(5 (0.5 (1 - c) - d)), 0.1, 10)
    assert lam(0.5, 0.0) == pytest.approx(1.0)  # the difference wanted for uncorrelated tasks
    assert lam(0.25, 0.5) == pytest.approx(1.0)
    assert lam(0.6, 0.0) == pytest.approx(math.exp(-0.5))  # more different than wanted: slower
    assert lam(0.3, 0.0) == pytest.approx(math.exp(1.0))  # more alike than wanted: faster
    assert lam(0.2, 0.8) == pytest.approx(math.exp(-0.5))  # correlated tasks want alike gates
    assert lam(0.2, 0.2) == pytest.approx(math.exp(1.0))
    assert lam(0.0, 0.0) == 10.0  # exp(2.5) = 12.2, clipped
    assert lam(1.0, 1.0) == pytest.approx(0.1)  # exp(-5) = 0.0067, clipped
    per_task = gate_coefficients(torch.tensor([0.5, 0.6]), torch.tensor([0.0, 0.0]), kappa=2.0, delta=0.5)
    assert per_task.tolist() == pytest.approx([1.0, math.exp(-0.2)])

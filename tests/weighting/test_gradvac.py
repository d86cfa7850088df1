"""GradVac (ICLR 2021) against its update rule on hand-made gradients."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from mtlcli.weighting.gradvac import gradvac_coefficients, gradvac_group_coefficients
from tests.weighting import test_weighting_strategies as strategies
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


class TwoTensors(nn.Module):
    """L_k = a_k · α + b_k · β: task k's gradient is a_k on the shared tensor α and b_k on β."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(2))
        self.beta = nn.Parameter(torch.zeros(2))

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        return {"shared": {"alpha": self.alpha, "beta": self.beta}}


def two_tensor_step(granularity: str) -> tuple[Tensor, Tensor, object]:
    strategy = build("gradvac", granularity=granularity)
    model = TwoTensors()
    # α: a_1 = (1, 0), a_2 = (−1, 1) conflict (cos −1/√2); β: b_1 = (1, 0), b_2 = (2, 2) agree (cos 1/√2);
    # as one vector g_1 · g_2 = −1 + 2 = 1 > 0: no conflict as a whole
    grads = torch.tensor([[1.0, 0.0, 1.0, 0.0], [-1.0, 1.0, 2.0, 2.0]])
    weights = strategy.backward(torch.stack([g[:2] @ model.alpha + g[2:] @ model.beta for g in grads]) + 1.0, model)
    assert model.alpha.grad is not None and model.beta.grad is not None
    return weights, torch.cat([model.alpha.grad, model.beta.grad]), strategy


def test_per_parameter_each_tensor_has_its_own_rule_and_targets() -> None:
    weights, update, strategy = two_tensor_step("whole")
    assert torch.allclose(update, torch.tensor([0.0, 1.0, 3.0, 2.0]))  # g_1 + g_2, untouched
    assert torch.allclose(weights, torch.tensor([1.0, 1.0]))
    cos = 1 / math.sqrt(20)  # 1 / (√2 · √10)
    assert torch.allclose(strategy.targets, torch.tensor([[0.0, 0.01 * cos], [0.01 * cos, 0.0]], dtype=torch.float64))

    weights, update, strategy = two_tensor_step("parameter")
    # on α the conflict is projected away (zero targets): a_1' = (0.5, 0.5), a_2' = (0, 1); β is left alone
    assert torch.allclose(update, torch.tensor([0.5, 1.5, 3.0, 2.0]))
    # c_α = (2, 1.5), c_β = (1, 1), averaged with the tensors' sizes (2 and 2)
    assert torch.allclose(weights, torch.tensor([1.5, 1.25]))
    c = 0.01 / math.sqrt(2)
    expected = torch.tensor([[[0.0, -c], [-c, 0.0]], [[0.0, c], [c, 0.0]]], dtype=torch.float64)
    assert torch.allclose(strategy.targets, expected)


def test_the_grouped_rule_steers_each_group_to_its_own_target() -> None:
    gram = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)  # g_1 = (1, 0), g_2 = (0, 2)
    targets = torch.tensor([[[0.0, 0.5], [0.0, 0.0]], [[0.0, -0.3], [0.8, 0.0]]], dtype=torch.float64)
    coef = gradvac_group_coefficients(gram.repeat(2, 1, 1), targets, 0.01, torch.Generator().manual_seed(0))
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    new = coef @ g  # [2 groups, 2 tasks, 2]

    def cos(u: Tensor, v: Tensor) -> float:
        return float(u @ v / (u.norm() * v.norm()))

    assert math.isclose(cos(new[0, 0], g[1]), 0.5, rel_tol=1e-9)  # group 0: g_1 steered to 0.5
    assert torch.allclose(new[0, 1], g[1])  # cos 0 ≥ target 0
    assert torch.allclose(new[1, 0], g[0])  # group 1: cos 0 ≥ target −0.3
    assert math.isclose(cos(new[1, 1], g[0]), 0.8, rel_tol=1e-9)  # g_2 steered to 0.8


def test_one_group_is_the_whole_vector_rule() -> None:
    torch.manual_seed(0)
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    targets = (torch.rand(4, 4, dtype=torch.float64) - 0.5) * 1.5
    grouped = targets.clone()[None]
    for _ in range(3):
        g = torch.randn(4, 6, dtype=torch.float64)
        whole = gradvac_coefficients(g @ g.T, targets, 0.3, gen_a)
        one = gradvac_group_coefficients((g @ g.T)[None], grouped, 0.3, gen_b)
        assert torch.allclose(one[0], whole, rtol=1e-9, atol=1e-12)
        assert torch.allclose(grouped[0], targets, rtol=1e-9, atol=1e-12)


def test_per_parameter_targets_survive_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The strategies' round trip (6 steps, checkpoint, 6 more, bitwise), with one target block per tensor."""
    monkeypatch.setitem(strategies.STATEFUL, "gradvac", {"granularity": "parameter"})
    strategies.test_checkpoint_round_trip_continues_identically("gradvac", tmp_path)

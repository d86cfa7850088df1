"""CSRec's contrastive sharing (mtlcli/models/contrastive_sharing.py): each formula against values
worked out by hand."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

from mtlcli.models import contrastive_sharing as cs

MASKS = torch.tensor(
    [
        [[1.0, 1.0], [0.0, 1.0]],
        [[1.0, 0.0], [1.0, 1.0]],
        [[0.0, 0.0], [0.0, 1.0]],
    ]
)  # kept by: (0,0) tasks 0 and 1; (0,1) task 0; (1,0) task 1; (1,1) all three


def test_conflicting_entries_and_contrastive_masks() -> None:
    assert cs.conflicting(MASKS).tolist() == [[True, False], [False, True]]
    assert cs.contrastive_masks(MASKS).tolist() == [
        [[0.0, 1.0], [0.0, 0.0]],
        [[0.0, 0.0], [1.0, 0.0]],
        [[0.0, 0.0], [0.0, 0.0]],
    ]


def test_contributions_are_weight_times_gradient_in_absolute_value() -> None:
    weight = torch.tensor([[2.0, -1.0], [0.5, 3.0]], requires_grad=True)
    grads = torch.tensor([[[0.5, -2.0], [0.0, 1.0]], [[-1.0, 0.0], [4.0, -0.5]], [[0.0, 0.0], [0.0, 2.0]]])
    out = cs.contributions(weight, grads)
    assert out.tolist() == [[[1.0, 2.0], [0.0, 3.0]], [[2.0, 0.0], [2.0, 1.5]], [[0.0, 0.0], [0.0, 6.0]]]
    assert not out.requires_grad


def test_contribution_average_is_set_then_smoothed_and_kept_in_the_state_dict() -> None:
    average = cs.ContributionAverage(n_tasks=2, n_weights=3, decay=0.9)
    average.update(0, torch.tensor([1.0, 2.0, 0.0]))
    assert average.impact.tolist() == [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]
    average.update(0, torch.tensor([3.0, 0.0, 10.0]))
    average.update(1, torch.tensor([5.0, 5.0, 5.0]))  # task 1's first update sets its row
    assert average.impact[0].tolist() == pytest.approx([0.9 + 0.3, 1.8, 1.0])
    assert average.impact[1].tolist() == [5.0, 5.0, 5.0]
    assert average.updates.tolist() == [2, 1]
    restored = cs.ContributionAverage(n_tasks=2, n_weights=3, decay=0.9)
    restored.load_state_dict(average.state_dict())
    assert set(average.state_dict()) == {"impact", "updates"}
    assert torch.equal(restored.impact, average.impact) and torch.equal(restored.updates, average.updates)


IMPACT = torch.tensor(
    [
        [[4.0, 0.5], [9.0, 2.0]],
        [[1.0, 7.0], [0.0, 6.0]],
        [[8.0, 8.0], [8.0, 3.0]],
    ]
)  # task 2's 8s lie off its mask and must not count


def test_shares_divide_by_the_largest_contribution_among_the_tasks_that_keep_the_entry() -> None:
    pi = cs.shares(IMPACT, MASKS)
    expected = torch.tensor(
        [
            [[1.0, 1.0], [0.0, 2.0 / 6.0]],  # (0,1) is task 0's alone: 1 however small its contribution
            [[0.25, 0.0], [1.0, 1.0]],  # (1,0) is task 1's alone with contribution 0: still 1
            [[0.0, 0.0], [0.0, 0.5]],
        ]
    )
    assert torch.allclose(pi, expected, rtol=1e-6, atol=0.0)
    nothing = cs.shares(torch.zeros(3, 2, 2), MASKS)
    assert torch.equal(nothing, MASKS)  # nothing measured: every task's gradient unscaled


def test_a_conflicting_parameter_moves_in_proportion_to_the_tasks_shares() -> None:
    pi = cs.shares(IMPACT, MASKS)
    grads = torch.tensor(
        [
            [[1.0, 2.0], [0.0, -3.0]],
            [[1.0, 0.0], [5.0, 0.0]],
            [[0.0, 0.0], [0.0, 4.0]],
        ]
    )
    update, changed = cs.apply_shares(grads, pi)
    # (0,0): 1·1 + 0.25·1; (0,1), (1,0): one task, unscaled; (1,1): (1/3)·(-3) + 1·0 + 0.5·4
    assert update.flatten().tolist() == pytest.approx([1.25, 2.0, 5.0, -1.0 + 2.0], rel=1e-6)
    assert changed == 2  # (0,0) by task 1, (1,1) by tasks 0 and 2
    weight = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    stepped = weight - 0.1 * update  # an SGD step on the shared weights
    assert stepped[0, 0].item() == pytest.approx(1.0 - 0.1 * (1.0 + 0.25))
    alone, changed_alone = cs.apply_shares(grads[1:2], pi[1:2])  # alternating: task 1's step alone
    assert alone.tolist() == [[0.25, 0.0], [5.0, 0.0]]
    assert changed_alone == 1


def test_negative_masks_swap_kept_and_pruned_entries_at_equal_density() -> None:
    mask = torch.zeros(4, 5)
    mask.view(-1)[torch.tensor([0, 2, 3, 7, 8, 11, 12, 15, 18, 19])] = 1.0  # 10 kept of 20
    negatives = cs.negative_masks(mask, torch.Generator().manual_seed(0), count=3, swap=0.2)
    assert negatives.shape == (3, 4, 5)
    for negative in negatives:
        assert negative.sum().item() == 10.0  # same density
        assert ((mask == 1) & (negative == 0)).sum().item() == 2  # round(0.2 · 10) turned off
        assert ((mask == 0) & (negative == 1)).sum().item() == 2  # and as many turned on
    assert not torch.equal(negatives[0], negatives[1])
    again = cs.negative_masks(mask, torch.Generator().manual_seed(0), count=3, swap=0.2)
    assert torch.equal(again, negatives)
    full = torch.ones(2, 3)
    assert torch.equal(cs.negative_masks(full, torch.Generator().manual_seed(0), count=2), torch.stack([full, full]))


def test_contrastive_subnet_loss() -> None:
    positive = torch.tensor(0.5)
    negatives = torch.tensor([0.7, 0.2])
    loss = cs.contrastive_subnet_loss(positive, negatives, weight=0.1, temperature=2.0)
    # 0.1 · mean(−log σ((0.7 − 0.5)/2), −log σ((0.2 − 0.5)/2))
    expected = 0.1 * (math.log1p(math.exp(-0.1)) + math.log1p(math.exp(0.15))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_reliance_is_the_loss_without_the_shared_weights_minus_the_loss_with_them() -> None:
    w1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    w2 = torch.tensor([[1.0, 1.0]])
    x = torch.tensor([1.0, 1.0])

    def loss(masks: Sequence[Tensor]) -> Tensor:
        out = (w2 * masks[1]) @ ((w1 * masks[0]) @ x)
        return ((out - 7.0) ** 2).sum()

    own = [torch.tensor([[1.0, 1.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0]])]
    without = [torch.tensor([[0.0, 1.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    # own subnet: h = (3, 4), out = 7, L = 0; without shared: h = (2, 0), out = 0, L = 49
    assert cs.reliance(loss, own, without).item() == 49.0
    # layer 1 alone: h = (2, 0), out = 2, L = 25; layer 2 alone: h = (3, 4), out = 4, L = 9
    assert [d.item() for d in cs.layer_reliance(loss, own, without)] == [25.0, 9.0]


def test_wins_count_the_conflicting_entries_each_task_leads() -> None:
    pi = cs.shares(IMPACT, MASKS)
    conflict = cs.conflicting(MASKS)  # (0,0): task 0 leads; (1,1): task 1 leads
    assert cs.wins(pi, conflict).tolist() == [0.5, 0.5, 0.0]
    assert cs.wins(pi, torch.zeros(2, 2, dtype=torch.bool)).tolist() == [0.0, 0.0, 0.0]

from __future__ import annotations

import math

import pytest
import torch

from mtlcli.train.metrics import auc, logloss, mae, rmse, task_metrics


def brute_force_auc(scores: list[float], labels: list[int]) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_hand_computed() -> None:
    # positives 0.35 and 0.8; negatives 0.1 and 0.4: 3 of the 4 pairs are ordered right
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0.0, 0.0, 1.0, 1.0])) == pytest.approx(0.75)


def test_auc_ties_count_half() -> None:
    # the tie 0.5 (pos) vs 0.5 (neg) counts 1/2: (0.5 + 1 + 1 + 1) / 4
    assert auc(torch.tensor([0.5, 0.5, 0.2, 0.9]), torch.tensor([1.0, 0.0, 0.0, 1.0])) == pytest.approx(0.875)


def test_auc_matches_pairwise_definition_on_random_data() -> None:
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 20, (300,), generator=gen).float() / 20  # many ties
    labels = (torch.rand(300, generator=gen) < 0.3).float()
    expected = brute_force_auc(scores.tolist(), [int(v) for v in labels.tolist()])
    assert auc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_auc_one_class_is_nan() -> None:
    assert math.isnan(auc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 1.0])))


def test_logloss_rmse_mae_hand_computed() -> None:
    logits = torch.tensor([0.0, math.log(3.0)])  # p = 0.5 and 0.75
    labels = torch.tensor([1.0, 0.0])
    assert logloss(logits, labels) == pytest.approx((-math.log(0.5) - math.log(0.25)) / 2)
    assert rmse(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])) == pytest.approx(math.sqrt(5.0))
    assert mae(torch.tensor([1.0, -3.0]), torch.tensor([0.0, 0.0])) == pytest.approx(2.0)


def test_task_metrics_respects_mask_and_types() -> None:
    logits = torch.tensor([[0.1, 1.0], [0.9, 2.0], [0.8, 4.0], [0.2, 0.0]])
    labels = torch.tensor([[0.0, 1.0], [1.0, 2.0], [0.0, 3.0], [1.0, 0.0]])
    mask = torch.tensor([[True, True], [True, True], [False, True], [False, True]])
    out = task_metrics(logits, labels, mask, ["click", "time"], ["binary", "regression"])
    assert out["click"]["n"] == 2
    assert out["click"]["auc"] == pytest.approx(1.0)  # only the first two rows count
    assert out["click"]["positive_rate"] == pytest.approx(0.5)
    assert out["time"]["rmse"] == pytest.approx(math.sqrt((0 + 0 + 1 + 0) / 4))
    assert out["time"]["mae"] == pytest.approx(0.25)

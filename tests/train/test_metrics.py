from __future__ import annotations

import math

import pytest
import torch

from mtlcli.train.metrics import auc, gauc, logloss, mae, rmse, task_metrics


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
    # a regression row outside the mask (error 100) counts for nothing either
    logits[3, 1], mask[0, 1] = 100.0, False
    masked = task_metrics(logits, labels, mask.clone(), ["click", "time"], ["binary", "regression"])
    mask[3, 1] = False
    out = task_metrics(logits, labels, mask, ["click", "time"], ["binary", "regression"])
    assert out["time"]["n"] == 2
    assert out["time"]["rmse"] == pytest.approx(math.sqrt((0 + 1) / 2))
    assert out["time"]["mae"] == pytest.approx(0.5)
    assert masked["time"]["rmse"] > 50  # row 3 counts while it is in the mask


def test_gauc_hand_computed() -> None:
    # group 0: AUC 0.75 over 4 rows; group 1: a tie, AUC 0.5 over 2 rows; group 2: one class, left out.
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.2, 0.2, 0.9, 0.3])
    labels = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    value, counted = gauc(scores, labels, groups)
    assert counted == 2
    assert value == pytest.approx((4 * 0.75 + 2 * 0.5) / 6)
    # the order of the rows and the group ids do not matter
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    assert gauc(scores[perm], labels[perm], groups[perm] * 7 + 3)[0] == pytest.approx(value)
    assert math.isnan(gauc(scores[6:], labels[6:], groups[6:])[0])


def test_gauc_equals_the_weighted_mean_of_per_group_aucs_on_census(census_file) -> None:  # type: ignore[no-untyped-def]
    """On the real census rows: income grouped by education, scored by a coarse function of age and
    weeks worked (many ties), against a loop over the groups."""
    import polars as pl

    frame = pl.read_csv(census_file, has_header=False, infer_schema=False)
    education = frame.get_column(frame.columns[4]).str.strip_chars()
    income = (frame.get_column(frame.columns[41]).str.strip_chars() == "50000+.").cast(pl.Float64)
    age = frame.get_column(frame.columns[0]).str.strip_chars().cast(pl.Float64)
    weeks = frame.get_column(frame.columns[39]).str.strip_chars().cast(pl.Float64)
    scores = torch.from_numpy((age.to_numpy() // 5) + weeks.to_numpy() / 10)
    labels = torch.from_numpy(income.to_numpy())
    codes = torch.from_numpy(education.cast(pl.Categorical).to_physical().cast(pl.Int64).to_numpy().copy())
    expected_sum, weight, counted = 0.0, 0, 0
    for g in codes.unique():
        rows = codes == g
        value = auc(scores[rows], labels[rows])
        if not math.isnan(value):
            expected_sum += value * int(rows.sum())
            weight += int(rows.sum())
            counted += 1
    value, n_groups = gauc(scores, labels, codes)
    assert n_groups == counted > 10
    assert value == pytest.approx(expected_sum / weight, abs=1e-12)
    assert value < auc(scores, labels) - 0.01  # within an education level the score separates less


def test_task_metrics_gauc_skips_rows_without_a_group_and_outside_the_space() -> None:
    logits = torch.tensor([[0.1], [0.9], [0.5], [0.2], [0.8]])
    labels = torch.tensor([[0.0], [1.0], [0.0], [1.0], [1.0]])
    mask = torch.tensor([[True], [True], [True], [True], [False]])
    groups = torch.tensor([0, 0, -1, 1, 1])
    metrics = task_metrics(logits, labels, mask, ["t"], ["binary"], groups)["t"]
    assert metrics["gauc"] == pytest.approx(1.0) and metrics["gauc_groups"] == 1
    assert list(metrics)[:2] == ["auc", "gauc"]
    assert "gauc" not in task_metrics(logits, labels, mask, ["t"], ["binary"])["t"]


def test_pcoc_is_mean_prediction_over_positive_rate() -> None:
    logits = torch.tensor([0.0, 0.0, math.log(3.0), -math.log(3.0)])  # p = 0.5, 0.5, 0.75, 0.25
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0])
    metrics = task_metrics(logits[:, None], labels[:, None], torch.ones(4, 1, dtype=torch.bool), ["t"], ["binary"])
    assert metrics["t"]["pcoc"] == pytest.approx(2.0 / 1.0)  # predicts 2 positives, 1 observed
    none = task_metrics(logits[:, None], torch.zeros(4, 1), torch.ones(4, 1, dtype=torch.bool), ["t"], ["binary"])
    assert none["t"]["pcoc"] is None


def test_pos_weight_scales_the_loss_of_positive_rows() -> None:
    from mtlcli.data.batch import Batch
    from mtlcli.train.loop import task_losses

    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0], [-1.0, 0.5]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    batch = Batch(torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, 0), labels, torch.ones(3, 2, dtype=torch.bool))
    binary = torch.tensor([True, True])
    plain = task_losses(logits, batch, binary)
    weighted = task_losses(logits, batch, binary, torch.tensor([3.0, 1.0]))

    def bce(z: float, y: float, w: float = 1.0) -> float:
        p = 1 / (1 + math.exp(-z))
        return -(w * y * math.log(p) + (1 - y) * math.log(1 - p))

    assert float(weighted[0]) == pytest.approx((bce(0.0, 1, 3) + bce(2.0, 0, 3) + bce(-1.0, 1, 3)) / 3, rel=1e-6)
    assert float(weighted[1]) == pytest.approx(float(plain[1]))

"""Per-task metrics: AUC, GAUC, logloss and calibration (PCOC) for binary tasks, RMSE and MAE for regression."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied scores given their average rank).

    scores, labels: [N]; labels in {0, 1}. NaN when only one class is present.
    """
    scores = scores.double().flatten()
    labels = labels.double().flatten()
    n_pos = float(labels.sum())
    n_neg = float(labels.numel()) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    average_rank = ends - (counts.double() - 1.0) / 2.0  # 1-based average rank of each distinct score
    rank_sum = float((average_rank[inverse] * labels).sum())
    return (rank_sum - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg)


def gauc(scores: Tensor, labels: Tensor, groups: Tensor) -> tuple[float, int]:
    """Group AUC: the mean of the per-group AUCs weighted by each group's row count, over the
    groups that hold both classes (Zhu et al., "Optimized Cost per Click in Taobao Display
    Advertising", KDD 2017; used as GAUC in Zhou et al., "Deep Interest Network", KDD 2018).

    scores, labels, groups: [N] (groups: integer ids). Returns (GAUC, number of groups counted);
    NaN and 0 when no group holds both classes. Vectorised: one sort by (group, score), rank sums
    per group by bincount, ties within a group given their average rank.
    """
    s = scores.double().flatten()
    y = labels.double().flatten()
    g = groups.long().flatten()
    n = s.numel()
    if n == 0:
        return math.nan, 0
    order = torch.argsort(s, stable=True)
    order = order[torch.argsort(g[order], stable=True)]
    s, y, g = s[order], y[order], g[order]
    new_group = torch.ones(n, dtype=torch.bool)
    new_group[1:] = g[1:] != g[:-1]
    group_id = torch.cumsum(new_group, 0) - 1
    new_run = new_group.clone()
    new_run[1:] |= s[1:] != s[:-1]
    run_id = torch.cumsum(new_run, 0) - 1
    position = torch.arange(n, dtype=torch.float64)
    group_start = position[new_group][group_id]
    run_start = position[new_run]
    run_length = torch.bincount(run_id).double()
    mean_position = (run_start + (run_length - 1.0) / 2.0)[run_id]
    rank = mean_position - group_start + 1.0  # 1-based average rank within the group
    size = torch.bincount(group_id).double()
    n_pos = torch.bincount(group_id, weights=y)
    n_neg = size - n_pos
    rank_sum = torch.bincount(group_id, weights=rank * y)
    both = (n_pos > 0) & (n_neg > 0)
    if not bool(both.any()):
        return math.nan, 0
    per_group = (rank_sum[both] - n_pos[both] * (n_pos[both] + 1.0) / 2.0) / (n_pos[both] * n_neg[both])
    weight = size[both]
    return float((per_group * weight).sum() / weight.sum()), int(both.sum())


def logloss(logits: Tensor, labels: Tensor) -> float:
    """Mean binary cross-entropy of sigmoid(logits) against labels."""
    return float(torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), labels.double()))


def pcoc(logits: Tensor, labels: Tensor) -> float:
    """Calibration: the mean predicted probability over the observed positive rate ("predicted
    clicks over clicks"); 1 is calibrated, above 1 over-predicts. NaN without positives."""
    positives = float(labels.double().sum())
    if positives == 0:
        return math.nan
    return float(torch.sigmoid(logits.double()).sum()) / positives


def rmse(pred: Tensor, target: Tensor) -> float:
    return float(torch.sqrt(torch.mean((pred.double() - target.double()) ** 2)))


def mae(pred: Tensor, target: Tensor) -> float:
    return float(torch.mean(torch.abs(pred.double() - target.double())))


def task_metrics(
    logits: Tensor,
    labels: Tensor,
    mask: Tensor,
    tasks: list[str],
    types: list[str],
    groups: Tensor | None = None,
) -> dict[str, dict[str, float | int | None]]:
    """Metrics per task over the rows in each task's mask. logits, labels, mask: [N, T].

    With ``groups`` ([N] integer ids, negative for rows without a group) binary tasks also get
    ``gauc`` and ``gauc_groups`` (the groups that hold both classes).
    """
    out: dict[str, dict[str, float | int | None]] = {}
    for k, (task, kind) in enumerate(zip(tasks, types, strict=True)):
        keep = mask[:, k]
        z, y = logits[keep, k], labels[keep, k]
        n = int(y.numel())
        if kind == "binary":
            score = auc(z, y) if n else math.nan
            entry: dict[str, float | int | None] = {"auc": None if math.isnan(score) else score}
            counted = 0
            if groups is not None:
                g = groups[keep]
                grouped = g >= 0
                value, counted = gauc(z[grouped], y[grouped], g[grouped])
                entry["gauc"] = None if math.isnan(value) else value
            calibration = pcoc(z, y) if n else math.nan
            entry |= {
                "logloss": logloss(z, y) if n else None,
                "pcoc": None if math.isnan(calibration) else calibration,
                "n": n,
                "positive_rate": float(y.mean()) if n else None,
            }
            if groups is not None:
                entry["gauc_groups"] = counted
            out[task] = entry
        else:
            out[task] = {
                "rmse": rmse(z, y) if n else None,
                "mae": mae(z, y) if n else None,
                "n": n,
                "mean": float(y.mean()) if n else None,
            }
    return out

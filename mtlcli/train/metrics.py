"""Per-task metrics: AUC and logloss for binary tasks, RMSE and MAE for regression."""

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


def logloss(logits: Tensor, labels: Tensor) -> float:
    """Mean binary cross-entropy of sigmoid(logits) against labels."""
    return float(torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), labels.double()))


def rmse(pred: Tensor, target: Tensor) -> float:
    return float(torch.sqrt(torch.mean((pred.double() - target.double()) ** 2)))


def mae(pred: Tensor, target: Tensor) -> float:
    return float(torch.mean(torch.abs(pred.double() - target.double())))


def task_metrics(
    logits: Tensor, labels: Tensor, mask: Tensor, tasks: list[str], types: list[str]
) -> dict[str, dict[str, float | int | None]]:
    """Metrics per task over the rows in each task's mask. logits, labels, mask: [N, T]."""
    out: dict[str, dict[str, float | int | None]] = {}
    for k, (task, kind) in enumerate(zip(tasks, types, strict=True)):
        keep = mask[:, k]
        z, y = logits[keep, k], labels[keep, k]
        n = int(y.numel())
        if kind == "binary":
            score = auc(z, y) if n else math.nan
            out[task] = {
                "auc": None if math.isnan(score) else score,
                "logloss": logloss(z, y) if n else None,
                "n": n,
                "positive_rate": float(y.mean()) if n else None,
            }
        else:
            out[task] = {
                "rmse": rmse(z, y) if n else None,
                "mae": mae(z, y) if n else None,
                "n": n,
                "mean": float(y.mean()) if n else None,
            }
    return out

"""How related the tasks are in the data and in the model's predictions.

Every pair of tasks is compared on the rows where both are observed (both label masks true), so a
task with its own sample space only counts its own rows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

Matrix = dict[str, dict[str, float | None]]


def pearson(x: Tensor, y: Tensor) -> float | None:
    """Pearson correlation of two vectors (phi when both are 0/1); None when either is constant."""
    if x.numel() < 2:
        return None
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / denominator if denominator > 0 else None


def correlation_matrix(values: Tensor, mask: Tensor, tasks: list[str]) -> Matrix:
    """Pearson correlation between the columns of ``values`` [N, T] on jointly observed rows."""
    out: Matrix = {}
    for i, a in enumerate(tasks):
        out[a] = {}
        for j, b in enumerate(tasks):
            both = mask[:, i] & mask[:, j]
            out[a][b] = pearson(values[both, i], values[both, j])
    return out


def positive_rates(labels: Tensor, mask: Tensor, tasks: list[str], types: list[str]) -> dict[str, float | None]:
    """P(task = 1) on each binary task's own rows."""
    rates: dict[str, float | None] = {}
    for k, (task, kind) in enumerate(zip(tasks, types, strict=True)):
        if kind == "binary":
            rows = labels[mask[:, k], k]
            rates[task] = float(rows.double().mean()) if rows.numel() else None
    return rates


def conditional_rates(labels: Tensor, mask: Tensor, tasks: list[str], types: list[str]) -> Matrix:
    """``out[a][b]`` = P(b = 1 | a = 1) on rows where both binary tasks are observed."""
    binary = [k for k, kind in enumerate(types) if kind == "binary"]
    out: Matrix = {}
    for i in binary:
        out[tasks[i]] = {}
        for j in binary:
            given = mask[:, i] & mask[:, j] & (labels[:, i] > 0.5)
            out[tasks[i]][tasks[j]] = float(labels[given, j].double().mean()) if bool(given.any()) else None
    return out


def predictions(logits: Tensor, types: list[str]) -> Tensor:
    """What a task predicts: a probability (sigmoid) for binary tasks, the value for regression. [N, T]."""
    binary = torch.tensor([t == "binary" for t in types])
    return torch.where(binary, torch.sigmoid(logits), logits)


def strength(r: float) -> str:
    size = abs(r)
    word = "negligible" if size < 0.1 else "weak" if size < 0.3 else "moderate" if size < 0.5 else "strong"
    return word if size < 0.1 else f"{word} {'positive' if r > 0 else 'negative'}"


def _pairs(tasks: list[str]) -> list[tuple[str, str]]:
    return [(a, b) for i, a in enumerate(tasks) for b in tasks[i + 1 :]]


def read_labels(correlation: Matrix, conditional: Matrix, rates: dict[str, float | None], tasks: list[str]) -> str:
    """One line per the whole matrix: each pair's correlation, and how a positive moves the other's rate."""
    parts = []
    for a, b in _pairs(tasks):
        r = correlation[a][b]
        if r is None:
            parts.append(f"{a}~{b}: undefined (a label is constant on their common rows)")
            continue
        text = f"{a}~{b}: r = {r:+.3f} ({strength(r)})"
        given, base = conditional.get(a, {}).get(b), rates.get(b)
        if given is not None and base:
            text += f", P({b} | {a}) = {given:.2f} vs {base:.2f} overall"
        parts.append(text)
    return "labels: " + ("; ".join(parts) if parts else "one task, nothing to correlate")


def read_predictions(predicted: Matrix, labels: Matrix, tasks: list[str]) -> str:
    """Whether the model ties the tasks more or less tightly than the labels do."""
    parts = []
    for a, b in _pairs(tasks):
        p, r = predicted[a][b], labels[a][b]
        if p is None or r is None:
            continue
        tie = "tighter than" if abs(p) > abs(r) + 0.05 else "looser than" if abs(p) < abs(r) - 0.05 else "as tight as"
        parts.append(f"{a}~{b}: r = {p:+.3f}, {tie} the labels ({r:+.3f})")
    return "predictions: " + ("; ".join(parts) if parts else "nothing to compare")


def correlation_report(
    labels: Tensor, mask: Tensor, logits: Tensor, tasks: list[str], types: list[str]
) -> dict[str, Any]:
    correlation = correlation_matrix(labels, mask, tasks)
    conditional = conditional_rates(labels, mask, tasks, types)
    rates = positive_rates(labels, mask, tasks, types)
    predicted = correlation_matrix(predictions(logits, types), mask, tasks)
    return {
        "label_correlation": correlation,
        "positive_rate": rates,
        "conditional_positive_rate": conditional,
        "prediction_correlation": predicted,
        "readings": {
            "label_correlation": read_labels(correlation, conditional, rates, tasks),
            "prediction_correlation": read_predictions(predicted, correlation, tasks),
        },
    }

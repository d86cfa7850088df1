"""Task-specific bottoms (DTRN): which inputs each task's refinement leans on, and how different
the tasks' interests in each behaviour history are."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mtlcli.data.batch import SplitTensors
from mtlcli.models.base import scheme


@torch.no_grad()
def representation_report(
    model: nn.Module, data: SplitTensors, batch_size: int, fields: list[str], histories: list[str], numbers: list[str]
) -> dict[str, Any] | None:
    """{"refine": {task: {input: mean weight}}, "interest_cosine": {history: {task: {task: cos}}}}
    for a scheme that declares ``task_representations``, else None.

    The refinement weights (one per element of the task's representation: each categorical
    field's and history's ``d`` embedding elements, then one per number) are averaged over the rows
    and over each input's elements. The interest cosine is the mean over rows, for each history,
    of the cosine between two tasks' interest vectors (rows whose history is empty left out)."""
    of = scheme(model).capabilities.task_representations
    if of is None:
        return None
    was_training = model.training
    model.eval()
    tasks = scheme(model).tasks
    sums: dict[str, Tensor] = {}
    cos_sum = torch.zeros(len(histories), len(tasks), len(tasks), dtype=torch.float64)
    cos_rows = torch.zeros(len(histories), dtype=torch.float64)
    rows = 0
    for batch in data.batches(batch_size):
        shown = of(batch)
        for part in shown:
            if part.refine is not None:
                total = part.refine.double().sum(0)
                sums[part.task] = sums[part.task] + total if part.task in sums else total
        interest = [part.interest for part in shown if part.interest is not None]
        if histories and len(interest) == len(tasks):
            interests = torch.stack([i.double() for i in interest], 1)  # [B, T, S, d]
            unit = interests / interests.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            present = interests.norm(dim=-1).gt(0).all(1)  # [B, S]
            pair = torch.einsum("bisd,bjsd->bsij", unit, unit)  # [B, S, T, T]
            cos_sum += (pair * present[:, :, None, None]).sum(0)
            cos_rows += present.sum(0)
        rows += len(batch)
    model.train(was_training)
    refine: dict[str, dict[str, float]] = {}
    for task, total in sums.items():
        mean = total / max(rows, 1)
        width = mean.shape[0] - len(numbers)
        dim = width // max(len(fields) + len(histories), 1)
        names = [*fields, *histories]
        refine[task] = {name: float(mean[i * dim : (i + 1) * dim].mean()) for i, name in enumerate(names)}
        refine[task] |= {name: float(mean[width + i]) for i, name in enumerate(numbers)}
    cosine = {
        history: {a: {b: float(cos_sum[s, i, j] / cos_rows[s]) if cos_rows[s] else None for j, b in enumerate(tasks)}
                  for i, a in enumerate(tasks)}
        for s, history in enumerate(histories)
    }  # fmt: skip
    return {"refine": refine, "interest_cosine": cosine}


def read_representations(report: dict[str, Any]) -> str:
    """One line: each task's most-weighted input, and the tasks' interest agreement per history."""
    parts = []
    for task, weights in report["refine"].items():
        if not weights:
            continue
        top = max(weights, key=lambda name: weights[name])
        parts.append(f"{task} leans most on {top} ({weights[top]:.2f})")
    for history, matrix in report["interest_cosine"].items():
        tasks = list(matrix)
        pairs = [
            f"{a}~{b} {matrix[a][b]:+.2f}"
            for i, a in enumerate(tasks)
            for b in tasks[i + 1 :]
            if matrix[a][b] is not None
        ]
        if pairs:
            parts.append(f"interests in {history}: cos {', '.join(pairs)}")
    return "task-specific bottoms: " + "; ".join(parts)

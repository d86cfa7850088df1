"""Sparse-sharing masks: how much of the shared network each task keeps, and how much two tasks share."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mtlcli.models.base import scheme


def mask_report(model: nn.Module) -> dict[str, Any] | None:
    """{"density": {task: fraction kept}, "overlap": {task: {task: IoU}}, "layers": [...]} for a
    model with ``masks()`` (sparse_sharing), else None. Figures pool every masked layer."""
    masks_of = scheme(model).capabilities.masks
    if masks_of is None:
        return None
    masks: dict[str, list[Tensor]] = masks_of()
    tasks = list(masks)
    flat = {t: [m.bool().flatten() for m in layers] for t, layers in masks.items()}
    total = sum(m.numel() for m in next(iter(flat.values()))) if flat else 0

    def kept(t: str) -> int:
        return sum(int(m.sum()) for m in flat[t])

    def iou(a: str, b: str) -> float:
        inter = sum(int((x & y).sum()) for x, y in zip(flat[a], flat[b], strict=True))
        union = sum(int((x | y).sum()) for x, y in zip(flat[a], flat[b], strict=True))
        return inter / union if union else 1.0

    return {
        "density": {t: kept(t) / total if total else 0.0 for t in tasks},
        "overlap": {a: {b: iou(a, b) for b in tasks} for a in tasks},
        "layers": [
            {t: float(masks[t][layer].mean()) for t in tasks} for layer in range(len(next(iter(masks.values()))))
        ],
    }


def read_masks(report: dict[str, Any]) -> str:
    tasks = list(report["density"])
    kept = ", ".join(f"{t} keeps {d:.0%}" for t, d in report["density"].items())
    pairs = [f"{a}~{b} share {report['overlap'][a][b]:.0%}" for i, a in enumerate(tasks) for b in tasks[i + 1 :]]
    return f"sparse sharing: {kept}; " + ", ".join(pairs) + " of their weights (IoU)"

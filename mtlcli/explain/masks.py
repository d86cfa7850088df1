"""Sparse-sharing masks: how much of the shared network each task keeps, how much two tasks share,
and, for schemes that settle the shared weights between tasks (CSRec), how much each task relies on
what it shares and how many of the contested weights it wins."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mtlcli.data.batch import Batch
from mtlcli.models.base import scheme


def _iou(a: list[Tensor], b: list[Tensor]) -> float:
    """Intersection over union of two masks given as bool pieces (one per layer, or one layer)."""
    inter = sum(int((x & y).sum()) for x, y in zip(a, b, strict=True))
    union = sum(int((x | y).sum()) for x, y in zip(a, b, strict=True))
    return inter / union if union else 1.0


def mask_report(model: nn.Module, batch: Batch | None = None) -> dict[str, Any] | None:
    """{"density": {task: fraction kept}, "overlap": {task: {task: IoU}}, "layers": [{task: density}],
    "per_layer": [...]} for a model with ``masks()`` (sparse_sharing, csrec), else None. The first
    figures pool every masked layer; ``per_layer`` gives each layer's density, overlap and
    ``conflicting`` (the share of its weights kept by two tasks or more), and with the scheme's
    ``mask_contest`` on ``batch`` also ``reliance`` ({task: Δ}) and ``wins`` ({task: share})."""
    masks_of = scheme(model).capabilities.masks
    if masks_of is None:
        return None
    masks: dict[str, list[Tensor]] = masks_of()
    tasks = list(masks)
    flat = {t: [m.bool().flatten() for m in layers] for t, layers in masks.items()}
    total = sum(m.numel() for m in next(iter(flat.values()))) if flat else 0
    n_layers = len(next(iter(masks.values()))) if masks else 0

    def kept(t: str) -> int:
        return sum(int(m.sum()) for m in flat[t])

    def layer(index: int) -> dict[str, Any]:
        pieces = {t: [flat[t][index]] for t in tasks}
        holders = torch.stack([piece[0] for piece in pieces.values()]).sum(0)
        return {
            "density": {t: float(masks[t][index].mean()) for t in tasks},
            "overlap": {a: {b: _iou(pieces[a], pieces[b]) for b in tasks} for a in tasks},
            "conflicting": float((holders >= 2).float().mean()) if tasks else 0.0,
        }

    per_layer = [layer(index) for index in range(n_layers)]
    contest = scheme(model).capabilities.mask_contest
    if contest is not None and batch is not None:
        for figures, contested in zip(per_layer, contest(batch), strict=True):
            figures.update(contested)
    return {
        "density": {t: kept(t) / total if total else 0.0 for t in tasks},
        "overlap": {a: {b: _iou(flat[a], flat[b]) for b in tasks} for a in tasks},
        "layers": [figures["density"] for figures in per_layer],
        "per_layer": per_layer,
    }


def read_masks(report: dict[str, Any]) -> list[str]:
    """One line over every layer, then one per layer."""
    tasks = list(report["density"])
    kept = ", ".join(f"{t} keeps {d:.0%}" for t, d in report["density"].items())
    pairs = [f"{a}~{b} share {report['overlap'][a][b]:.0%}" for i, a in enumerate(tasks) for b in tasks[i + 1 :]]
    lines = [f"sparse sharing: {kept}; " + ", ".join(pairs) + " of their weights (IoU)"]
    for index, figures in enumerate(report["per_layer"]):
        parts = [", ".join(f"{t} keeps {d:.0%}" for t, d in figures["density"].items())]
        parts += [f"{a}~{b} IoU {figures['overlap'][a][b]:.0%}" for i, a in enumerate(tasks) for b in tasks[i + 1 :]]
        parts.append(f"{figures['conflicting']:.0%} of its weights conflict")
        if "reliance" in figures:
            reliance = ", ".join(f"{t} {d:+.4f}" for t, d in figures["reliance"].items())
            parts.append(f"Δ without the shared weights {reliance}")
            parts.append("conflicts won " + ", ".join(f"{t} {w:.0%}" for t, w in figures["wins"].items()))
        lines.append(f"layer {index}: " + "; ".join(parts))
    return lines

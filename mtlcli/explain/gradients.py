"""Gradient conflict: the cosine similarity between the tasks' loss gradients on the shared parameters.

For each batch, every task's loss (its own masked rows only) is differentiated with respect to the
parameters that all tasks share (``parameter_groups()["shared"]``); the cosines between those
gradients are averaged over the batches, overall and per shared layer, together with the share of
batches in which a pair's cosine is negative (the tasks pull the shared weights apart).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mtlcli.data.batch import SplitTensors
from mtlcli.models.base import scheme
from mtlcli.models.blocks import trainable_tensors
from mtlcli.train.loop import task_losses
from mtlcli.weighting.gradients import shared_task_gradients


def shared_named_parameters(model: nn.Module) -> list[tuple[str, Tensor]]:
    """The shared parameters as the last forward pass's gradients reach them (row-wise tables: their rows)."""
    return list(trainable_tensors(model, scheme(model).parameter_groups()["shared"]).items())


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: its name without a trailing ``.weight`` / ``.bias``."""
    head, _, last = name.rpartition(".")
    return head if head and last in ("weight", "bias") else name


def cosine_matrix(grads: Tensor) -> Tensor:
    """Pairwise cosines of the rows of ``grads`` [T, P], in float64; NaN where a row is zero. [T, T].

    Symmetric by construction: a GEMM kernel may sum g_i·g_j and g_j·g_i in different orders."""
    g = grads.double()
    norms = g.norm(dim=1)
    dots = g @ g.T
    cos = (dots + dots.T) / 2 / (norms[:, None] * norms[None, :])
    zero = norms == 0
    cos[zero, :] = float("nan")
    cos[:, zero] = float("nan")
    return cos


class CosineStats:
    """Running mean of cosine matrices and the share of negative ones, ignoring undefined (NaN) entries."""

    def __init__(self, n: int) -> None:
        self.total = torch.zeros(n, n, dtype=torch.float64)
        self.negative = torch.zeros(n, n, dtype=torch.float64)
        self.count = torch.zeros(n, n, dtype=torch.float64)

    def add(self, cos: Tensor) -> None:
        ok = ~cos.isnan()
        self.total += torch.where(ok, cos, 0.0)
        self.negative += (ok & (cos < 0)).double()
        self.count += ok.double()

    def matrices(
        self, tasks: list[str]
    ) -> tuple[dict[str, dict[str, float | None]], dict[str, dict[str, float | None]]]:
        def table(values: Tensor) -> dict[str, dict[str, float | None]]:
            return {
                a: {
                    b: (float(values[i, j] / self.count[i, j]) if self.count[i, j] else None)
                    for j, b in enumerate(tasks)
                }
                for i, a in enumerate(tasks)
            }

        return table(self.total), table(self.negative)


def gradient_report(
    model: nn.Module,
    data: SplitTensors,
    tasks: list[str],
    types: list[str],
    batch_size: int = 1024,
    max_batches: int = 32,
    seed: int = 0,
    pos_weight: Tensor | None = None,
) -> dict[str, Any]:
    """Cosines of the task gradients on the shared parameters, over up to ``max_batches`` batches
    drawn in a seeded random order; the model is in eval mode (no dropout) and left unchanged."""
    named = scheme(model).parameter_groups()["shared"]
    result: dict[str, Any] = {
        "gradient_cosine": {},
        "gradient_conflict": {},
        "gradient_cosine_by_layer": {},
        "gradient_conflict_by_layer": {},
        "gradient_norm": {},
        "gradient_batches": 0,
        "shared_parameters": sum(p.numel() for p in named.values()),
    }
    if not named or len(data) == 0:
        return result
    binary = torch.tensor([t == "binary" for t in types])
    overall = CosineStats(len(tasks))
    per_layer: dict[str, CosineStats] = {}
    norm_sum = torch.zeros(len(tasks), dtype=torch.float64)
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    batches = 0
    try:
        for batch in data.batches(batch_size, shuffle=True, generator=generator):
            if batches == max_batches:
                break
            losses = task_losses(model(batch), batch, binary, pos_weight)
            shared = shared_named_parameters(model)  # after the pass: a row-wise table's rows of this batch
            layers: dict[str, list[tuple[int, int]]] = {}
            offset = 0
            for name, p in shared:
                layers.setdefault(layer_of(name), []).append((offset, offset + p.numel()))
                offset += p.numel()
            grads = shared_task_gradients(losses, [p for _, p in shared]).detach()
            # A task without rows in this batch has no gradient here: leave it out of this batch.
            grads[~batch.label_mask.any(0)] = 0.0
            overall.add(cosine_matrix(grads))
            for layer, spans in layers.items():
                per_layer.setdefault(layer, CosineStats(len(tasks))).add(
                    cosine_matrix(torch.cat([grads[:, a:b] for a, b in spans], dim=1))
                )
            norm_sum += grads.double().norm(dim=1)
            batches += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    result["gradient_cosine"], result["gradient_conflict"] = overall.matrices(tasks)
    for layer, stats in per_layer.items():
        cos, conflict = stats.matrices(tasks)
        result["gradient_cosine_by_layer"][layer] = cos
        result["gradient_conflict_by_layer"][layer] = conflict
    result["gradient_norm"] = {t: float(norm_sum[k] / batches) for k, t in enumerate(tasks)}
    result["gradient_batches"] = batches
    return result


def read_gradients(report: dict[str, Any], tasks: list[str]) -> str:
    """One line: each pair's mean cosine and conflict share, and the layer where they conflict most."""
    if not report["shared_parameters"]:
        return "gradients: no shared parameters, so the tasks cannot conflict"
    parts = []
    for i, a in enumerate(tasks):
        for b in tasks[i + 1 :]:
            cos, conflict = report["gradient_cosine"][a][b], report["gradient_conflict"][a][b]
            if cos is None:
                continue
            verdict = "aligned" if cos > 0.3 else "nearly orthogonal" if cos > -0.05 else "conflicting"
            text = f"{a} and {b} are {verdict} (cos {cos:+.2f}, negative in {conflict:.0%} of batches)"
            by_layer = [
                (layer, m[a][b]) for layer, m in report["gradient_cosine_by_layer"].items() if m[a][b] is not None
            ]
            if len(by_layer) > 1:
                layer, worst = min(by_layer, key=lambda item: item[1])
                text += f", most in {layer} (cos {worst:+.2f})"
            parts.append(text)
    norms = report["gradient_norm"]
    if len(norms) > 1 and min(norms.values()) > 0:
        big, small = max(norms, key=norms.__getitem__), min(norms, key=norms.__getitem__)
        parts.append(f"{big}'s gradient is {norms[big] / norms[small]:.1f}x {small}'s")
    return "gradients: " + ("; ".join(parts) if parts else "one task, nothing to compare")

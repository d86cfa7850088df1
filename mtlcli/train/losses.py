"""The training loss: each task's mean over its labelled rows, and the check that it stays finite."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlcli.data.batch import Batch
from mtlcli.distributed import SameOnEveryRank

if TYPE_CHECKING:
    from mtlcli.train.step import StepAt


def task_losses(logits: Tensor, batch: Batch, binary: Tensor, pos_weight: Tensor | None = None) -> Tensor:
    """Per-task mean loss over each task's masked rows: BCE for binary (positive rows weighted by
    ``pos_weight`` [T] when given), MSE for regression. [T]."""
    sums, counts = task_loss_sums(logits, batch, binary, pos_weight)
    return sums / counts.clamp_min(1.0)


def task_loss_sums(
    logits: Tensor, batch: Batch, binary: Tensor, pos_weight: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Each task's loss summed over its masked rows [T], and the count of those rows [T]."""
    labels = batch.labels
    if bool(binary.all()):
        per_row = F.binary_cross_entropy_with_logits(logits, labels, reduction="none", pos_weight=pos_weight)
    elif not bool(binary.any()):
        per_row = (logits - labels) ** 2
    else:
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none", pos_weight=pos_weight)
        per_row = torch.where(binary, bce, (logits - labels) ** 2)
    mask = batch.label_mask.to(per_row.dtype)
    return (per_row * mask).sum(0), mask.sum(0)


class TrainingDiverged(SameOnEveryRank):
    """A task's loss became NaN or infinite (the loss values are global: every rank sees it)."""


def check_finite(losses: Tensor, tasks: list[str], at: StepAt) -> None:
    if not bool(torch.isfinite(losses).all()):
        bad = [t for t, ok in zip(tasks, torch.isfinite(losses).tolist(), strict=True) if not ok]
        raise TrainingDiverged(
            f"the loss of task {', '.join(bad)} became NaN or infinite at epoch {at.epoch}, step {at.in_epoch}",
            "lower train.lr, check the labels and numeric transforms",
        )

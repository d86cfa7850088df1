"""The typed batch every model takes, and a split held as contiguous tensors."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Batch:
    """The only model input.

    categorical: int64 [B, F_cat], per-feature ids (0 = out of vocabulary, 1 = missing)
    numeric:     float32 [B, F_num], already filled and transformed
    labels:      float32 [B, T], one column per task in recipe order
    label_mask:  bool [B, T], True where the row counts for that task's loss and metrics
    groups:      int64 [B] group ids for GAUC (data.group), -1 without a group; metrics only
    """

    categorical: Tensor
    numeric: Tensor
    labels: Tensor
    label_mask: Tensor
    groups: Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class SplitTensors:
    """One encoded split (train, valid or test), each part one contiguous tensor.

    Batches are views (slices) of a once-per-epoch shuffled copy: no per-row Python anywhere.
    """

    categorical: Tensor
    numeric: Tensor
    labels: Tensor
    label_mask: Tensor
    groups: Tensor | None = None  # int64 [N] group ids for GAUC (data.group), -1 without a group

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        skip: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> Iterator[Batch]:
        """Batches in order, or in a fresh random order when ``shuffle``; ``skip`` leaves out the
        first batches (to finish an interrupted epoch); process ``rank`` of ``world`` gets its
        slice of each global batch (see ``mtlcli.data.source``)."""
        parts: tuple[Tensor, ...] = (self.categorical, self.numeric, self.labels, self.label_mask)
        if self.groups is not None:
            parts = (*parts, self.groups)
        if shuffle:
            order = torch.randperm(len(self), generator=generator)
            parts = tuple(part[order] for part in parts)
        for start in range(skip * batch_size, len(self), batch_size):
            stop = start + batch_size
            chunk = tuple(part[start:stop] for part in parts)
            if world > 1:
                chunk = tuple(torch.tensor_split(part, world)[rank] for part in chunk)
            yield Batch(*chunk)

    def all(self) -> Batch:
        return Batch(self.categorical, self.numeric, self.labels, self.label_mask, self.groups)

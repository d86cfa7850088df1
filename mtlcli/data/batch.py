"""The typed batch every model takes, and a split held as contiguous tensors."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Batch:
    """The only model input.

    categorical:      int64 [B, F_cat], per-feature ids (0 = out of vocabulary, 1 = missing)
    numeric:          float32 [B, F_num], already filled and transformed
    labels:           float32 [B, T], one column per task in recipe order
    label_mask:       bool [B, T], True where the row counts for that task's loss and metrics
    groups:           int64 [B] group ids for GAUC (data.group), -1 without a group; metrics only
    sequences:        int64 [B, S, L] ids of each sequence feature (most recent first, padded
                      after its length), or None without sequence features
    sequence_lengths: int64 [B, S], how many of each row's L ids are real
    """

    categorical: Tensor
    numeric: Tensor
    labels: Tensor
    label_mask: Tensor
    groups: Tensor | None = None
    sequences: Tensor | None = None
    sequence_lengths: Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> Batch:
        """The batch on ``device`` (itself when it is there already)."""
        if self.labels.device == device:
            return self
        return Batch(**{name: part.to(device, non_blocking=True) for name, part in present(self).items()})


def present(rows: Batch | SplitTensors) -> dict[str, Tensor]:
    """The tensors a batch or split holds, by field name (fields that are None left out): every
    one has the rows first, so a permutation or a slice applies to all alike."""
    return {f.name: getattr(rows, f.name) for f in dataclasses.fields(rows) if getattr(rows, f.name) is not None}


@dataclass(frozen=True)
class SplitTensors:
    """One encoded split (train, valid or test), each part one contiguous tensor (fields as in
    ``Batch``).

    Batches are views (slices) of a once-per-epoch shuffled copy: no per-row Python anywhere.
    """

    categorical: Tensor
    numeric: Tensor
    labels: Tensor
    label_mask: Tensor
    groups: Tensor | None = None
    sequences: Tensor | None = None
    sequence_lengths: Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def shards(self) -> int:
        """In memory, the order is one permutation of the whole split (see ``StreamedSplit``)."""
        return 1

    def steps(self, batch_size: int) -> int:
        """Global batches in an epoch."""
        return -(-len(self) // batch_size)

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
        parts = present(self)
        if shuffle:
            order = torch.randperm(len(self), generator=generator)
            parts = {name: part[order] for name, part in parts.items()}
        for start in range(skip * batch_size, len(self), batch_size):
            stop = start + batch_size
            chunk = {name: part[start:stop] for name, part in parts.items()}
            if world > 1:
                chunk = {name: torch.tensor_split(part, world)[rank] for name, part in chunk.items()}
            yield Batch(**chunk)

    def select(self, index: Tensor) -> SplitTensors:
        """The rows ``index`` (a slice, mask or index tensor) of every field."""
        return SplitTensors(**{name: part[index] for name, part in present(self).items()})

    def all(self) -> Batch:
        return Batch(**present(self))

"""The typed batch every model takes, and a split held as contiguous tensors."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from mtlcli.kernels import gather_runs


@dataclass(frozen=True)
class Batch:
    """The only model input.

    categorical:      int64 [B, F_cat], per-feature ids (0 = out of vocabulary, 1 = missing)
    numeric:          float32 [B, F_num], already filled and transformed
    labels:           float32 [B, T], one column per task in recipe order
    label_mask:       bool [B, T], True where the row counts for that task's loss and metrics
    groups:           int64 [B] group ids for GAUC (data.group), -1 without a group; metrics only
    sequences:        int64 [B, S, L] ids of each sequence feature (most recent first, padded
                      after its length), or None without sequence features or when they come packed
    sequence_lengths: int64 [B, S], how many of each row's ids are real
    history_ids:      int32 or int64 [N], the histories packed instead of padded: the ids present
                      only, history by history (history 0 of rows 0..B-1, then history 1, ...), each
                      row's as in ``sequences``; N = sequence_lengths.sum(). Set where ``sequences``
                      is None (a batch holds its histories one way or the other)
    """

    categorical: Tensor
    numeric: Tensor
    labels: Tensor
    label_mask: Tensor
    groups: Tensor | None = None
    sequences: Tensor | None = None
    sequence_lengths: Tensor | None = None
    history_ids: Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def padded(self) -> Batch:
        """The batch with its histories padded (itself when they are): for what reads [B, S, L]
        (export, DTRN, explain); L is the longest history of the batch."""
        if self.history_ids is None:
            return self
        assert self.sequence_lengths is not None
        sequences = unpack(self.history_ids, self.sequence_lengths)
        return dataclasses.replace(self, sequences=sequences, history_ids=None)

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
    Histories are held padded (``sequences``) or packed: ``history_ids`` the ids present of every
    row, history by history (int32 where the vocabulary allows), and ``history_starts`` int64
    [N, S] where each row's ids of each history begin in them. Packed, an epoch's shuffle copies
    the starts and lengths only, and each batch gathers its rows' ids (``gather_histories``):
    its cost follows the items present, not the longest history.
    """

    categorical: Tensor
    numeric: Tensor
    labels: Tensor
    label_mask: Tensor
    groups: Tensor | None = None
    sequences: Tensor | None = None
    sequence_lengths: Tensor | None = None
    history_ids: Tensor | None = None
    history_starts: Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _by_row(self) -> dict[str, Tensor]:
        """The parts with the rows first (all but the packed ids)."""
        return {name: part for name, part in present(self).items() if name != "history_ids"}

    def _batch(self, parts: dict[str, Tensor]) -> Batch:
        """A batch of rows' parts: with packed histories, their ids gathered and the starts dropped."""
        starts = parts.pop("history_starts", None)
        if starts is not None:
            assert self.history_ids is not None
            parts["history_ids"] = gather_histories(self.history_ids, starts, parts["sequence_lengths"])
        return Batch(**parts)

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
        parts = self._by_row()
        if shuffle:
            order = torch.randperm(len(self), generator=generator)
            parts = {name: part[order] for name, part in parts.items()}
        for start in range(skip * batch_size, len(self), batch_size):
            stop = start + batch_size
            chunk = {name: part[start:stop] for name, part in parts.items()}
            if world > 1:
                chunk = {name: torch.tensor_split(part, world)[rank] for name, part in chunk.items()}
            yield self._batch(chunk)

    def select(self, index: Tensor) -> SplitTensors:
        """The rows ``index`` (a slice, mask or index tensor) of every field (packed histories stay
        packed: the rows' ids gathered)."""
        parts = {name: part[index] for name, part in self._by_row().items()}
        if self.history_ids is None:
            return SplitTensors(**parts)
        packed = self._batch(parts)
        return SplitTensors(**present(packed), history_starts=history_starts(parts["sequence_lengths"]))

    def padded(self) -> SplitTensors:
        """The split with its histories padded (itself when they are), for what reads [N, S, L]."""
        if self.history_ids is None:
            return self
        padded = self.all().padded()
        return SplitTensors(**present(padded))

    def packed(self) -> SplitTensors:
        """The split with its histories packed (itself when they are, or without histories)."""
        if self.sequences is None or self.sequence_lengths is None:
            return self
        lengths = self.sequence_lengths
        real = torch.arange(self.sequences.shape[2]) < lengths.unsqueeze(-1)  # [N, S, L]
        ids = self.sequences.transpose(0, 1)[real.transpose(0, 1)]  # history by history
        narrow = ids.numel() == 0 or int(ids.max()) <= torch.iinfo(torch.int32).max
        parts = {name: part for name, part in present(self).items() if name != "sequences"}
        return SplitTensors(
            **parts, history_ids=ids.int() if narrow else ids.contiguous(), history_starts=history_starts(lengths)
        )

    def all(self) -> Batch:
        return self._batch(self._by_row())


def history_starts(lengths: Tensor) -> Tensor:
    """int64 [N, S]: where each row's ids of each history begin in ids packed history by history
    (see ``SplitTensors``) from their lengths [N, S]."""
    flat = lengths.t().reshape(-1)
    ends = torch.cumsum(flat, 0)
    return (ends - flat).view(lengths.shape[1], lengths.shape[0]).t()


def gather_histories(ids: Tensor, starts: Tensor, lengths: Tensor) -> Tensor:
    """The ids [N] of some rows' histories, history by history (as ``Batch.history_ids``), from
    packed ``ids`` with the rows' ``starts`` and ``lengths`` [B, S] (a split is held on the CPU):
    one copy per row and history (``kernels.gather_runs``), no per-row Python."""
    begin, size = starts.t().reshape(-1).numpy(), lengths.t().reshape(-1).numpy()
    return torch.from_numpy(gather_runs(ids.numpy(), begin, size))


def unpack(ids: Tensor, lengths: Tensor, longest: int | None = None) -> Tensor:
    """Packed history ids (as ``Batch.history_ids``) with their lengths [B, S] -> int64 [B, S, L]
    padded with 0 after each length; L = ``longest`` or the longest history (at least 1)."""
    batch_size, histories = lengths.shape
    width = longest if longest is not None else max(1, int(lengths.max())) if lengths.numel() else 1
    present = torch.arange(width, device=ids.device) < lengths.t().unsqueeze(-1)  # [S, B, L]
    out = torch.zeros(histories, batch_size, width, dtype=torch.long, device=ids.device)
    out[present] = ids.long()
    return out.permute(1, 0, 2).contiguous()

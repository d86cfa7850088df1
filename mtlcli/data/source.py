"""Batch sources: where training and evaluation take their batches from.

Two implementations of one protocol (``BatchSource``):

- ``SplitTensors`` (``mtlcli.data.batch``): the whole encoded split in memory, shuffled by one
  permutation per epoch;
- ``StreamedSplit``: the split's Parquet file read a window of rows at a time. An epoch visits
  the file's blocks (``block_rows`` consecutive rows) in a seeded random order; consecutive
  blocks make a window of at most ``window_rows`` rows, whose rows are shuffled together (the
  bounded shuffle buffer); the windows, one after the other, are cut into batches. The next
  window is read and shuffled on a background thread while the current one trains, so a step
  does not wait on the disk. Memory: about five windows at the peak, whatever the split's size.

Both draw an epoch's order from the caller's generator, the same way when one window holds the
whole split: then the streamed order *is* the in-memory order, batch for batch. Both skip the
first batches of an epoch cheaply (resume): a stream starts reading at the window that holds the
first batch to give. Both give process ``rank`` of ``world`` its slice of each global batch, so
N processes together see the one global order.

A training stream of S ``shards`` (``train.shards``) deals the epoch's shuffled blocks to S
shards in turn; each shard is a stream of its own windows as above, and a global batch of B rows
is B/S consecutive rows of every shard, in shard order. Process ``rank`` of ``world`` reads only
its S/world shards, so N processes read 1/N of the split each, and one process streaming S shards
sees the same global batches as S/k processes of k shards. The shards' rows differ by at most a
block (the short last block is dealt last, so their sizes, and the steps of an epoch, are known
before reading); the last steps of an epoch take rows from the longer shards only, and a rank
whose shards are used up takes part with an empty slice. An unshuffled stream (evaluation) on
several processes deals its blocks the same way: every rank scores its own rows.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from mtlcli.data.batch import Batch
from mtlcli.data.load import SplitFile
from mtlcli.errors import DataError


class BatchSource(Protocol):
    """Rows of one split, given as batches in a seeded order."""

    def __len__(self) -> int: ...

    @property
    def shards(self) -> int:
        """Shards an epoch's order is dealt to (1: one order, each process slicing every batch)."""
        ...

    def steps(self, batch_size: int) -> int:
        """Global batches in an epoch."""
        ...

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        skip: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> Iterator[Batch]: ...


Parts = dict[str, Tensor]  # a Batch's fields by name, each with the rows first


def rank_slice(parts: Parts, rank: int, world: int) -> Parts:
    """Process ``rank``'s share of one global batch: contiguous, as even as the rows allow."""
    if world == 1:
        return parts
    return {name: torch.tensor_split(part, world)[rank] for name, part in parts.items()}


@dataclass(frozen=True)
class Window:
    start: int  # position of its first row in the epoch's stream
    blocks: list[int]  # block indices, in the order read


class StreamedSplit:
    """An encoded split streamed from its Parquet file (see the module docstring)."""

    def __init__(
        self, file: SplitFile, window_rows: int, block_rows: int = 65_536, read_ahead: bool = True, shards: int = 1
    ) -> None:
        self.file = file
        self.rows = file.rows
        self.window_rows = max(1, window_rows)
        self.shards = max(1, shards)
        # a split cut into fewer blocks than shards is cut finer (only where S > 1: one shard keeps
        # the order it has always had)
        finer = -(-self.rows // self.shards) if self.shards > 1 else block_rows
        self.block_rows = max(1, min(block_rows, self.window_rows, finer))
        self.read_ahead = read_ahead
        self._empty: Parts | None = None

    def __len__(self) -> int:
        return self.rows

    @property
    def whole(self) -> bool:
        """Does one window hold the whole split (then the order equals the in-memory one)?"""
        return self.window_rows >= self.rows and self.shards == 1

    @property
    def blocks(self) -> int:
        return -(-self.rows // self.block_rows)

    def _block_size(self, block: int) -> int:
        return min(self.block_rows, self.rows - block * self.block_rows)

    def shard_rows(self) -> list[int]:
        """Rows of each shard: the same every epoch, the short last block being dealt last."""
        rows = [len(range(s, self.blocks, self.shards)) * self.block_rows for s in range(self.shards)]
        rows[(self.blocks - 1) % self.shards] -= self.block_rows - self._block_size(self.blocks - 1)
        return rows

    def steps(self, batch_size: int) -> int:
        if self.shards == 1:
            return -(-self.rows // batch_size)
        piece = batch_size // self.shards
        return max(-(-rows // piece) for rows in self.shard_rows())

    def _windows(self, blocks: list[int]) -> list[Window]:
        """Windows of ``per`` consecutive blocks of ``blocks``, each placed in the stream they make."""
        per = max(1, self.window_rows // self.block_rows)
        windows, start = [], 0
        for i in range(0, len(blocks), per):
            chosen = blocks[i : i + per]
            windows.append(Window(start, chosen))
            start += sum(self._block_size(b) for b in chosen)
        return windows

    def _order(self, shuffle: bool, generator: torch.Generator | None) -> tuple[list[int], int | None]:
        """The epoch's block order and the seed of the windows' row shuffles (None: file order)."""
        if not shuffle:
            return list(range(self.blocks)), None
        order = torch.randperm(self.blocks, generator=generator).tolist()
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        if self.shards > 1:  # the short block last: every shard's size is known in advance
            order.remove(self.blocks - 1)
            order.append(self.blocks - 1)
        return order, seed

    def _read(self, window: Window, index: int, seed: int | None, whole_order: Tensor | None) -> Parts:
        """A window's rows as tensors, shuffled (its blocks are read in runs of adjacent ones).
        NumPy only until the end (see ``arrays_from_frame``: this runs on the reader thread)."""
        pieces, run = [], [window.blocks[0]]
        for block in window.blocks[1:]:
            if block == run[-1] + 1:
                run.append(block)
                continue
            pieces.append(self._read_run(run))
            run = [block]
        pieces.append(self._read_run(run))
        parts = (
            {name: np.concatenate([p[name] for p in pieces]) for name in pieces[0]} if len(pieces) > 1 else pieces[0]
        )
        order: np.ndarray | None = None
        if whole_order is not None:
            order = whole_order.numpy()
        elif seed is not None:
            order = np.random.default_rng([seed, index]).permutation(len(parts["labels"]))
        if order is not None:
            parts = {name: np.take(part, order, axis=0) for name, part in parts.items()}
        return {name: torch.from_numpy(part) for name, part in parts.items()}

    def _read_run(self, run: list[int]) -> dict[str, np.ndarray]:
        start = run[0] * self.block_rows
        stop = min(self.rows, (run[-1] + 1) * self.block_rows)
        return self.file.window(start, stop - start)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        skip: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> Iterator[Batch]:
        if shuffle and self.shards > 1:
            yield from self._sharded(batch_size, generator, skip, rank, world)
            return
        if not shuffle and world > 1:  # evaluation: each rank scores the blocks dealt to it
            dealt = copy.copy(self)
            dealt.block_rows = min(self.block_rows, -(-self.rows // world))  # every rank some rows
            mine = dealt._windows(list(range(dealt.blocks))[rank::world])
            for parts in dealt._carve(list(enumerate(mine)), None, None, skip * batch_size, batch_size):
                yield _batch(parts)
            return
        whole_order = torch.randperm(self.rows, generator=generator) if shuffle and self.whole else None
        if self.whole:
            windows, seed = [Window(0, list(range(self.blocks)))], None
        else:
            order, seed = self._order(shuffle, generator)
            windows = self._windows(order)
        for parts in self._carve(list(enumerate(windows)), seed, whole_order, skip * batch_size, batch_size):
            yield _batch(rank_slice(parts, rank, world))

    def _sharded(
        self, batch_size: int, generator: torch.Generator | None, skip: int, rank: int, world: int
    ) -> Iterator[Batch]:
        """Global batch k: rows [k b, (k + 1) b) of every shard (b = batch_size / shards); this
        rank's part of it is its own shards' rows, concatenated in shard order."""
        order, seed = self._order(True, generator)
        piece, per_rank = batch_size // self.shards, self.shards // world
        streams = []
        for s in range(rank * per_rank, (rank + 1) * per_rank):
            indexed = [(j * self.shards + s, w) for j, w in enumerate(self._windows(order[s :: self.shards]))]
            streams.append(self._carve(indexed, seed, None, skip * piece, piece))
        try:
            for _ in range(skip, self.steps(batch_size)):
                got = [p for p in (next(stream, None) for stream in streams) if p is not None]
                if not got:
                    yield _batch(self.empty())
                elif len(got) == 1:
                    yield _batch(got[0])
                else:
                    yield _batch({name: torch.cat([p[name] for p in got]) for name in got[0]})
        finally:
            for stream in streams:
                stream.close()

    def empty(self) -> Parts:
        """A batch of no rows, with every field's shape (a rank's part of an epoch's last steps)."""
        if self._empty is None:
            self._empty = {name: torch.from_numpy(part) for name, part in self.file.window(0, 0).items()}
        return self._empty

    def _carve(
        self, indexed: list[tuple[int, Window]], seed: int | None, whole_order: Tensor | None, first: int, size: int
    ) -> Generator[Parts, None, None]:
        """The rows of a stream of windows (each with the index that seeds its shuffle) from
        stream position ``first`` on, in pieces of ``size`` rows (the last may be shorter)."""
        if not indexed:
            return
        last = indexed[-1][1]
        end = last.start + sum(self._block_size(b) for b in last.blocks)
        todo = [(i, w) for k, (i, w) in enumerate(indexed) if k + 1 == len(indexed) or indexed[k + 1][1].start > first]
        if first >= end:
            return
        reader = (
            _ReadAhead(self, todo, seed, whole_order) if self.read_ahead else _Inline(self, todo, seed, whole_order)
        )
        try:
            position = todo[0][1].start
            pending: Parts | None = None  # the rows of a piece begun in the last window
            for parts in reader:
                if position < first:  # resume inside this window
                    parts = {name: part[first - position :] for name, part in parts.items()}
                    position = first
                n, start = len(parts["labels"]), 0
                position += n
                if pending is not None:  # finish the piece begun in the last window
                    start = min(n, size - len(pending["labels"]))
                    pending = {name: torch.cat([part, parts[name][:start]]) for name, part in pending.items()}
                    if len(pending["labels"]) < size:
                        continue
                    yield pending
                    pending = None
                full = start + (n - start) // size * size
                for offset in range(start, full, size):
                    yield {name: part[offset : offset + size] for name, part in parts.items()}
                if full < n:  # a copy, so that the window itself can be freed
                    pending = {name: part[full:].clone() for name, part in parts.items()}
            if pending is not None:
                yield pending
        finally:
            reader.close()


def _batch(parts: Parts) -> Batch:
    return Batch(**parts)


class _Inline:
    """Windows read on the calling thread (for tests and debugging)."""

    def __init__(
        self, source: StreamedSplit, todo: list[tuple[int, Window]], seed: int | None, whole: Tensor | None
    ) -> None:
        self.items = (source._read(w, i, seed, whole) for i, w in todo)

    def __iter__(self) -> Iterator[Parts]:
        return iter(self.items)

    def close(self) -> None:
        return None


_DONE = object()
WINDOWS_PER_BUDGET = 5  # see open_source


class _ReadAhead:
    """Windows read and shuffled on a background thread while the consumer trains on the one
    before: at most two windows are alive (the one in use, the next one read or being read)."""

    def __init__(
        self, source: StreamedSplit, todo: list[tuple[int, Window]], seed: int | None, whole: Tensor | None
    ) -> None:
        self.queue: queue.Queue[object] = queue.Queue()
        self.slots = threading.Semaphore(2)  # a window takes a slot from its read until it is used up
        self.stop = threading.Event()
        self.holding = False

        def work() -> None:
            try:
                for i, window in todo:
                    while not self.slots.acquire(timeout=0.1):
                        if self.stop.is_set():
                            return
                    if self.stop.is_set():
                        return
                    self.queue.put(source._read(window, i, seed, whole))
                self.queue.put(_DONE)
            except BaseException as exc:  # handed to the consumer, raised there
                self.queue.put(exc)

        self.thread = threading.Thread(target=work, name="mtl-read-ahead", daemon=True)
        self.thread.start()

    def __iter__(self) -> Iterator[Parts]:
        while True:
            item = self.queue.get()
            if self.holding:  # the previous window is used up: its slot goes to the next read
                self.slots.release()
            self.holding = True
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def check_shards(shards: int, world: int) -> None:
    """Each of ``world`` processes reads shards / world of a training stream's shards (checked by
    the training plan, ``train.plan.resolve_plan``)."""
    if shards % world:
        raise DataError(
            f"train.shards: {shards} shards cannot be shared evenly by {world} processes",
            f"make train.shards a multiple of {world}, or auto (one shard per process)",
        )


def streams(file: SplitFile, loading: str, memory_budget: int) -> bool:
    """Whether ``open_source`` streams ``file`` (``train.loading``; ``auto``: when its tensors do
    not fit ``data.memory_budget``)."""
    return loading == "stream" or (loading == "auto" and file.rows * file.row_bytes > memory_budget)


def open_source(
    file: SplitFile,
    loading: str,
    memory_budget: int,
    shuffle_buffer: int | str,
    batch_size: int,
    field: str,
    shuffled: bool = True,
    shards: int = 1,
) -> BatchSource:
    """The split in memory or streamed (``train.loading``), within ``data.memory_budget``.

    ``auto``: in memory when the split's tensors fit the budget. A stream's window is a fifth of
    the budget: two windows are alive (one trains, the next is read), and reading one takes about
    three times its tensors for a moment (the Parquet columns, their conversion, the shuffled
    copy); a ``shuffled`` (training) stream takes ``train.shuffle_buffer`` rows instead when it is
    set. A window must hold one batch. A training stream of ``shards`` > 1 is shared by the
    processes (the plan checks that they divide it evenly); each shard takes an equal part of a
    batch and at least one row."""
    row_bytes = file.row_bytes
    if not streams(file, loading, memory_budget):
        return file.load()
    by_buffer = shuffled and shuffle_buffer != "auto"
    window = int(shuffle_buffer) if by_buffer else memory_budget // (WINDOWS_PER_BUDGET * row_bytes)
    if window < batch_size:
        what = (
            f"train.shuffle_buffer ({window:,} rows)"
            if by_buffer
            else f"data.memory_budget ({memory_budget:,} bytes holds windows of {window:,} rows of {row_bytes} bytes)"
        )
        raise DataError(
            f"{what} is too small for one batch of {field} ({batch_size:,} rows)",
            "raise data.memory_budget or train.shuffle_buffer, or lower the batch size",
        )
    if not shuffled or shards == 1:
        return StreamedSplit(file, window)
    if batch_size % shards:
        raise DataError(
            f"{field} ({batch_size:,}) does not divide evenly among {shards} shards (train.shards)",
            f"make {field} a multiple of {shards}",
        )
    if file.rows < shards:
        raise DataError(
            f"train.shards: {shards} shards need at least one row each; the split has {file.rows:,}",
            "lower train.shards or the process count",
        )
    return StreamedSplit(file, window, shards=shards)

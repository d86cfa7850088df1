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
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
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

    def __init__(self, file: SplitFile, window_rows: int, block_rows: int = 65_536, read_ahead: bool = True) -> None:
        self.file = file
        self.rows = file.rows
        self.window_rows = max(1, window_rows)
        self.block_rows = max(1, min(block_rows, self.window_rows))
        self.read_ahead = read_ahead

    def __len__(self) -> int:
        return self.rows

    @property
    def whole(self) -> bool:
        """Does one window hold the whole split (then the order equals the in-memory one)?"""
        return self.window_rows >= self.rows

    def _windows(self, shuffle: bool, generator: torch.Generator | None) -> tuple[list[Window], int | None]:
        """The epoch's windows and the seed of their row shuffles (None: rows in file order)."""
        blocks = -(-self.rows // self.block_rows)
        if self.whole:
            return [Window(0, list(range(blocks)))], None
        order = list(range(blocks))
        seed = None
        if shuffle:
            order = torch.randperm(blocks, generator=generator).tolist()
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        per = max(1, self.window_rows // self.block_rows)
        windows, start = [], 0
        for i in range(0, blocks, per):
            chosen = order[i : i + per]
            windows.append(Window(start, chosen))
            start += sum(min(self.block_rows, self.rows - b * self.block_rows) for b in chosen)
        return windows, seed

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
        whole_order = torch.randperm(self.rows, generator=generator) if shuffle and self.whole else None
        windows, seed = self._windows(shuffle, generator)
        first = skip * batch_size  # the stream position of the first row to give
        todo = [(i, w) for i, w in enumerate(windows) if i + 1 == len(windows) or windows[i + 1].start > first]
        if not todo or first >= self.rows:
            return
        reader = (
            _ReadAhead(self, todo, seed, whole_order) if self.read_ahead else _Inline(self, todo, seed, whole_order)
        )
        try:
            position = todo[0][1].start
            pending: Parts | None = None  # the rows of a batch begun in the last window
            for parts in reader:
                if position < first:  # resume inside this window
                    parts = {name: part[first - position :] for name, part in parts.items()}
                    position = first
                n, start = len(parts["labels"]), 0
                position += n
                if pending is not None:  # finish the batch begun in the last window
                    start = min(n, batch_size - len(pending["labels"]))
                    pending = {name: torch.cat([part, parts[name][:start]]) for name, part in pending.items()}
                    if len(pending["labels"]) < batch_size:
                        continue
                    yield _batch(rank_slice(pending, rank, world))
                    pending = None
                full = start + (n - start) // batch_size * batch_size
                for offset in range(start, full, batch_size):
                    batch = {name: part[offset : offset + batch_size] for name, part in parts.items()}
                    yield _batch(rank_slice(batch, rank, world))
                if full < n:  # a copy, so that the window itself can be freed
                    pending = {name: part[full:].clone() for name, part in parts.items()}
            if pending is not None:
                yield _batch(rank_slice(pending, rank, world))
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


def open_source(
    file: SplitFile,
    loading: str,
    memory_budget: int,
    shuffle_buffer: int | str,
    batch_size: int,
    field: str,
    shuffled: bool = True,
) -> BatchSource:
    """The split in memory or streamed (``train.loading``), within ``data.memory_budget``.

    ``auto``: in memory when the split's tensors fit the budget. A stream's window is a fifth of
    the budget: two windows are alive (one trains, the next is read), and reading one takes about
    three times its tensors for a moment (the Parquet columns, their conversion, the shuffled
    copy); a ``shuffled`` (training) stream takes ``train.shuffle_buffer`` rows instead when it is
    set. A window must hold one batch."""
    row_bytes = file.row_bytes
    if loading == "memory" or (loading == "auto" and file.rows * row_bytes <= memory_budget):
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
    return StreamedSplit(file, window)

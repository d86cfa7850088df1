"""Stage 6, load: an encoded split file as contiguous tensors, whole or a window of rows at a time
(``mtlcli.data.source`` batches them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from mtlcli.data.batch import SplitTensors
from mtlcli.data.encode import GROUP_COLUMN, SEQUENCE_PREFIX, WINDOW_AT, WINDOW_LENGTH
from mtlcli.data.labels import LABEL_PREFIX, MASK_PREFIX
from mtlcli.data.schema import DataSchema, SequenceFeature
from mtlcli.errors import ArtifactError
from mtlcli.kernels import gather_runs


@dataclass(frozen=True)
class SplitFile:
    """One encoded split on disk (``train.parquet``): its rows, and reads of all or part of it."""

    path: Path
    schema: DataSchema

    def _scan(self) -> pl.LazyFrame:
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: encoded split not found", "re-run `mtl preprocess`")
        return pl.scan_parquet(self.path)

    def _read(self, query: pl.LazyFrame) -> pl.DataFrame:
        try:
            return query.collect()
        except (pl.exceptions.PolarsError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"{self.path}: unreadable ({first})", "re-run `mtl preprocess`") from None

    @property
    def rows(self) -> int:
        return int(self._read(self._scan().select(pl.len())).item())

    @property
    def row_bytes(self) -> int:
        """Bytes one row takes as tensors (int64 ids, float32 numbers and labels, bool masks), its
        histories counted at their bound as a window holds them (``max_len`` int64 ids and a
        length each): a row of long histories can weigh far more than its other columns, and
        the choice between holding a split and streaming it must see that."""
        tasks = len(self.schema.tasks)
        groups = 8 if self.schema.group is not None else 0
        histories = sum(8 * (s.max_len + 1) for s in self.schema.sequences)
        return 8 * len(self.schema.categorical) + 4 * len(self.schema.numeric) + 5 * tasks + groups + histories

    def load(self) -> SplitTensors:
        """The whole split as contiguous tensors (see Batch for the layout)."""
        return tensors_from_frame(self._read(self._scan()), self.schema, self.events)

    def window(self, offset: int, rows: int) -> dict[str, np.ndarray]:
        """Rows [offset, offset + rows) as numpy arrays (see ``arrays_from_frame``); only the row
        groups holding them are read."""
        return arrays_from_frame(self._read(self._scan().slice(offset, rows)), self.schema, events=self.events)

    def events(self, index: int) -> np.ndarray:
        """History ``index``'s ids, newest first, that this split's windows point into (read
        from disk as they are used, never all in memory: a log of 10^8 events is 400 MB)."""
        path = history_path(self.path.parent, index)
        try:
            events = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{path}: unreadable ({exc})", "re-run `mtl preprocess`") from None
        if events.ndim != 1 or events.dtype.kind != "i":
            raise ArtifactError(
                f"{path}: not a history's ids ({events.dtype}, {events.ndim} dimensions)", "re-run `mtl preprocess`"
            )
        return events

    def histories(self, name: str) -> list[list[int]]:
        """History ``name`` of every row as lists of ids, most recent first (to inspect a split)."""
        index = [f.name for f in self.schema.sequences].index(name)
        frame = self._read(self._scan())
        lengths, ids = history_ids(frame, index, self.schema.sequences[index], self.events)
        return [chunk.tolist() for chunk in np.split(ids, np.cumsum(lengths)[:-1])] if len(lengths) else []


def history_path(directory: Path, index: int) -> Path:
    """Where an encoded split's directory keeps the ids of its history ``index`` from events."""
    return directory / f"history-{index}.npy"


def window_ids(events: np.ndarray, at: np.ndarray, lengths: np.ndarray, where: str) -> np.ndarray:
    """Each row's window of ``events``, row after row: ``events[at[r]:at[r] + lengths[r]]``
    (one copy per row, ``kernels.gather_runs``, which refuses a window outside the ids)."""
    try:
        return gather_runs(events, at, lengths)
    except IndexError:
        raise ArtifactError(
            f"{where}: a row's window lies outside its history's ids", "re-run `mtl preprocess`"
        ) from None


Events = Callable[[int], np.ndarray]  # a history's index -> its ids from events (SplitFile.events)


def history_ids(
    frame: pl.DataFrame, index: int, feature: SequenceFeature, events: Events | None
) -> tuple[np.ndarray, np.ndarray]:
    """History ``index`` of every row of an encoded frame: int64 lengths [N] and the ids [M],
    row after row, each row's most recent first; from its list column, or from its window of
    the history's events (``with_event_histories``)."""
    name = SEQUENCE_PREFIX + feature.name
    if name in frame.columns:
        column = frame.get_column(name)
        lengths = column.list.len().fill_null(0).to_numpy().astype(np.int64)
        return lengths, column.explode().drop_nulls().to_numpy()
    at, length = WINDOW_AT + feature.name, WINDOW_LENGTH + feature.name
    if at not in frame.columns or length not in frame.columns or events is None:
        raise ArtifactError(f"encoded data has no {name!r} column", "re-run `mtl preprocess`")
    lengths = frame.get_column(length).to_numpy().astype(np.int64)
    ids = window_ids(events(index), frame.get_column(at).to_numpy().astype(np.int64), lengths, name)
    return lengths, ids


def load_split(directory: Path, split: str, schema: DataSchema) -> SplitTensors:
    """An encoded split as contiguous tensors (see Batch for the layout)."""
    return SplitFile(directory / f"{split}.parquet", schema).load()


def label_mask(frame: pl.DataFrame, schema: DataSchema, labels: torch.Tensor) -> torch.Tensor:
    """bool [N, T]: True where the row is in the task's sample space (everywhere for most tasks)."""
    return torch.from_numpy(_mask_array(frame, schema, labels.shape[0]))


def _mask_array(frame: pl.DataFrame, schema: DataSchema, rows: int) -> np.ndarray:
    mask = np.ones((rows, len(schema.tasks)), dtype=bool)
    for k, task in enumerate(schema.tasks):
        if task.has_space:
            column = MASK_PREFIX + task.name
            if column not in frame.columns:
                raise ArtifactError(f"encoded data has no {column!r} column", "re-run `mtl preprocess`")
            mask[:, k] = frame.get_column(column).to_numpy().astype(bool)
    return mask


def arrays_from_frame(
    frame: pl.DataFrame, schema: DataSchema, packed: bool = False, events: Events | None = None
) -> dict[str, np.ndarray]:
    """The fields of ``Batch`` (categorical int64 [N, F_cat], numeric float32 [N, F_num], labels
    float32 [N, T], label_mask bool [N, T], with data.group the groups int64 [N], histories padded
    or, with ``packed``, as ``packed_arrays``) as C-contiguous numpy arrays. NumPy only,
    no torch operation: a reader thread that ran torch operations would start a second OpenMP team
    of threads, whose spinning took a fifth of the training thread's time on two cores."""
    cat_names = [f.name for f in schema.categorical]
    num_names = [f.name for f in schema.numeric]
    label_names = [LABEL_PREFIX + t for t in schema.task_names]
    missing = [c for c in [*cat_names, *num_names, *label_names] if c not in frame.columns]
    if missing:
        raise ArtifactError(
            f"encoded data does not match its schema (missing {missing[:5]})", "re-run `mtl preprocess`"
        )
    n = frame.height

    def block(names: list[str], dtype: Any) -> np.ndarray:
        if not names:
            return np.zeros((n, 0), dtype=dtype)
        return np.require(frame.select(names).to_numpy(), dtype=dtype, requirements=["C", "W"])

    arrays = {
        "categorical": block(cat_names, np.int64),
        "numeric": block(num_names, np.float32),
        "labels": block(label_names, np.float32),
        "label_mask": _mask_array(frame, schema, n),
    }
    if schema.group is not None:
        if GROUP_COLUMN not in frame.columns:
            raise ArtifactError(f"encoded data has no {GROUP_COLUMN!r} column", "re-run `mtl preprocess`")
        arrays["groups"] = np.require(frame.get_column(GROUP_COLUMN).to_numpy(), np.int64, ["C", "W"])
    if schema.sequences and packed:
        arrays["history_ids"], arrays["history_starts"], arrays["sequence_lengths"] = packed_arrays(
            frame, schema, events
        )
    elif schema.sequences:
        arrays["sequences"], arrays["sequence_lengths"] = sequence_arrays(frame, schema, n, events)
    return arrays


def sequence_arrays(
    frame: pl.DataFrame, schema: DataSchema, rows: int, events: Events | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """int64 [N, S, L] ids of each history (padded with 0 after its length; L the longest
    max_len) and int64 [N, S] lengths."""
    longest = max(f.max_len for f in schema.sequences)
    ids = np.zeros((rows, len(schema.sequences), longest), dtype=np.int64)
    lengths = np.zeros((rows, len(schema.sequences)), dtype=np.int64)
    for s, feature in enumerate(schema.sequences):
        count, flat = history_ids(frame, s, feature, events)
        block = np.zeros((rows, longest), dtype=np.int64)
        block[np.arange(longest)[None, :] < count[:, None]] = flat  # row-major, as explode
        ids[:, s, :] = block
        lengths[:, s] = count
    return ids, lengths


def packed_arrays(
    frame: pl.DataFrame, schema: DataSchema, events: Events | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The histories packed (see ``SplitTensors``): ids [M] of every row's history 0, then of
    history 1, ... (int32 where every vocabulary fits it, else int64), int64 [N, S] starts and
    int64 [N, S] lengths."""
    read = [history_ids(frame, s, feature, events) for s, feature in enumerate(schema.sequences)]
    lengths = np.stack([count for count, _ in read], axis=1)
    lengths = np.require(lengths.reshape(frame.height, len(read)), np.int64, ["C", "W"])
    wide = max([f.cardinality for f in schema.categorical] + [f.cardinality for f in schema.sequences])
    dtype = np.int32 if wide <= np.iinfo(np.int32).max else np.int64
    ids = np.concatenate([flat.astype(dtype, copy=False) for _, flat in read])
    flat = lengths.T.reshape(-1)
    starts = (np.cumsum(flat) - flat).reshape(len(read), frame.height).T
    return ids, np.require(starts, np.int64, ["C", "W"]), lengths


def tensors_from_frame(frame: pl.DataFrame, schema: DataSchema, events: Events | None = None) -> SplitTensors:
    """The split as tensors, its histories packed (no padding held in memory)."""
    arrays = arrays_from_frame(frame, schema, packed=True, events=events)
    return SplitTensors(**{name: torch.from_numpy(a) for name, a in arrays.items()})

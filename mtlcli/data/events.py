"""Histories derived from an event log (``features.sequences.<name>.events``).

For each row (an impression: a user and a time) the history is the same user's events strictly
before the row's time, oldest first: an event at the row's own time counts as later, so the
impression's own event (a click logged with the impression's timestamp) never leaks into its
history. Events with equal times are ordered by item id, so the history does not depend on the
order of the log's lines. Item ids are stripped of surrounding spaces and empty ones dropped, as
in a list column. The history is encoded like a list column (last ``max_len`` ids, most recent
first); at serving it comes as a list column named after the sequence.

The log is read once and sorted by (user, time, item) into an ``EventLog``: its memory grows
with the number of events (about 16 bytes each, plus each distinct user's text), never with the
rows. Each row's history is then a window of that sorted log, found by one binary search per row
(a user's events are contiguous and in time order), so rows are encoded chunk by chunk and a
row's history depends on nothing but its own user and time. The histories of one log (one per
behaviour type, say) share its search: each ``EventIndex`` maps the log's window to its own
events by prefix counts of the events it keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from mtlcli.data.checks import ROW_COLUMN, RowCheck, declared_types, enforce, number_exprs
from mtlcli.data.scan import SPLIT_COLUMN, Scanned, format_of, require_columns, resolve_files, unreadable
from mtlcli.data.schema import FIRST_ID, OOV_ID
from mtlcli.errors import DataError
from mtlcli.recipe.schema import EventsOptions, Recipe

_USER, _ITEM, _EVENT_TIME, _TYPE = "__user", "__item", "__event_time", "__type"
ROW_USER, ROW_TIME = "__events_user:", "__events_time:"  # + the history's name: a row's user code and time


def _times(column: str, dtype: pl.DataType) -> pl.Expr:
    """A time column as float64: numbers as they are, dates and datetimes as epoch microseconds."""
    if dtype in (pl.Date, pl.Datetime) or isinstance(dtype, pl.Datetime):
        return pl.col(column).dt.epoch("us").cast(pl.Float64)
    return number_exprs(column, dtype)[0]


def _time_checks(column: str, dtype: pl.DataType, where: str) -> list[RowCheck]:
    """A time must be a finite number (or a date); a missing one is refused too."""
    values = _times(column, dtype)
    text = pl.col(column).cast(pl.String)

    def error(value: object, row: int, count: int) -> DataError:
        return DataError(
            f"{where}: column {column!r} holds {value!r} at row {row} ({count} such rows), not a time",
            "times are numbers (e.g. Unix seconds) or datetimes, never missing",
        )

    return [RowCheck(values.is_null() | ~values.is_finite(), text, error)]


def event_files(recipe: Recipe) -> list[tuple[str, Path]]:
    """("events:<sequence>", file) for every event file the recipe's histories read (for the cache key)."""
    return [
        (f"events:{name}", path)
        for name, options in recipe.features.sequences.items()
        if options.events is not None
        for path in _files(options.events, f"features.sequences.{name}.events")
    ]


def _files(options: EventsOptions, field: str) -> list[Path]:
    return [f for i, p in enumerate(options.source) for f in resolve_files(p, f"{field}.source[{i}]")]


def _scan_events(options: EventsOptions, field: str) -> tuple[pl.LazyFrame, list[Path]]:
    files = _files(options, field)
    parts = []
    for path in files:
        fmt = format_of(path)
        try:
            lazy = pl.scan_parquet(path) if fmt == "parquet" else pl.scan_csv(path, infer_schema=False)
            names = lazy.collect_schema().names()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise unreadable(path, fmt, exc) from None
        wanted = [options.user, options.item, options.time, *([options.type] if options.type else [])]
        for name in wanted:
            if name not in names:
                raise DataError(
                    f"{field}: the event file {path} has no column {name!r}",
                    f"its columns: {', '.join(names[:12])}",
                )
        parts.append(lazy.select(wanted))
    return pl.concat(parts, how="vertical_relaxed").with_row_index(ROW_COLUMN), files


@dataclass(frozen=True)
class EventLog:
    """An event log sorted by (user, time, item), as arrays, shared by every history that reads it
    with the same row columns: one binary search per row finds where the row's user's events at
    or after its time begin, for all of those histories at once.

    ``users`` holds the distinct users (text) in order; user ``u``'s events are positions
    ``first[u]`` to ``first[u + 1]``. ``keys`` [E] (int64, ascending) is ``u * (len(times) + 1) + r``
    for an event of user ``u`` whose time is ``times[r]`` (``times``: the distinct event times,
    ascending). ``user`` and ``time`` are the expressions that give a row its user's index (null:
    no event) and its time (float64), named ``ROW_USER``/``ROW_TIME`` + ``name``."""

    name: str
    users: pl.Series
    first: np.ndarray
    keys: np.ndarray
    times: np.ndarray
    user: pl.Expr
    time: pl.Expr

    def ends(self, user: np.ndarray, time: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(user, end) [N] int64: each row's user index (-1: a user without events) and the
        position where its user's events at or after its time begin (0 without events)."""
        known = user >= 0
        u = np.where(known, user, 0).astype(np.int64)
        before = np.searchsorted(self.times, time, side="left")  # distinct event times < the row's time
        end = np.searchsorted(self.keys, u * (len(self.times) + 1) + before, side="left").astype(np.int64)
        return np.where(known, user, -1).astype(np.int64), np.where(known, end, 0)

    def rows(self, batch: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """``ends`` of a batch holding this log's ``ROW_USER`` and ``ROW_TIME`` columns."""
        user = batch.get_column(ROW_USER + self.name).cast(pl.Int64).fill_null(-1).to_numpy()
        return self.ends(user, batch.get_column(ROW_TIME + self.name).to_numpy())


@dataclass(frozen=True)
class EventIndex:
    """One history's events: those of ``log`` it keeps (all, or its types), in the log's order.

    ``kept`` [E + 1] (int64, or None when every event is kept) counts the kept events among the
    log's first ``p``, so that a window of the log maps to the window of this history's events
    (``items``, text ids) by two lookups, and histories of one log share its search."""

    name: str
    log: EventLog
    kept: np.ndarray | None
    items: pl.Series

    @property
    def user(self) -> pl.Expr:
        return self.log.user

    @property
    def time(self) -> pl.Expr:
        return self.log.time

    def windows(self, user: np.ndarray, end: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(start, end) [N] int64: the positions in ``items`` of each row's last ``max_len``
        events strictly before its time, from the log's ``ends`` (``user`` -1: none)."""
        known = user >= 0
        lowest = self.log.first[np.where(known, user, 0)]
        if self.kept is not None:
            lowest, end = self.kept[lowest], self.kept[end]
        start = np.where(known, np.maximum(lowest, end - max_len), 0)
        return start, np.where(known, end, 0)

    def rows(self, batch: pl.DataFrame, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """``windows`` of a batch holding the log's ``ROW_USER`` and ``ROW_TIME`` columns."""
        return self.windows(*self.log.rows(batch), max_len)

    def ids(self, vocab: list[str]) -> np.ndarray:
        """The events' items as int32 ids in ``vocab`` (FIRST_ID onwards; OOV_ID outside it)."""
        position = self.items.cast(pl.Enum(vocab), strict=False).to_physical().cast(pl.Int32)
        return (position + FIRST_ID).fill_null(OOV_ID).to_numpy().astype(np.int32)

    def counts(self, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        """[E] int64: how many of the windows (start, end) hold each of the history's events."""
        size = len(self.items) + 1
        steps = np.bincount(start, minlength=size) - np.bincount(end, minlength=size)
        return np.cumsum(steps)[:-1]


def newest_first(ids: np.ndarray) -> np.ndarray:
    """The events' ids in reverse order, then one 0: a history's ids as an encoded split stores
    them (see ``encode.with_event_histories``), each row's window newest first in one run."""
    return np.concatenate([ids[::-1], np.zeros(1, ids.dtype)])


Collect = Callable[[pl.LazyFrame], pl.DataFrame]


def train_counts(scanned: Scanned, index: EventIndex, max_len: int, chunk: int) -> pl.DataFrame:
    """(id, count): how many times each item occurs in the train rows' histories (for a history's
    own vocabulary), the rows streamed ``chunk`` at a time; memory grows with the events only."""
    held = np.zeros(len(index.items), np.int64)

    def add(batch: pl.DataFrame) -> None:
        held[:] += index.counts(*index.rows(batch, max_len))

    train = scanned.frame.filter(pl.col(SPLIT_COLUMN) == 0).select(index.user, index.time)
    scanned.each_batch(train, chunk, add)
    counted = pl.DataFrame({"id": index.items, "count": held})
    return counted.filter(pl.col("count") > 0).group_by("id").agg(pl.col("count").sum())


def _event_log(name: str, ordered: pl.DataFrame, user: pl.Expr, time: pl.Expr) -> EventLog:
    """The search arrays of a log sorted by (user, time, item), its row columns named after ``name``."""
    users = ordered.get_column(_USER).unique(maintain_order=True)  # in sorted order: user u is users[u]
    code = ordered.select(pl.col(_USER).rle_id()).to_series().to_numpy().astype(np.int64)
    event_times = ordered.get_column(_EVENT_TIME).to_numpy()
    times = np.unique(event_times)
    keys = code * (len(times) + 1) + np.searchsorted(times, event_times)
    first = np.searchsorted(keys, np.arange(len(users) + 1, dtype=np.int64) * (len(times) + 1))
    index_of = user.cast(pl.Enum(users), strict=False).to_physical()
    return EventLog(name, users, first, keys, times, index_of.alias(ROW_USER + name), time.alias(ROW_TIME + name))


def _sorted_log(events: EventsOptions, field: str, collect: Collect) -> pl.DataFrame:
    """An event log read once into memory (its times checked there), sorted by (user, time,
    item): user, item (stripped text), time (float64) and, with ``type``, the type as text."""
    log, _ = _scan_events(events, field)
    log_schema = dict(log.collect_schema().items())
    columns = [
        pl.col(ROW_COLUMN),
        pl.col(events.user).cast(pl.String).alias(_USER),
        pl.col(events.item).cast(pl.String).str.strip_chars().alias(_ITEM),
        _times(events.time, log_schema[events.time]).alias(_EVENT_TIME),
    ]
    if events.type is not None:
        columns.append(pl.col(events.type).cast(pl.String).alias(_TYPE))
    read = collect(log.select(*columns, pl.col(events.time)))
    enforce(read.lazy(), _time_checks(events.time, log_schema[events.time], f"{field} (event files)"))
    return read.drop(ROW_COLUMN, events.time).sort([_USER, _EVENT_TIME, _ITEM])


def event_indexes(scanned: Scanned, recipe: Recipe) -> tuple[Scanned, dict[str, EventIndex]]:
    """An ``EventIndex`` for every history derived from events (see the module docstring), the
    rows' and the log's times checked, with a warning for each kept event type that never
    occurs (``declared_types``). Histories of the same log (one per behaviour type, say) read
    and sort it once, and with the same row columns share one ``EventLog`` (one search per row)."""
    frame = scanned.frame
    warnings = list(scanned.warnings)
    indexes = {}
    schema = dict(frame.collect_schema().items())
    logs: dict[tuple[object, ...], tuple[pl.DataFrame, pl.Series, list[str]]] = {}
    searched: dict[tuple[object, ...], EventLog] = {}
    checked: set[str] = set()
    for name, options in recipe.features.sequences.items():
        events = options.events
        if events is None:
            continue
        field = f"features.sequences.{name}.events"
        row_user, row_time = events.row_user or events.user, events.row_time or events.time
        require_columns(list(schema), [row_user], f"{field}.row_user")
        require_columns(list(schema), [row_time], f"{field}.row_time")
        if name in schema:
            raise DataError(f"{field}: the data already has a column {name!r}", "name the sequence otherwise")
        if row_time not in checked:
            enforce(frame, _time_checks(row_time, schema[row_time], "the data"), scanned.collect)
            checked.add(row_time)
        source = (tuple(events.source), events.user, events.item, events.time, events.type)
        if source not in logs:
            log = _sorted_log(events, field, scanned.collect)
            # the events any history can hold, and the types present: once per log
            usable = log.get_column(_USER).is_not_null() & log.get_column(_ITEM).is_not_null()
            usable &= log.get_column(_ITEM) != ""
            seen = log.get_column(_TYPE).drop_nulls().unique().to_list() if events.type is not None else []
            logs[source] = (log, usable, seen)
        log, usable, seen = logs[source]
        kept = None
        if events.types:
            assert events.type is not None
            warnings += declared_types(f"{field}.types", events.type, events.types, seen)
            kept = log.get_column(_TYPE).is_in(events.types).fill_null(False)
        search = (source, row_user, row_time)
        if search not in searched:  # events that no history can hold are not searched
            user = pl.col(row_user).cast(pl.String)
            searched[search] = _event_log(name, log.filter(usable), user, _times(row_time, schema[row_time]))
        if kept is None:
            indexes[name] = EventIndex(name, searched[search], None, log.get_column(_ITEM).filter(usable))
        else:
            own = kept.filter(usable).to_numpy()
            counts = np.concatenate([np.zeros(1, np.int64), np.cumsum(own, dtype=np.int64)])
            indexes[name] = EventIndex(name, searched[search], counts, log.get_column(_ITEM).filter(usable & kept))
    return Scanned(frame, scanned.files, scanned.recipe, tuple(warnings), scanned.in_memory), indexes

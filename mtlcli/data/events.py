"""Histories derived from an event log (``features.sequences.<name>.events``).

For each row (an impression: a user and a time) the history is the same user's events strictly
before the row's time, oldest first: an event at the row's own time counts as later, so the
impression's own event (a click logged with the impression's timestamp) never leaks into its
history. Events with equal times are ordered by item id, so the history does not depend on the
order of the log's lines. The result is a list column named after the sequence, joined to the
rows by position; the sequence is then encoded like any list column (last ``max_len`` ids, most
recent first).

The join pairs every row with its user's events and keeps the earlier ones: polars runs it on the
streaming engine, and its cost grows with rows × events per user (cap a heavy user's events
upstream when that product is large).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from mtlcli.data.checks import ROW_COLUMN, RowCheck, declared_types, enforce, number_exprs
from mtlcli.data.scan import Scanned, format_of, require_columns, resolve_files, unreadable
from mtlcli.errors import DataError
from mtlcli.recipe.schema import EventsOptions, Recipe

_USER, _TIME, _ITEM, _EVENT_TIME = "__user", "__time", "__item", "__event_time"


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


def attach_histories(scanned: Scanned, recipe: Recipe) -> Scanned:
    """The rows with one list column per sequence derived from events (see the module docstring),
    with a warning for each kept event type that never occurs (``declared_types``)."""
    frame = scanned.frame
    warnings = list(scanned.warnings)
    for name, options in recipe.features.sequences.items():
        events = options.events
        if events is None:
            continue
        field = f"features.sequences.{name}.events"
        row_user, row_time = events.row_user or events.user, events.row_time or events.time
        schema = dict(frame.collect_schema().items())
        require_columns(list(schema), [row_user], f"{field}.row_user")
        require_columns(list(schema), [row_time], f"{field}.row_time")
        if name in schema:
            raise DataError(f"{field}: the data already has a column {name!r}", "name the sequence otherwise")
        enforce(frame, _time_checks(row_time, schema[row_time], "the data"), scanned.collect)
        log, _ = _scan_events(events, field)
        log_schema = dict(log.collect_schema().items())
        enforce(log, _time_checks(events.time, log_schema[events.time], f"{field} (event files)"), scanned.collect)
        if events.types:
            assert events.type is not None
            seen = scanned.collect(log.select(pl.col(events.type).cast(pl.String).drop_nulls().unique()))
            warnings += declared_types(f"{field}.types", events.type, events.types, seen.to_series().to_list())
            log = log.filter(pl.col(events.type).cast(pl.String).is_in(events.types))
        log = log.select(
            pl.col(events.user).cast(pl.String).alias(_USER),
            pl.col(events.item).cast(pl.String).alias(_ITEM),
            _times(events.time, log_schema[events.time]).alias(_EVENT_TIME),
        ).drop_nulls([_USER, _ITEM])
        rows = frame.select(
            pl.col(ROW_COLUMN),
            pl.col(row_user).cast(pl.String).alias(_USER),
            _times(row_time, schema[row_time]).alias(_TIME),
        )
        histories = (
            rows.join(log, on=_USER, how="inner")
            .filter(pl.col(_EVENT_TIME) < pl.col(_TIME))  # strictly before: no leakage
            .sort([ROW_COLUMN, _EVENT_TIME, _ITEM])
            .group_by(ROW_COLUMN, maintain_order=True)
            .agg(pl.col(_ITEM).tail(options.max_len).alias(name))
        )
        frame = frame.join(histories, on=ROW_COLUMN, how="left", maintain_order="left").with_columns(
            pl.col(name).fill_null(pl.lit([], dtype=pl.List(pl.String)))
        )
    return Scanned(frame, scanned.files, scanned.recipe, tuple(warnings))

"""Stage 3 of preprocessing, encode: raw values -> model inputs, as polars expressions, so that
every feature of a row is encoded in one streaming query (and ``mtl predict`` encodes its input
with the very same expressions).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl

from mtlcli.data.checks import RowCheck, number_checks, number_exprs
from mtlcli.data.events import ROW_TIME, ROW_USER, EventIndex
from mtlcli.data.scan import require_columns
from mtlcli.data.schema import (
    FIRST_ID,
    MISSING_ID,
    OOV_ID,
    CategoricalFeature,
    DataSchema,
    NumericFeature,
    SequenceFeature,
)
from mtlcli.errors import DataError

GROUP_COLUMN = "__group"
SEQUENCE_PREFIX = "seq:"
# a history from events is stored as a window of its events (``history_path``: the history's ids,
# newest first, then a 0): where the row's newest event sits there and how many events it holds
WINDOW_AT, WINDOW_LENGTH = "seq_at:", "seq_len:"


def _bucket(value: str, buckets: int) -> int:
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % buckets


def categorical_expr(feature: CategoricalFeature, distinct: pl.Series | None = None) -> pl.Expr:
    """The expression that encodes column ``feature.name`` into int32 ids (see CategoricalFeature).

    A value's position in the vocabulary comes from a cast to an ``Enum`` of the vocabulary (a
    value outside it becomes null): polars keeps one dictionary for the whole stream, where a
    ``replace`` with a million-value mapping took memory in proportion to the rows. A hashed
    feature needs the column's ``distinct`` values: Python hashes each one once (blake2b: stable
    across processes and versions, unlike polars' own hash) and the rows look their bucket up."""
    text = pl.col(feature.name).cast(pl.String)
    if feature.hash_buckets:
        assert distinct is not None, "a hashed feature is encoded from its distinct values"
        values = distinct.cast(pl.String).drop_nulls().unique(maintain_order=True)
        buckets = pl.Series([FIRST_ID + _bucket(v, feature.hash_buckets) for v in values.to_list()], dtype=pl.Int32)
        index = text.cast(pl.Enum(values.to_list()), strict=False).to_physical()
        mapped = pl.lit(buckets).gather(index)
    else:
        mapped = text.cast(pl.Enum(feature.vocab), strict=False).to_physical().cast(pl.Int32) + FIRST_ID
    return (
        pl.when(text.is_null())
        .then(MISSING_ID)
        .when(mapped.is_null())
        .then(OOV_ID)
        .otherwise(mapped)
        .cast(pl.Int32)
        .alias(feature.name)
    )


def numeric_expr(feature: NumericFeature, dtype: pl.DataType) -> pl.Expr:
    """Column ``feature.name`` (raw, of type ``dtype``) filled, transformed and scaled, float32.
    The column's ``number_checks`` must have passed."""
    return encoded_numbers(number_exprs(feature.name, dtype)[0], feature)


ENCODED_LIMIT = 1e6  # |encoded value| at most this: see encoded_numbers


def encoded_numbers(values: pl.Expr, feature: NumericFeature) -> pl.Expr:
    """(x - center) / scale, clipped to ±ENCODED_LIMIT: a value a million scales away from the
    train data (a train column of 0 and 1e-77, then 1 on test) would otherwise overflow float32
    and make the model's output NaN; no value within reason comes near the limit."""
    x = values.fill_null(feature.fill_value).fill_nan(feature.fill_value)
    if feature.log1p:
        x = x.sign() * x.abs().log1p()
    scaled = ((x - feature.center) / feature.scale).clip(-ENCODED_LIMIT, ENCODED_LIMIT)
    return scaled.cast(pl.Float32).alias(feature.name)


def encode_categorical(column: pl.Series, feature: CategoricalFeature) -> pl.Series:
    """Raw values -> int32 ids, one in-memory column."""
    return column.rename(feature.name).to_frame().select(categorical_expr(feature, column)).to_series()


def encode_numeric(values: pl.Series, feature: NumericFeature) -> pl.Series:
    """Float64 values (already checked) -> the model's float32 input, one in-memory column."""
    return values.to_frame("x").select(encoded_numbers(pl.col("x"), feature)).to_series()


def group_expr(vocabulary: pl.Series, column: str) -> pl.Expr:
    """``GROUP_COLUMN``: an int64 id per distinct value of ``column`` (data.group), in the order of
    the sorted ``vocabulary`` of its values; -1 where missing."""
    values = vocabulary.cast(pl.String).drop_nulls().unique().sort()
    text = pl.col(column).cast(pl.String)
    ids = pl.Series(range(len(values)), dtype=pl.Int64)
    return text.replace_strict(values, ids, default=-1, return_dtype=pl.Int64).fill_null(-1).alias(GROUP_COLUMN)


def sequence_expr(feature: SequenceFeature, items: pl.Expr, vocab: list[str]) -> pl.Expr:
    """A history (``items``: a list of text ids per row, oldest first) -> int32 ids in ``vocab``
    (0 out of vocabulary), the last ``max_len`` of them, most recent first."""
    enum = pl.Enum(vocab)
    ids = items.list.eval(
        (pl.element().cast(enum, strict=False).to_physical().cast(pl.Int32) + FIRST_ID).fill_null(OOV_ID)
    )
    return ids.list.tail(feature.max_len).list.reverse().alias(SEQUENCE_PREFIX + feature.name)


def with_event_histories(
    batch: pl.DataFrame, histories: list[tuple[SequenceFeature, EventIndex, np.ndarray]]
) -> pl.DataFrame:
    """A chunk of rows holding each event log's ``ROW_USER``/``ROW_TIME`` columns (see
    ``EventLog``) -> the same rows with each history's window of its events instead: the columns
    ``WINDOW_AT`` (int64, where in the history's ids newest first, ``newest_first``, the row's most
    recent event sits) and ``WINDOW_LENGTH`` (int32, how many of them, at most ``max_len``). Two
    numbers a row whatever the history's length: the ids are stored once per event, not once per
    row that holds them (the loader gathers them, ``window_ids``). Histories of one log share its
    search."""
    ends: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    columns = []
    for feature, index, reversed_ids in histories:
        log = index.log
        if log.name not in ends:
            ends[log.name] = log.rows(batch)
        start, end = index.windows(*ends[log.name], feature.max_len)
        columns += [
            pl.Series(WINDOW_AT + feature.name, len(reversed_ids) - 1 - end, pl.Int64),
            pl.Series(WINDOW_LENGTH + feature.name, end - start, pl.Int32),
        ]
    return batch.with_columns(columns).drop(*(prefix + name for name in ends for prefix in (ROW_USER, ROW_TIME)))


def input_columns(schema: DataSchema) -> list[str]:
    """The raw columns a model's inputs are encoded from, each once: the categorical and numeric
    features, then every column each history reads (its ids, its parallel type and time lists,
    its row time). Serving reads exactly these (with the labels, to evaluate)."""
    columns = [f.name for f in schema.categorical] + [f.name for f in schema.numeric]
    columns += [column for f in schema.sequences for column in f.columns().values()]
    return list(dict.fromkeys(columns))


def list_columns(schema: DataSchema) -> dict[str, str]:
    """The raw columns holding one list per row (a history's ids, types and timestamps) -> the
    separator between the items of their text form."""
    return {column: f.separator for f in schema.sequences for key, column in f.columns().items() if key != "row_time"}


Where = Callable[[SequenceFeature, str], str]  # (history, its key: column, type_column...) -> a label for errors


def _text_lists(column: str, dtype: pl.DataType, separator: str, what: str, field: str) -> pl.Expr:
    """A list column of text or integers, or text split at ``separator`` -> lists of stripped
    text, one element per position (a missing value is an empty list, and so is every value of a
    column that holds only missing values or empty lists: polars types it null)."""
    if dtype == pl.String:
        items = pl.col(column).str.split(separator)
    elif dtype == pl.Null or (isinstance(dtype, pl.List) and dtype.inner == pl.Null):
        items = pl.col(column).cast(pl.List(pl.String))
    elif isinstance(dtype, pl.List) and (dtype.inner == pl.String or dtype.inner.is_integer()):
        items = pl.col(column)
    else:
        raise DataError(
            f"{field}: column {column!r} holds {dtype}, not a list of {what}",
            f"give a list column of text or integer {what} (Parquet), or text with the {what} between the separator (CSV)",
        )
    return items.list.eval(pl.element().cast(pl.String).str.strip_chars()).fill_null([])


def _epoch(x: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    return x.dt.epoch("us").cast(pl.Float64) if dtype.is_temporal() else x.cast(pl.Float64, strict=False)


def _time_lists(f: SequenceFeature, types: dict[str, pl.DataType], where: Where) -> pl.Expr:
    """The timestamps as lists of float64 (dates and datetimes as epoch microseconds; text that
    is not a number -> null)."""
    assert f.time_column is not None
    dtype = types[f.time_column]
    if dtype == pl.String or dtype == pl.Null or (isinstance(dtype, pl.List) and dtype.inner in (pl.String, pl.Null)):
        text = _text_lists(f.time_column, dtype, f.separator, "timestamps", where(f, "time_column"))
        return text.list.eval(pl.element().cast(pl.Float64, strict=False))
    if isinstance(dtype, pl.List) and (dtype.inner.is_numeric() or dtype.inner.is_temporal()):
        inner = dtype.inner if isinstance(dtype.inner, pl.DataType) else dtype.inner()
        return pl.col(f.time_column).list.eval(_epoch(pl.element(), inner)).fill_null([])
    raise DataError(
        f"{where(f, 'time_column')}: column {f.time_column!r} holds {dtype}, not a list of timestamps",
        "give a list column of numbers or datetimes (Parquet), or numbers between the separator (CSV)",
    )


def _row_time(f: SequenceFeature, types: dict[str, pl.DataType]) -> pl.Expr:
    assert f.row_time is not None
    dtype = types[f.row_time]
    return _epoch(pl.col(f.row_time), dtype) if dtype.is_temporal() else number_exprs(f.row_time, dtype)[0]


def type_lists(f: SequenceFeature, types: dict[str, pl.DataType], where: Where) -> pl.Expr:
    """A history's ``type_column`` as lists of stripped text, one type per id."""
    assert f.type_column is not None
    return _text_lists(f.type_column, types[f.type_column], f.separator, "types", where(f, "type_column"))


def sequence_items(f: SequenceFeature, types: dict[str, pl.DataType], where: Where) -> pl.Expr:
    """A history column as a list of text ids, oldest first: empty ids dropped, and with parallel
    lists only the ids of ``f.types`` and (with ``row_time``) those before the row's time. The
    parallel lists are assumed checked (``history_checks``)."""
    ids = _text_lists(f.column, types[f.column], f.separator, "ids", where(f, "column"))
    keep = ids.list.eval(pl.element().is_not_null() & (pl.element() != "")).cast(pl.List(pl.Int8))
    if f.type_column is not None and f.types:
        kinds = type_lists(f, types, where)
        keep = keep * kinds.list.eval(pl.element().is_in(f.types)).cast(pl.List(pl.Int8))
    if f.row_time is not None:
        # a missing row time: no id is known to be before it
        before = (_time_lists(f, types, where) - _row_time(f, types)).list.eval((pl.element() < 0).fill_null(False))
        keep = keep * before.cast(pl.List(pl.Int8))
    return ids.list.gather(keep.list.eval(pl.arg_where(pl.element() > 0)))


def _shown(column: str, dtype: pl.DataType) -> pl.Expr:
    """A raw value as text for an error message: a list as ``[1.0, null, 3.0]``."""
    if isinstance(dtype, pl.List):
        items = pl.col(column).list.eval(pl.element().cast(pl.String).fill_null("null")).list.join(", ")
        return pl.format("[{}]", items)
    return pl.col(column).cast(pl.String)


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def history_checks(f: SequenceFeature, types: dict[str, pl.DataType], where: Where) -> list[RowCheck]:
    """What a history's parallel lists must satisfy on every row: as many types and timestamps as
    ids, timestamps that are numbers, oldest first, and a row time that is a number."""
    for key, column in f.columns().items():
        require_columns(list(types), [column], where(f, key))
    checks: list[RowCheck] = []
    ids = _text_lists(f.column, types[f.column], f.separator, "ids", where(f, "column"))

    def paired(key: str, column: str, lists: pl.Expr, what: str) -> RowCheck:
        def error(value: Any, row: int, count: int) -> DataError:
            have, want = value
            return DataError(
                f"{where(f, key)}: column {column!r} has {plural(have, what)} for {plural(want, 'id')} "
                f"(data row {row}; {plural(count, 'row')} like it)",
                f"give one {what} per id of {f.column!r}, in the same order",
            )

        value = pl.concat_list([lists.list.len(), ids.list.len()])
        return RowCheck(lists.list.len() != ids.list.len(), value, error)

    if f.type_column is not None:
        kinds = _text_lists(f.type_column, types[f.type_column], f.separator, "types", where(f, "type_column"))
        checks.append(paired("type_column", f.type_column, kinds, "type"))
    if f.time_column is not None:
        times = _time_lists(f, types, where)
        checks.append(paired("time_column", f.time_column, times, "timestamp"))
        raw = _shown(f.time_column, types[f.time_column])

        def not_number(value: Any, row: int, _: int) -> DataError:
            return DataError(
                f"{where(f, 'time_column')}: column {f.time_column!r} has a timestamp that is missing, not a "
                f"number or infinite: {value!r} (data row {row})",
                "give finite numbers (e.g. seconds since 1970) or datetimes, one per id",
            )

        def unordered(value: Any, row: int, count: int) -> DataError:
            return DataError(
                f"{where(f, 'time_column')}: the timestamps in column {f.time_column!r} are not oldest first: "
                f"{value!r} (data row {row}; {plural(count, 'row')} like it)",
                "sort each row's history by time, oldest first, moving ids, types and timestamps together",
            )

        bad = times.list.eval(pl.element().is_null() | ~pl.element().is_finite()).list.any()
        checks.append(RowCheck(bad, raw, not_number))
        checks.append(RowCheck(times.list.eval(pl.element().diff() < 0).list.any(), raw, unordered))
    if f.row_time is not None and not types[f.row_time].is_temporal():
        checks += number_checks(f.row_time, types[f.row_time], where(f, "row_time"))
    return checks


def history_exprs(
    sequences: list[SequenceFeature],
    categorical: list[CategoricalFeature],
    types: dict[str, pl.DataType],
    where: Where,
) -> list[pl.Expr]:
    """Every history's ``sequence_expr`` over raw columns of ``types``, each in the vocabulary it
    shares or its own; ``where`` names a history's column in an error (a recipe field, an input
    column)."""
    vocab_of = {f.name: f.vocab for f in categorical}
    return [
        sequence_expr(f, sequence_items(f, types, where), vocab_of[f.vocabulary] if f.vocabulary else f.vocab)
        for f in sequences
    ]

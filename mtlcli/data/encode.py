"""Stage 3 of preprocessing, encode: raw values -> model inputs, as polars expressions, so that
every feature of a row is encoded in one streaming query (and ``mtl predict`` encodes its input
with the very same expressions).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import polars as pl

from mtlcli.data.checks import number_exprs
from mtlcli.data.schema import FIRST_ID, MISSING_ID, OOV_ID, CategoricalFeature, NumericFeature, SequenceFeature
from mtlcli.errors import DataError

GROUP_COLUMN = "__group"
SEQUENCE_PREFIX = "seq:"


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


def sequence_items(column: str, dtype: pl.DataType, separator: str, field: str) -> pl.Expr:
    """A history column as a list of text ids: a list column's elements, or text split at
    ``separator`` (empty ids dropped; a missing value is an empty history)."""
    if dtype == pl.String:
        items = pl.col(column).str.split(separator)
    elif isinstance(dtype, pl.List) and (dtype.inner == pl.String or dtype.inner.is_integer()):
        items = pl.col(column)
    else:
        raise DataError(
            f"{field}: column {column!r} holds {dtype}, not a list of ids",
            "give a list column of text or integer ids (Parquet), or text with the ids between the separator (CSV)",
        )
    items = items.list.eval(pl.element().cast(pl.String).str.strip_chars())
    return items.list.eval(pl.element().filter(pl.element().is_not_null() & (pl.element() != ""))).fill_null([])


def history_exprs(
    sequences: list[SequenceFeature],
    categorical: list[CategoricalFeature],
    types: dict[str, pl.DataType],
    where: Callable[[SequenceFeature], str],
) -> list[pl.Expr]:
    """Every history's ``sequence_expr`` over raw columns of ``types``, each in the vocabulary it
    shares or its own; ``where`` names a history in an error (a recipe field, an input column)."""
    vocab_of = {f.name: f.vocab for f in categorical}
    return [
        sequence_expr(
            f,
            sequence_items(f.column, types[f.column], f.separator, where(f)),
            vocab_of[f.vocabulary] if f.vocabulary else f.vocab,
        )
        for f in sequences
    ]

"""Row checks: conditions no data row may meet, all found in one streaming pass.

Every stage of preprocessing (labels, numeric columns) and prediction's input cleaning states its
checks as ``RowCheck``s; ``enforce`` runs them together over a lazy frame, so a file of 10^8 rows
is read once for all of them, and the error names the first offending row (1-based, in data
order, from the ``__row`` index) and the raw value found there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl

from mtlcli.errors import DataError

ROW_COLUMN = "__row"  # 0-based position of a row in the source data (before any split filter)

# (the raw value, its data row counted from 1, how many rows fail the check) -> the error to raise
ErrorFor = Callable[[Any, int, int], DataError]


@dataclass(frozen=True)
class RowCheck:
    bad: pl.Expr  # true on a row that fails
    value: pl.Expr  # what to show of that row (usually the raw text of the column)
    error: ErrorFor


def enforce(frame: pl.LazyFrame, checks: list[RowCheck], collect: Callable[..., Any] | None = None) -> None:
    """Raise the error of the first check (in list order) that some row fails; one pass for all.

    ``collect`` runs a query (default: ``LazyFrame.collect`` on the streaming engine); the caller
    passes its own to turn a read failure into a message naming the file."""
    if not checks:
        return
    run = collect or (lambda query: query.collect(engine="streaming"))
    aggregations = []
    for i, check in enumerate(checks):
        bad = check.bad.fill_null(False)
        aggregations += [pl.col(ROW_COLUMN).filter(bad).min().alias(f"row{i}"), bad.sum().alias(f"count{i}")]
    found = run(frame.select(aggregations)).row(0)
    for i, check in enumerate(checks):
        row = found[2 * i]
        if row is not None:
            value = run(frame.filter(pl.col(ROW_COLUMN) == row).select(check.value.alias("value")).head(1)).item()
            raise check.error(value, int(row) + 1, int(found[2 * i + 1]))


def number_exprs(name: str, dtype: pl.DataType) -> tuple[pl.Expr, pl.Expr]:
    """(float64 values, the raw values as text) of column ``name`` of type ``dtype``: numbers as
    they are, booleans and the words true/false as 1/0, other text parsed; a value that is not a
    number becomes null."""
    column = pl.col(name)
    text = column.cast(pl.String)
    if dtype == pl.Boolean or dtype.is_numeric():
        return column.cast(pl.Float64), text
    lowered = text.str.to_lowercase()
    values = (
        pl.when(lowered == "true")
        .then(pl.lit("1"))
        .when(lowered == "false")
        .then(pl.lit("0"))
        .otherwise(text)
        .cast(pl.Float64, strict=False)
    )
    return values, text


SKIP_HINT = "fix that row, or let `mtl predict --rejects FILE` set such rows aside and score the rest"


def number_checks(name: str, dtype: pl.DataType, field: str) -> list[RowCheck]:
    """Column ``name`` must hold numbers: a value that is not one, or an infinite one (``inf``,
    ``-Infinity``, ``1e400``), fails. NaN passes (read as missing)."""
    values, text = number_exprs(name, dtype)
    label = field.startswith("tasks.") and field.endswith(".label")
    served = field.startswith("input column")

    def not_number(value: Any, row: int, _: int) -> DataError:
        hint = (
            f"a binary label is 0/1 or true/false; for other values name the positive ones, e.g. "
            f"label: {{column: {name}, positive: [{value}]}}"
            if label
            else SKIP_HINT
            if served
            else "fix the data, or make this column categorical"
        )
        return DataError(f"{field}: column {name!r} has a value that is not a number: {value!r} (data row {row})", hint)

    def infinite(value: Any, row: int, _: int) -> DataError:
        hint = (
            SKIP_HINT
            if served
            else f"fix or drop that row; to read such values as missing, add {str(value)!r} to data.missing"
        )
        return DataError(f"{field}: column {name!r} has an infinite value: {value!r} (data row {row})", hint)

    return [
        RowCheck(values.is_null() & text.is_not_null(), text, not_number),
        RowCheck(values.is_infinite(), text, infinite),
    ]


def enforce_frame(frame: pl.DataFrame, checks: list[RowCheck]) -> None:
    """``enforce`` on an in-memory frame (its rows numbered from its first when it has no
    ``ROW_COLUMN`` of its own)."""
    lazy = frame.lazy() if ROW_COLUMN in frame.columns else frame.lazy().with_row_index(ROW_COLUMN)
    enforce(lazy, checks, collect=lambda query: query.collect())


def checked_numbers(frame: pl.DataFrame, name: str, field: str) -> pl.Series:
    """Column ``name`` of an in-memory frame as float64, after its ``number_checks``."""
    dtype = frame.schema[name]
    enforce_frame(frame, number_checks(name, dtype, field))
    return frame.select(number_exprs(name, dtype)[0].alias(name)).to_series()


def declared_types(field: str, column: str, declared: list[str], seen: list[str]) -> list[str]:
    """Warnings for the behaviour ``types`` a history keeps (``declared``, recipe key ``field``)
    that never occur among the types of ``column`` (``seen``: its distinct values); none of them
    occurring is an error, since every history would be empty."""
    absent = [t for t in declared if t not in seen]
    if not absent:
        return []
    shown = ", ".join(repr(t) for t in sorted(seen)[:12]) + (" ..." if len(seen) > 12 else "") if seen else "none"
    if len(absent) == len(declared):
        raise DataError(
            f"{field}: none of the types {', '.join(map(repr, declared))} occurs in column {column!r}, so every "
            f"history would be empty (types seen: {shown})",
            "list types the column holds (compared as text, case and all)",
        )
    return [
        f"{field}: the type {t!r} never occurs in column {column!r} (types seen: {shown}); it keeps no id"
        for t in absent
    ]

"""Labels and sample spaces: the recipe's ``tasks`` as expressions over the raw rows, with the
row checks that refuse a label the task cannot learn from (see ``mtlcli.data.checks``).

``label:<task>`` is a float32 column per task; ``mask:<task>`` a boolean column per task with a
sample space (True: the row is in it). A label may be empty only outside its task's space (it is
then stored as 0 and masked).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import polars as pl

from mtlcli.data.checks import RowCheck, enforce, number_checks, number_exprs
from mtlcli.data.scan import require_columns
from mtlcli.errors import DataError
from mtlcli.recipe.schema import Recipe, TaskSpec
from mtlcli.registry import did_you_mean

LABEL_PREFIX = "label:"
MASK_PREFIX = "mask:"

Collect = Callable[[pl.LazyFrame], pl.DataFrame]


def label_exprs(frame: pl.LazyFrame, recipe: Recipe, collect: Collect) -> tuple[list[pl.Expr], list[RowCheck]]:
    """The ``label:`` and ``mask:`` columns of ``frame`` (lazy), and the checks every row must pass.

    ``collect`` runs the one query this needs besides the checks: the distinct values of a label
    column with named positive values (to say when one of them never occurs)."""
    schema = dict(frame.collect_schema().items())
    columns = list(schema)
    for name, task in recipe.tasks.items():
        require_columns(columns, [task.label.column], f"tasks.{name}.label.column")
        if task.space is not None and task.space.column is not None:
            require_columns(columns, [task.space.column], f"tasks.{name}.space.column")
    checks: list[RowCheck] = []
    values: dict[str, pl.Expr] = {}
    for name, task in recipe.tasks.items():
        values[name], task_checks = _label_values(frame, schema, name, task, collect)
        checks += task_checks
    masks: dict[str, pl.Expr] = {}
    for name, task in recipe.tasks.items():
        if task.space is None:
            continue
        if task.space.task is not None:
            masks[name] = (values[task.space.task] == 1.0).fill_null(False)
        else:
            assert task.space.column is not None
            column = task.space.column
            field = f"tasks.{name}.space.column"
            checks += number_checks(column, schema[column], field)
            truth = number_exprs(column, schema[column])[0]
            masks[name] = (truth.fill_null(0.0) != 0.0).fill_null(False)
    for name, task in recipe.tasks.items():
        inside = masks.get(name, pl.lit(True))
        checks.append(RowCheck(values[name].is_null() & inside, pl.lit(None), _empty_label(name, task, name in masks)))
    exprs = [values[name].fill_null(0.0).cast(pl.Float32).alias(LABEL_PREFIX + name) for name in recipe.tasks]
    exprs += [mask.alias(MASK_PREFIX + name) for name, mask in masks.items()]
    return exprs, checks


def make_labels(frame: pl.DataFrame, recipe: Recipe) -> pl.DataFrame:
    """The label and mask columns of an in-memory frame (with a ``__row`` index), checked."""
    lazy = frame.lazy()
    exprs, checks = label_exprs(lazy, recipe, lambda query: query.collect())
    enforce(lazy, checks, collect=lambda query: query.collect())
    return lazy.select(exprs).collect()


def _empty_label(name: str, task: TaskSpec, spaced: bool) -> Callable[[Any, int, int], DataError]:
    def error(_: Any, row: int, count: int) -> DataError:
        where = " inside its sample space" if spaced else ""
        return DataError(
            f"tasks.{name}.label: column {task.label.column!r} is empty in {count} rows{where} (first: data row {row})",
            "every row needs a label: drop or fill those rows"
            + ("" if spaced else ", or give the task a 'space' outside which labels may be empty"),
        )

    return error


def _label_values(
    frame: pl.LazyFrame, schema: dict[str, pl.DataType], name: str, task: TaskSpec, collect: Collect
) -> tuple[pl.Expr, list[RowCheck]]:
    """A task's label per row as float64 (null where the raw label is empty), and its checks."""
    spec = task.label
    field = f"tasks.{name}.label"
    column = spec.column
    if task.type == "binary" and spec.positive is not None:
        text = pl.col(column).cast(pl.String)
        seen = {v for v in collect(frame.select(text.unique())).to_series().to_list() if v is not None}
        absent = [v for v in spec.positive if v not in seen]
        if absent:
            raise DataError(
                f"{field}.positive: {absent[0]!r} never occurs in column {column!r}"
                f"{did_you_mean(absent[0], sorted(str(v) for v in seen))}",
                f"values seen include: {sorted(str(v) for v in seen)[:8]}",
            )
        return pl.when(text.is_null()).then(None).otherwise(text.is_in(spec.positive).cast(pl.Float64)), []
    values, text = number_exprs(column, schema[column])
    checks = number_checks(column, schema[column], field)

    def not_finite(_: Any, row: int, __: int) -> DataError:
        return DataError(f"{field}: column {column!r} is NaN or infinite at data row {row}", "fix or drop that row")

    checks.append(RowCheck(values.is_not_null() & ~values.is_finite(), text, not_finite))
    if task.type == "binary" and spec.threshold is not None:
        return pl.when(values.is_null()).then(None).otherwise((values > spec.threshold).cast(pl.Float64)), checks
    if task.type == "binary":

        def not_binary(value: Any, row: int, _: int) -> DataError:
            return DataError(
                f"{field}: binary label column {column!r} holds {value!r} at data row {row}, not 0/1",
                "say which values are positive with 'positive: [...]' or use 'threshold'",
            )

        checks.append(RowCheck(values.is_not_null() & ~values.is_in([0.0, 1.0]), pl.col(column), not_binary))
    return values, checks

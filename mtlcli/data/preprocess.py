"""Raw CSV/Parquet (or the synthetic generator) -> labels, split, train-fitted encoding -> Parquet.

``prepare(recipe)`` is what commands call: it returns the encoded data for a recipe, running
``preprocess`` only when the cache entry for the recipe's data part and source files is missing.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from mtlcli.data.batch import SplitTensors
from mtlcli.data.schema import (
    FIRST_ID,
    MISSING_ID,
    OOV_ID,
    SPLIT_NAMES,
    CategoricalFeature,
    DataSchema,
    NumericFeature,
    SplitInfo,
    TaskInfo,
)
from mtlcli.data.synthetic import generate
from mtlcli.errors import ArtifactError, DataError
from mtlcli.fileio import atomic_dir, sha256_file_remembered, sha256_json
from mtlcli.recipe.schema import (
    ColumnSplit,
    FilesSplit,
    ModuloSplit,
    NumericOptions,
    RandomSplit,
    Recipe,
    TaskSpec,
)
from mtlcli.registry import did_you_mean

SPLITS = SPLIT_NAMES
SPLIT_COLUMN = "__split"
ROW_COLUMN = "__row"
LABEL_PREFIX = "label:"
MASK_PREFIX = "mask:"
GROUP_COLUMN = "__group"


@dataclass(frozen=True)
class Prepared:
    """Encoded data on disk: ``directory`` holds schema.json and {train,valid,test}.parquet."""

    directory: Path
    schema: DataSchema
    reused: bool

    def load(self, split: str) -> SplitTensors:
        return load_split(self.directory, split, self.schema)


# --- locating and reading the source ------------------------------------------------------------


def resolve_files(path: str, field: str) -> list[Path]:
    """A data path from the recipe, or a glob of shards (``logs/part-*.parquet``, in sorted
    order); relative paths resolve from the working directory."""
    if not any(c in path for c in "*?["):
        return [resolve_file(path, field)]
    pattern = Path(path).expanduser()
    anchor = Path(pattern.anchor) if pattern.is_absolute() else Path()
    matches = sorted(p for p in anchor.glob(str(pattern.relative_to(anchor))) if p.is_file())
    if not matches:
        raise DataError(
            f"{field}: the pattern {path!r} matches no file (relative paths resolve from {Path.cwd()})",
            "check the pattern, or run the command from the directory the recipe's paths are relative to",
        )
    return matches


def resolve_file(path: str, field: str) -> Path:
    """A data path from the recipe; relative paths resolve from the working directory."""
    file = Path(path).expanduser()
    if not file.exists():
        raise DataError(
            f"{field}: data file not found: {path} (relative paths resolve from {Path.cwd()})",
            "check the path, or run the command from the directory the recipe's paths are relative to",
        )
    if not file.is_file():
        raise DataError(f"{field}: {path} is not a file")
    return file


def source_files(recipe: Recipe) -> list[tuple[str, Path]]:
    """(split or '', file) for every input file the recipe reads."""
    split = recipe.data.split
    if isinstance(split, FilesSplit):
        return [
            (name, file)
            for name in SPLITS
            for i, p in enumerate(getattr(split, name))
            for file in resolve_files(p, f"data.split.{name}[{i}]")
        ]
    return [("", file) for i, p in enumerate(recipe.data.source) for file in resolve_files(p, f"data.source[{i}]")]


FILE_HASHES = "file-hashes.json"  # in data.cache_dir: each source file's sha256 with its identity


def data_key(recipe: Recipe) -> tuple[str, dict[str, Any]]:
    """The cache key: the data, features and tasks sections plus the source files' sha256 (each
    remembered with the file's identity, so an unchanged file is not read again; see
    ``fileio.sha256_file_remembered`` for what the identity catches)."""
    memo = Path(recipe.data.cache_dir) / FILE_HASHES
    files = [{"split": s, "path": str(f), "sha256": sha256_file_remembered(f, memo)} for s, f in source_files(recipe)]
    source = {"files": files, "synthetic": recipe.data.synthetic.model_dump() if recipe.data.synthetic else None}
    spec = recipe.to_dict()
    # data.group is left out while unset, so that recipes written before it keep their cache keys
    data_part = {k: v for k, v in spec["data"].items() if k != "cache_dir" and not (k == "group" and v is None)}
    # pos_weight shapes the loss, not the data: left out so that changing it reuses the cache
    tasks = {name: {k: v for k, v in task.items() if k != "pos_weight"} for name, task in spec["tasks"].items()}
    key_input = {
        "data": data_part,
        "features": spec["features"],
        "tasks": tasks,
        "files": [f["sha256"] for f in files],
        "format": 1,
    }
    return sha256_json(key_input)[:20], source


def _check_unique_header(path: Path, separator: str, strip: bool) -> None:
    """Refuse a header that names a column twice (polars would rename the second one silently)."""
    first = pl.read_csv(path, has_header=False, n_rows=1, separator=separator, infer_schema=False, quote_char='"')
    names = [str(v).strip() if strip and v is not None else str(v) for v in first.row(0)]
    seen: dict[str, int] = {}
    for position, name in enumerate(names, start=1):
        if name in seen:
            raise DataError(
                f"{path}: the header names column {name!r} twice (columns {seen[name]} and {position})",
                "rename one of them in the file, or name every column in data.columns",
            )
        seen[name] = position


def _read_one(path: Path, recipe: Recipe) -> pl.DataFrame:
    data = recipe.data
    fmt = data.format
    if fmt == "auto":
        fmt = "parquet" if path.name.endswith((".parquet", ".pq")) else "csv"
    try:
        if fmt == "parquet":
            frame = pl.read_parquet(path)
        else:
            frame = pl.read_csv(
                path,
                has_header=data.header,
                separator=data.separator.strip() or data.separator,
                infer_schema=False,
                quote_char='"',
            )
    except pl.exceptions.NoDataError:
        raise DataError(f"{path}: the file is empty", "give a file with at least one data row") from None
    except (pl.exceptions.PolarsError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "check data.format, data.separator and data.header"
        if "utf-8" in first.lower() or "utf8" in first.lower():
            first, hint = "it is not UTF-8 text", "convert it to UTF-8 first, e.g. iconv -f latin1 -t utf-8"
        elif "more fields than" in first:
            first, hint = "a row has more fields than the header (ragged rows)", "fix the rows, or check data.separator"
        raise DataError(f"{path}: cannot read it as {fmt.upper()}: {first}", hint) from None
    if fmt == "csv" and data.header and data.columns is None:
        _check_unique_header(path, data.separator.strip() or data.separator, data.strip)
    if fmt == "csv" and frame.width > 1 and frame.height and frame.get_column(frame.columns[-1]).null_count():
        _check_short_rows(path, frame.width, data.separator.strip() or data.separator, data.header)
    if data.columns is not None:
        if len(data.columns) != frame.width:
            raise DataError(
                f"{path}: the file has {frame.width} columns but data.columns names {len(data.columns)}",
                "list exactly one name per column, in file order",
            )
        frame = frame.rename(dict(zip(frame.columns, data.columns, strict=True)))
    elif data.strip and fmt == "csv":
        names = [c.strip() for c in frame.columns]
        if len(set(names)) == len(names):  # a header "a, b" names columns a and b, as values are stripped
            frame = frame.rename(dict(zip(frame.columns, names, strict=True)))
    if frame.height == 0:
        raise DataError(f"{path}: the file has no data rows", "give a file with at least one data row")
    strings = [c for c, t in frame.schema.items() if t == pl.String]
    if strings:
        exprs = []
        for name in strings:
            col = pl.col(name).str.strip_chars() if data.strip else pl.col(name)
            exprs.append(pl.when(col.is_in(data.missing)).then(None).otherwise(col).alias(name))
        frame = frame.with_columns(exprs)
    return frame


def _check_short_rows(path: Path, width: int, separator: str, header: bool) -> None:
    """polars pads rows with too few fields with nulls; refuse them instead (ragged CSV).

    Lines holding a quote are not judged (a quoted field may contain the separator)."""
    lines = pl.read_csv(
        path, has_header=False, separator="\x1f", quote_char=None, infer_schema=False, new_columns=["line"]
    ).get_column("line")
    if header:
        lines = lines.slice(1)
    fields = lines.str.count_matches(separator, literal=True) + 1
    short = (fields < width) & ~lines.str.contains('"', literal=True) & lines.is_not_null()
    if short.any():
        index = int(short.arg_true()[0])
        raise DataError(
            f"{path}: line {index + 1 + int(header)} has {int(fields[index])} fields, not {width} (ragged rows)",
            "fix or drop the short rows",
        )


def read_source(recipe: Recipe) -> pl.DataFrame:
    """The raw rows with a ``__split`` column (0 train, 1 valid, 2 test) and a ``__row`` index."""
    split = recipe.data.split
    if recipe.data.synthetic is not None:
        frame = generate(recipe.data.synthetic)
    elif isinstance(split, FilesSplit):
        files = source_files(recipe)
        parts = [
            _read_one(path, recipe).with_columns(pl.lit(SPLITS.index(name), pl.Int8).alias(SPLIT_COLUMN))
            for name, path in files
        ]
        frame = _concat(parts, [path for _, path in files])
    else:
        files = source_files(recipe)
        frame = _concat([_read_one(path, recipe) for _, path in files], [path for _, path in files])
    frame = frame.with_row_index(ROW_COLUMN)
    n = frame.height
    if isinstance(split, ModuloSplit):
        residue = pl.col(ROW_COLUMN) % split.modulus
        frame = frame.with_columns(
            pl.when(residue.is_in(split.test))
            .then(2)
            .when(residue.is_in(split.valid))
            .then(1)
            .otherwise(0)
            .cast(pl.Int8)
            .alias(SPLIT_COLUMN)
        )
    elif isinstance(split, RandomSplit):
        draw = np.random.default_rng(split.seed).random(n)
        which = np.where(draw < split.test, 2, np.where(draw < split.test + split.valid, 1, 0)).astype(np.int8)
        frame = frame.with_columns(pl.Series(SPLIT_COLUMN, which))
    elif isinstance(split, ColumnSplit):
        _require_columns(frame, [split.column], "data.split.column")
        value = pl.col(split.column).cast(pl.String)
        frame = frame.with_columns(
            pl.when(value.is_in(split.test))
            .then(2)
            .when(value.is_in(split.valid))
            .then(1)
            .when(value.is_in(split.train))
            .then(0)
            .otherwise(None)
            .cast(pl.Int8)
            .alias(SPLIT_COLUMN)
        ).filter(pl.col(SPLIT_COLUMN).is_not_null())
    counts = frame.get_column(SPLIT_COLUMN).value_counts()
    present = {int(row[0]) for row in counts.iter_rows()}
    for index, name in enumerate(SPLITS[:2]):
        if index not in present:
            raise DataError(f"data.split: the {name} split is empty", "check the split settings against the data")
    return frame


def _concat(parts: list[pl.DataFrame], paths: list[Path]) -> pl.DataFrame:
    """The files' rows one after the other; every file (shard) must have the first one's columns."""
    if len(parts) == 1:
        return parts[0]
    columns = parts[0].columns
    for part, path in zip(parts[1:], paths[1:], strict=True):
        if part.columns != columns:
            missing = [c for c in columns if c not in part.columns]
            extra = [c for c in part.columns if c not in columns]
            what = (
                f"lacks column {missing[0]!r}"
                if missing
                else f"has column {extra[0]!r} that {paths[0].name} lacks"
                if extra
                else "has the same columns in another order"
            )
            raise DataError(
                f"{path}: {what} (the data files must share {paths[0].name}'s columns)",
                "give files (shards) with one layout",
            )
    return pl.concat(parts, how="vertical_relaxed")


FEW_ROWS = 10  # a split this small gives metrics that are noise
SKIP_HINT = "fix that row, or let `mtl predict --rejects FILE` set such rows aside and score the rest"


def data_warnings(splits: dict[str, SplitInfo], tasks: list[TaskInfo], empty_numeric: list[str]) -> list[str]:
    """Data that trains without error but cannot give a meaningful model or metric."""
    out = [
        f"numeric feature {name!r} has no value in any train row: it carries no information" for name in empty_numeric
    ]
    train = splits["train"]
    for task in tasks:
        if task.type != "binary":
            continue
        rows = train.space_rows.get(task.name, train.rows)
        positives = train.positives.get(task.name, 0)
        if positives == 0:
            out.append(f"task {task.name!r} has no positive rows in train: it cannot learn to predict them")
        elif positives == rows:
            out.append(f"task {task.name!r} has no negative rows in train: it cannot learn to tell rows apart")
    for name, info in splits.items():
        if 0 < info.rows < FEW_ROWS:
            out.append(
                f"the {name} split has only {info.rows} row{'s' if info.rows != 1 else ''}: its metrics are noise"
            )
    return out


def _require_columns(frame: pl.DataFrame, names: list[str], field: str) -> None:
    for name in names:
        if name not in frame.columns:
            columns = [c for c in frame.columns if c not in (SPLIT_COLUMN, ROW_COLUMN)]
            hint = did_you_mean(name, columns)
            raise DataError(
                f"{field}: column {name!r} is not in the data{hint}",
                f"the data has {len(columns)} columns: {', '.join(columns[:12])}{' ...' if len(columns) > 12 else ''}",
            )


# --- labels ------------------------------------------------------------------------------------


def parse_numbers(column: pl.Series) -> tuple[pl.Series, pl.Series]:
    """(float64 values, the raw values as text) of a column: numbers as they are, booleans and the
    words true/false as 1/0, other text parsed; a value that is not a number becomes null."""
    text = column.cast(pl.String)
    if column.dtype == pl.Boolean or column.dtype.is_numeric():
        return column.cast(pl.Float64), text
    lowered = text.str.to_lowercase()
    values = pl.select(
        pl.when(lowered == "true")
        .then(pl.lit("1"))
        .when(lowered == "false")
        .then(pl.lit("0"))
        .otherwise(text)
        .cast(pl.Float64, strict=False)
    ).to_series()
    return values, text


def _numeric(frame: pl.DataFrame, name: str, field: str) -> pl.Series:
    """Column ``name`` as float64; a value that is not a number, or an infinite one (``inf``,
    ``-Infinity``, ``1e400``), is a DataError naming its row. NaN stays NaN (read as missing)."""
    values, text = parse_numbers(frame.get_column(name))
    bad = values.is_null() & text.is_not_null()
    if bad.any():
        index = int(bad.arg_true()[0])
        row = int(frame.get_column(ROW_COLUMN)[index])
        raise DataError(
            f"{field}: column {name!r} has a value that is not a number: {text[index]!r} (data row {row + 1})",
            (
                f"a binary label is 0/1 or true/false; for other values name the positive ones, e.g. "
                f"label: {{column: {name}, positive: [{text[index]}]}}"
                if field.startswith("tasks.") and field.endswith(".label")
                else SKIP_HINT
                if field.startswith("input column")
                else "fix the data, or make this column categorical"
            ),
        )
    return _finite(values, text, frame, name, field)


def _finite(values: pl.Series, raw: pl.Series, frame: pl.DataFrame, name: str, field: str) -> pl.Series:
    """``values`` unchanged if none is infinite; else a DataError naming the first such row."""
    infinite = values.is_infinite().fill_null(False)
    if infinite.any():
        index = int(infinite.arg_true()[0])
        row = int(frame.get_column(ROW_COLUMN)[index])
        raise DataError(
            f"{field}: column {name!r} has an infinite value: {raw[index]!r} (data row {row + 1})",
            SKIP_HINT
            if field.startswith("input column")
            else f"fix or drop that row; to read such values as missing, add {str(raw[index])!r} to data.missing",
        )
    return values


def make_labels(frame: pl.DataFrame, recipe: Recipe) -> pl.DataFrame:
    """One float32 column ``label:<task>`` per task, made from the raw rows as the recipe says,
    and a boolean ``mask:<task>`` for each task with a sample space (True: the row is in it).

    A label may be empty only outside its task's space (it is then stored as 0 and masked).
    """
    for name, task in recipe.tasks.items():
        _require_columns(frame, [task.label.column], f"tasks.{name}.label.column")
        if task.space is not None and task.space.column is not None:
            _require_columns(frame, [task.space.column], f"tasks.{name}.space.column")
    labels = {name: _label_values(frame, name, task) for name, task in recipe.tasks.items()}
    masks: dict[str, pl.Series] = {}
    for name, task in recipe.tasks.items():
        if task.space is None:
            continue
        if task.space.task is not None:
            masks[name] = (labels[task.space.task] == 1.0).fill_null(False)
        else:
            assert task.space.column is not None
            truth = _numeric(frame, task.space.column, f"tasks.{name}.space.column")
            masks[name] = (truth.fill_null(0.0) != 0.0).fill_null(False)
    out = {}
    for name, task in recipe.tasks.items():
        values = labels[name]
        inside = masks.get(name, pl.Series([True] * frame.height))
        missing = values.is_null() & inside
        if missing.any():
            row = int(frame.get_column(ROW_COLUMN)[int(missing.arg_true()[0])])
            where = " inside its sample space" if name in masks else ""
            raise DataError(
                f"tasks.{name}.label: column {task.label.column!r} is empty in {int(missing.sum())} rows{where} "
                f"(first: data row {row + 1})",
                "every row needs a label: drop or fill those rows"
                + ("" if name in masks else ", or give the task a 'space' outside which labels may be empty"),
            )
        out[LABEL_PREFIX + name] = values.fill_null(0.0).cast(pl.Float32)
    for name, mask in masks.items():
        out[MASK_PREFIX + name] = mask.rename(MASK_PREFIX + name)
    return pl.DataFrame(out)


def _label_values(frame: pl.DataFrame, name: str, task: TaskSpec) -> pl.Series:
    """A task's label per row as float64; null where the raw label is empty."""
    spec = task.label
    field = f"tasks.{name}.label"
    raw = frame.get_column(spec.column)
    if task.type == "binary" and spec.positive is not None:
        text = raw.cast(pl.String)
        seen = {v for v in text.unique().to_list() if v is not None}
        absent = [v for v in spec.positive if v not in seen]
        if absent:
            raise DataError(
                f"{field}.positive: {absent[0]!r} never occurs in column {spec.column!r}"
                f"{did_you_mean(absent[0], sorted(str(v) for v in seen))}",
                f"values seen include: {sorted(str(v) for v in seen)[:8]}",
            )
        return pl.select(
            pl.when(text.is_null()).then(None).otherwise(text.is_in(spec.positive).cast(pl.Float64))
        ).to_series()
    values = _numeric(frame, spec.column, field)
    bad = values.is_not_null() & ~values.is_finite()
    if bad.any():
        index = int(bad.arg_true()[0])
        row = int(frame.get_column(ROW_COLUMN)[index])
        raise DataError(
            f"{field}: column {spec.column!r} is NaN or infinite at data row {row + 1}", "fix or drop that row"
        )
    if task.type == "binary" and spec.threshold is not None:
        return pl.select(
            pl.when(values.is_null()).then(None).otherwise((values > spec.threshold).cast(pl.Float64))
        ).to_series()
    if task.type == "binary":
        bad = values.is_not_null() & ~values.is_in([0.0, 1.0])
        if bad.any():
            index = int(bad.arg_true()[0])
            row = int(frame.get_column(ROW_COLUMN)[index])
            raise DataError(
                f"{field}: binary label column {spec.column!r} holds {raw[index]!r} at data row {row + 1}, not 0/1",
                "say which values are positive with 'positive: [...]' or use 'threshold'",
            )
    return values


# --- fitting and encoding ----------------------------------------------------------------------


def choose_features(frame: pl.DataFrame, recipe: Recipe) -> tuple[list[str], list[str]]:
    """(categorical, numeric) input columns: never labels, the split column or excluded columns.

    Names in ``numeric``, ``categorical`` and ``exclude`` may be glob patterns (``numerical_*``).
    ``auto`` numeric means every remaining column whose values are all numbers; ``auto``
    categorical means every remaining column not taken as numeric.
    """
    feats = recipe.features
    reserved = {t.label.column for t in recipe.tasks.values()} | {SPLIT_COLUMN, ROW_COLUMN}
    reserved |= {t.space.column for t in recipe.tasks.values() if t.space is not None and t.space.column}
    if isinstance(recipe.data.split, ColumnSplit):
        reserved.add(recipe.data.split.column)
    excluded = set(expand_columns(frame, feats.exclude, "features.exclude"))
    listed_cat = []
    if isinstance(feats.categorical, dict):
        chosen = expand_columns(frame, list(feats.categorical), "features.categorical")
        listed_cat = [c for c, src in chosen.items() if c == src or c not in reserved]  # patterns skip labels
    for name in listed_cat:
        if name in excluded:
            raise DataError(f"features.categorical: {name!r} is also in features.exclude", "remove it from one of them")
    free = [c for c in frame.columns if c not in reserved and c not in excluded and c not in listed_cat]
    if isinstance(feats.numeric, dict):
        chosen = expand_columns(frame, list(feats.numeric), "features.numeric")
        numeric = [c for c, src in chosen.items() if c == src or c not in reserved]  # patterns skip labels
        for name in numeric:
            if name in excluded:
                raise DataError(f"features.numeric: {name!r} is also in features.exclude", "remove it from one of them")
            if name in listed_cat:
                raise DataError(f"features: {name!r} is listed as both numeric and categorical", "keep it in one")
    else:
        numeric = [c for c in free if _all_numbers(frame.get_column(c))]
    categorical = listed_cat if isinstance(feats.categorical, dict) else [c for c in free if c not in numeric]
    if not categorical and not numeric:
        raise DataError("features: no input columns are left", "list numeric/categorical features or shorten 'exclude'")
    return categorical, numeric


def expand_columns(frame: pl.DataFrame, names: list[str], field: str) -> dict[str, str]:
    """Column -> the recipe name (a column or a glob pattern) that selected it, in data order for
    patterns. A plain name must exist; a pattern must match at least one column."""
    out: dict[str, str] = {}
    for name in names:
        if any(ch in name for ch in "*?["):
            matches = [c for c in frame.columns if fnmatch.fnmatchcase(c, name) and not c.startswith("__")]
            if not matches:
                raise DataError(f"{field}: pattern {name!r} matches no column", "check the pattern against the header")
            for column in matches:
                out.setdefault(column, name)
        else:
            _require_columns(frame, [name], field)
            out.setdefault(name, name)
    return out


def _all_numbers(column: pl.Series) -> bool:
    if column.dtype.is_numeric() or column.dtype == pl.Boolean:
        return True
    if column.dtype != pl.String:
        return False
    return int(column.cast(pl.Float64, strict=False).null_count()) == int(column.null_count())


def _bucket(value: str, buckets: int) -> int:
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % buckets


def categorical_expr(feature: CategoricalFeature, values: pl.Series) -> pl.Expr:
    """The expression that encodes column ``feature.name`` into int32 ids (see CategoricalFeature),
    so that many features encode in one query. ``values`` (the column) matters only for a hashed
    feature: Python hashes each of its distinct values once."""
    if feature.hash_buckets:
        old = values.cast(pl.String).drop_nulls().unique().to_list()
        new = [FIRST_ID + _bucket(v, feature.hash_buckets) for v in old]
    else:
        old, new = feature.vocab, list(range(FIRST_ID, FIRST_ID + len(feature.vocab)))
    text = pl.col(feature.name).cast(pl.String)
    mapped = text.replace_strict(
        pl.Series(old, dtype=pl.String), pl.Series(new, dtype=pl.Int32), default=OOV_ID, return_dtype=pl.Int32
    )
    return pl.when(text.is_null()).then(MISSING_ID).otherwise(mapped).cast(pl.Int32).alias(feature.name)


def encode_categorical(column: pl.Series, feature: CategoricalFeature) -> pl.Series:
    """Raw values -> int32 ids (see CategoricalFeature), one column."""
    return column.rename(feature.name).to_frame().select(categorical_expr(feature, column)).to_series()


def encode_numeric(values: pl.Series, feature: NumericFeature) -> pl.Series:
    x = values.fill_null(feature.fill_value).fill_nan(feature.fill_value)
    if feature.log1p:
        x = x.sign() * x.abs().log1p()
    return ((x - feature.center) / feature.scale).cast(pl.Float32).rename(feature.name)


def fit_numeric(name: str, values: pl.Series, options: NumericOptions) -> NumericFeature:
    """Fill value and scaling statistics, from the train rows given."""
    present = values.drop_nulls().drop_nans()
    if isinstance(options.fill, float | int):
        fill = float(options.fill)
    elif options.fill == "zero" or present.is_empty():
        fill = 0.0
    elif options.fill == "median":
        fill = float(present.median() or 0.0)  # type: ignore[arg-type]
    else:
        fill = float(present.mean() or 0.0)  # type: ignore[arg-type]
    steps = [t for t in options.transform if t != "none"]
    log1p = "log1p" in steps
    x = values.fill_null(fill).fill_nan(fill)
    if log1p:
        x = x.sign() * x.abs().log1p()
    center, scale = 0.0, 1.0
    if "standardize" in steps:
        center = float(x.mean() or 0.0)  # type: ignore[arg-type]
        scale = float(x.std(ddof=0) or 0.0) or 1.0  # type: ignore[arg-type]
    elif "minmax" in steps:
        low, high = float(x.min() or 0.0), float(x.max() or 0.0)  # type: ignore[arg-type]
        center, scale = low, (high - low) or 1.0
    return NumericFeature(name, fill, log1p, center, scale, [str(t) for t in steps])


def fit_categorical(name: str, train_values: pl.Series, min_count: int, hash_buckets: int | None) -> CategoricalFeature:
    if hash_buckets:
        return CategoricalFeature(name, [], min_count, hash_buckets)
    counts = (
        train_values.cast(pl.String)
        .drop_nulls()
        .value_counts(name="count")
        .filter(pl.col("count") >= min_count)
        .sort(["count", train_values.name], descending=[True, False])
    )
    return CategoricalFeature(name, counts.get_column(train_values.name).to_list(), min_count, None)


def preprocess(recipe: Recipe, out_dir: Path) -> DataSchema:
    """Read, label, split, fit on train, encode and write ``out_dir`` atomically."""
    key, source = data_key(recipe)
    frame = read_source(recipe)
    labels = make_labels(frame, recipe)
    categorical, numeric = choose_features(frame, recipe)
    is_train = frame.get_column(SPLIT_COLUMN) == 0
    defaults = recipe.features.defaults
    cat_specs = []
    for name in categorical:
        options = defaults.categorical
        if isinstance(recipe.features.categorical, dict):
            chosen = expand_columns(frame, list(recipe.features.categorical), "features.categorical")[name]
            options = recipe.features.categorical[chosen] or defaults.categorical
        cat_specs.append(
            fit_categorical(name, frame.get_column(name).filter(is_train), options.min_count, options.hash_buckets)
        )
    num_specs = []
    num_values = {}
    for name in numeric:
        values = _numeric(frame, name, f"features.numeric.{name}")
        num_values[name] = values
        listed = None
        if isinstance(recipe.features.numeric, dict):
            listed = recipe.features.numeric[
                expand_columns(frame, list(recipe.features.numeric), "features.numeric")[name]
            ]
        num_specs.append(fit_numeric(name, values.filter(is_train), listed or defaults.numeric))
    groups = [group_ids(frame, recipe.data.group)] if recipe.data.group else []
    encoded = pl.DataFrame(
        [encode_categorical(frame.get_column(f.name), f) for f in cat_specs]
        + [encode_numeric(num_values[f.name], f) for f in num_specs]
        + list(labels.iter_columns())
        + groups
        + [frame.get_column(SPLIT_COLUMN)]
    )
    tasks = [
        TaskInfo(
            name,
            spec.type,
            spec.label.column,
            spec.label.positive,
            spec.label.threshold,
            spec.space.task if spec.space else None,
            spec.space.column if spec.space else None,
        )
        for name, spec in recipe.tasks.items()
    ]
    splits = {}
    parts = {}
    for index, split in enumerate(SPLITS):
        part = encoded.filter(pl.col(SPLIT_COLUMN) == index).drop(SPLIT_COLUMN)
        parts[split] = part
        splits[split] = _split_info(part, cat_specs, tasks)
    empty = [name for name, values in num_values.items() if values.filter(is_train).drop_nulls().drop_nans().is_empty()]
    warnings = data_warnings(splits, tasks, empty)
    schema = DataSchema(cat_specs, num_specs, tasks, splits, source, key, group=recipe.data.group, warnings=warnings)
    with atomic_dir(out_dir) as tmp:
        for split, part in parts.items():
            part.write_parquet(tmp / f"{split}.parquet")
        schema.save(tmp / "schema.json")
    return schema


def group_ids(frame: pl.DataFrame, column: str) -> pl.Series:
    """``GROUP_COLUMN``: an int64 id per distinct value of ``column`` (data.group), -1 where missing."""
    _require_columns(frame, [column], "data.group")
    values = frame.get_column(column).cast(pl.String)
    return (values.rank("dense").cast(pl.Int64).fill_null(0) - 1).alias(GROUP_COLUMN)


def _split_info(part: pl.DataFrame, cats: list[CategoricalFeature], tasks: list[TaskInfo]) -> SplitInfo:
    rows = part.height
    means, positives, space_rows = {}, {}, {}
    for task in tasks:
        column = part.get_column(LABEL_PREFIX + task.name)
        if task.has_space:
            column = column.filter(part.get_column(MASK_PREFIX + task.name))
            space_rows[task.name] = column.len()
        means[task.name] = float(column.mean() or 0.0) if column.len() else 0.0  # type: ignore[arg-type]
        if task.type == "binary":
            positives[task.name] = int(column.sum()) if column.len() else 0
    oov = {}
    for feature in cats:
        ids = part.get_column(feature.name)
        present = int((ids != MISSING_ID).sum())
        oov[feature.name] = float((ids == OOV_ID).sum() / present) if present else 0.0
    return SplitInfo(rows, means, positives, oov, space_rows)


def cache_dir_for(recipe: Recipe, key: str) -> Path:
    return Path(recipe.data.cache_dir).expanduser() / key


def prepare(recipe: Recipe, out: Path | None = None, force: bool = False) -> Prepared:
    """The encoded data for ``recipe``: reused from the cache when its key matches, else built."""
    key, _ = data_key(recipe)
    directory = out if out is not None else cache_dir_for(recipe, key)
    schema_file = directory / "schema.json"
    if not force and schema_file.is_file():
        try:
            schema = DataSchema.load(schema_file)
            if schema.data_key == key and all((directory / f"{s}.parquet").is_file() for s in SPLITS):
                return Prepared(directory, schema, reused=True)
        except ArtifactError:
            pass
    return Prepared(directory, preprocess(recipe, directory), reused=False)


def load_split(directory: Path, split: str, schema: DataSchema) -> SplitTensors:
    """An encoded split as contiguous tensors (see Batch for the layout)."""
    path = directory / f"{split}.parquet"
    try:
        frame = pl.read_parquet(path)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: encoded split not found", "re-run `mtl preprocess`") from None
    except pl.exceptions.PolarsError as exc:
        raise ArtifactError(f"{path}: unreadable ({exc})", "re-run `mtl preprocess`") from None
    return tensors_from_frame(frame, schema)


def _label_mask(frame: pl.DataFrame, schema: DataSchema, labels: torch.Tensor) -> torch.Tensor:
    """bool [N, T]: True where the row is in the task's sample space (everywhere for most tasks)."""
    mask = torch.ones_like(labels, dtype=torch.bool)
    for k, task in enumerate(schema.tasks):
        if task.has_space:
            column = MASK_PREFIX + task.name
            if column not in frame.columns:
                raise ArtifactError(f"encoded data has no {column!r} column", "re-run `mtl preprocess`")
            mask[:, k] = torch.from_numpy(frame.get_column(column).to_numpy().astype(bool))
    return mask


def tensors_from_frame(frame: pl.DataFrame, schema: DataSchema) -> SplitTensors:
    cat_names = [f.name for f in schema.categorical]
    num_names = [f.name for f in schema.numeric]
    label_names = [LABEL_PREFIX + t for t in schema.task_names]
    missing = [c for c in [*cat_names, *num_names, *label_names] if c not in frame.columns]
    if missing:
        raise ArtifactError(
            f"encoded data does not match its schema (missing {missing[:5]})", "re-run `mtl preprocess`"
        )
    n = frame.height

    def block(names: list[str], dtype: Any, torch_dtype: torch.dtype) -> torch.Tensor:
        if not names:
            return torch.zeros((n, 0), dtype=torch_dtype)
        array = np.require(frame.select(names).to_numpy(), dtype=dtype, requirements=["C", "W"])
        return torch.from_numpy(array)

    labels = block(label_names, np.float32, torch.float32)
    groups = None
    if schema.group is not None:
        if GROUP_COLUMN not in frame.columns:
            raise ArtifactError(f"encoded data has no {GROUP_COLUMN!r} column", "re-run `mtl preprocess`")
        groups = torch.from_numpy(np.require(frame.get_column(GROUP_COLUMN).to_numpy(), np.int64, ["C", "W"]))
    return SplitTensors(
        categorical=block(cat_names, np.int64, torch.int64),
        numeric=block(num_names, np.float32, torch.float32),
        labels=labels,
        label_mask=_label_mask(frame, schema, labels),
        groups=groups,
    )
